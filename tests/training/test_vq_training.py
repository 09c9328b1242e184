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


@pytest.mark.parametrize("levels", [1, 3])
def test_code_counter_dense_and_sparse_agree(monkeypatch, levels):
    """Past DENSE_COUNTS the counter keeps indices and counts them when read: the same usage,
    perplexity and codes used as the dense histogram."""
    from fastvae.training import trainer

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (7, 5, levels), generator=g) for _ in range(3)]
    if levels == 1:
        batches = [b[..., 0] for b in batches]
    dense = trainer.CodeCounter(levels, 50, "cpu")
    monkeypatch.setattr(trainer, "DENSE_COUNTS", 10)
    sparse = trainer.CodeCounter(levels, 50, "cpu")
    assert dense.dense
    assert not sparse.dense
    for b in batches:
        dense.add(b)
        sparse.add(b)
    a, b = dense.stats(), sparse.stats()
    assert a.keys() == b.keys() == {"usage", "perplexity", "codes_used"}
    for key in a:
        assert a[key] == pytest.approx(b[key]), key
    assert sparse.dense_counts() is None
    flat = torch.stack(batches).reshape(-1, levels)
    for level in range(levels):
        expected = code_usage(torch.bincount(flat[:, level], minlength=50))
        got = (a["usage"], a["perplexity"]) if levels == 1 else \
            (a["usage"][level], a["perplexity"][level])
        assert got == pytest.approx(expected)
    # usage of a partial histogram: the fraction of K
    assert code_usage(torch.tensor([2, 2]), 8) == pytest.approx((0.25, 2.0))


def test_csv_rows_spread_levels_over_columns():
    from fastvae.training.trainer import csv_row

    assert csv_row({"epoch": 1, "usage": [0.5, 0.25], "perplexity": 3.0}) == {
        "epoch": 1, "usage_l0": 0.5, "usage_l1": 0.25, "perplexity": 3.0}


def test_the_objective_is_the_quantizers_loss():
    """The trainer minimizes nll + the quantizer's own ``loss`` (whatever it weighs), and
    evaluate_vq's loss is nll + that loss on the held-out data."""
    from fastvae.training.trainer import evaluate_vq

    x = torch.rand(24, 1, 4, 4)
    config = {**CONFIG, "quantizer": "lfq", "codebook_dim": None, "codebook_size": 16}
    result = fv.train(config, x[:16], x[16:], fv.TrainConfig(epochs=1, batch_size=16),
                      progress=False)
    model = result.model
    epoch = result.history[0]
    assert epoch.train_loss == pytest.approx(epoch.train_nll + epoch.train_vq_loss)
    final = evaluate_vq(model, x[16:])
    with torch.no_grad():
        q = model.quantize(model.encode(x[16:]))
    assert final["vq_loss"] == pytest.approx(float(q.loss))
    assert final["loss"] == pytest.approx(final["nll"] + final["vq_loss"])
