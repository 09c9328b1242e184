"""fv.ResidualVectorQuantizer, the fastvae-native residual quantizer: the quantizer-module
protocol (shapes, losses, nearest, get_codes_from_indices, usage and perplexity per level,
restarts), its EMA update against a level-by-level loop of the formula, per-sample quantize
dropout (repeatable by seed), k-means level by level, learned codebooks, and no host sync."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv
from fastvae.models.quantizer import QuantizerOutput


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_protocol_shapes_and_losses():
    rvq = fv.ResidualVectorQuantizer(6, 32, 3, commitment_weight=0.5)
    assert (rvq.dim, rvq.codebook_size, rvq.num_levels) == (6, 32, 3)
    x = _x(4, 7, 6).requires_grad_()
    out = rvq(x)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == x.shape
    assert out.indices.shape == (4, 7, 3)
    assert out.indices.dtype == torch.int64
    assert out.commitment_loss.shape == out.codebook_loss.shape == (3,)
    torch.testing.assert_close(out.loss, out.commitment_loss.sum())  # EMA: commitment only
    torch.testing.assert_close(out.commitment_loss, 0.5 * out.codebook_loss)
    out.loss.backward()
    assert x.grad is not None
    rvq.eval()
    assert torch.equal(rvq.nearest(x), rvq(x).indices)
    torch.testing.assert_close(rvq.get_codes_from_indices(rvq.nearest(x)), rvq(x).quantized)
    assert rvq.codebook_usage().shape == rvq.perplexity().shape == (3,)
    assert rvq.restarts.shape == ()
    assert rvq.restarts.dtype == torch.int64


def test_ema_update_is_the_level_by_level_formula():
    torch.manual_seed(0)
    rvq = fv.ResidualVectorQuantizer(4, 8, 3, decay=0.7, eps=1e-3)
    cb0 = rvq.codebooks.clone()
    x = _x(50, 4)
    out = rvq(x)
    # the formula, level by level on the residual with the codes before the update
    r = x.clone()
    for level in range(3):
        idx = out.indices[:, level]
        counts = torch.bincount(idx, minlength=8).float()
        sums = torch.zeros(8, 4).index_add_(0, idx, r)
        n = 0.7 * 1.0 + 0.3 * counts
        m = 0.7 * cb0[level] + 0.3 * sums
        smoothed = (n + 1e-3) / (n.sum() + 8e-3) * n.sum()
        torch.testing.assert_close(rvq.cluster_size[level], n)
        torch.testing.assert_close(rvq.embed_avg[level], m)
        torch.testing.assert_close(rvq.codebooks[level], m / smoothed[:, None])
        r = r - cb0[level][idx]


def test_per_sample_quantize_dropout_repeatable_by_seed():
    rvq = fv.ResidualVectorQuantizer(4, 8, 5, quantize_dropout=True,
                                     quantize_dropout_cutoff_index=1)
    x = _x(64, 3, 4)
    torch.manual_seed(7)
    a = rvq(x).indices
    active = (a != -1).sum(-1)
    assert (active == active[:, :1]).all()  # one count per sample (dim 0)
    assert set(active[:, 0].tolist()) == {2, 3, 4, 5}  # cutoff index 1: >= 2 levels
    assert torch.equal(a != -1, torch.arange(5) < active[..., None])  # a prefix of levels
    rvq2 = fv.ResidualVectorQuantizer(4, 8, 5, quantize_dropout=True,
                                      quantize_dropout_cutoff_index=1)
    rvq2.load_state_dict(rvq.state_dict())
    rvq.eval()
    assert (rvq(x).indices != -1).all()


def test_dropped_levels_give_no_statistics():
    rvq = fv.ResidualVectorQuantizer(4, 8, 2, decay=0.5)
    x = _x(30, 4)
    nl = torch.tensor([1] * 30)
    before = rvq.cluster_size[1].clone()
    rvq._dropout_levels = lambda x: nl  # every sample keeps one level
    rvq(x)
    torch.testing.assert_close(rvq.cluster_size[1], 0.5 * before)  # decayed, no counts
    assert rvq.cluster_size[0].sum() > 0.5 * 8


def test_kmeans_init_level_by_level_and_learned_codebooks():
    torch.manual_seed(1)
    rvq = fv.ResidualVectorQuantizer(3, 8, 2, kmeans_init=True, kmeans_iters=3)
    x = _x(200, 3)
    rvq(x)
    assert bool(rvq.initted)
    assert rvq.codebooks.abs().sum() > 0
    learned = fv.ResidualVectorQuantizer(3, 8, 2, decay=None)
    assert isinstance(learned.codebooks, torch.nn.Parameter)
    out = learned(x)
    torch.testing.assert_close(out.loss, (out.commitment_loss + out.codebook_loss).sum())
    out.loss.backward()
    assert learned.codebooks.grad.abs().sum() > 0


def test_usage_perplexity_and_restarts():
    rvq = fv.ResidualVectorQuantizer(4, 64, 2, decay=0.5, dead_code_threshold=0.5,
                                     usage_window=3)
    assert torch.equal(rvq.codebook_usage(), torch.zeros(2))
    for step in range(4):
        rvq(_x(40, 4, seed=step))
    usage, ppl = rvq.codebook_usage(), rvq.perplexity()
    assert ((usage > 0) & (usage <= 1)).all()
    assert ((ppl >= 1) & (ppl <= 64)).all()
    assert int(rvq.restarts) > 0
    # a window of one step: only the last batch's codes count
    one = fv.ResidualVectorQuantizer(4, 16, 1, usage_window=1)
    one(_x(3, 4))
    used = len(torch.unique(one.nearest(_x(3, 4))))
    assert one.codebook_usage()[0] <= used / 16 + 1e-6


def test_a_training_step_compiles_without_graph_breaks():
    # a host sync (.item(), a branch on data) would break the graph: fullgraph=True refuses it
    rvq = fv.ResidualVectorQuantizer(4, 16, 3, dead_code_threshold=1.0, quantize_dropout=True)
    x = _x(8, 5, 4)
    rvq(x)  # k-means / first-call Python state settled

    def step(x):
        out = rvq(x)
        return out.quantized, out.loss, rvq.codebook_usage(), rvq.perplexity()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q, loss, usage, ppl = compiled(x.clone().requires_grad_())
    loss.backward()
    assert q.shape == x.shape
    assert usage.shape == ppl.shape == (3,)
    assert int(rvq.steps) == 2


@pytest.mark.parametrize(("kwargs", "err"), [
    (dict(num_quantizers=0), ValueError), (dict(decay=1.5), ValueError),
    (dict(straight_through="x"), ValueError), (dict(quantize_dropout_cutoff_index=3), ValueError),
    (dict(quantize_dropout_cutoff_index=1.0), TypeError), (dict(dim=2.0), TypeError),
])
def test_argument_errors(kwargs, err):
    args = dict(dim=4, codebook_size=8, num_quantizers=3) | kwargs
    with pytest.raises(err):
        fv.ResidualVectorQuantizer(args.pop("dim"), args.pop("codebook_size"),
                                   args.pop("num_quantizers"), **args)
    with pytest.raises(ValueError, match="x must have shape"):
        fv.ResidualVectorQuantizer(4, 8, 2)(_x(3, 5))
