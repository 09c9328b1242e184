"""Defaults that train a useful model: ``--likelihood gaussian`` on [0, 1] digits keeps active
units (and a fixed Gaussian as wide as the data warns with the remedy); ``amp`` on a CPU is
bfloat16 autocast, not a silent no-op."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastvae.cli import main
from fastvae.models.vae import VAE
from fastvae.training import data
from fastvae.training.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def digits():
    images = data.load_digits()
    return images[:512], images[512:600]


def test_cli_gaussian_default_trains_active_units(tmp_path, capsys):
    """The old default (log-variance 0: std 1 on pixels in [0, 1]) ended with 0 of 8 active
    units on the digits; the default now keeps most of them."""
    out = tmp_path / "run"
    assert main(["train", "--likelihood", "gaussian", "--epochs", "10", "--iwae-samples", "0",
                 "--no-progress", "--no-images", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_config"]["obs_logvar"] < -1
    assert metrics["final"]["active_units"] >= 4, metrics["final"]


@pytest.mark.parametrize("obs_logvar", [0.0, -1.0, 1.0])
def test_a_gaussian_as_wide_as_the_data_warns_with_the_remedy(digits, obs_logvar):
    config = {"input_shape": [1, 8, 8], "latent_dim": 2, "hidden": [8],
              "likelihood": "gaussian", "obs_logvar": obs_logvar}
    with pytest.warns(UserWarning, match="collapse.*obs_logvar.*gaussian_learned"):
        train(config, *digits, TrainConfig(epochs=1, iwae_samples=0), progress=False)


@pytest.mark.parametrize(("likelihood", "obs_logvar"), [("gaussian", -4.0),
                                                        ("gaussian_learned", 0.0),
                                                        ("bernoulli", 0.0)])
def test_no_warning_for_a_narrow_or_learned_likelihood(digits, likelihood, obs_logvar):
    config = {"input_shape": [1, 8, 8], "latent_dim": 2, "hidden": [8],
              "likelihood": likelihood, "obs_logvar": obs_logvar}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(config, *digits, TrainConfig(epochs=1, iwae_samples=0), progress=False)


@pytest.mark.parametrize(("arch", "likelihood"), [("mlp", "bernoulli"),
                                                  ("conv", "gaussian_learned"),
                                                  ("mlp", "gaussian")])
def test_amp_on_cpu_is_bfloat16_autocast(digits, monkeypatch, arch, likelihood):
    """With amp the decoder's output in training is bfloat16 (autocast ran), the loss terms
    are finite, and the model learns; without amp it is float32."""
    dtypes = []
    forward = VAE.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            dtypes.append(out.recon.dtype)
        return out

    monkeypatch.setattr(VAE, "forward", spy)
    config = {"input_shape": [1, 8, 8], "latent_dim": 4, "arch": arch,
              "hidden": [16] if arch == "mlp" else [8, 8], "likelihood": likelihood,
              "obs_logvar": -4.0}
    result = train(config, *digits, TrainConfig(epochs=3, batch_size=64, iwae_samples=0,
                                                amp=True), progress=False)
    assert set(dtypes) == {torch.bfloat16}
    assert all(m.skipped_steps == 0 for m in result.history)
    losses = [m.train_loss for m in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    dtypes.clear()
    train(config, *digits, TrainConfig(epochs=1, batch_size=256, iwae_samples=0),
          progress=False)
    assert set(dtypes) == {torch.float32}
