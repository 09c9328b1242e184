"""``fv.gaussian_kl_per_dim``: the batch-mean KL of each latent dimension, with its gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, loss_dtype, to_oracle

import fastvae as fv
from fastvae.ops import reference


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.empty(shape, dtype=torch.float64).uniform_(-3, 2, generator=g)
    return (mu.to(dtype).to(device).requires_grad_(),
            logvar.to(dtype).to(device).requires_grad_())


@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 3, 2), (1, 6), (4, 1)])
@pytest.mark.parametrize("prior", ["standard", "per_dim"])
def test_kl_per_dim_values_and_gradients(backend, device, dtype, shape, prior):
    mu, logvar = _inputs(shape, dtype, device)
    priors = ()
    if prior == "per_dim":
        priors = _inputs(shape[1:], dtype, device, seed=1)
    kl = fv.gaussian_kl_per_dim(mu, logvar, *priors)
    assert kl.shape == shape[1:]
    assert kl.dtype == loss_dtype(dtype)
    leaves = [to_oracle(t) for t in (mu, logvar, *priors)]
    expected = reference.kl_elementwise(*leaves).mean(0)
    assert_close(kl, expected)
    w = torch.linspace(0.5, 1.5, kl.numel(), dtype=kl.dtype, device=kl.device).view(kl.shape)
    inputs = (mu, logvar, *priors)
    grads = torch.autograd.grad((kl * w).sum(), inputs)
    want = torch.autograd.grad((expected * w.double().cpu()).sum(), leaves)
    for t, g_a, g_e in zip(inputs, grads, want, strict=True):
        assert g_a.dtype == t.dtype
        assert_close(g_a, g_e, dtype=dtype)


def test_kl_per_dim_sums_to_the_kl_and_gives_free_bits(backend, device):
    mu, logvar = _inputs((6, 5), torch.float64, device)
    per_dim = fv.gaussian_kl_per_dim(mu, logvar)
    torch.testing.assert_close(per_dim.sum(), fv.gaussian_kl(mu, logvar))
    lam = float(per_dim.detach().median())
    mine = torch.clamp_min(per_dim, lam).sum()
    theirs = fv.gaussian_kl(mu, logvar, free_bits=lam)
    torch.testing.assert_close(mine, theirs)
    for a, b in zip(torch.autograd.grad(mine, (mu, logvar)),
                    torch.autograd.grad(theirs, (mu, logvar)), strict=True):
        torch.testing.assert_close(a, b)


def test_kl_per_dim_empty_batch_and_errors():
    mu = torch.zeros(0, 3)
    assert torch.isnan(fv.gaussian_kl_per_dim(mu, mu)).all()
    with pytest.raises(ValueError, match="logvar"):
        fv.gaussian_kl_per_dim(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="logvar"):
        fv.gaussian_kl_per_dim(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="prior_mu"):
        fv.gaussian_kl_per_dim(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4))
