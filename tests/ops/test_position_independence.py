"""An element's result does not depend on where it sits in the call: the CPU kernels' vector loops
and their scalar remainders (calls of a few elements) round every element the same way. GCC's
contraction of a multiply and an add into an FMA chooses between two products by the order of
its IR, which differs between the two loops; fastvae_math.h writes such sums with ``fmadd_`` and
selects before multiplying (std_times), and this test holds the ops to it: the same inputs in
calls of 1 to 40 elements and at the end of a call of 4096, per CPU kernel set, float32 and
float64, bitwise equal values (rows of one element) and gradients (one row)."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv
from fastvae.ops import native as _native

pytestmark = pytest.mark.skipif(_native.unusable_reason("cpu") is not None,
                                reason=f"native library: {_native.unusable_reason('cpu')}")

M = 40


def _inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, generator=g, dtype=torch.float64) * 3
    a[:8] = torch.tensor([0.38730422, -0.25778311, 1e-3, -0.3466, 1.04, 50.0, -90.0, 89.4])
    return {"a": a.to(dtype), "b": torch.rand(M, generator=g, dtype=torch.float64).to(dtype),
            "c": (torch.randn(M, generator=g, dtype=torch.float64) * 2).to(dtype),
            "d": torch.randn(M, generator=g, dtype=torch.float64).to(dtype)}


OPS = {  # name: (the call, the inputs it differentiates)
    "gaussian_kl": (lambda t: fv.gaussian_kl(t["a"], t["c"], reduction="none"), "ac"),
    "gaussian_kl_prior": (lambda t: fv.gaussian_kl(t["a"], t["c"], t["d"], t["b"],
                                                   reduction="none"), "acdb"),
    "bernoulli_nll": (lambda t: fv.bernoulli_nll(t["a"], t["b"], reduction="none"), "ab"),
    "continuous_bernoulli_nll": (lambda t: fv.continuous_bernoulli_nll(t["a"], t["b"],
                                                                       reduction="none"), "ab"),
    "gaussian_nll": (lambda t: fv.gaussian_nll(t["a"], t["b"], t["c"], reduction="none"), "abc"),
    "reparameterize": (lambda t: fv.reparameterize(t["a"], t["c"], eps=t["d"]), "acd"),
}


def _run(op: str, values: dict[str, torch.Tensor], n: int, padded: bool, column: bool):
    """The last n results of op on the first n values, alone or after 4096 - n others."""
    call, differentiated = OPS[op]
    vals = {k: v[:n] for k, v in values.items()}
    if padded:
        vals = {k: torch.cat([torch.full((4096 - n,), 0.3, dtype=v.dtype), v])
                for k, v in vals.items()}
    t = {k: (v[:, None] if column else v[None, :]).clone().requires_grad_()
         for k, v in vals.items()}
    out = call(t)
    grads = torch.autograd.grad(out.sum(), [t[k] for k in differentiated])
    return out.detach().flatten()[-n:], [g.flatten()[-n:] for g in grads]


@pytest.fixture(params=_native.cpu_isas() if _native.unusable_reason("cpu") is None else [])
def isa(request):
    before = fv.get_backend()
    fv.set_backend("cpu")
    _native.set_cpu_isa(request.param)
    yield request.param
    _native.set_cpu_isa("auto")
    fv.set_backend(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", sorted(OPS))
def test_same_bits_wherever_an_element_sits(isa, op, dtype):
    values = _inputs(dtype)
    for n in range(1, M + 1):
        for column in (True, False):  # rows of one element (values), one row (gradients)
            alone, alone_grads = _run(op, values, n, False, column)
            padded, padded_grads = _run(op, values, n, True, column)
            if column or op == "reparameterize":
                assert torch.equal(alone, padded), (n, column)
            for i, (x, y) in enumerate(zip(alone_grads, padded_grads, strict=True)):
                assert torch.equal(x, y), (n, column, i)
