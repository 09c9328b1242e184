"""The VAE API where a new user stumbled: one moments tensor, slerp near opposite endpoints, a
repeatable anomaly score, Bernoulli data outside [0, 1], a learned observation variance that
collapses, data of another dtype than the decoder's output, checkpoints at the top level."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastvae as fv
from fastvae.training.data import DataError


class _Moments(nn.Module):
    """An encoder returning one fixed moments tensor, whatever the input."""

    def __init__(self, moments: torch.Tensor) -> None:
        super().__init__()
        self.moments = nn.Parameter(moments)

    def forward(self, x):
        return self.moments


def test_one_moments_tensor_splits_on_dim_1():
    """(B, 2C, H, W) for a latent (C, H, W): mean = channels [0, C), log-variance [C, 2C),
    the latent-diffusion layout (it was split on W)."""
    moments = torch.randn(2, 8, 3, 6)
    model = fv.VAE(_Moments(moments), nn.Identity(), (4, 3, 6), likelihood="gaussian")
    mu, logvar = model.encode(torch.zeros(2, 1))
    torch.testing.assert_close(mu, moments[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(logvar, moments[:, 4:], rtol=0, atol=0)
    # a flat head for a shaped latent, and a flat latent, split on dim 1 as before
    flat = torch.randn(2, 2 * 4 * 3 * 6)
    mu, logvar = fv.VAE(_Moments(flat), nn.Identity(), (4, 3, 6)).encode(torch.zeros(2, 1))
    torch.testing.assert_close(mu, flat[:, :72].reshape(2, 4, 3, 6), rtol=0, atol=0)
    torch.testing.assert_close(logvar, flat[:, 72:].reshape(2, 4, 3, 6), rtol=0, atol=0)


@pytest.mark.parametrize(("shape", "latent"), [((2, 4, 3, 12), (4, 3, 6)),
                                               ((2, 4, 6, 6), (4, 3, 6)),
                                               ((2, 3, 8), (8,)),
                                               ((2, 10), (4,))])
def test_ambiguous_moments_are_refused_by_shape(shape, latent):
    model = fv.VAE(_Moments(torch.randn(shape)), nn.Identity(), latent)
    with pytest.raises(ValueError, match=re_shape(shape)):
        model.encode(torch.zeros(2, 1))


def re_shape(shape) -> str:
    return "shape " + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


# ---------------------------------------------------------------------------------------------
# slerp
# ---------------------------------------------------------------------------------------------


def _slerp_oracle(z1: torch.Tensor, z2: torch.Tensor, steps: int) -> torch.Tensor:
    """sin((1-t)w)/sin(w) z1 + sin(tw)/sin(w) z2 in float64, w the exact angle between them."""
    a, b = z1.double().flatten(1), z2.double().flatten(1)
    a_hat = a / a.norm(dim=1, keepdim=True)
    par = (a_hat * b).sum(1, keepdim=True)
    omega = torch.atan2((b - par * a_hat).norm(dim=1, keepdim=True), par)
    t = torch.linspace(0, 1, steps, dtype=torch.float64).view(-1, 1, 1)
    path = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return path.reshape(steps, *z1.shape)


def _identity_vae(dim: int) -> fv.VAE:
    class Encoder(nn.Module):
        def forward(self, x):
            return x, torch.zeros_like(x)

    model = fv.VAE(Encoder(), nn.Identity(), dim, likelihood="gaussian")
    model.register_parameter("dummy", nn.Parameter(torch.zeros(1)))
    return model


@pytest.mark.parametrize("delta", [1e-4, 1e-3, 1e-2, 0.5])
def test_slerp_between_nearly_opposite_endpoints(delta):
    """z2 = -z1 turned by a small angle: the path follows the great circle (its radius stays
    the endpoints' ~3) instead of a straight line through the origin."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(3, 16, generator=g)
    z1 = 3 * z1 / z1.norm(dim=1, keepdim=True)
    u = torch.randn(3, 16, generator=g)
    u = u - (u * z1).sum(1, keepdim=True) * z1 / 9
    u = u / u.norm(dim=1, keepdim=True)
    z2 = -z1 + 3 * delta * u
    z2 = 3 * z2 / z2.norm(dim=1, keepdim=True)
    path = _identity_vae(16).interpolate(z1, z2, steps=9, method="slerp")
    expected = _slerp_oracle(z1, z2, 9)
    torch.testing.assert_close(path.double(), expected, rtol=0, atol=3e-5)
    # the radius stays 3 up to the endpoints' float32 norm rounding, which the exact slerp
    # amplifies by 1 / sin w (a straight line would pass at distance 3 * delta of the origin)
    assert (path.norm(dim=-1) - 3).abs().max() < 1e-2


@pytest.mark.parametrize("angle", [0.0, 1e-7, 1e-3, 0.7, 2.0, math.pi - 1e-3])
def test_slerp_matches_the_formula_at_every_angle(angle):
    """Endpoints of different norms at a given angle; linear at angle 0 exactly."""
    e1, e2 = torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)
    e1[:, 0], e2[:, 1] = 1.0, 1.0
    z1 = 2.0 * e1
    z2 = 1.5 * (math.cos(angle) * e1 + math.sin(angle) * e2)
    path = _identity_vae(5).double().interpolate(z1, z2, steps=7, method="slerp")
    if angle == 0.0:
        t = torch.linspace(0, 1, 7, dtype=torch.float64).view(-1, 1, 1)
        expected = (1 - t) * z1 + t * z2
    else:
        expected = _slerp_oracle(z1, z2, 7)
    torch.testing.assert_close(path, expected, rtol=1e-9, atol=1e-9)
    zero = _identity_vae(5).double().interpolate(torch.zeros_like(z1), z2, steps=3,
                                                 method="slerp")
    torch.testing.assert_close(zero[1], z2 / 2)


# ---------------------------------------------------------------------------------------------
# anomaly_score
# ---------------------------------------------------------------------------------------------


class _Affine(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, z):
        return z @ self.weight.T + self.bias


def _linear_gaussian(perturb: float):
    """p(z) = N(0, I), p(x|z) = N(W z + b, s2 I), W with orthogonal columns: the posterior is
    diagonal and log p(x) exact (a multivariate normal)."""
    g = torch.Generator().manual_seed(0)
    d_x, s2 = 6, 0.5
    q, _ = torch.linalg.qr(torch.randn(d_x, 3, dtype=torch.float64, generator=g))
    col_sq = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    weight, bias = q * col_sq.sqrt(), torch.randn(d_x, dtype=torch.float64, generator=g)

    class Posterior(nn.Module):
        def forward(self, x):
            mu = ((x - bias) @ weight) / (s2 + col_sq) * (1 + perturb)
            return mu, torch.log(s2 / (s2 + col_sq)).expand_as(mu) + perturb

    model = fv.VAE(Posterior(), _Affine(weight, bias), 3, likelihood="gaussian",
                   obs_logvar=math.log(s2)).double()
    marginal = torch.distributions.MultivariateNormal(
        bias, weight @ weight.T + s2 * torch.eye(d_x, dtype=torch.float64))
    torch.manual_seed(0)
    x = marginal.sample((8,))
    return model, x, marginal.log_prob(x)


def test_anomaly_score_is_repeatable_and_averaged():
    model, x, exact = _linear_gaussian(perturb=0.3)
    a = model.anomaly_score(x, n_samples=32, seed=1)
    torch.testing.assert_close(model.anomaly_score(x, n_samples=32, seed=1), a, rtol=0, atol=0)
    assert not torch.equal(model.anomaly_score(x, n_samples=32, seed=2), a)
    # chunks do not change the draws' distribution: the same seed in other chunks still averages
    singles = torch.stack([model.anomaly_score(x, n_samples=1, seed=s) for s in range(64)])
    many = torch.stack([model.anomaly_score(x, n_samples=64, seed=s, chunk_size=10)
                        for s in range(16)])
    assert (many.std(0) < 0.3 * singles.std(0)).all()  # 1/sqrt(64) of the noise, with slack
    torch.testing.assert_close(many.mean(0), singles.mean(0), rtol=0,
                               atol=float(4 * singles.std(0).max() / 8))
    assert (many.mean(0) > -exact).all()  # the negative ELBO bounds -log p(x) from above


def test_anomaly_score_importance_weighted():
    model, x, exact = _linear_gaussian(perturb=0.0)
    # with the true posterior every importance weight is p(x): exact for any K
    torch.testing.assert_close(model.anomaly_score(x, n_samples=3, bound="iwae", seed=0),
                               -exact, rtol=0, atol=1e-9)
    model, x, exact = _linear_gaussian(perturb=0.3)
    iwae = model.anomaly_score(x, n_samples=20000, bound="iwae", seed=3, chunk_size=7000)
    elbo = model.anomaly_score(x, n_samples=2000, seed=0)
    assert ((elbo + exact) > 0.05).all()  # the perturbed posterior leaves a real ELBO gap
    assert ((iwae + exact).abs() < (elbo + exact) / 2).all()
    assert (iwae + exact).abs().mean() < 0.03
    with pytest.raises(ValueError, match="bound"):
        model.anomaly_score(x, bound="iw")
    with pytest.raises(ValueError, match="n_samples"):
        model.anomaly_score(x, n_samples=0)


# ---------------------------------------------------------------------------------------------
# training data, observation variance, dtypes, checkpoints
# ---------------------------------------------------------------------------------------------


def test_train_rejects_bernoulli_data_outside_the_unit_interval():
    """The error of `fastvae train` on such a file, now from the Python API too."""
    g = torch.Generator().manual_seed(0)
    data = 2 * torch.rand(40, 1, 4, 4, generator=g) - 1  # images in [-1, 1]
    config = fv.TrainConfig(epochs=1, batch_size=16, iwae_samples=0)
    model = dict(input_shape=[1, 4, 4], latent_dim=2, hidden=[8])
    with pytest.raises(DataError, match=r"train_data: pixel values must lie in \[0, 1\]"):
        fv.train(model, data[:32], data[32:].clamp(0, 1), config, progress=False)
    with pytest.raises(ValueError, match=r"val_data: .* got range \[0\.00\d+, 1\.4\d+\]"):
        fv.train(model, data[:32].clamp(0, 1), 1.5 * data[32:].abs(), config, progress=False)
    # a Gaussian likelihood models any real data (its unit noise on such data: the warning)
    with pytest.warns(UserWarning, match="posterior will likely collapse"):
        result = fv.train(dict(model, likelihood="gaussian"), data[:32], data[32:], config,
                          progress=False)
    assert math.isfinite(result.history[-1].val_elbo)


def test_learned_observation_variance_is_bounded_below():
    """gaussian_learned: the variance used is exp(obs_logvar) + min_obs_var, however low the
    parameter goes, with a gradient."""
    model = fv.build_vae([1, 2, 2], 2, hidden=[4], likelihood="gaussian_learned")
    assert model.min_obs_var == 1e-6
    with torch.no_grad():
        model.obs_logvar.fill_(-60.0)
    recon, x = torch.full((3, 1, 2, 2), 0.2), torch.full((3, 1, 2, 2), 0.7)
    nll = model.nll(recon, x, reduction="sum")
    floor = fv.gaussian_nll(recon, x, math.log(math.exp(-60.0) + 1e-6), reduction="sum")
    torch.testing.assert_close(nll, floor)
    (g,) = torch.autograd.grad(nll, model.obs_logvar)
    assert g != 0
    free = fv.VAE(nn.Identity(), nn.Identity(), 4, likelihood="gaussian_learned", min_obs_var=0)
    with torch.no_grad():
        free.obs_logvar.fill_(-3.0)
    torch.testing.assert_close(free.nll(recon, x), fv.gaussian_nll(recon, x, -3.0))
    with pytest.raises(ValueError, match="min_obs_var"):
        fv.VAE(nn.Identity(), nn.Identity(), 4, min_obs_var=-1.0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_learned"])
def test_nll_keeps_the_data_precision(likelihood):
    """Under autocast the decoder returns bfloat16: the NLL computes in float32 with the
    float32 data (it rounded the data to bfloat16)."""
    model = fv.VAE(nn.Identity(), nn.Identity(), 4, likelihood=likelihood)
    if likelihood == "gaussian_learned":
        with torch.no_grad():
            model.obs_logvar.fill_(-1.2345678)  # float32, not representable in bfloat16
    g = torch.Generator().manual_seed(0)
    recon = torch.randn(3, 8, generator=g).bfloat16()
    x = 0.05 + 0.9 * torch.rand(3, 8, generator=g)
    with torch.no_grad():
        expected = model.nll(recon.float(), x, reduction="none")
        torch.testing.assert_close(model.nll(recon, x, reduction="none"), expected,
                                   rtol=0, atol=0)


def test_save_vae_and_load_vae_at_the_top_level(tmp_path):
    torch.manual_seed(0)
    model = fv.build_vae([1, 4, 4], 3, hidden=[8], likelihood="gaussian_learned", beta=2.0)
    x = torch.rand(5, 1, 4, 4)
    path = fv.save_vae(model, tmp_path / "vae.safetensors")
    loaded = fv.load_vae(path)
    assert not loaded.training
    assert loaded.beta == 2.0
    assert loaded.likelihood == "gaussian_learned"
    torch.testing.assert_close(loaded.reconstruct(x), model.eval().reconstruct(x), rtol=0, atol=0)
    # a VAE built by the caller: saved under an empty config, loaded into the same architecture
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 6))
    custom = fv.VAE(encoder, nn.Sequential(nn.Linear(3, 16), nn.Unflatten(1, (1, 4, 4))), 3)
    fv.save_vae(custom, tmp_path / "custom.safetensors")
    with pytest.raises(fv.training.checkpoint.CheckpointError, match="model="):
        fv.load_vae(tmp_path / "custom.safetensors")
    twin = fv.VAE(nn.Sequential(nn.Flatten(), nn.Linear(16, 6)),
                  nn.Sequential(nn.Linear(3, 16), nn.Unflatten(1, (1, 4, 4))), 3)
    fv.load_vae(tmp_path / "custom.safetensors", model=twin)
    torch.testing.assert_close(twin.reconstruct(x), custom.eval().reconstruct(x), rtol=0, atol=0)
    with pytest.raises(fv.training.checkpoint.CheckpointError, match="another model"):
        fv.load_vae(tmp_path / "custom.safetensors", model=fv.VAE(nn.Linear(16, 4),
                                                                  nn.Identity(), 2))
