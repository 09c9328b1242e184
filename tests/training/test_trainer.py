"""Training: the loop lowers the loss, KL schedules, caller-built models, checkpoints, resume,
non-finite steps."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from helpers import DIGITS_CONFIG
from torch import nn

import fastvae as fv
from fastvae.models.vae import VAE, build_vae
from fastvae.training import checkpoint, data
from fastvae.training.trainer import NonFiniteLossError, TrainConfig, beta_at, evaluate, train


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


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_learned", "continuous_bernoulli"])
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


def test_training_is_bitwise_reproducible(backend, device):
    """Two runs of the trainer from one seed end with the same weights, bit for bit."""
    train_x, val_x = data.split(data.load_digits()[:150], 0.1, seed=0)
    config = TrainConfig(epochs=1, batch_size=64, seed=3, iwae_samples=0)
    model_config = {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}
    first, second = (train(model_config, train_x, val_x, config, device=device,
                           progress=False).model.state_dict() for _ in range(2))
    for name, weights in first.items():
        assert torch.equal(weights, second[name]), f"{name} differs between the runs"


@pytest.mark.slow
# torch.compile's own import of torch.jit, not fastvae's
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_training_matches_eager(digits, tmp_path):
    """TrainConfig(compile=True): the model (fused ops inside) runs under torch.compile; the
    steps give the eager run's losses to float rounding, and the checkpoint is the plain
    module's (it loads into an uncompiled VAE)."""
    train_x, val_x = digits
    runs = {}
    for compiled in (False, True):
        runs[compiled] = train(dict(DIGITS_CONFIG), train_x[:128], val_x[:32],
                               TrainConfig(epochs=2, batch_size=64, iwae_samples=0, seed=3,
                                           compile=compiled),
                               out_dir=tmp_path / str(compiled), progress=False)
    for eager, compiled in zip(runs[False].history, runs[True].history, strict=True):
        assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-4)
    model = checkpoint.load_vae(tmp_path / "True" / "checkpoint.safetensors")
    for a, b in zip(model.state_dict().values(), runs[True].model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
