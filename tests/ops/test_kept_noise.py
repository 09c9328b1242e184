"""The noise a reparameterize forward draws is kept for its backward up to
``functional.KEEP_NOISE_MAX`` elements (float32, float64), else regenerated from the seed
(docs/random-numbers.md, "Kept or regenerated"): same noise, same formula, so outputs and
gradients are bitwise the same on both sides of the threshold, on every backend, through the
dispatcher path and the Python path."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, device_for

import fastvae as fv
from fastvae.ops import custom_ops, functional, native_dispatch


def _fwd_bwd(backend, mu, lv, K, seed):
    mu, lv = mu.detach().requires_grad_(), lv.detach().requires_grad_()
    with fv.use_backend(backend):
        z = fv.reparameterize(mu, lv, seed=seed, n_samples=K)
        g = torch.linspace(-2, 2, z.numel(), dtype=z.dtype, device=z.device).view(z.shape)
        z.backward(g)
    return z.detach(), mu.grad, lv.grad


def _paths(backend):
    paths = ["python"]
    if backend == "cpu" and native_dispatch.unusable_reason() is None:
        paths.append("dispatcher")
    return paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_and_regenerated_bitwise(backend, K, dtype, monkeypatch):
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    B, N = 3, 5
    mu = torch.randn(B, N, generator=g, dtype=torch.float64).to(device, dtype)
    lv = (0.5 * torch.randn(B, N, generator=g, dtype=torch.float64)).to(device, dtype)
    results = {}
    for path in _paths(backend):
        with monkeypatch.context() as m:
            if path == "python":
                m.setattr(custom_ops, "NATIVE", {})
            for limit, kept in ((K * B * N, True), (K * B * N - 1, False)):  # at, just below
                m.setattr(functional, "KEEP_NOISE_MAX", limit)
                assert functional.keeps_noise(dtype, K * B * N) is kept
                results[path, kept] = _fwd_bwd(backend, mu, lv, K, 1234)
    first = next(iter(results.values()))
    for key, got in results.items():
        for a, b in zip(got, first, strict=True):
            assert a.dtype == b.dtype, key
            assert a.shape == b.shape, key
            assert torch.equal(a, b), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_forward_keeps_the_noise_and_the_backward_reads_it(backend, monkeypatch):
    """The op returns the noise it drew when asked (empty otherwise, and when eps is given), and
    its backward reads that noise, not the seed: given the kept noise and a wrong seed, the
    gradients are those of the right seed regenerated."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(2, 4, generator=g).to(device)
    lv = torch.randn(2, 4, generator=g).to(device)
    seed = torch.tensor([77], device=device)
    for path in _paths(backend):
        with monkeypatch.context() as m:
            if path == "python":
                m.setattr(custom_ops, "NATIVE", {})
            z, noise = custom_ops.call(custom_ops.reparameterize, mu, lv, None, seed, 2, True,
                                       backend)
            z_reg, none = custom_ops.call(custom_ops.reparameterize, mu, lv, None, seed, 2,
                                          False, backend)
            assert torch.equal(z, z_reg)
            assert none.shape == (0,)
            assert noise.shape == (2, 2, 4)
            assert noise.dtype == mu.dtype
            # the noise is the stream itself: z of mu = 0, logvar = 0
            zero = torch.zeros_like(mu)
            eps, _ = custom_ops.call(custom_ops.reparameterize, zero, zero, None, seed, 2, False,
                                     backend)
            assert torch.equal(noise, eps)
            _, given = custom_ops.call(custom_ops.reparameterize, mu, lv, eps, None, 2, True,
                                       backend)
            assert given.shape == (0,)  # eps given: nothing to keep
            gz = torch.linspace(-1, 1, 16, device=device).view(2, 2, 4)
            needs = [True, True, False]
            wrong = torch.tensor([78], device=device)
            kept = custom_ops.call(custom_ops.reparameterize_backward, gz, noise, mu, lv, None,
                                   wrong, backend, needs)
            regen = custom_ops.call(custom_ops.reparameterize_backward, gz, none, mu, lv, None,
                                    seed, backend, needs)
            for a, b in zip(kept, regen, strict=True):
                assert torch.equal(a, b), path


def test_the_size_rule():
    limit = functional.KEEP_NOISE_MAX
    assert functional.keeps_noise(torch.float32, limit)
    assert functional.keeps_noise(torch.float64, 1)
    assert not functional.keeps_noise(torch.float32, limit + 1)
    # half precision: a kept copy would round the float32 noise, so it is regenerated
    assert not functional.keeps_noise(torch.float16, 1)
    assert not functional.keeps_noise(torch.bfloat16, 1)
