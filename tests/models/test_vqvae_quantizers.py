"""fv.VQVAE and fv.build_vqvae / fv.build_vae with every kind of quantizer of the protocol (a
residual VQ with indices per level, FSQ, LFQ): shapes, the loss, indices round trips, the code
priors per level, the option rules, checkpoints."""

from __future__ import annotations

import pytest
import torch
from protocol_quantizers import RoundingFSQ, SignLFQ, StackedRVQ
from torch import nn

import fastvae as fv
from fastvae.models.quantizers import check_quantizer, level_counts
from fastvae.training.checkpoint import CheckpointError

KINDS = {  # build_vqvae arguments of a tiny model of each kind
    "vq": {"codebook_size": 8, "codebook_dim": 3},
    "rvq": {"codebook_size": 8, "codebook_dim": 3, "num_quantizers": 3},
    "fsq": {"levels": [3, 4, 3]},
    "lfq": {"codebook_size": 8},
}


def _model(kind: str, **extra) -> fv.VQVAE:
    torch.manual_seed(0)
    return fv.build_vqvae((1, 8, 8), quantizer=kind, num_tokens=4, hidden=[16],
                          **KINDS[kind], **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_decodes_and_samples(kind):
    m = _model(kind)
    L = m.num_levels
    assert m.latent_shape == (3, 4)  # FSQ: len(levels); LFQ: log2(codebook_size)
    assert m.codebook_size == (36 if kind == "fsq" else 8)
    assert (3 if kind == "rvq" else 1) == L
    x = torch.rand(5, 1, 8, 8)
    out = m(x)
    spatial = (5, 4, *((L,) if L > 1 else ()))
    assert out.indices.shape == spatial
    assert out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0
    assert int(out.indices.max()) < m.codebook_size
    torch.testing.assert_close(out.loss, out.nll + out.vq_loss)
    out.loss.backward()
    assert m.encoder[1].weight.grad.abs().sum() > 0  # through the straight-through estimator
    m.eval()
    idx = m.encode_indices(x)
    assert idx.shape == spatial
    torch.testing.assert_close(m.decode_indices(idx), m.decode(m.quantize(m.encode(x)).quantized))
    torch.testing.assert_close(m.reconstruct(x), m.mean_of(m.decode_indices(idx)))
    g = torch.Generator().manual_seed(0)
    assert m.sample(3, prior="uniform", generator=g).shape == (3, 1, 8, 8)
    assert m.draw_indices(0, "uniform").shape == (0, 4, *((L,) if L > 1 else ()))
    assert m(x, reduction="none").loss.shape == (5,)
    # a training step leaves the protocol's statistics in their shapes
    usage, perplexity = m.quantizer.codebook_usage(), m.quantizer.perplexity()
    assert usage.shape == perplexity.shape == ((L,) if L > 1 else ())
    assert m.quantizer.restarts.shape == ()


def test_the_empirical_prior_draws_each_level_from_its_histogram():
    m = _model("rvq")
    assert m.default_prior == "empirical"
    with pytest.raises(ValueError, match="training steps"):
        m.sample(2)
    counts = level_counts(m.quantizer)  # a view of the quantizer's histogram
    assert counts.shape == (3, 8)
    for level, code in enumerate((3, 5, 0)):
        counts[level, code] = 7  # one code used per level
    idx = m.draw_indices(6, "empirical", torch.Generator().manual_seed(0))
    assert idx.shape == (6, 4, 3)
    assert (idx == torch.tensor([3, 5, 0])).all()
    uniform = m.draw_indices(200, "uniform", torch.Generator().manual_seed(0))
    assert all(len(uniform[..., level].unique()) == 8 for level in range(3))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_samples_its_training_codes(kind):
    """After training steps the default prior of every fastvae quantizer is the empirical one:
    it draws only codes that the steps chose."""
    m = _model(kind)
    x = torch.rand(16, 1, 8, 8)
    chosen = m(x).indices
    m.eval()
    counts = level_counts(m.quantizer)
    if counts is None:  # a module that keeps no histogram: uniform
        assert m.default_prior == "uniform"
        return
    assert m.default_prior == "empirical"
    idx = m.draw_indices(50, generator=torch.Generator().manual_seed(1))
    L = m.num_levels
    for level in range(L):
        used = set(chosen.reshape(-1, L)[:, level].tolist())
        assert set(idx.reshape(-1, L)[:, level].tolist()) <= used


def test_a_quantizer_without_histogram_samples_uniformly():
    m = fv.VQVAE(nn.Identity(), nn.Identity(), RoundingFSQ([3, 3]), (2, 4))
    assert level_counts(m.quantizer) is None
    assert m.default_prior == "uniform"
    assert m.sample(2).shape == (2, 2, 4)  # the default prior
    with pytest.raises(ValueError, match="no code histogram"):
        m.sample(2, prior="empirical")


def test_a_huge_implicit_codebook_is_drawn_without_a_dense_histogram():
    """FSQ [4]*16: 2^32 codes; the uniform prior is randint, never a K-sized weight vector."""
    m = fv.VQVAE(nn.Identity(), nn.Identity(), fv.FiniteScalarQuantizer(16, [4] * 16), (16, 2))
    assert m.codebook_size == 2 ** 32
    assert m.default_prior == "uniform"  # its usage is tracked per dimension, not per code
    idx = m.draw_indices(5, "uniform", torch.Generator().manual_seed(0))
    assert idx.shape == (5, 2)
    assert int(idx.max()) < 2 ** 32
    assert int(idx.max()) > 2 ** 31  # spread over the whole range (10 draws)


def test_the_protocol_is_checked():
    class Partial(nn.Module):
        dim, codebook_size = 4, 8

    with pytest.raises(TypeError, match="num_levels, nearest, get_codes_from_indices"):
        fv.VQVAE(nn.Identity(), nn.Identity(), Partial(), (4, 2))
    with pytest.raises(TypeError, match="quantizer module"):
        check_quantizer(object())
    for q in (fv.VectorQuantizer(4, 8), StackedRVQ(4, 8), RoundingFSQ([2] * 4), SignLFQ(4)):
        fv.VQVAE(nn.Identity(), nn.Identity(), q, (4, 2))  # accepted
    assert fv.VectorQuantizer(4, 8).num_levels == 1
    with pytest.raises(ValueError, match="latent_shape"):
        fv.VQVAE(nn.Identity(), nn.Identity(), RoundingFSQ([3, 3]), (4, 2))


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"quantizer": "vq", "codebook_size": 8, "levels": [3, 3]}, ["levels", "'vq'"]),
    ({"quantizer": "vq", "codebook_size": 8, "num_quantizers": 2}, ["num_quantizers"]),
    ({"quantizer": "fsq", "levels": [3, 3], "decay": 0.5, "entropy_weight": 1.0},
     ["decay", "entropy_weight", "'fsq'"]),
    ({"quantizer": "lfq", "codebook_size": 8, "dead_code_threshold": 2.0},
     ["dead_code_threshold", "'lfq'"]),
    ({"quantizer": "rvq", "codebook_size": 8, "straight_through": "rotation"},
     ["straight_through", "'rvq'"]),
    ({"quantizer": "fsq"}, ["levels"]),
    ({"quantizer": "fsq", "levels": [3, 1]}, ["levels"]),
    ({"quantizer": "fsq", "levels": [3, 3], "codebook_size": 8}, ["codebook_size", "9"]),
    ({"quantizer": "fsq", "levels": [3, 3], "codebook_dim": 3}, ["codebook_dim", "2"]),
    ({"quantizer": "lfq", "codebook_size": 12}, ["power of 2"]),
    ({"quantizer": "lfq", "codebook_size": 8, "codebook_dim": 4}, ["codebook_dim", "3"]),
    ({"quantizer": "lfq"}, ["codebook_size"]),
    ({"quantizer": "rvq"}, ["codebook_size"]),
    ({"quantizer": "pq", "codebook_size": 8}, ["quantizer", "'pq'"]),
])
def test_build_vqvae_quantizer_rules(kwargs, words):
    with pytest.raises(ValueError, match=words[0]) as info:
        fv.build_vqvae((1, 8, 8), **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_build_vae_with_each_quantizer():
    fsq = fv.build_vae((1, 8, 8), 3, quantizer="fsq", levels=[3, 4, 3], hidden=[8])
    assert fsq.build_config["quantizer"] == "fsq"
    assert (fsq.codebook_size, fsq.latent_shape[0]) == (36, 3)
    with pytest.raises(ValueError, match="len"):  # latent_dim is the latent dimension
        fv.build_vae((1, 8, 8), 4, quantizer="fsq", levels=[3, 4, 3])
    lfq = fv.build_vae((1, 8, 8), 5, quantizer="lfq", codebook_size=32, hidden=[8])
    assert lfq.latent_shape[0] == 5
    rvq = fv.build_vae((1, 8, 8), 4, quantizer="rvq", codebook_size=8, num_quantizers=2,
                       hidden=[8])
    assert (rvq.num_levels, rvq.build_config["num_quantizers"]) == (2, 2)
    with pytest.raises(ValueError, match="beta"):
        fv.build_vae((1, 8, 8), 5, quantizer="lfq", codebook_size=32, beta=2.0)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_round_trip(kind, tmp_path):
    x = torch.rand(20, 1, 8, 8)
    config = {"kind": "vqvae", "input_shape": [1, 8, 8], "quantizer": kind, "hidden": [8],
              **KINDS[kind]}
    result = fv.train(config, x[:16], x[16:], fv.TrainConfig(epochs=1, batch_size=8),
                      out_dir=tmp_path, progress=False)
    model = fv.load_vae(tmp_path / "checkpoint.safetensors")
    assert model.build_config == result.model.build_config
    assert model.build_config["quantizer"] == kind
    state, again = result.model.state_dict(), model.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    result.model.eval()
    assert torch.equal(model.encode_indices(x), result.model.encode_indices(x))
    # a resume of another quantizer is refused, naming it
    other = {**config, "quantizer": "vq", "codebook_size": 8, "codebook_dim": 3}
    for key in ("levels", "num_quantizers"):
        other.pop(key, None)
    if kind != "vq":
        with pytest.raises(CheckpointError, match="quantizer"):
            fv.train(other, x[:16], x[16:], fv.TrainConfig(epochs=2, batch_size=8),
                     resume=tmp_path / "checkpoint.safetensors", progress=False)
