"""fv.residual_vector_quantize: the fused residual-VQ op on every backend.

The oracle is the definition, level by level: ``fv.nearest_code``'s definition (the whole small
distance matrix in the compute dtype, in the one order; lowest index on ties) on the running
residual ``r_{l+1} = r_l - c_l``; every backend must return those indices and bitwise the
quantized sum and distances. A float64 brute force checks that each level takes the nearest
code of its residual. Gradients against plain autograd of the formula (float64).
"""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, compute_dtype, cpu_isas_and_threads, device_for

import fastvae as fv
from fastvae.ops import custom_ops as _ops
from fastvae.ops import native, reference

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _codebook_grad(backend: str) -> bool:
    """The CUDA library has no kernel for the codebooks' gradient (learned codebooks): it says
    so (test_cuda_codebook_gradient_says_so); the other backends have it."""
    return backend != "cuda"


def _definition(x, codebooks, n_levels=None):
    """(indices (N, L), quantized (N, D), distances (N, L)) level by level from the whole
    distance matrices (reference.nearest_code_distances) in the compute dtype."""
    c = compute_dtype(torch.promote_types(x.dtype, codebooks.dtype))
    r = x.to(c).cpu()
    cbs = codebooks.to(c).cpu()
    N, L = r.shape[0], cbs.shape[0]
    q = torch.zeros_like(r)
    idx = torch.full((N, L), -1, dtype=torch.int64)
    dist = torch.zeros((N, L), dtype=c)
    for level in range(L):
        d = reference.nearest_code_distances(r, cbs[level], "l2")
        masked = torch.where(torch.isnan(d), torch.inf, d)
        i = torch.where(masked.amin(1) < torch.inf, masked.argmin(1), 0)
        active = torch.ones(N, dtype=torch.bool) if n_levels is None else n_levels.cpu() > level
        code = cbs[level][i]
        r = torch.where(active[:, None], r - code, r)
        q = torch.where(active[:, None], q + code, q)
        idx[:, level] = torch.where(active, i, -1)
        dist[:, level] = torch.where(active, d.gather(1, i[:, None])[:, 0], 0)
    return idx, q, dist


def _run(backend, x, codebooks, **kwargs):
    device = device_for(backend)
    nl = kwargs.pop("n_levels", None)
    if isinstance(nl, torch.Tensor):
        nl = nl.to(device)
    return fv.residual_vector_quantize(x.to(device), codebooks.to(device), n_levels=nl,
                                       reduction="none", **kwargs)


def _check(backend, x, codebooks, n_levels=None):
    out = _run(backend, x, codebooks, n_levels=n_levels)
    D, L = x.shape[-1], codebooks.shape[0]
    nl = None if n_levels is None else n_levels.reshape(-1)
    idx, q, dist = _definition(x.reshape(-1, D), codebooks, nl)
    assert out.indices.dtype == torch.int64
    assert out.indices.shape == (*x.shape[:-1], L)
    assert torch.equal(out.indices.cpu().reshape(-1, L), idx)
    assert out.quantized.dtype == x.dtype
    assert torch.equal(out.quantized.cpu().reshape(-1, D), q.to(x.dtype))
    torch.testing.assert_close(out.codebook_loss.cpu().reshape(-1, L), dist, rtol=0, atol=0,
                               equal_nan=True)
    return out, idx


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size", [(37, 3, 4, 5), (130, 16, 3, 70), (64, 8, 1, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_the_level_by_level_definition(backend, size, dtype):
    N, D, L, K = size
    x = _x(N, D, seed=1, dtype=dtype)
    cb = _x(L, K, D, seed=2, dtype=dtype) * torch.logspace(0, -1, L)[:, None, None].to(dtype)
    _, idx = _check(backend, x, cb)
    # each level's code is the float64 nearest code of its residual (well-separated data)
    if dtype == torch.float64:
        r = x.double()
        for level in range(L):
            d64 = ((r[:, None, :] - cb[level].double()[None]) ** 2).sum(-1)
            assert torch.equal(d64.argmin(1), idx[:, level])
            r = r - cb[level].double()[idx[:, level]]


def test_one_level_is_nearest_code(backend):
    x, cb = _x(90, 12, seed=3), _x(1, 300, 12, seed=4)
    out = _run(backend, x, cb)
    index, dist = fv.nearest_code(x.to(device_for(backend)), cb[0].to(device_for(backend)))
    assert torch.equal(out.indices[:, 0], index)
    assert torch.equal(out.codebook_loss[:, 0], dist)
    assert torch.equal(out.quantized.cpu(), cb[0][index.cpu()])


def test_ties_and_duplicates_give_the_lowest_index(backend):
    # every code duplicated: the lower copy wins at every level; the residual of an exact hit
    # is 0, equidistant from +-e: the lower index
    base = _x(2, 5, 6, seed=5)
    base[1, 2] = -base[1, 1]
    cb = torch.cat([base, base], 1)
    x = torch.cat([_x(40, 6, seed=6), base[0][:3], torch.zeros(2, 6)])
    _out, idx = _check(backend, x, cb)
    assert (idx < 5).all()
    assert torch.equal(idx[40:43, 0], torch.arange(3))
    # exact hits leave a zero residual: codes 1 and 2 of level 1 tie (if nearest), 1 wins
    assert not (idx[40:43, 1] == 2).any()


def test_near_a_common_offset(backend):
    # the expanded form cancels here; the direct difference on the residual does not
    g = torch.Generator().manual_seed(7)
    x = 300 + 0.05 * torch.randn(64, 16, generator=g)
    cb = torch.stack([300 + 0.05 * torch.randn(64, 16, generator=g),
                      0.05 * torch.randn(64, 16, generator=g)])
    _check(backend, x, cb)


def test_quantize_dropout_masks(backend):
    x, cb = _x(5, 7, 4, seed=8), _x(4, 9, 4, seed=9)
    n = torch.tensor([[0, 1, 2, 3, 4, 9, -2], [4, 4, 4, 0, 0, 1, 1], [2] * 7, [3] * 7,
                      [1] * 7])
    out, idx = _check(backend, x, cb, n_levels=n)
    levels = torch.arange(4)
    assert torch.equal(idx.view(5, 7, 4) == -1, levels >= n[..., None].clamp(0, 4))
    assert (out.commitment_loss.cpu().view(5, 7, 4)[idx.view(5, 7, 4) == -1] == 0).all()
    # an int n_levels and a 0-d tensor are every vector's
    a = _run(backend, x, cb, n_levels=2)
    b = _run(backend, x, cb, n_levels=torch.tensor(2))
    c = _run(backend, x, cb[:2])
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized, c.quantized)
    assert (a.indices[..., 2:] == -1).all()
    assert (_run(backend, x, cb, n_levels=0).quantized == 0).all()


def test_any_strides(backend):
    x = _x(20, 30, seed=10)[:, ::3].t()  # (10, 20), non-contiguous
    cb = _x(3, 11, 40, seed=11)[:, :, ::2]
    _check(backend, x, cb)
    want = _run(backend, x.contiguous(), cb.contiguous())
    got = _run(backend, x, cb)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.quantized, want.quantized)


def test_mixed_dtypes_compute_in_the_common_one(backend):
    x, cb = _x(30, 6, seed=12, dtype=torch.bfloat16), _x(3, 8, 6, seed=13)
    out, _ = _check(backend, x, cb)
    assert out.commitment_loss.dtype == torch.float32
    x64 = _x(30, 6, seed=12, dtype=torch.float64)
    assert _run(backend, x64, cb).commitment_loss.dtype == torch.float64


def test_empty_inputs(backend):
    cb = _x(3, 5, 4, seed=14)
    for reduction, want in (("sum", 0.0), ("none", None)):
        out = fv.residual_vector_quantize(torch.zeros(0, 4, device=device_for(backend)),
                                          cb.to(device_for(backend)), reduction=reduction)
        assert out.indices.shape == (0, 3)
        assert out.quantized.shape == (0, 4)
        if want is not None:
            assert (out.commitment_loss == 0).all()
            assert out.commitment_loss.shape == (3,)
    out = fv.residual_vector_quantize(torch.zeros(0, 4), cb)
    assert torch.isnan(out.loss)  # the mean over no elements, as torch
    x = torch.zeros(2, 5, 4, requires_grad=True)
    out = fv.residual_vector_quantize(x[:, :0], cb)
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_nan_propagates_to_its_row(backend):
    x, cb = _x(10, 5, seed=15), _x(3, 7, 5, seed=16)
    x[3, 2] = float("nan")
    out, idx = _check(backend, x, cb)
    assert torch.isnan(out.codebook_loss[3].cpu()).all()
    assert torch.isfinite(out.codebook_loss[[0, 1, 2, 4]].cpu()).all()
    assert (idx[3] == 0).all()


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _autograd_oracle(x, cb, n_levels, beta, mode):
    """The formula in plain float64 autograd, level by level (L x N x D, small)."""
    from fastvae.ops.quantize import _straight_through

    r = x
    q = torch.zeros_like(x)
    commits, books = [], []
    idx = _definition(x.detach(), cb.detach(), n_levels)[0]
    for level in range(cb.shape[0]):
        i = idx[:, level]
        a = (i >= 0)[:, None]
        c = cb[level][i.clamp_min(0)]
        st = _straight_through(r, c, mode)
        q = q + torch.where(a, st, 0)
        commits.append(beta * torch.where(a, (r - c.detach()) ** 2, 0).sum(-1))
        books.append(torch.where(a, (r.detach() - c) ** 2, 0).sum(-1))
        r = torch.where(a, r - c.detach(), r)
    return q, torch.stack(commits, -1), torch.stack(books, -1)


@pytest.mark.parametrize("mode", ["ste", "rotation"])
@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_match_autograd_of_the_formula(backend, mode, dropout):
    device = device_for(backend)
    x = _x(40, 6, seed=17, dtype=torch.float64)
    cb = _x(3, 10, 6, seed=18, dtype=torch.float64)
    n = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1)) if dropout \
        else None
    gq = _x(40, 6, seed=19, dtype=torch.float64)
    gc, gb = _x(40, 3, seed=20, dtype=torch.float64), _x(40, 3, seed=21, dtype=torch.float64)
    xa, ca = x.clone().requires_grad_(), cb.clone().requires_grad_()
    q, commit, book = _autograd_oracle(xa, ca, n, 0.3, mode)
    want = torch.autograd.grad((q * gq).sum() + (commit * gc).sum() + (book * gb).sum(),
                               (xa, ca))
    xb, cbb = x.to(device).requires_grad_(), cb.to(device).requires_grad_(_codebook_grad(backend))
    out = fv.residual_vector_quantize(xb, cbb, n_levels=None if n is None else n.to(device),
                                      beta=0.3, straight_through=mode, reduction="none")
    torch.testing.assert_close(out.quantized.cpu(), q.detach())
    got = torch.autograd.grad((out.quantized * gq.to(device)).sum()
                              + (out.commitment_loss * gc.to(device)).sum()
                              + (out.codebook_loss * gb.to(device)).sum(),
                              (xb, cbb) if _codebook_grad(backend) else (xb,))
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-10, atol=1e-12)
    if _codebook_grad(backend):
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction):
    x, cb = _x(4, 9, 5, seed=22), _x(3, 6, 5, seed=23)
    none = _run(backend, x, cb, beta=0.5)
    out = fv.residual_vector_quantize(x.to(device_for(backend)), cb.to(device_for(backend)),
                                      beta=0.5, reduction=reduction)
    scale = x.numel() if reduction == "mean" else 1
    torch.testing.assert_close(out.commitment_loss, none.commitment_loss.sum((0, 1)) / scale)
    torch.testing.assert_close(out.codebook_loss, none.codebook_loss.sum((0, 1)) / scale)
    torch.testing.assert_close(out.loss, (out.commitment_loss + out.codebook_loss).sum())
    torch.testing.assert_close(none.commitment_loss, 0.5 * none.codebook_loss)


def test_half_gradients_come_back_in_their_dtype(backend):
    device = device_for(backend)
    x = _x(12, 4, seed=24, dtype=torch.bfloat16).to(device).requires_grad_()
    cb = _x(2, 5, 4, seed=25, dtype=torch.float16).to(device).requires_grad_(
        _codebook_grad(backend))
    out = fv.residual_vector_quantize(x, cb)
    (out.quantized.float().sum() + out.loss).backward()
    assert x.grad.dtype == torch.bfloat16
    if _codebook_grad(backend):
        assert cb.grad.dtype == torch.float16


def test_backward_saves_nothing_level_sized():
    # the op saves x, the codebooks and the (N, L) indices: no (L, N, D) residuals
    x = _x(64, 32, seed=26).requires_grad_()
    cb = _x(8, 16, 32, seed=27).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fv.residual_vector_quantize(x, cb)
    assert max(saved) <= max(x.numel(), cb.numel())
    assert sum(saved) <= 3 * x.numel() + cb.numel() + 64 * 8 * 3


@pytest.mark.skipif(native.unusable_reason("cpu") is not None, reason="no native library")
def test_cpu_bitwise_across_isas_and_threads():
    x, cb = _x(333, 24, seed=28), _x(4, 300, 24, seed=29)
    n = torch.randint(0, 5, (333,), generator=torch.Generator().manual_seed(2))
    cpu = native.implementation("cpu")
    want = reference.residual_vq_fwd(x, cb, n, 0)
    for isa, threads in cpu_isas_and_threads():
        got = cpu.residual_vq_fwd(x, cb, n, 0)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), (isa, threads)


@pytest.mark.parametrize(("kwargs", "err", "match"), [
    (dict(straight_through="gumbel"), ValueError, "straight_through"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta="1"), TypeError, "beta"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(n_levels=5), ValueError, "n_levels"),
    (dict(n_levels=1.5), TypeError, "n_levels"),
    (dict(n_levels=torch.ones(3)), TypeError, "n_levels"),
    (dict(n_levels=torch.ones(3, dtype=torch.int64)), ValueError, "n_levels"),
])
def test_argument_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        fv.residual_vector_quantize(_x(4, 3), _x(2, 5, 3), **kwargs)


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match="codebooks"):
        fv.residual_vector_quantize(_x(4, 3), _x(5, 3))
    with pytest.raises(ValueError, match="empty"):
        fv.residual_vector_quantize(_x(4, 3), _x(2, 0, 3))
    with pytest.raises(ValueError, match="empty"):
        fv.residual_vector_quantize(_x(4, 3), _x(0, 5, 3))
    with pytest.raises(TypeError, match="codebooks"):
        fv.residual_vector_quantize(_x(4, 3), torch.ones(2, 5, 3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# The custom op: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck(backend, dropout):
    device = device_for(backend)
    x = _x(6, 4, seed=30, dtype=torch.float64).to(device).requires_grad_()
    cb = _x(3, 5, 4, seed=31, dtype=torch.float64).to(device).requires_grad_(
        _codebook_grad(backend))
    n = torch.tensor([0, 1, 2, 3, 3, 1], device=device) if dropout else None
    for rotation in (0, 1):
        torch.library.opcheck(_ops.residual_vq, (x, cb, n, rotation, backend))
    torch.library.opcheck(_ops.residual_vq, (x[:0], cb, None, 0, backend))


def test_compile_fullgraph(backend):
    device = device_for(backend)
    x = _x(3, 7, 4, seed=32).to(device)
    cb = _x(3, 11, 4, seed=33).to(device)
    n = torch.tensor([1, 2, 3], device=device)[:, None].expand(3, 7)

    def f(x, cb):
        out = fv.residual_vector_quantize(x, cb, n_levels=n, straight_through="rotation")
        return out.quantized, out.indices, out.loss

    torch._dynamo.reset()
    grad_cb = _codebook_grad(backend)
    xa, ca = x.clone().requires_grad_(), cb.clone().requires_grad_(grad_cb)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xa, ca)
    xb, cbb = x.clone().requires_grad_(), cb.clone().requires_grad_(grad_cb)
    want = f(xb, cbb)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    (got[0].sum() + got[2]).backward()
    (want[0].sum() + want[2]).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    if grad_cb:
        torch.testing.assert_close(ca.grad, cbb.grad)


@pytest.mark.parametrize("mode", ["ste", "rotation"])
def test_rows_longer_than_a_chunk(backend, mode):
    # D = 300: more than one column chunk of the Triton kernels (256 under the interpreter)
    device = device_for(backend)
    x, cb = _x(9, 300, seed=34), _x(2, 5, 300, seed=35)
    _check(backend, x, cb)
    g = _x(9, 300, seed=36)
    grads = []
    for name in ("torch", backend):
        with fv.use_backend(name):
            xx = x.to(device).requires_grad_()
            cc = cb.to(device).requires_grad_(_codebook_grad(backend))
            out = fv.residual_vector_quantize(xx, cc, straight_through=mode)
            grads.append(torch.autograd.grad((out.quantized * g.to(device)).sum() + out.loss,
                                             (xx, cc) if _codebook_grad(backend) else (xx,)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="no CUDA backend here")
def test_cuda_codebook_gradient_says_so():
    x = _x(6, 4).cuda()
    cb = _x(2, 5, 4).cuda().requires_grad_()
    with fv.use_backend("cuda"), pytest.raises(RuntimeError, match="no CUDA kernel"):
        fv.residual_vector_quantize(x, cb).loss.backward()
