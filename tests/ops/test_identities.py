"""The drop-in identities (README) on every backend, and the reference formulas (the oracle of
the other tests) against torch's own distributions and losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

import fastvae as fv
from fastvae.ops import reference

IDENTITY_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
                torch.float64: dict(rtol=1e-12, atol=1e-12)}
SHAPES = [(7, 13), (2, 3, 4, 5), (6,)]


def _inputs(shape, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=dtype)).to(device).requires_grad_()


def _targets(shape, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, dtype=dtype)
    x[..., ::2] = x[..., ::2].round()  # binary and continuous targets
    return x.to(device).requires_grad_()


def _value_and_grads(loss, inputs):
    return loss.detach(), torch.autograd.grad(loss, inputs)


def _assert_same(ours, theirs, dtype):
    (value, grads), (value_ref, grads_ref) = ours, theirs
    torch.testing.assert_close(value, value_ref, **IDENTITY_TOL[dtype])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **IDENTITY_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bernoulli_nll_is_bce_with_logits(shape, dtype, backend, device):
    """fv.bernoulli_nll(l, x, reduction="sum") == F.binary_cross_entropy_with_logits(l, x,
    reduction="sum"), values and gradients (logits and targets)."""
    logits, target = _inputs(shape, dtype, device, scale=4.0), _targets(shape, dtype, device)
    ours = _value_and_grads(fv.bernoulli_nll(logits, target, reduction="sum"), (logits, target))
    theirs = _value_and_grads(
        F.binary_cross_entropy_with_logits(logits, target, reduction="sum"), (logits, target))
    _assert_same(ours, theirs, dtype)
    # "mean" is the batch mean of per-sample sums (docs/conventions.md), not torch's mean over
    # elements.
    mean = fv.bernoulli_nll(logits, target)
    torch.testing.assert_close(mean, theirs[0] / shape[0], **IDENTITY_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gaussian_kl_is_the_classic_formula(shape, dtype, backend, device):
    """fv.gaussian_kl(mu, lv, reduction="sum") == -0.5 * torch.sum(1 + lv - mu**2 - lv.exp()),
    values and gradients."""
    mu, logvar = _inputs(shape, dtype, device), _inputs(shape, dtype, device, 0.8, seed=1)
    ours = _value_and_grads(fv.gaussian_kl(mu, logvar, reduction="sum"), (mu, logvar))
    theirs = _value_and_grads(-0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp()),
                              (mu, logvar))
    _assert_same(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_identities_half_precision(dtype, backend, device):
    """Half-precision inputs compute in float32: the identities hold against the float32
    formulas on the upcast inputs, to float32 rounding."""
    logits, target = (_inputs((7, 13), dtype, device, 4.0).detach(),
                      _targets((7, 13), dtype, device).detach())
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="sum")
    torch.testing.assert_close(fv.bernoulli_nll(logits, target, reduction="sum"), bce,
                               rtol=1e-5, atol=1e-5)
    mu, lv = _inputs((7, 13), dtype, device).detach(), _inputs((7, 13), dtype, device, 0.8).detach()
    mu, lv = mu.float(), lv.float()
    kl = -0.5 * torch.sum(1 + lv - mu**2 - lv.exp())
    torch.testing.assert_close(fv.gaussian_kl(mu.to(dtype), lv.to(dtype), reduction="sum"), kl,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The reference (oracle) against torch.distributions and torch.nn.functional, in float64
# ---------------------------------------------------------------------------------------------


def _f64(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


def test_reference_kl_is_torch_distributions_kl():
    mu, lv, pm, plv = _f64(5, 7), _f64(5, 7, scale=0.8, seed=1), _f64(7, seed=2), _f64(7, seed=3)
    q = Normal(mu, torch.exp(0.5 * lv))
    expected = kl_divergence(q, Normal(pm, torch.exp(0.5 * plv))).sum(1)
    torch.testing.assert_close(reference.gaussian_kl(mu, lv, pm, plv, reduction="none"),
                               expected, rtol=1e-12, atol=1e-12)
    standard = kl_divergence(q, Normal(torch.zeros(()), torch.ones(()))).sum(1)
    torch.testing.assert_close(reference.gaussian_kl(mu, lv, reduction="none"), standard,
                               rtol=1e-12, atol=1e-12)
    # Numbers as priors; prior_mu alone; prior_logvar alone.
    torch.testing.assert_close(
        reference.gaussian_kl(mu, lv, 0.5, -1.0, reduction="sum"),
        kl_divergence(q, Normal(torch.tensor(0.5), math.exp(-0.5) * torch.ones(()))).sum())
    torch.testing.assert_close(reference.gaussian_kl(mu, lv, pm, reduction="none"),
                               kl_divergence(q, Normal(pm, torch.ones(()))).sum(1))
    torch.testing.assert_close(reference.gaussian_kl(mu, lv, None, plv, reduction="none"),
                               kl_divergence(q, Normal(torch.zeros(()),
                                                       torch.exp(0.5 * plv))).sum(1))


def test_reference_free_bits_is_the_definition():
    """Each latent dimension's batch-mean KL floored at λ, then summed (Kingma et al. 2016)."""
    mu, lv = _f64(6, 5, scale=0.3), _f64(6, 5, scale=0.3, seed=1)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * lv)), Normal(0.0, 1.0))  # (B, N)
    lam = 0.07
    expected = sum(max(kl[:, j].mean().item(), lam) for j in range(kl.shape[1]))
    assert 0 < (kl.mean(0) < lam).sum() < kl.shape[1]  # some dimensions floored, not all
    torch.testing.assert_close(reference.gaussian_kl(mu, lv, free_bits=lam).item(), expected)
    torch.testing.assert_close(reference.gaussian_kl(mu, lv, free_bits=lam, reduction="sum"
                                                     ).item(), 6 * expected)


def test_reference_bernoulli_is_torch_distributions():
    logits, x = _f64(4, 9, scale=5.0), torch.rand(4, 9, dtype=torch.float64).round()
    expected = -Bernoulli(logits=logits).log_prob(x).sum(1)
    torch.testing.assert_close(reference.bernoulli_nll(logits, x, reduction="none"), expected,
                               rtol=1e-12, atol=1e-12)
    # Continuous targets: binary cross-entropy.
    xc = torch.rand(4, 9, dtype=torch.float64)
    torch.testing.assert_close(
        reference.bernoulli_nll(logits, xc, reduction="sum"),
        F.binary_cross_entropy_with_logits(logits, xc, reduction="sum"), rtol=1e-12, atol=1e-12)


def test_reference_gaussian_nll_is_torch_distributions():
    m, x, lv = _f64(4, 9), _f64(4, 9, seed=1), _f64(9, scale=0.7, seed=2)
    expected = -Normal(m, torch.exp(0.5 * lv)).log_prob(x).sum(1)
    torch.testing.assert_close(reference.gaussian_nll(m, x, lv, reduction="none"), expected,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.gaussian_nll(m, x, 0.3, reduction="none"),
                               -Normal(m, math.exp(0.15)).log_prob(x).sum(1))
    torch.testing.assert_close(
        reference.gaussian_nll(m, x, lv, reduction="sum"),
        F.gaussian_nll_loss(m, x, torch.exp(lv).expand(4, 9), full=True, reduction="sum"))


def test_reference_reparameterize_and_vae_loss():
    mu, lv, eps = _f64(3, 4), _f64(3, 4, seed=1), _f64(2, 3, 4, seed=2)
    torch.testing.assert_close(reference.reparameterize(mu, lv, eps=eps, n_samples=2),
                               mu + torch.exp(0.5 * lv) * eps)
    z = reference.reparameterize(mu, lv, seed=5)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * reference.noise(5, (3, 4), "cpu"))
    recon, x = _f64(3, 6, seed=3), torch.rand(3, 6, dtype=torch.float64)
    for likelihood, nll in (("bernoulli", F.binary_cross_entropy_with_logits(
            recon, x, reduction="sum")), ("gaussian", reference.gaussian_nll(
                recon, x, 0.0, reduction="sum"))):
        kl = -0.5 * torch.sum(1 + lv - mu**2 - lv.exp())
        torch.testing.assert_close(
            reference.vae_loss(recon, x, mu, lv, likelihood=likelihood, beta=0.3,
                               reduction="sum"), nll + 0.3 * kl)


def test_reference_gradient_formulas_are_the_derivatives():
    """The closed-form gradients that the "torch" backend uses are the derivatives of the
    per-element formulas (Bernoulli: of torch's BCE, the max/abs form is not differentiable
    at 0)."""
    mu, lv, pm, plv = (_f64(4, 5, seed=s).requires_grad_() for s in range(4))
    kl = reference.kl_elementwise(mu, lv, pm, plv)
    expected = torch.autograd.grad(kl.sum(), (mu, lv, pm, plv))
    for got, want in zip(reference.kl_grads(mu, lv, pm, plv), expected, strict=True):
        torch.testing.assert_close(got, want)
    kl = reference.kl_elementwise(mu, lv)
    for got, want in zip(reference.kl_grads(mu, lv)[:2], torch.autograd.grad(kl.sum(), (mu, lv)),
                         strict=True):
        torch.testing.assert_close(got, want)
    logits = torch.tensor([[-30.0, -1.0, 0.0, 0.0, 2.0, 30.0]], dtype=torch.float64,
                          requires_grad=True)
    x = torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.3, 0.0]], dtype=torch.float64, requires_grad=True)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    for got, want in zip(reference.bernoulli_nll_grads(logits, x),
                         torch.autograd.grad(bce, (logits, x)), strict=True):
        torch.testing.assert_close(got, want)
    m, t, v = (_f64(4, 5, seed=s).requires_grad_() for s in range(3))
    nll = reference.gaussian_nll_elementwise(m, t, v)
    for got, want in zip(reference.gaussian_nll_grads(m, t, v),
                         torch.autograd.grad(nll.sum(), (m, t, v)), strict=True):
        torch.testing.assert_close(got, want)


def test_reference_expm1mx_is_accurate_in_float32():
    """expm1(x) - x without cancellation: relative accuracy in float32 across the range."""
    x64 = torch.cat([-torch.logspace(-10, 1.9, 200, dtype=torch.float64),
                     torch.logspace(-10, 1.9, 200, dtype=torch.float64)])
    x32 = x64.float()
    exact = torch.where(x32.double().abs() < 1e-3,
                        x32.double() ** 2 / 2 * (1 + x32.double() / 3 + x32.double() ** 2 / 12),
                        torch.expm1(x32.double()) - x32.double())
    torch.testing.assert_close(reference.expm1mx(x32).double(), exact, rtol=2e-6, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_continuous_bernoulli_nll_is_torch_distributions(reduction, backend, device):
    """fv.continuous_bernoulli_nll == -ContinuousBernoulli(logits=l).log_prob(x) summed over the
    event, values and gradients, in float64 for |l| <= 10 (where torch's is accurate)."""
    g = torch.Generator().manual_seed(3)
    logits = (3.0 * torch.randn(6, 17, generator=g, dtype=torch.float64)).clamp(-10, 10)
    target = torch.rand(6, 17, generator=g, dtype=torch.float64)
    target[:, ::3] = target[:, ::3].round()
    leaves = [t.to(device).requires_grad_() for t in (logits, target)]
    ours = fv.continuous_bernoulli_nll(*leaves, reduction=reduction)
    dist = torch.distributions.ContinuousBernoulli(logits=leaves[0], validate_args=False)
    theirs = -dist.log_prob(leaves[1]).sum(1)
    theirs = theirs.sum() if reduction == "sum" else theirs
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    upstream = torch.ones_like(ours)
    for a, b in zip(torch.autograd.grad(ours, leaves, upstream),
                    torch.autograd.grad(theirs, leaves, upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
