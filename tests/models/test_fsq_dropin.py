"""fv.FSQ against the installed vector-quantize-pytorch 1.32.0 (the anchor): the same outputs and
indices (bitwise where the package is exact), gradients to float rounding, in training and
evaluation, for sequences, images and videos, channel-first, several codebooks, projections,
the symmetric and hard-clamped bounds, noise dropout and the orthogonal rotation; state_dict
keys and shapes both ways; TypeError for what is not supported. And fv.FiniteScalarQuantizer,
fastvae's module of the quantizer protocol."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv

vqp = pytest.importorskip("vector_quantize_pytorch")

GRAD_TOL = dict(rtol=2e-6, atol=2e-6)


def _pair(seed=0, **kwargs):
    """The package's FSQ and ours from the same seed (same projection and rotation draws),
    ours loaded with the package's state_dict."""
    torch.manual_seed(seed)
    theirs = vqp.FSQ(**kwargs)
    torch.manual_seed(seed)
    ours = fv.FSQ(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _x(*shape, seed=1, scale=1.5):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "8-5-5-5": (dict(levels=[8, 5, 5, 5]), (2, 50, 4)),
    "8-8-8-5-5-5": (dict(levels=[8, 8, 8, 5, 5, 5]), (3, 40, 6)),
    "projection": (dict(levels=[8, 5, 5, 5], dim=16), (2, 30, 16)),
    "projection-no-bias": (dict(levels=[7, 5, 3], dim=9, projection_has_bias=False),
                           (2, 30, 9)),
    "codebooks": (dict(levels=[8, 5, 5], num_codebooks=3), (2, 20, 9)),
    "codebooks-projection": (dict(levels=[4, 4], num_codebooks=2, dim=12), (2, 20, 12)),
    "image": (dict(levels=[8, 5, 5, 5], dim=4), (2, 4, 6, 7)),
    "image-projection": (dict(levels=[8, 6, 5], dim=8), (2, 8, 5, 3)),
    "video": (dict(levels=[5, 5, 5], dim=3), (2, 3, 2, 4, 5)),
    "channel-first": (dict(levels=[8, 5, 5], channel_first=True), (2, 3, 17)),
    "symmetric": (dict(levels=[2, 3, 4, 8], preserve_symmetry=True), (2, 40, 4)),
    "hard-clamp": (dict(levels=[8, 5, 5], bound_hard_clamp=True), (2, 40, 3)),
    "hard-symmetric": (dict(levels=[4, 5], bound_hard_clamp=True, preserve_symmetry=True),
                       (2, 40, 2)),
    "rotation": (dict(levels=[5, 5, 5, 5], orthogonal_rotation=True), (2, 30, 4)),
    "float32-only": (dict(levels=[8, 5, 5], allowed_dtypes=(torch.float32,)), (2, 30, 3)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("config", CONFIGS)
def test_same_outputs_indices_and_gradients(config, training):
    kwargs, shape = CONFIGS[config]
    theirs, ours = _pair(**kwargs)
    theirs.train(training)
    ours.train(training)
    x = _x(*shape)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_t, idx_t = theirs(xt)
    out_o, idx_o = ours(xo)
    assert out_o.shape == out_t.shape
    assert out_o.dtype == out_t.dtype
    assert idx_o.shape == idx_t.shape
    assert idx_o.dtype == idx_t.dtype
    assert torch.equal(idx_o, idx_t)
    assert torch.equal(out_o, out_t)  # projections and rotations: the same torch ops
    g = _x(*out_t.shape, seed=2)
    (out_t * g).sum().backward()
    (out_o * g).sum().backward()
    torch.testing.assert_close(xo.grad, xt.grad, **GRAD_TOL)
    for (name, p_t), (_, p_o) in zip(theirs.named_parameters(), ours.named_parameters(),
                                     strict=True):
        # a parameter's gradient sums N products whose factors agree to a few ulps: its
        # error scales with the largest of them, not with each element
        scale = max(float(p_t.grad.abs().max()), 1.0)
        torch.testing.assert_close(p_o.grad, p_t.grad, rtol=GRAD_TOL["rtol"],
                                   atol=GRAD_TOL["atol"] * scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    """float64 quantizes in float64 (the constants in float32, as the package); half precision
    in float32 (the package's force_quantization_f32), the result in the input's dtype."""
    theirs, ours = _pair(levels=[8, 5, 5, 5])
    x = _x(2, 60, 4).to(dtype)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_t, idx_t = theirs(xt)
    out_o, idx_o = ours(xo)
    assert out_o.dtype == dtype
    assert torch.equal(out_o, out_t)
    assert torch.equal(idx_o, idx_t)
    g = _x(2, 60, 4, seed=3).to(dtype)
    (out_t * g).sum().backward()
    (out_o * g).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(xo.grad, xt.grad, rtol=tol, atol=tol)


def test_noise_dropout_draws_what_the_package_draws():
    theirs, ours = _pair(levels=[4, 5, 6], preserve_symmetry=True, noise_dropout=0.5)
    x = _x(2, 50, 3)
    torch.manual_seed(7)
    out_t, idx_t = theirs(x)
    torch.manual_seed(7)
    out_o, idx_o = ours(x)
    assert torch.equal(out_o, out_t)
    assert torch.equal(idx_o, idx_t)
    ours.eval()
    theirs.eval()
    assert torch.equal(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("config", ["8-5-5-5", "codebooks", "image", "channel-first",
                                    "symmetric", "rotation", "projection"])
def test_indices_to_codes_and_back(config):
    kwargs, shape = CONFIGS[config]
    theirs, ours = _pair(**kwargs)
    ours.eval()
    theirs.eval()
    _, idx = theirs(_x(*shape))
    got, want = ours.indices_to_codes(idx), theirs.indices_to_codes(idx)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if "dim" not in kwargs and not kwargs.get("orthogonal_rotation"):
        assert torch.equal(got, want)
    codes = fv.fsq_indices_to_codes(idx, kwargs["levels"],
                                    preserve_symmetry=kwargs.get("preserve_symmetry", False))
    assert torch.equal(ours.codes_to_indices(codes), theirs.codes_to_indices(codes))
    assert torch.equal(ours.indices_to_level_indices(idx), theirs.indices_to_level_indices(idx))


def test_codebook_size_and_implicit_codebook():
    theirs, ours = _pair(levels=[8, 5, 5, 5])
    assert ours.codebook_size == theirs.codebook_size == 1000
    assert torch.equal(ours.implicit_codebook, theirs.implicit_codebook)
    theirs_s, ours_s = _pair(levels=[2, 3, 4], preserve_symmetry=True)
    assert torch.equal(ours_s.implicit_codebook, theirs_s.implicit_codebook)


def test_huge_codebook_constructs_at_once_and_is_exact():
    """[4] * 16: 2**32 codes. The package builds a 2**32 x 16 implicit codebook (34 GB) at
    construction; ours holds nothing of that size (a few dozen numbers) and refuses to build
    it."""
    q = fv.FSQ(levels=[4] * 16)
    assert q.codebook_size == 4**16
    assert sum(b.numel() for b in q.buffers()) < 100
    with pytest.raises(ValueError, match="implicit_codebook would hold"):
        _ = q.implicit_codebook
    x = _x(2, 10, 16)
    out, idx = q(x)
    assert idx.dtype == torch.int64
    assert torch.equal(q.indices_to_codes(idx), out)
    assert torch.equal(q.codes_to_indices(out), idx)


def test_return_indices_false_and_keep_dim():
    theirs, ours = _pair(levels=[8, 5, 5], return_indices=False)
    x = _x(2, 10, 3)
    assert ours(x)[1] is None
    assert theirs(x)[1] is None
    theirs, ours = _pair(levels=[8, 5, 5], keep_num_codebooks_dim=True)
    assert ours(x)[1].shape == theirs(x)[1].shape == (2, 10, 1)


@pytest.mark.parametrize("kwargs", [dict(levels=[8, 5, 5, 5], dim=16),
                                    dict(levels=[5, 5, 5], orthogonal_rotation=True),
                                    dict(levels=[4, 4], num_codebooks=2, dim=6,
                                         projection_has_bias=False)])
def test_state_dict_both_ways(kwargs):
    torch.manual_seed(0)
    theirs = vqp.FSQ(**kwargs)
    torch.manual_seed(1)
    ours = fv.FSQ(**kwargs)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(a)  # theirs into ours
    theirs2 = vqp.FSQ(**kwargs)
    theirs2.load_state_dict(ours.state_dict())  # ours into theirs
    x = _x(2, 10, theirs.dim)
    assert torch.equal(ours(x)[1], theirs2(x)[1])


def test_unsupported_arguments_raise_type_error():
    with pytest.raises(TypeError, match="force_quantization_f32"):
        fv.FSQ(levels=[8, 5], force_quantization_f32=False)
    with pytest.raises(TypeError, match="allowed_dtypes"):
        fv.FSQ(levels=[8, 5], allowed_dtypes=(torch.float16, torch.float32))
    with pytest.raises(TypeError, match="unexpected keyword"):
        fv.FSQ(levels=[8, 5], not_an_argument=1)
    with pytest.raises(ValueError, match="preserve_symmetry"):
        fv.FSQ(levels=[2, 5])
    with pytest.raises(ValueError, match="noise_dropout"):
        fv.FSQ(levels=[4, 5], noise_dropout=0.1)
    with pytest.raises(ValueError, match="expected dimension of 3"):
        fv.FSQ(levels=[8, 5, 5])(torch.zeros(2, 4, 4))


# ---------------------------------------------------------------------------------------------
# FiniteScalarQuantizer: the quantizer protocol
# ---------------------------------------------------------------------------------------------


def test_protocol():
    q = fv.FiniteScalarQuantizer(4, [8, 5, 5, 5], usage_window=3)
    assert q.dim == 4
    assert q.codebook_size == 1000
    assert q.num_levels == 1
    x = _x(6, 10, 4).requires_grad_()
    out = q(x)
    assert isinstance(out, fv.QuantizerOutput)
    assert out.quantized.shape == x.shape
    assert out.indices.shape == (6, 10)
    assert out.indices.dtype == torch.int64
    for t in (out.loss, out.commitment_loss, out.codebook_loss):
        assert t.shape == ()
        assert t.item() == 0.0
    want_codes, want_idx = fv.finite_scalar_quantize(x, [8, 5, 5, 5], index_dtype=torch.int64)
    assert torch.equal(out.quantized, want_codes)
    assert torch.equal(out.indices, want_idx)
    assert torch.equal(q.nearest(x), want_idx)
    assert torch.equal(q.get_codes_from_indices(out.indices), want_codes.detach())
    out.quantized.sum().backward()
    assert x.grad is not None
    used = out.indices.unique().numel()
    assert q.codebook_usage().item() == pytest.approx(used / 1000)
    assert 1.0 <= q.perplexity().item() <= used + 1e-6
    assert q.restarts.item() == 0
    assert q.restarts.dtype == torch.int64
    # the window: three steps on one code forget the others
    for _ in range(3):
        q(torch.full((2, 4), 5.0))
    assert q.codebook_usage().item() == pytest.approx(1 / 1000)
    q.eval()
    before = q.usage_ema.clone()
    q(x)
    assert torch.equal(q.usage_ema, before)


def test_protocol_projection_and_large_codebook():
    q = fv.FiniteScalarQuantizer(32, [4] * 16)  # 2**32 codes: tracked per dimension
    assert q.usage_ema.numel() == 64
    x = _x(50, 32)
    out = q(x)
    assert out.quantized.shape == x.shape
    assert out.indices.dtype == torch.int64
    assert 0 < q.codebook_usage().item() <= 1
    assert 1 <= q.perplexity().item() <= 4**16
    assert torch.equal(q.nearest(x), out.indices)
    torch.testing.assert_close(q.get_codes_from_indices(out.indices), out.quantized.detach())


def test_protocol_nan_rows_are_not_counted():
    q = fv.FiniteScalarQuantizer(3, [3, 3, 3])
    q(torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert q.usage_ema.sum().item() == pytest.approx(0.01)
