"""The VAE API: the model's methods and shapes, the IWAE estimator, the soft clamp of the
log-variance. (Training and checkpoints: training/test_trainer.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastvae as fv
from fastvae.models.vae import VAE, active_units, build_vae


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(digits, trained):
    _, val_x = digits
    model = trained.model.eval()
    torch.manual_seed(1)
    elbo = -model.anomaly_score(val_x).double().mean()
    repeats = {1: 10, 30: 10, 1000: 1}  # average away the estimator's noise (~0.01 per run)
    ll = {k: torch.stack([model.log_likelihood(val_x, n_samples=k).double().mean()
                          for _ in range(r)]).mean() for k, r in repeats.items()}
    # K = 1 is an unbiased ELBO estimate; the bound tightens (grows) with K, quickly at first
    # (this small model's posterior is good: the bound saturates near K = 30)
    assert abs(ll[1] - elbo) < 0.2
    assert ll[30] > ll[1] + 0.05
    assert ll[1000] > ll[30] - 0.015


class _Affine(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, z):
        return z @ self.weight.T + self.bias


def _linear_gaussian(perturb: float):
    """p(z) = N(0, I), p(x|z) = N(W z + b, s2 I) with orthogonal columns of W, so that the true
    posterior is diagonal: q = N(W^T (x - b) / (s2 + c), s2 / (s2 + c)) with c = |w_j|^2."""
    torch.manual_seed(0)
    d_x, d_z, s2 = 6, 3, 0.5
    q, _ = torch.linalg.qr(torch.randn(d_x, d_z, dtype=torch.float64))
    col_sq = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    weight = q * col_sq.sqrt()
    bias = torch.randn(d_x, dtype=torch.float64)

    class Posterior(nn.Module):
        def forward(self, x):
            mu = ((x - bias) @ weight) / (s2 + col_sq) * (1 + perturb)
            logvar = torch.log(s2 / (s2 + col_sq)).expand_as(mu) + perturb
            return mu, logvar

    model = VAE(Posterior(), _Affine(weight, bias), d_z, likelihood="gaussian",
                obs_logvar=math.log(s2)).double()
    marginal = torch.distributions.MultivariateNormal(
        bias, weight @ weight.T + s2 * torch.eye(d_x, dtype=torch.float64))
    x = marginal.sample((5,))
    return model, x, marginal.log_prob(x)


def test_iwae_is_exact_with_the_true_posterior():
    model, x, exact = _linear_gaussian(perturb=0.0)
    # with q equal to the true posterior every importance weight is p(x): exact for any K
    torch.testing.assert_close(model.log_likelihood(x, n_samples=3), exact, rtol=0, atol=1e-9)


def test_iwae_converges_to_the_marginal_with_streamed_k():
    model, x, exact = _linear_gaussian(perturb=0.3)
    torch.manual_seed(0)
    estimate = model.log_likelihood(x, n_samples=5000, chunk_size=700)
    elbo = -model.anomaly_score(x)
    assert (estimate - exact).abs().max() < 0.05
    assert (exact - elbo).mean() > 0.1  # the perturbed posterior leaves a real ELBO gap


def test_vae_methods_shapes_and_endpoints(trained, digits):
    model = trained.model.eval()
    _, val_x = digits
    x = val_x[:5]
    out = model(x, reduction="none")
    assert out.loss.shape == out.nll.shape == out.kl.shape == (5,)
    assert out.z.shape == out.mu.shape == out.logvar.shape == (5, 4)
    assert out.recon.shape == x.shape
    torch.testing.assert_close(out.loss, out.nll + out.kl)
    assert model.sample(7).shape == (7, 1, 8, 8)
    assert model.reconstruct(x).shape == x.shape
    for method in ("linear", "slerp"):
        path = model.interpolate(x[:2], x[2:4], steps=5, method=method)
        assert path.shape == (5, 2, 1, 8, 8)
        torch.testing.assert_close(path[0], model.reconstruct(x[:2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(path[-1], model.reconstruct(x[2:4]), rtol=1e-5, atol=1e-5)
    assert model.anomaly_score(x).shape == (5,)
    assert model.kl_per_dimension(x).shape == (4,)
    with pytest.raises(ValueError, match="method"):
        model.interpolate(x[:1], x[1:2], method="cubic")


def test_active_units_counts_variance_above_threshold():
    mu = torch.stack([torch.linspace(-1, 1, 100), torch.full((100,), 3.0),
                      0.05 * torch.linspace(-1, 1, 100)], 1)
    count, variance = active_units(mu)
    assert count == 1
    assert variance.shape == (3,)


def test_conv_vae_shapes():
    for shape in ([1, 8, 8], [3, 28, 28], [1, 7, 9]):
        model = build_vae(shape, 3, arch="conv", hidden=[8, 16])
        out = model(torch.rand(2, *shape))
        assert out.recon.shape == (2, *shape)


def test_vae_loss_matches_functional(trained, digits):
    _, val_x = digits
    model = trained.model
    x = val_x[:8]
    out = model(x, seed=3)
    mu, logvar = model.encode(x)
    z = fv.reparameterize(mu, logvar, seed=3)
    torch.testing.assert_close(out.z, z)
    expected = fv.vae_loss(model.decode(z), x, mu, logvar)
    torch.testing.assert_close(out.loss, expected)


def test_logvar_soft_clamp():
    model = build_vae([4], 2, hidden=[8], logvar_limit=3.0)
    with torch.no_grad():
        model.encoder[-1].bias.fill_(50.0)  # a runaway log-variance
    _, logvar = model.encode(torch.rand(5, 4))
    assert logvar.max() <= 3.0
    assert logvar.min() > 2.9
    with pytest.raises(ValueError, match="logvar_limit"):
        build_vae([4], 2, logvar_limit=0.0)
