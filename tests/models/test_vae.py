"""The VAE API, training, the IWAE estimator and checkpoints (issue 4)."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

import fastvae as fv
from fastvae.models.vae import VAE, active_units, build_vae
from fastvae.training import checkpoint, data
from fastvae.training.trainer import NonFiniteLossError, TrainConfig, beta_at, evaluate, train

DIGITS_CONFIG = {"input_shape": [1, 8, 8], "latent_dim": 4, "arch": "mlp", "hidden": [64],
                 "likelihood": "bernoulli", "obs_logvar": 0.0}


@pytest.fixture(scope="module")
def digits():
    return data.split(data.load_digits(), 0.1, seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    train_x, val_x = digits
    config = TrainConfig(epochs=6, batch_size=64, seed=0, iwae_samples=0)
    return train(DIGITS_CONFIG, train_x, val_x, config, progress=False)


def test_training_lowers_the_negative_elbo(digits, trained):
    _, val_x = digits
    torch.manual_seed(0)
    untrained = build_vae(**DIGITS_CONFIG)
    before = evaluate(untrained, val_x)["elbo"]
    after = trained.history[-1].val_elbo
    # an untrained decoder sits near 64 * log 2 = 44 nats per image; a few epochs reach ~28
    assert before < -40
    assert after > before + 12
    assert [m.epoch for m in trained.history] == list(range(1, 7))


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


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_learned"])
def test_gaussian_likelihoods_train(digits, likelihood):
    train_x, val_x = digits
    config = dict(DIGITS_CONFIG, likelihood=likelihood, obs_logvar=-2.0)
    result = train(config, train_x[:256], val_x[:64], TrainConfig(epochs=2, iwae_samples=0),
                   progress=False)
    learned = result.model.obs_logvar
    assert isinstance(learned, nn.Parameter) == (likelihood == "gaussian_learned")
    if likelihood == "gaussian_learned":
        assert float(learned.detach()) != -2.0  # the shared variance received gradients
    assert math.isfinite(result.history[-1].val_elbo)


def _custom_vae(latent: int = 4) -> VAE:
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2 * latent))
    decoder = nn.Sequential(nn.Linear(latent, 64), nn.Unflatten(1, (1, 8, 8)))
    return fv.VAE(encoder, decoder, latent_shape=latent)


def test_train_a_vae_built_by_the_caller(digits, tmp_path):
    """``fv.train`` on a ``fv.VAE`` around a user's networks (the encoder returns one tensor of
    mu and logvar), as the README shows: trained in place, checkpointed, resumable."""
    train_x, val_x = digits
    config = fv.TrainConfig(epochs=2, batch_size=64, iwae_samples=0)
    torch.manual_seed(1)
    model = _custom_vae()
    before = fv.gaussian_kl(*model.encode(val_x)).item()
    result = fv.train(model, train_x[:512], val_x, config, out_dir=tmp_path, progress=False)
    assert result.model is model
    assert len(result.history) == 2
    assert result.history[-1].val_elbo > result.history[0].val_elbo - 1.0
    assert fv.gaussian_kl(*model.encode(val_x)).item() != before
    saved = checkpoint.load(tmp_path / "checkpoint.safetensors")
    assert saved.model_config == {}
    assert all(torch.equal(saved.model_state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(checkpoint.CheckpointError, match="built by the caller"):
        checkpoint.load_vae(tmp_path / "checkpoint.safetensors")
    # Resume: the same architecture continues; another one is refused by name.
    longer = fv.TrainConfig(epochs=3, batch_size=64, iwae_samples=0)
    resumed = fv.train(_custom_vae(), train_x[:512], val_x, longer, progress=False,
                       resume=tmp_path / "checkpoint.safetensors")
    assert len(resumed.history) == 3
    with pytest.raises(checkpoint.CheckpointError, match="weights of another model"):
        fv.train(_custom_vae(latent=3), train_x[:512], val_x, longer, progress=False,
                 resume=tmp_path / "checkpoint.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="built by the caller"):
        fv.train(DIGITS_CONFIG, train_x[:512], val_x, longer, progress=False,
                 resume=tmp_path / "checkpoint.safetensors")
    with pytest.raises(TypeError, match="model must be"):
        fv.train(nn.Linear(2, 2), train_x, val_x, config, progress=False)


def test_conv_vae_shapes():
    for shape in ([1, 8, 8], [3, 28, 28], [1, 7, 9]):
        model = build_vae(shape, 3, arch="conv", hidden=[8, 16])
        out = model(torch.rand(2, *shape))
        assert out.recon.shape == (2, *shape)


def test_kl_schedules():  # beta_at(config, step, steps per epoch): 4 steps an epoch here
    warm = TrainConfig(epochs=10, beta=2.0, warmup_epochs=4)
    assert beta_at(warm, 0, 4) == 0
    assert beta_at(warm, 8, 4) == 1.0
    assert beta_at(warm, 32, 4) == 2.0
    cyc = TrainConfig(epochs=10, beta=1.0, cycles=2)  # period 5: ramp over 2.5 epochs, hold
    assert beta_at(cyc, 0, 4) == 0
    assert beta_at(cyc, 5, 4) == 0.5
    assert beta_at(cyc, 16, 4) == 1.0
    assert beta_at(cyc, 20, 4) == 0  # the second cycle restarts


def test_save_load_identical_outputs(tmp_path, trained, digits):
    _, val_x = digits
    path = checkpoint.save(tmp_path / "m.safetensors",
                           checkpoint.Checkpoint(DIGITS_CONFIG, trained.model.state_dict()))
    loaded = checkpoint.load_vae(path)
    x = val_x[:16]
    torch.testing.assert_close(loaded.reconstruct(x), trained.model.eval().reconstruct(x),
                               rtol=0, atol=0)
    assert (path.stat().st_mode & 0o777) != 0o600  # an ordinary file, not mkstemp's mode


def test_resume_gives_the_uninterrupted_result(tmp_path, digits):
    train_x, val_x = digits
    train_x, val_x = train_x[:300], val_x[:50]
    full = train(DIGITS_CONFIG, train_x, val_x, TrainConfig(epochs=3, iwae_samples=0),
                 out_dir=tmp_path / "full", progress=False)
    train(DIGITS_CONFIG, train_x, val_x, TrainConfig(epochs=1, iwae_samples=0),
          out_dir=tmp_path / "part", progress=False)
    resumed = train(DIGITS_CONFIG, train_x, val_x, TrainConfig(epochs=3, iwae_samples=0),
                    out_dir=tmp_path / "part", resume=tmp_path / "part" / "checkpoint.safetensors",
                    progress=False)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert [asdict(m)["val_elbo"] for m in full.history] == \
        [asdict(m)["val_elbo"] for m in resumed.history]


def test_checkpoint_errors(tmp_path, trained):
    good = checkpoint.save(tmp_path / "good.safetensors",
                           checkpoint.Checkpoint(DIGITS_CONFIG, trained.model.state_dict()))
    raw = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    for name, match in [("truncated", "truncated"), ("junk", "not a readable"),
                        ("foreign", "not a fastvae checkpoint"), ("missing", "cannot read")]:
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.load(tmp_path / f"{name}.safetensors")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, trained, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, checkpoint.Checkpoint(DIGITS_CONFIG, trained.model.state_dict()))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, checkpoint.Checkpoint(DIGITS_CONFIG, {}))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp file left


def test_nonfinite_loss_stops_or_skips(digits):
    train_x, val_x = digits
    bad = train_x[:128].clone()
    bad[5, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*reconstruction NLL"):
        train(DIGITS_CONFIG, bad, val_x[:20], TrainConfig(epochs=1, batch_size=128,
                                                           iwae_samples=0), progress=False)
    result = train(DIGITS_CONFIG, torch.cat([bad, train_x[:128]]), val_x[:20],
                   TrainConfig(epochs=1, batch_size=128, on_nonfinite="skip", iwae_samples=0),
                   progress=False)
    assert result.history[-1].skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


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
