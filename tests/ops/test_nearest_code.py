"""fv.nearest_code: the exact nearest code without the N x K matrix, on every backend.

The oracle is the definition: the distances of every (row, code) pair computed in the compute
dtype in the one order of docs/numerics.md (``reference.nearest_code_distances`` on the whole,
small, matrix), argmin with the lowest index on ties; every backend must return those indices
and bitwise those distances. A float64 brute force checks that this is the nearest code
(near-ties that the expanded form ``|x|^2 - 2 x.e + |e|^2`` gets wrong included).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import BACKENDS, compute_dtype, device_for

import fastvae as fv
from fastvae.ops import native, reference

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _serves(backend: str) -> bool:
    if backend != "triton":
        return True
    return hasattr(importlib.import_module("fastvae.kernels"), "nearest_code_fwd")


NC_BACKENDS = [b for b in BACKENDS if _serves(b)]
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(params=NC_BACKENDS)
def nc_backend(request):
    with fv.use_backend(request.param):
        yield request.param


def _definition(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    """(index, distance) per row of x (N, D) from the whole N x K matrix in the compute dtype,
    in the one order; NaN never wins; no distance below +inf: code 0."""
    c = compute_dtype(x.dtype)
    xs, cb = x.to(c).cpu(), codebook.to(c).cpu()
    if metric == "cosine":
        xs, cb = reference.nearest_code_normalize(xs), reference.nearest_code_normalize(cb)
    d = reference.nearest_code_distances(xs, cb, metric)
    masked = torch.where(torch.isnan(d), torch.inf, d)
    index = masked.argmin(1)  # the first of equal minima
    index = torch.where(masked.amin(1) < torch.inf, index, 0)
    return index, d.gather(1, index[:, None])[:, 0]


def _brute64(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """The float64 distances (N, K)."""
    x, cb = x.double().cpu(), codebook.double().cpu()
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cb = cb / cb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 1 - x @ cb.T
    return ((x[:, None, :] - cb[None, :, :]) ** 2).sum(-1)


def _run(backend, x, codebook, metric="l2"):
    device = device_for(backend)
    index, dist = fv.nearest_code(x.to(device), codebook.to(device), metric=metric)
    return index.cpu(), dist.cpu()


def _check(backend, x, codebook, metric="l2"):
    """The backend's answer is the definition's, bitwise; returns it."""
    index, dist = _run(backend, x, codebook, metric)
    x2 = x.reshape(-1, x.shape[-1])
    want_i, want_d = _definition(x2, codebook, metric)
    assert index.dtype == torch.int64
    assert index.shape == x.shape[:-1]
    assert dist.dtype == compute_dtype(x.dtype)
    assert dist.shape == x.shape[:-1]
    torch.testing.assert_close(index.reshape(-1), want_i, rtol=0, atol=0)
    torch.testing.assert_close(dist.reshape(-1), want_d, rtol=0, atol=0, equal_nan=True)
    return index, dist


# ---------------------------------------------------------------------------------------------
# Values: random inputs on every backend, dtype, metric, and sizes that cross tiles and units
# ---------------------------------------------------------------------------------------------

# rows past one work unit (64) and not a multiple of 4; codes past one tile (4096 at D = 8,
# 512 at D = 64 in float32) and not a multiple of the lanes; D past a cache line
SIZES = [(1, 1, 1), (5, 3, 2), (67, 37, 8), (9, 40, 64), (20, 4500, 8), (6, 1100, 64),
         (3, 7, 300)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_definition(nc_backend, size, dtype, metric):
    N, K, D = size
    g = torch.Generator().manual_seed(N * 1000 + K + D)
    x = torch.randn(N, D, generator=g).to(dtype)
    cb = torch.randn(K, D, generator=g).to(dtype)
    index, _dist = _check(nc_backend, x, cb, metric)
    # ... and that is the nearest code in float64, to the rounding of the distances
    d64 = _brute64(x, cb, metric)
    best = d64.gather(1, index[:, None])[:, 0]
    slack = 1e-5 if compute_dtype(dtype) == torch.float32 else 1e-13
    assert (best <= d64.amin(1) + slack * (1 + d64.amin(1).abs()) * D).all()


def test_torch_backend_tiles_agree():
    """The reference's tiling (over rows and codes) changes nothing."""
    g = torch.Generator().manual_seed(1)
    x, cb = torch.randn(50, 6, generator=g), torch.randn(333, 6, generator=g)
    whole = reference.nearest_code_fwd(x, cb, "l2")
    for tile in (600, 2000, 20000):
        tiled = reference.nearest_code_fwd(x, cb, "l2", tile=tile)
        assert torch.equal(tiled[0], whole[0])
        assert torch.equal(tiled[1], whole[1])


# ---------------------------------------------------------------------------------------------
# Ties and near-ties
# ---------------------------------------------------------------------------------------------


def test_exact_duplicates_give_the_lowest_index(nc_backend):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 8, generator=g)
    # every code three times, the copies far apart in the codebook (other tiles and lanes)
    cb = torch.cat([base, torch.randn(2000, 8, generator=g) + 50, base, base])
    x = base[torch.randint(0, 40, (100,), generator=g)] + 0.01 * torch.randn(100, 8, generator=g)
    index, _ = _check(nc_backend, x, cb)
    assert (index < 40).all()
    # a row exactly between two codes: equal distances, the lower index
    cb2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    index, dist = _check(nc_backend, torch.zeros(3, 2), cb2.flip(0))
    assert index.tolist() == [0, 0, 0]
    assert dist.tolist() == [1.0, 1.0, 1.0]


def test_near_a_common_offset_the_direct_difference_is_right(nc_backend):
    """FIELD-NOTES: every vector near 300 (spread 0.05, D = 16): the expanded form in float32
    picks the wrong code for most rows; the direct difference picks the float64 one."""
    g = torch.Generator().manual_seed(0)
    x = 300 + 0.05 * torch.randn(64, 16, generator=g)
    cb = 300 + 0.05 * torch.randn(256, 16, generator=g)
    want = _brute64(x, cb).argmin(1)
    expanded = ((x * x).sum(1, keepdim=True) - 2 * x @ cb.T + (cb * cb).sum(1)).argmin(1)
    assert (expanded != want).sum() > 32  # the test can fail
    index, _ = _check(nc_backend, x, cb)
    assert torch.equal(index, want)


@pytest.mark.parametrize("offset", [1e3, -2e4, 1e5])
def test_near_ties_at_large_offsets(nc_backend, offset):
    """Codes 1/8 of the spread apart around a large offset, the rows between them."""
    g = torch.Generator().manual_seed(3)
    D = 4
    cb = offset + torch.arange(64, dtype=torch.float64)[:, None] * torch.full((D,), 0.125)
    x = cb[torch.randint(0, 64, (50,), generator=g)] + 0.05 * torch.randn(50, D, generator=g,
                                                                            dtype=torch.float64)
    x32, cb32 = x.float(), cb.float()
    index, _ = _check(nc_backend, x32, cb32)
    assert torch.equal(index, _brute64(x32, cb32).argmin(1))


@pytest.mark.parametrize("offset", [0.0, 20.0])
def test_midpoints(nc_backend, offset):
    """Rows halfway between two codes (D = 16, past the C++ kernel's filtered-search threshold):
    the two distances tie up to rounding, which the definition decides; with an offset the
    expanded form's error exceeds the gaps for some rows and not others."""
    g = torch.Generator().manual_seed(12)
    cb = offset + torch.randn(3000, 16, generator=g)
    a, b = torch.randint(0, 3000, (2, 200), generator=g)
    x = (cb[a] + cb[b]) / 2
    index, _ = _check(nc_backend, x, cb)
    d64 = _brute64(x, cb)
    assert (d64.gather(1, index[:, None])[:, 0] <= d64.amin(1) + 1e-4).all()
    # cosine: rows halfway in angle, and codes repeated at other scales (equal directions)
    unit = cb / cb.norm(dim=1, keepdim=True)
    _check(nc_backend, unit[a] + unit[b], cb, "cosine")
    _check(nc_backend, x, torch.cat([cb[:500], 2 * cb[:500], 0.5 * cb[:500]]), "cosine")


@pytest.mark.parametrize("scale", [1e-21, 1e-19, 1e17, 1e19])
def test_tiny_and_huge_values(nc_backend, scale):
    """Squares below float32's normal range (subnormal distances, where a relative error bound
    does not hold) and near its top (where the expanded form overflows): still the definition."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(70, 16, generator=g) * scale
    cb = torch.randn(300, 16, generator=g) * scale
    _check(nc_backend, x, cb)
    _check(nc_backend, x.double() * scale, cb.double() * scale)


# ---------------------------------------------------------------------------------------------
# Geometry: strides, shapes, empty inputs
# ---------------------------------------------------------------------------------------------


def test_any_strides(nc_backend):
    g = torch.Generator().manual_seed(4)
    big = torch.randn(12, 40, generator=g)
    cb_big = torch.randn(30, 24, generator=g)
    cases = {
        "transposed_x": (big.t()[:, :12], cb_big[:, :12]),
        "sliced_x": (torch.randn(40, 24, generator=g)[::3, ::2], cb_big[:, :12]),
        "strided_codebook": (big[:, :12], cb_big[::2, ::2]),
        "transposed_codebook": (big[:, :12], torch.randn(12, 30, generator=g).t()),
        "expanded_x": (big[:1, :12].expand(7, 12), cb_big[:, :12]),
    }
    for name, (x, cb) in cases.items():
        index, dist = _run(nc_backend, x, cb)
        want = _definition(x.contiguous(), cb.contiguous())
        assert torch.equal(index, want[0]), name
        assert torch.equal(dist, want[1]), name


def test_shapes(nc_backend):
    g = torch.Generator().manual_seed(5)
    cb = torch.randn(9, 3, generator=g)
    x = torch.randn(2, 3, 4, 3, generator=g)
    index, dist = _check(nc_backend, x, cb)
    assert index.shape == dist.shape == (2, 3, 4)
    index, dist = _run(nc_backend, x[0, 0, 0], cb)  # one vector: 0-d results
    assert index.shape == dist.shape == ()
    assert index.item() == _definition(x[0, 0, :1], cb)[0].item()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_empty_inputs(nc_backend, metric):
    for x, cb in ((torch.randn(0, 4), torch.randn(5, 4)), (torch.randn(2, 0, 4), torch.randn(5, 4)),
                  (torch.randn(0, 4), torch.randn(0, 4))):
        index, dist = _run(nc_backend, x, cb, metric)
        assert index.shape == dist.shape == x.shape[:-1]
        assert index.dtype == torch.int64
        assert dist.dtype == torch.float32
    # D = 0: every code at distance 0 (1 - 0 for cosine): code 0
    index, dist = _run(nc_backend, torch.randn(3, 0, dtype=torch.float64),
                       torch.randn(4, 0, dtype=torch.float64), metric)
    assert index.tolist() == [0, 0, 0]
    assert dist.tolist() == [1.0 if metric == "cosine" else 0.0] * 3
    assert dist.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Cosine, NaN, gradients
# ---------------------------------------------------------------------------------------------


def test_cosine_is_one_minus_the_cosine(nc_backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    cb = torch.randn(30, 5, generator=g, dtype=torch.float64) * torch.rand(30, 1, generator=g,
                                                                             dtype=torch.float64)
    index, dist = _check(nc_backend, x, cb, "cosine")
    cos = torch.nn.functional.cosine_similarity(x[:, None], cb[None], dim=-1)
    assert torch.equal(index, cos.argmax(1))
    torch.testing.assert_close(dist, 1 - cos.amax(1), rtol=0, atol=1e-14)
    # scale does not matter; a zero vector is at distance 1 from every code: code 0
    index2, _ = _check(nc_backend, 3.5 * x, cb, "cosine")
    assert torch.equal(index2, index)
    index, dist = _check(nc_backend, torch.zeros(2, 5, dtype=torch.float64), cb, "cosine")
    assert index.tolist() == [0, 0]
    assert dist.tolist() == [1.0, 1.0]


def test_nan(nc_backend):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, generator=g)
    cb = torch.randn(6, 3, generator=g)
    x[1, 2] = float("nan")
    cb[0, 1] = float("nan")  # a NaN code never wins
    index, dist = _check(nc_backend, x, cb)
    assert index[1] == 0
    assert torch.isnan(dist[1])
    assert (index[[0, 2, 3]] != 0).all()
    assert torch.isfinite(dist[[0, 2, 3]]).all()


def test_not_differentiable(nc_backend):
    x = torch.randn(5, 3, requires_grad=True)
    cb = torch.randn(4, 3, requires_grad=True)
    device = device_for(nc_backend)
    index, dist = fv.nearest_code(x.to(device), cb.to(device))
    assert not index.requires_grad
    assert not dist.requires_grad


# ---------------------------------------------------------------------------------------------
# The C++ kernels: every instruction set, thread counts
# ---------------------------------------------------------------------------------------------


def _cpu_isas():
    return native.cpu_isas() if native.unusable_reason("cpu") is None else []


@pytest.mark.skipif(native.unusable_reason("cpu") is not None, reason="no native library")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpu_bitwise_across_isas_and_threads(metric):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(333, 24, generator=g)
    cb = torch.randn(2100, 24, generator=g)
    cpu = native.implementation("cpu")
    want = _definition(x, cb, metric)
    before = torch.get_num_threads()
    try:
        for isa in _cpu_isas():
            native.set_cpu_isa(isa)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                index, dist = cpu.nearest_code_fwd(x, cb, metric)
                assert torch.equal(index, want[0]), (isa, threads)
                assert torch.equal(dist, want[1]), (isa, threads)
    finally:
        native.set_cpu_isa("auto")
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The custom op: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck(nc_backend, metric):
    from fastvae.ops import custom_ops as _ops

    device = device_for(nc_backend)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64).to(device)
    cb = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device)
    torch.library.opcheck(_ops.nearest_code, (x, cb, metric, nc_backend))
    torch.library.opcheck(_ops.nearest_code, (x[:0], cb, metric, nc_backend))


def test_compile_fullgraph(nc_backend):
    device = device_for(nc_backend)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 7, 4, generator=g).to(device)
    cb = torch.randn(11, 4, generator=g).to(device)

    def f(x, cb):
        index, dist = fv.nearest_code(x, cb)
        return cb[index], dist.sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, cb)
    want = f(x, cb)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
