"""The torch.nn-style loss modules: the functional ops behind an nn.Module interface."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastvae as fv


def _t(*shape, seed=0, scale=1.0, unit=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) if unit else scale * torch.randn(shape, generator=g)
    return x.to(device).requires_grad_()


def _same(module_out, functional_out, inputs):
    torch.testing.assert_close(module_out, functional_out, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(module_out.sum(), inputs, retain_graph=True),
                    torch.autograd.grad(functional_out.sum(), inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bernoulli_module(reduction, backend, device):
    logits, target = _t(5, 8, scale=3.0, device=device), _t(5, 8, unit=True, device=device)
    loss = fv.BernoulliNLLLoss(reduction=reduction)
    _same(loss(logits, target), fv.bernoulli_nll(logits, target, reduction=reduction),
          (logits, target))
    if reduction == "sum":  # a drop-in for nn.BCEWithLogitsLoss(reduction="sum")
        torch.testing.assert_close(loss(logits, target),
                                   nn.BCEWithLogitsLoss(reduction="sum")(logits, target))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gaussian_nll_module(reduction, backend, device):
    mean, target = _t(5, 8, device=device), _t(5, 8, seed=1, device=device)
    per_feature = _t(8, seed=2, scale=0.5, device=device)
    default = fv.GaussianNLLLoss(reduction=reduction)
    _same(default(mean, target), fv.gaussian_nll(mean, target, 0.0, reduction=reduction),
          (mean, target))
    fixed = fv.GaussianNLLLoss(logvar=0.7, reduction=reduction)
    _same(fixed(mean, target), fv.gaussian_nll(mean, target, 0.7, reduction=reduction),
          (mean, target))
    # logvar given to forward overrides the module's, as a float or a (learned) tensor.
    _same(fixed(mean, target, logvar=-0.2),
          fv.gaussian_nll(mean, target, -0.2, reduction=reduction), (mean, target))
    _same(fixed(mean, target, logvar=per_feature),
          fv.gaussian_nll(mean, target, per_feature, reduction=reduction),
          (mean, target, per_feature))


@pytest.mark.parametrize(("reduction", "free_bits"), [("mean", 0.0), ("sum", 0.0),
                                                      ("none", 0.0), ("mean", 0.4),
                                                      ("sum", 0.4)])
def test_gaussian_kl_module(reduction, free_bits, backend, device):
    mu, logvar = _t(5, 8, device=device), _t(5, 8, seed=1, scale=0.5, device=device)
    prior_mu, prior_logvar = _t(8, seed=2, device=device), _t(8, seed=3, device=device)
    loss = fv.GaussianKLLoss(reduction=reduction, free_bits=free_bits)
    _same(loss(mu, logvar), fv.gaussian_kl(mu, logvar, reduction=reduction,
                                           free_bits=free_bits), (mu, logvar))
    _same(loss(mu, logvar, prior_mu, prior_logvar),
          fv.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=reduction,
                         free_bits=free_bits), (mu, logvar, prior_mu, prior_logvar))


def test_modules_are_plain_losses():
    """No parameters or state; a readable repr; usable wherever an nn loss is."""
    for module, text in ((fv.BernoulliNLLLoss(), "reduction='mean'"),
                         (fv.GaussianNLLLoss(logvar=0.5, reduction="sum"), "logvar=0.5"),
                         (fv.GaussianKLLoss(free_bits=0.25), "free_bits=0.25")):
        assert isinstance(module, nn.Module)
        assert list(module.parameters()) == []
        assert module.state_dict() == {}
        assert text in repr(module)


def test_training_with_the_modules(backend, device):
    """A small VAE trained with the modules (and sample_and_kl) lowers its loss."""
    torch.manual_seed(0)
    data = (torch.rand(64, 12) < torch.linspace(0.1, 0.9, 12)).float().to(device)
    encoder, decoder = nn.Linear(12, 2 * 3).to(device), nn.Linear(3, 12).to(device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.05)
    recon_loss, kl_loss = fv.BernoulliNLLLoss(reduction="mean"), fv.GaussianKLLoss()

    def loss_at(seed):
        mu, logvar = encoder(data).chunk(2, dim=1)
        z = fv.reparameterize(mu, logvar, seed=seed)
        return recon_loss(decoder(z), data) + kl_loss(mu, logvar)

    start = loss_at(0).item()
    for step in range(25):
        optimizer.zero_grad()
        loss = loss_at(step + 1)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
    assert loss_at(0).item() < start - 0.5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_continuous_bernoulli_module(reduction, backend, device):
    logits, target = _t(5, 8, scale=3.0, device=device), _t(5, 8, unit=True, device=device)
    loss = fv.ContinuousBernoulliNLLLoss(reduction=reduction)
    assert repr(loss) == f"ContinuousBernoulliNLLLoss(reduction={reduction!r})"
    _same(loss(logits, target),
          fv.continuous_bernoulli_nll(logits, target, reduction=reduction), (logits, target))
