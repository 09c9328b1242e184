"""Resume honours the caller: the settings passed now are the ones used and recorded (the
learning rate set into the restored optimizer); only another model is refused, by the fields
that differ, compared by value; a fully skipped epoch reports NaN, not 0."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastvae.cli import main
from fastvae.models.vae import build_vae
from fastvae.training import checkpoint, data
from fastvae.training.checkpoint import CheckpointError
from fastvae.training.trainer import TrainConfig, train

CONFIG = {"input_shape": [1, 8, 8], "latent_dim": 3, "arch": "mlp", "hidden": [16],
          "likelihood": "bernoulli", "obs_logvar": 0.0, "logvar_limit": None}
BASE = {"epochs": 1, "batch_size": 64, "iwae_samples": 0}


@pytest.fixture(scope="module")
def digits():
    images = data.load_digits()
    return images[:256], images[256:288]


@pytest.fixture
def first_epoch(tmp_path, digits):
    """A checkpoint after one epoch at lr 2e-3."""
    train(CONFIG, *digits, TrainConfig(**BASE), out_dir=tmp_path / "a", progress=False)
    return tmp_path / "a" / "checkpoint.safetensors"


def _weights(path):
    return checkpoint.load(path).model_state


@pytest.mark.parametrize("lr", [1e-9, 1e-5, 5e-2])
def test_a_new_learning_rate_is_the_one_used_and_recorded(tmp_path, digits, first_epoch, lr):
    out = tmp_path / "b"
    result = train(CONFIG, *digits, TrainConfig(**{**BASE, "epochs": 2, "lr": lr}),
                   out_dir=out, resume=first_epoch, progress=False)
    saved = checkpoint.load(out / "checkpoint.safetensors")
    assert [g["lr"] for g in saved.optimizer_state["param_groups"]] == [lr]
    assert saved.trainer_state["train_config"]["lr"] == lr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_config"]["lr"] == lr
    assert [h["lr"] for h in metrics["history"]] == [2e-3, lr]
    assert metrics["resumed"]["changed"]["lr"] == {"checkpoint": 2e-3, "now": lr}
    assert result.resumed["epoch"] == 1
    # The update itself: Adam moves every weight by about lr per step (4 steps here).
    moved = max(float((after - _weights(first_epoch)[name]).abs().max())
                for name, after in saved.model_state.items())
    assert moved <= 4 * lr * 1.5 + 1e-7, (moved, lr)  # + float32 rounding of the weights
    if lr > 2e-3:
        assert moved > 4 * 2e-3


def test_other_changed_settings_are_used_and_recorded(tmp_path, digits, first_epoch):
    """batch size, beta, free bits, clipping, seed and the likelihood's variance: the caller's
    values; the step count goes on from the checkpoint's (4 steps of 64, then 8 of 32)."""
    gaussian = {**CONFIG, "likelihood": "gaussian", "obs_logvar": -4.0}
    train(gaussian, *digits, TrainConfig(**BASE), out_dir=tmp_path / "g", progress=False)
    new = TrainConfig(epochs=2, batch_size=32, beta=0.5, free_bits=0.1, grad_clip=1.0, seed=7,
                      iwae_samples=0)
    moved = {**gaussian, "obs_logvar": -3.0}
    result = train(moved, *digits, new, out_dir=tmp_path / "h", progress=False,
                   resume=tmp_path / "g" / "checkpoint.safetensors")
    assert result.model.obs_logvar == -3.0
    assert [m.step for m in result.history] == [4, 12]
    assert result.history[-1].beta == 0.5
    changed = json.loads((tmp_path / "h" / "metrics.json").read_text())["resumed"]["changed"]
    for name, old, now in [("batch_size", 64, 32), ("beta", 1.0, 0.5), ("free_bits", 0.0, 0.1),
                           ("grad_clip", None, 1.0), ("seed", 0, 7), ("obs_logvar", -4.0, -3.0),
                           ("epochs", 1, 2)]:
        assert changed[name] == {"checkpoint": old, "now": now}, name
    saved = checkpoint.load(tmp_path / "h" / "checkpoint.safetensors")
    assert saved.model_config["obs_logvar"] == -3.0
    assert saved.trainer_state["train_config"]["batch_size"] == 32


def test_tuples_lists_and_defaults_are_the_same_model(tmp_path, digits, first_epoch):
    """The checkpoint's config comes back from JSON: a tuple and a list of the same sizes, or a
    default left out, are the same model."""
    same = {"input_shape": (1, 8, 8), "latent_dim": 3, "hidden": (16,)}
    result = train(same, *digits, TrainConfig(**{**BASE, "epochs": 2}), resume=first_epoch,
                   progress=False)
    assert len(result.history) == 2
    assert set(result.resumed["changed"]) == {"epochs"}


@pytest.mark.parametrize(("change", "words"), [
    ({"latent_dim": 4}, "latent_dim: 3 in the checkpoint, 4 now"),
    ({"hidden": (16, 16)}, "hidden: [16] in the checkpoint, [16, 16] now"),
    ({"likelihood": "gaussian", "obs_logvar": -4.0},
     "likelihood: bernoulli in the checkpoint, gaussian now"),
    ({"arch": "conv", "hidden": [4, 4]}, "arch: mlp in the checkpoint, conv now"),
])
def test_another_model_is_refused_by_the_fields_that_differ(digits, first_epoch, change, words):
    with pytest.raises(CheckpointError, match=r"another configuration \(.*" + re_escape(words)):
        train({**CONFIG, **change}, *digits, TrainConfig(**{**BASE, "epochs": 2}),
              resume=first_epoch, progress=False)


def test_another_input_shape_is_refused(tmp_path, first_epoch):
    x = torch.rand(40, 1, 4, 16)
    with pytest.raises(CheckpointError, match=r"input_shape: \[1, 8, 8\] in the checkpoint, "
                                              r"\[1, 4, 16\] now"):
        train({**CONFIG, "input_shape": (1, 4, 16)}, x[:32], x[32:],
              TrainConfig(**{**BASE, "epochs": 2}), resume=first_epoch, progress=False)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_cli_resume_with_a_new_lr(tmp_path, capsys):
    common = ["train", "--hidden", "8", "--latent-dim", "2", "--iwae-samples", "0",
              "--no-progress", "--no-images", "--out", str(tmp_path / "run")]
    assert main([*common, "--epochs", "1"]) == 0
    assert main([*common, "--epochs", "2", "--lr", "1e-5", "--batch-size", "128",
                 "--resume", str(tmp_path / "run" / "checkpoint.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "lr 0.002 -> 1e-05" in printed
    assert "batch_size 64 -> 128" in printed
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_config"]["lr"] == 1e-5
    assert [h["lr"] for h in metrics["history"]] == [2e-3, 1e-5]
    saved = checkpoint.load(tmp_path / "run" / "checkpoint.safetensors")
    assert saved.optimizer_state["param_groups"][0]["lr"] == 1e-5


def test_a_fully_skipped_epoch_reports_nan(tmp_path, digits):
    """Every step non-finite (the encoder's mean at 3e19: the KL overflows, and skipping
    leaves the weights as they were): train loss, NLL and KL are NaN, not 0, and every step
    is counted as skipped."""
    torch.manual_seed(0)
    model = build_vae(**CONFIG)
    with torch.no_grad():
        model.encoder[-1].bias[:3].fill_(3e19)
    path = checkpoint.save(tmp_path / "poisoned.safetensors",
                           checkpoint.Checkpoint(CONFIG, model.state_dict(), None, {"epoch": 0}))
    result = train(CONFIG, *digits, TrainConfig(**{**BASE, "on_nonfinite": "skip"}),
                   resume=path, out_dir=tmp_path / "run", progress=False)
    epoch = result.history[0]
    assert epoch.skipped_steps == 4
    assert epoch.step == 4
    assert math.isnan(epoch.train_loss)
    assert math.isnan(epoch.train_nll)
    assert math.isnan(epoch.train_kl)
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"][0]
    assert math.isnan(row["train_loss"])
    assert row["skipped_steps"] == 4
