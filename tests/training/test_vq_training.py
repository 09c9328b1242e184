"""The trainer on a VQ-VAE: non-finite steps stop or are skipped as for the VAE, and the
per-epoch codebook metrics are those of the codes the steps chose."""

from __future__ import annotations

import math

import pytest
import torch

import fastvae as fv
from fastvae.training.trainer import code_usage

CONFIG = {"kind": "vqvae", "input_shape": [1, 4, 4], "codebook_size": 8, "codebook_dim": 2,
          "hidden": [8]}


def _poison_nll(monkeypatch, at_call: int) -> None:
    """Make the reconstruction NLL of the ``at_call``-th training forward NaN."""
    calls = {"n": 0}
    original = fv.VQVAE.nll

    def nll(self, recon, x, reduction="mean"):
        value = original(self, recon, x, reduction)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                return value * math.nan
        return value

    monkeypatch.setattr(fv.VQVAE, "nll", nll)


def test_a_nonfinite_step_stops_naming_the_term(monkeypatch):
    _poison_nll(monkeypatch, 2)
    x = torch.rand(24, 1, 4, 4)
    with pytest.raises(fv.NonFiniteLossError, match=r"step 2 .*reconstruction NLL"):
        fv.train(CONFIG, x[:16], x[16:], fv.TrainConfig(epochs=1, batch_size=8),
                 progress=False)


def _poison_encoding(monkeypatch, at_call: int) -> None:
    """Make the encoder output of the ``at_call``-th training forward NaN."""
    calls = {"n": 0}
    original = fv.VQVAE.encode

    def encode(self, x):
        z = original(self, x)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                return z * math.nan
        return z

    monkeypatch.setattr(fv.VQVAE, "encode", encode)


@pytest.mark.parametrize("poison", [_poison_nll, _poison_encoding])
def test_a_nonfinite_step_is_skipped(monkeypatch, poison):
    """Skipped, the step leaves no trace: the codebook (updated in the forward) is restored."""
    poison(monkeypatch, 2)
    x = torch.rand(40, 1, 4, 4)
    result = fv.train(CONFIG, x[:32], x[32:],
                      fv.TrainConfig(epochs=1, batch_size=8, on_nonfinite="skip"),
                      progress=False)
    (epoch,) = result.history
    assert epoch.skipped_steps == 1
    assert epoch.step == 4
    assert math.isfinite(epoch.train_loss)
    for p in result.model.parameters():
        assert torch.isfinite(p).all()
    q = result.model.quantizer
    for name in ("codebook", "embed_avg", "cluster_size"):
        assert torch.isfinite(getattr(q, name)).all(), name
    assert int(q.steps) == 3  # the skipped step is not in the usage window


def test_code_usage():
    assert code_usage(torch.tensor([0, 0, 0, 0])) == (0.0, 0.0)
    usage, perplexity = code_usage(torch.tensor([5, 0, 5, 0]))
    assert usage == 0.5
    assert perplexity == pytest.approx(2.0)
    usage, perplexity = code_usage(torch.tensor([3, 1]))
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert perplexity == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_epoch_usage_counts_the_codes_of_the_steps():
    """One epoch of one step: the epoch's usage and perplexity are those of the codes that step
    chose (the quantizer's own window holds that one step)."""
    x = torch.rand(24, 1, 4, 4)
    result = fv.train(CONFIG, x[:16], x[16:], fv.TrainConfig(epochs=1, batch_size=16),
                      progress=False)
    q = result.model.quantizer
    assert result.history[0].usage == pytest.approx(float(q.codebook_usage()))
    assert result.history[0].perplexity == pytest.approx(float(q.perplexity()), rel=1e-5)
    assert result.history[0].restarts == int(q.restarts)
