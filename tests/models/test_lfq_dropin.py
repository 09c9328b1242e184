"""fv.LFQ against the installed vector_quantize_pytorch.LFQ (1.32.0): same outputs, indices,
aux loss and its breakdown (to float rounding), same gradients, in training and evaluation;
image inputs; state_dict both ways; TypeError for what it does not support. And the
fastvae-native fv.LookupFreeQuantizer's protocol."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastvae as fv

vqp = pytest.importorskip("vector_quantize_pytorch")

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

CONFIGS = [
    dict(dim=8),
    dict(codebook_size=2 ** 6),
    dict(codebook_size=2 ** 5, num_codebooks=2),
    dict(dim=16, codebook_size=2 ** 5, commitment_loss_weight=0.25),
    dict(dim=6, spherical=True, codebook_scale=0.5, commitment_loss_weight=1.0),
    dict(dim=4, codebook_scale=2.0, diversity_gamma=0.5, entropy_loss_weight=0.3),
    dict(dim=12, codebook_size=2 ** 3, num_codebooks=2, projection_has_bias=False),
    dict(dim=10, codebook_size=2 ** 4, cosine_sim_project_in=True),
    dict(dim=5, soft_clamp_input_value=1.5, experimental_softplus_entropy_loss=True),
    dict(dim=6, orthogonal_rotation=True, commitment_loss_weight=0.5),
    dict(dim=3, keep_num_codebooks_dim=True),
]


def pair(**kwargs):
    torch.manual_seed(1)
    theirs = vqp.LFQ(**kwargs)
    torch.manual_seed(1)
    ours = fv.LFQ(**kwargs)
    return theirs, ours


def _assert_same(theirs, ours, x, train, **call):
    theirs.train(train)
    ours.train(train)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    (qa, ia, la), ba = theirs(xa, return_loss_breakdown=True, **call)
    (qb, ib, lb), bb = ours(xb, return_loss_breakdown=True, **call)
    assert torch.equal(ia, ib)
    assert ia.dtype == ib.dtype
    assert qa.shape == qb.shape
    assert qa.dtype == qb.dtype
    torch.testing.assert_close(qb, qa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    for a, b in zip(ba, bb, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if train:
        w = torch.randn(qa.shape, generator=torch.Generator().manual_seed(9))
        ga = torch.autograd.grad((qa * w).sum() + la, [xa, *theirs.parameters()])
        gb = torch.autograd.grad((qb * w).sum() + lb, [xb, *ours.parameters()])
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(1.0, a.abs().max()))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={v}" for a, v in
                                                                  k.items()))
def test_matches_the_package(kwargs, train):
    theirs, ours = pair(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 10, theirs.dim, generator=torch.Generator().manual_seed(0)) * 0.2
    x[0, 0] = 0.0  # 0 quantizes to -s
    _assert_same(theirs, ours, x, train)
    _assert_same(theirs, ours, x, train, inv_temperature=7.0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_images_and_videos(train):
    theirs, ours = pair(dim=4, commitment_loss_weight=0.1)
    img = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(2)) * 0.1
    _assert_same(theirs, ours, img, train)
    video = torch.randn(2, 4, 2, 3, 3, generator=torch.Generator().manual_seed(3)) * 0.1
    _assert_same(theirs, ours, video, train)
    (_, indices, _), _ = ours(img, return_loss_breakdown=True)
    torch.testing.assert_close(ours.indices_to_codes(indices), theirs.indices_to_codes(indices))
    theirs2, ours2 = pair(dim=4, channel_first=True)
    seq = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(4)) * 0.1
    _assert_same(theirs2, ours2, seq, train)


@pytest.mark.parametrize("kwargs", [dict(dim=8), dict(codebook_size=2 ** 4, num_codebooks=3),
                                    dict(dim=10, codebook_size=2 ** 4, spherical=True),
                                    dict(dim=6, orthogonal_rotation=True)])
def test_indices_to_codes(kwargs):
    theirs, ours = pair(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, theirs.dim, generator=torch.Generator().manual_seed(5))
    ours.eval()
    quantized, indices, _ = ours(x)
    for project_out in (True, False):
        torch.testing.assert_close(ours.indices_to_codes(indices, project_out=project_out),
                                   theirs.indices_to_codes(indices, project_out=project_out))
    torch.testing.assert_close(ours.indices_to_codes(indices), quantized)


def test_mask_selects_rows():
    """With ``mask`` the entropy and commitment are over the selected rows. The package's batch
    entropy with a mask equals its per-sample entropy (it averages over no rows); ours is the
    entropy of the selected rows' average: the package's value on those rows without a mask."""
    theirs, ours = pair(dim=5, commitment_loss_weight=0.5)
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(6)) * 0.1
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(7)) > 0.4
    ours.train()
    theirs.train()
    (_q, idx, _), (ps, cb, commit) = ours(x, mask=mask, return_loss_breakdown=True)
    (_q2, idx2, _), (ps2, cb2, commit2) = theirs(x[mask][None], return_loss_breakdown=True)
    torch.testing.assert_close(ps, ps2)
    torch.testing.assert_close(cb, cb2)
    torch.testing.assert_close(commit, commit2)
    assert torch.equal(idx[mask], idx2[0])


def test_state_dict_both_ways():
    for kwargs in (dict(dim=16, codebook_size=2 ** 5), dict(dim=6, orthogonal_rotation=True),
                   dict(dim=10, codebook_size=2 ** 4, cosine_sim_project_in=True)):
        torch.manual_seed(3)
        theirs = vqp.LFQ(**kwargs)
        torch.manual_seed(4)
        ours = fv.LFQ(**kwargs)
        ours.load_state_dict(theirs.state_dict())
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        torch.manual_seed(5)
        ours2 = fv.LFQ(**kwargs)
        theirs.load_state_dict(ours2.state_dict())
        for key, value in ours2.state_dict().items():
            assert torch.equal(theirs.state_dict()[key], value), key


def test_same_parameters_from_the_same_seed():
    theirs, ours = pair(dim=16, codebook_size=2 ** 5, orthogonal_rotation=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_half_precision_input():
    theirs, ours = pair(dim=6, commitment_loss_weight=0.5)
    x = (torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(8)) * 0.1).bfloat16()
    _assert_same(theirs, ours, x, True)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(dim=4, straight_through_activation=nn.Tanh()), "straight_through_activation"),
    (dict(dim=4, frac_per_sample_entropy=0.5), "frac_per_sample_entropy"),
    (dict(dim=4, heads=2), "heads"),
])
def test_unsupported_arguments_raise_type_error(kwargs, name):
    with pytest.raises(TypeError, match=name):
        fv.LFQ(**kwargs)


def test_default_activation_is_accepted():
    fv.LFQ(dim=4, straight_through_activation=nn.Identity())


@pytest.mark.parametrize(("kwargs", "error"), [
    (dict(), ValueError),
    (dict(codebook_size=12), ValueError),
    (dict(codebook_size=2 ** 4, num_codebooks=2, keep_num_codebooks_dim=False), ValueError),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        fv.LFQ(**kwargs)


def test_wrong_feature_size():
    with pytest.raises(ValueError, match="features"):
        fv.LFQ(dim=4)(torch.zeros(2, 3, 5))


# ---------------------------------------------------------------------------------------------
# fv.LookupFreeQuantizer: the quantizer-module protocol
# ---------------------------------------------------------------------------------------------


def test_native_module_protocol():
    q = fv.LookupFreeQuantizer(8, num_codebooks=2, commitment_weight=0.5, entropy_weight=0.2,
                               usage_window=3)
    assert (q.dim, q.codebook_size, q.num_levels) == (8, 16, 1)
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    x.requires_grad_(True)
    out = q(x)
    assert isinstance(out, fv.QuantizerOutput)
    assert out.indices.shape == (4, 5, 2)
    assert out.indices.dtype == torch.int64
    ref = fv.lookup_free_quantize(x, num_codebooks=2, commitment_weight=0.5, entropy_weight=0.2)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.commitment_loss, 0.5 * ref.commitment_loss)
    torch.testing.assert_close(out.codebook_loss, 0.2 * (ref.per_sample_entropy
                                                         - ref.codebook_entropy))
    out.loss.backward()
    assert torch.equal(q.nearest(x), out.indices)
    torch.testing.assert_close(q.get_codes_from_indices(out.indices), out.quantized.detach())
    assert q.restarts.item() == 0
    used = len({(c, i) for c in range(2) for i in out.indices[..., c].reshape(-1).tolist()})
    torch.testing.assert_close(q.codebook_usage(), torch.tensor(used / 32))
    for _ in range(3):  # other codes: the first step's fall out of the window
        q(torch.full((1, 8), 1.0))
    torch.testing.assert_close(q.codebook_usage(), torch.tensor(2 / 32))
    assert 1.0 <= q.perplexity().item() <= 16.0
    q.eval()
    before = q.steps.clone()
    out = q(x)
    assert out.codebook_loss == 0
    assert torch.equal(q.steps, before)


def test_native_module_perplexity_of_a_uniform_histogram():
    q = fv.LookupFreeQuantizer(2, usage_window=1)
    q(torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(q.perplexity(), torch.tensor(4.0))
    torch.testing.assert_close(q.codebook_usage(), torch.tensor(1.0))


def test_native_module_large_codebook_state_is_linear_in_k():
    q = fv.LookupFreeQuantizer(18)
    assert q.codebook_size == 2 ** 18
    sizes = {name: b.numel() for name, b in q.named_buffers()}
    assert max(sizes.values()) == 2 ** 18
    q.eval()
    assert q(torch.randn(3, 18)).indices.shape == (3,)


def test_native_module_errors():
    with pytest.raises(ValueError, match="multiple"):
        fv.LookupFreeQuantizer(7, num_codebooks=2)
    with pytest.raises(TypeError, match="dim"):
        fv.LookupFreeQuantizer(4.0)
    with pytest.raises(ValueError, match="x must have shape"):
        fv.LookupFreeQuantizer(4)(torch.zeros(3, 5))
    assert math.isfinite(fv.LookupFreeQuantizer(4).perplexity().item())
