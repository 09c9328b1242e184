"""The likelihoods of one target per element (Bernoulli, continuous Bernoulli, Gaussian) share the
two Triton kernels of ``kernels/_likelihood.py``, each op passing its own per-element formulas
as ``tl.constexpr`` functions; the shared path gives what the op's formulas give, and a second
parameter given as one float is the same as that float broadcast as a tensor."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif("triton" not in fv.backends(), reason="needs Triton")

from fastvae.kernels import _likelihood  # noqa: E402

K = fv.kernels


def _calls(B: int = 3, N: int = 5):
    g = torch.Generator().manual_seed(0)
    a, x = torch.randn(B, N, generator=g), torch.rand(B, N, generator=g)
    lv = torch.randn(B, N, generator=g)
    grad = torch.ones(B)
    return {
        "bernoulli_nll": (lambda: K.bernoulli_nll_fwd(a, x),
                          lambda: K.bernoulli_nll_bwd(grad, a, x, [True, True])),
        "continuous_bernoulli_nll": (lambda: K.continuous_bernoulli_nll_fwd(a, x),
                                     lambda: K.continuous_bernoulli_nll_bwd(grad, a, x,
                                                                            [True, True])),
        "gaussian_nll": (lambda: K.gaussian_nll_fwd(a, x, lv, 0.0),
                         lambda: K.gaussian_nll_bwd(grad, a, x, lv, 0.0, [True, True, True])),
    }


def test_every_likelihood_launches_the_shared_kernels_with_its_own_formulas(monkeypatch):
    launched = []
    monkeypatch.setattr(_likelihood, "launch",
                        lambda op, kernel, grid, *args, **meta: launched.append(
                            (op, kernel, meta.get("VALUE", meta.get("GRADS")))))
    for name, (fwd, bwd) in _calls().items():
        fwd()
        bwd()
        assert getattr(K, f"{name}_fwd").__name__ == f"{name}_fwd"
    ops = [op for op, _, _ in launched]
    assert ops == [f"fastvae::{n}{s}" for n in _calls() for s in ("", "_backward")]
    assert [k for _, k, _ in launched] == [_likelihood._likelihood_fwd_kernel,
                                           _likelihood._likelihood_bwd_kernel] * 3
    formulas = [f for _, _, f in launched]
    assert len(set(map(id, formulas))) == len(formulas)  # one value and one gradient per op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_second_parameter_as_one_float_is_that_float_everywhere(dtype):
    g = torch.Generator().manual_seed(1)
    mean, target = (torch.randn(4, 7, generator=g, dtype=dtype) for _ in range(2))
    full = torch.full_like(mean, -0.75)
    grad = torch.rand(4, generator=g, dtype=dtype)
    assert torch.equal(K.gaussian_nll_fwd(mean, target, None, -0.75),
                       K.gaussian_nll_fwd(mean, target, full, 0.0))
    for got, want in zip(K.gaussian_nll_bwd(grad, mean, target, None, -0.75, [True, True, False]),
                         K.gaussian_nll_bwd(grad, mean, target, full, 0.0, [True, True, True]),
                         strict=False):
        assert torch.equal(got, want)
