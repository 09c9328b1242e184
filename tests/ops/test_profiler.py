"""torch.profiler traces name every fastvae op, forward and backward, on the eager fast path
(which skips the dispatcher that names ops otherwise) as under the dispatcher."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastvae as fv
from fastvae.ops import custom_ops


def _every_op(device):
    """Forward and backward of every fastvae op (a new op goes here)."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    mu, logvar, logits = leaf(3, 4), leaf(3, 4), leaf(3, 5)
    target = torch.rand(3, 5, generator=g).to(device)
    log_px, z = leaf(2, 3), leaf(2, 3, 4)
    z_sample, kl = fv.sample_and_kl(mu, logvar, seed=1)
    losses = (fv.reparameterize(mu, logvar, seed=2).sum(), fv.gaussian_kl(mu, logvar),
              fv.bernoulli_nll(logits, target), fv.gaussian_nll(logits, target, 0.5),
              z_sample.sum() + kl, fv.iwae_log_likelihood(log_px, z, mu, logvar).sum(),
              fv.continuous_bernoulli_nll(logits, target))
    params = leaf(2, 6, 3)  # discretized mixture of logistics: M = 2, C = 1, 3 pixels
    x = torch.randint(0, 256, (2, 1, 3), generator=g).to(device) * (2.0 / 255.0) - 1.0
    losses = (*losses, fv.discretized_mix_logistic_nll(params, x, n_mixtures=2))
    fv.nearest_code(leaf(5, 4), leaf(3, 4))  # no backward: not differentiable
    codes, _ = fv.finite_scalar_quantize(leaf(5, 3), [8, 5, 5])
    losses = (*losses, codes.sum())
    torch.stack(losses).sum().backward()


@pytest.mark.parametrize("path", ["eager", "dispatcher"])
def test_profiler_names_every_op(path, backend, device, monkeypatch):
    if path == "dispatcher":  # what tracing and tensor subclasses take
        monkeypatch.setattr(custom_ops, "_eager_tensors", lambda args: False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _every_op(device)
    names = {e.name for e in prof.events()}
    expected = set(custom_ops._NAME.values())  # every registered op, forward and backward
    assert expected <= names, f"not in the trace: {sorted(expected - names)}"
