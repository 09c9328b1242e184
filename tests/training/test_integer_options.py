"""Integer options of the model and training API (the op layer's are in
tests/ops/test_integer_options.py): each accepts numpy's integers (and any ``__index__``
integer) with the result of the equal ``int``, keeps a Python ``int`` (the build config and
the training config go to JSON), and refuses ``bool`` and floats with a ``TypeError`` naming
the option."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastvae.models.vae import VAE, build_vae, mlp_decoder, mlp_encoder
from fastvae.training.trainer import TrainConfig, evaluate

torch.manual_seed(0)
MODEL = build_vae([4], 2, hidden=[8])
X = torch.rand(3, 4)


def _seeded(fn):
    def run(v):
        torch.manual_seed(0)
        return fn(v)
    return run


# (option name, a valid value, call(value) -> something comparable)
OPTIONS = {
    "build_vae.latent_dim": ("latent_dim", 2, lambda v: build_vae([4], v, hidden=[8]).build_config),
    "build_vae.input_shape": ("input_shape", 4, lambda v: build_vae([v], 2).build_config),
    "build_vae.hidden": ("hidden", 8, lambda v: build_vae([4], 2, hidden=[v]).build_config),
    "build_vae.n_mixtures": ("n_mixtures", 2, lambda v: build_vae(
        [1, 2, 2], 2, likelihood="dmol", n_mixtures=v, n_bins=4).build_config),
    "build_vae.n_bins": ("n_bins", 4, lambda v: build_vae(
        [1, 2, 2], 2, likelihood="dmol", n_mixtures=2, n_bins=v).build_config),
    "VAE.latent_shape": ("latent_shape", 2, lambda v: VAE(
        mlp_encoder([4], 2), mlp_decoder(2, [4]), v).latent_shape),
    "VAE.sample.n": ("n", 3, _seeded(lambda v: MODEL.sample(v))),
    "VAE.interpolate.steps": ("steps", 3, lambda v: MODEL.interpolate(X, X, steps=v)),
    "VAE.log_likelihood.n_samples": ("n_samples", 3, _seeded(
        lambda v: MODEL.log_likelihood(X, n_samples=v))),
    "VAE.log_likelihood.chunk_size": ("chunk_size", 2, _seeded(
        lambda v: MODEL.log_likelihood(X, n_samples=3, chunk_size=v))),
    "VAE.anomaly_score.n_samples": ("n_samples", 3, lambda v: MODEL.anomaly_score(
        X, n_samples=v, seed=1)),
    "VAE.anomaly_score.seed": ("seed", 1, lambda v: MODEL.anomaly_score(X, seed=v)),
    "TrainConfig.epochs": ("epochs", 2, lambda v: json.dumps(vars(TrainConfig(epochs=v)))),
    "TrainConfig.batch_size": ("batch_size", 2, lambda v: json.dumps(
        vars(TrainConfig(batch_size=v)))),
    "TrainConfig.seed": ("seed", 2, lambda v: json.dumps(vars(TrainConfig(seed=v)))),
    "TrainConfig.iwae_samples": ("iwae_samples", 2, lambda v: json.dumps(
        vars(TrainConfig(iwae_samples=v)))),
    "evaluate.batch_size": ("batch_size", 2, _seeded(
        lambda v: evaluate(MODEL, X, batch_size=v)["nll"])),
}


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("option", OPTIONS)
def test_numpy_integers_are_accepted(option):
    _, value, call = OPTIONS[option]
    expected = call(value)
    for kind in (np.int64, np.int32):
        got = call(kind(value))  # json.dumps of a config holding an np.int64 raises
        assert _same(got, expected), f"{option} = {kind.__name__}({value})"


@pytest.mark.parametrize("bad", [True, 2.0, np.float64(2.0)], ids=["bool", "float", "np.float64"])
@pytest.mark.parametrize("option", OPTIONS)
def test_bool_and_float_are_refused(option, bad):
    name, _, call = OPTIONS[option]
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        call(bad)
