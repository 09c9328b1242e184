"""fv.finite_scalar_quantize (FSQ, Mentzer et al. 2023) on every backend.

The oracle: the bound evaluated in float64 from the compute dtype's ``u = z + shift`` (the one
rounding every backend shares), rounded half to even (floored, symmetric), the index summed in
Python integers. Every backend returns exactly the oracle's codes and indices wherever the
float64 value before rounding is farther than a few ulps of the compute dtype from a rounding
boundary (``_TIE_BAND``: each backend's tanh is accurate to a few ulps, not correctly rounded);
within that band either neighbour is right, and codes and indices must still agree with each
other. Gradients: the float64 closed form to a few ulps. Exact ties (``z = -shift`` with even L,
``z = 0`` with odd L) are exact everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, compute_dtype, cpu_isas_and_threads, device_for

import fastvae as fv
from fastvae.ops import custom_ops as _ops
from fastvae.ops import native, reference
from fastvae.ops.fsq import fsq_plan

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (levels, preserve_symmetry, hard_clamp)
CONFIGS = {
    "8-5-5-5": ([8, 5, 5, 5], False, False),
    "8-8-8-5-5-5": ([8, 8, 8, 5, 5, 5], False, False),
    "odd": ([3, 5, 7, 9], False, False),
    "4x16": ([4] * 16, False, False),
    "2x12-symmetric": ([2] * 12, True, False),
    "mixed-symmetric": ([2, 3, 4, 8], True, False),
    "hard-clamp": ([8, 5, 6], False, True),
    "hard-symmetric": ([4, 5], True, True),
    "wide-levels": ([1024, 2**20, 3], False, False),
}


def _tie_band(compute: torch.dtype, a: torch.Tensor) -> torch.Tensor:
    """How far (in float64) from a rounding boundary the backends may decide differently: a few
    ulps of tanh times the scale a, plus the rounding of the product."""
    eps = torch.finfo(compute).eps
    return 16 * eps * a.abs().clamp_min(1.0)


def _oracle(z: torch.Tensor, levels, ps: bool, hc: bool):
    """(codes in z's dtype, indices int64, band (N, D) bool, grad function) on the CPU."""
    plan = fsq_plan(levels, ps, hc)
    compute = compute_dtype(z.dtype)
    zc = z.detach().cpu().to(compute)
    a = torch.tensor(plan.a, dtype=compute)
    b = torch.tensor(plan.b, dtype=compute)
    L = torch.tensor(plan.levels)
    hw, top = L // 2, L - 1 - L // 2
    u = zc if ps else zc + b  # rounded in the compute dtype, as every backend rounds it
    u64 = u.double()
    t = u64.clamp(-1.0, 1.0) if hc else torch.tanh(u64)
    band = _tie_band(compute, a.double())
    if ps:
        v = a.double() * (t + 1) / 2 + 0.5
        level = torch.floor(v)
        near = (v - torch.round(v)).abs() < band
        code = b * level.to(compute) - 1
    else:
        v = t * a.double() - torch.where(L % 2 == 0, 0.5, 0.0).double()
        r = torch.round(v)
        r = torch.maximum(torch.minimum(r, top.double()), -hw.double())
        near = (v - torch.floor(v) - 0.5).abs() < band
        level = r + hw
        code = (r.to(compute) + 0.0) / hw.to(compute)
    nan = torch.isnan(level)
    digits = torch.where(nan, 0, level).to(torch.int64)
    index = torch.tensor([sum(int(d) * int(w) for d, w in zip(row, plan.basis, strict=True))
                          for row in digits.reshape(-1, len(levels)).tolist()] or [],
                         dtype=torch.int64).reshape(level.shape[:-1])
    index = torch.where(nan.any(-1), -1, index)

    def grad(g: torch.Tensor) -> torch.Tensor:
        g64 = g.detach().cpu().double()
        if hc:
            slope = torch.where(torch.isnan(u64), u64, ((u64 >= -1) & (u64 <= 1)).double())
        else:
            slope = 1 / torch.cosh(u64) ** 2
        scale = b.double() * a.double() / 2 if ps else a.double() / hw.double()
        return g64 * scale * slope

    return code.to(z.dtype), index, near & ~torch.isnan(v), grad


def _check(z, levels, ps=False, hc=False, *, grad_rtol=None):
    """Codes, indices and the gradient of fv.finite_scalar_quantize against the oracle."""
    leaf = z.detach().clone().requires_grad_()
    codes, indices = fv.finite_scalar_quantize(leaf, levels, preserve_symmetry=ps,
                                               hard_clamp=hc)
    want_codes, want_index, band, grad_fn = _oracle(z, levels, ps, hc)
    plan = fsq_plan(levels, ps, hc)
    assert codes.dtype == z.dtype
    assert codes.shape == z.shape
    assert indices.dtype == (torch.int32 if plan.size <= 2**31 - 1 else torch.int64)
    assert indices.shape == z.shape[:-1]
    codes_c, index_c = codes.detach().cpu(), indices.cpu().to(torch.int64)
    clear = ~band.any(-1)  # rows with no element near a rounding boundary
    assert _bitwise(codes_c[clear], want_codes[clear])
    assert torch.equal(index_c[clear], want_index[clear])
    # near a boundary: the neighbouring level at most, and the index that goes with the codes
    if (~clear).any():
        step = 2.0 / (torch.tensor(plan.levels, dtype=torch.float64) - 1) if ps else \
            1.0 / (torch.tensor(plan.levels) // 2).double()
        diff = (codes_c[~clear].double() - want_codes[~clear].double()).abs()
        assert (diff <= step * 1.01).all()
        if max(levels) <= 2 / torch.finfo(z.dtype).eps:  # codes exact in z's dtype
            again = fv.fsq_codes_to_indices(codes_c[~clear], levels, preserve_symmetry=ps,
                                            index_dtype=torch.int64)
            assert torch.equal(again, index_c[~clear])
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64).to(z.dtype).to(z.device)
    (codes * g).sum().backward()
    want = grad_fn(g)
    got = leaf.grad.detach().cpu().double()
    eps_out = torch.finfo(z.dtype).eps
    rtol = grad_rtol or (16 * torch.finfo(compute_dtype(z.dtype)).eps + 2 * eps_out)
    scale = (g.detach().cpu().double().abs() * want.abs().div(
        g.detach().cpu().double().abs().clamp_min(1e-300))).clamp_min(0)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert ((got - want).abs()[finite] <= rtol * scale[finite]
            + torch.finfo(z.dtype).tiny).all(), float((got - want).abs()[finite].max())
    return codes, indices


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(-1).double().nan_to_num(7.0),
                                              b.view(-1).double().nan_to_num(7.0)) and \
        torch.equal(torch.signbit(a), torch.signbit(b))


def _randn(shape, scale, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# Values, indices and gradients against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_the_oracle(backend, config, dtype):
    levels, ps, hc = CONFIGS[config]
    z = _randn((97, len(levels)), 1.5, dtype, device_for(backend))
    _check(z, levels, ps, hc)


@pytest.mark.parametrize("config", ["8-5-5-5", "mixed-symmetric", "hard-clamp"])
def test_extremes(backend, config):
    """Large, tiny, zero, signed zeros, subnormal, inf and NaN inputs, in float32 and float64."""
    levels, ps, hc = CONFIGS[config]
    values = [0.0, -0.0, 1e-30, -1e-30, 1e-45, 1e-8, -1e-8, 0.5, -0.5, 1.0, -1.0, 9.0, -9.0,
              20.0, 1e4, -1e4, 1e30, -3e38, math.inf, -math.inf]
    for dtype in (torch.float32, torch.float64):
        col = torch.tensor(values, dtype=dtype)
        z = torch.stack([col.roll(j) for j in range(len(levels))], -1)
        _check(z.to(device_for(backend)), levels, ps, hc)


def test_nan_gives_nan_codes_and_index_minus_one(backend):
    device = device_for(backend)
    z = torch.tensor([[0.3, math.nan, 1.0], [0.1, 0.2, 0.3]], device=device).requires_grad_()
    codes, indices = fv.finite_scalar_quantize(z, [8, 5, 5])
    assert torch.isnan(codes[0, 1])
    assert not torch.isnan(codes[0, ::2]).any()
    assert indices.tolist()[0] == -1
    assert indices.tolist()[1] >= 0
    codes.sum().backward()
    assert torch.isnan(z.grad[0, 1])
    assert torch.isfinite(z.grad[1]).all()


@pytest.mark.parametrize("levels", [[4, 6, 8], [3, 5, 7]])
def test_exact_ties_round_half_to_even(backend, levels):
    """z = -shift for even L makes tanh(z + shift) * half_l - 1/2 exactly -1/2: rounded to 0,
    the code +0 (never -0, as vector-quantize-pytorch's round_ste gives); z = 0 for odd L: 0."""
    plan = fsq_plan(levels)
    for dtype in (torch.float32, torch.float64):
        z = (-torch.tensor(plan.b, dtype=torch.float64)).to(dtype)[None].to(
            device_for(backend))
        codes, indices = fv.finite_scalar_quantize(z, levels)
        assert torch.equal(codes.cpu(), torch.zeros(1, 3, dtype=dtype))
        assert not torch.signbit(codes).any()
        half = [L // 2 for L in levels]
        assert indices.item() == sum(h * w for h, w in zip(half, plan.basis, strict=True))


def test_dense_grid_near_every_boundary(backend):
    """Inputs packed around every rounding boundary of L = 8 and 5 (the atanh of each
    boundary, +- a few hundred ulps): only the band may go either way."""
    plan = fsq_plan([8, 5])
    zs = []
    for j, L in enumerate((8, 5)):
        a, b = plan.a[j], plan.b[j]
        off = 0.5 if L % 2 == 0 else 0.0
        for k in range(-(L // 2), L - L // 2):
            edge = math.atanh(min(max((k + 0.5 + off) / a, -1 + 1e-7), 1 - 1e-7)) - b
            zs.append(torch.linspace(edge - 3e-5, edge + 3e-5, 257, dtype=torch.float64))
    col = torch.cat(zs)
    z = torch.stack([col, col.flip(0)], -1).float().to(device_for(backend))
    _check(z, [8, 5])


def test_any_strides_and_shapes(backend):
    device = device_for(backend)
    base = _randn((6, 7, 8), 2.0, torch.float32, device)
    levels = [8, 5, 5, 5, 3, 3]
    for z in (base[..., :6], base.transpose(0, 1)[..., 1:7], base[::2, :, ::1][..., 2:],
              base[0, 0, :6].expand(4, 6)):
        codes, indices = fv.finite_scalar_quantize(z, levels)
        want_c, want_i = fv.finite_scalar_quantize(z.contiguous(), levels)
        assert torch.equal(codes, want_c)
        assert torch.equal(indices, want_i)
        assert indices.shape == z.shape[:-1]


def test_empty(backend):
    device = device_for(backend)
    for shape in ((0, 3), (2, 0, 3)):
        z = torch.zeros(shape, device=device, requires_grad=True)
        codes, indices = fv.finite_scalar_quantize(z, [8, 5, 5])
        assert codes.shape == shape
        assert indices.shape == shape[:-1]
        codes.sum().backward()
        assert z.grad.shape == shape


def test_backends_agree_bitwise_on_codes_away_from_ties():
    """Every backend, every dtype: the same codes and indices as the torch backend where the
    oracle sees no boundary."""
    z = _randn((300, 6), 2.0, torch.float32, "cpu", seed=3)
    _, _, band, _ = _oracle(z, [8, 8, 8, 5, 5, 5], False, False)
    clear = ~band.any(-1)
    with fv.use_backend("torch"):
        want = fv.finite_scalar_quantize(z, [8, 8, 8, 5, 5, 5])
    for backend in BACKENDS:
        with fv.use_backend(backend):
            got = fv.finite_scalar_quantize(z.to(device_for(backend)), [8, 8, 8, 5, 5, 5])
        assert torch.equal(got.codes.cpu()[clear], want.codes[clear]), backend
        assert torch.equal(got.indices.cpu()[clear], want.indices[clear]), backend


# ---------------------------------------------------------------------------------------------
# Indices: int32 / int64, exactness, round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("levels", "dtype"), [
    ([2**16, 2**15 - 1], torch.int32),      # 2**31 - 2**16 codes
    ([2**16, 2**15], torch.int64),          # 2**31: the first int64 size
    ([4] * 16, torch.int64),                # 2**32
    ([2**20, 2**20, 2**13], torch.int64),   # 2**53: float64 sums stop being exact here
    ([2**20, 2**20, 2**20], torch.int64),   # 2**60
])
def test_index_dtype_and_exactness_at_the_boundaries(backend, levels, dtype):
    """The largest index (every dimension at its top level, z = +inf) and random ones, against
    Python's integers."""
    device = device_for(backend)
    z = torch.cat([torch.full((1, len(levels)), math.inf),
                   torch.full((1, len(levels)), -math.inf),
                   _randn((50, len(levels)), 3.0, torch.float32, "cpu")]).to(device)
    codes, indices = _check(z, levels)
    assert indices.dtype == dtype
    size = math.prod(levels)
    assert indices[0].item() == size - 1
    assert indices[1].item() == 0
    back = fv.fsq_indices_to_codes(indices, levels)
    assert torch.equal(back, codes.detach())
    assert torch.equal(fv.fsq_codes_to_indices(codes.detach(), levels), indices)


def test_package_float_sum_is_inexact_where_ours_is_exact():
    """vector-quantize-pytorch sums the digits as float32 (exact only below 2**24): at
    [1024] * 3 (2**30 codes) its codes_to_indices is off; ours equals Python's integers."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    levels = [1024, 1024, 1024]
    q = vqp.FSQ(levels, return_indices=False)
    z = _randn((2000, 3), 3.0, torch.float32, "cpu", seed=4)
    codes, indices = fv.finite_scalar_quantize(z, levels)
    theirs = q.codes_to_indices(codes)
    plan = fsq_plan(levels)
    digits = fv.fsq_indices_to_codes(indices, levels)
    exact = [sum(round(c * (L // 2) + L // 2) * w
                 for c, L, w in zip(row, levels, plan.basis, strict=True))
             for row in digits.double().tolist()]
    assert indices.tolist() == exact
    assert (theirs.to(torch.int64) != indices).any()


@pytest.mark.parametrize("config", ["8-5-5-5", "mixed-symmetric", "4x16", "wide-levels"])
def test_indices_codes_round_trip(config):
    levels, ps, _ = CONFIGS[config]
    size = math.prod(levels)
    g = torch.Generator().manual_seed(6)
    idx = torch.randint(0, min(size, 2**62), (500,), generator=g, dtype=torch.int64)
    codes = fv.fsq_indices_to_codes(idx, levels, preserve_symmetry=ps)
    assert codes.shape == (500, len(levels))
    assert codes.dtype == torch.float32
    back = fv.fsq_codes_to_indices(codes, levels, preserve_symmetry=ps, index_dtype=torch.int64)
    assert torch.equal(back, idx)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        c = fv.fsq_indices_to_codes(idx, levels, preserve_symmetry=ps, dtype=dtype)
        assert c.dtype == dtype
        if size <= 2**20 and dtype != torch.bfloat16:
            assert torch.equal(fv.fsq_codes_to_indices(c, levels, preserve_symmetry=ps,
                                                       index_dtype=torch.int64), idx)


def test_forward_codes_are_the_codes_of_their_indices(backend):
    for levels, ps, hc in CONFIGS.values():
        z = _randn((64, len(levels)), 2.0, torch.float32, device_for(backend))
        codes, indices = fv.finite_scalar_quantize(z, levels, preserve_symmetry=ps,
                                                   hard_clamp=hc)
        assert torch.equal(fv.fsq_indices_to_codes(indices, levels, preserve_symmetry=ps),
                           codes)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="levels\\[1\\] = 2 needs preserve_symmetry"):
        fv.finite_scalar_quantize(z, [3, 2, 3])
    with pytest.raises(ValueError, match="levels\\[0\\] must be >= 2"):
        fv.finite_scalar_quantize(z, [1, 3, 3])
    with pytest.raises(ValueError, match="exceeds 2\\*\\*24"):
        fv.finite_scalar_quantize(z, [3, 3, 2**24 + 1])
    with pytest.raises(ValueError, match="exceeds 2\\*\\*63 - 1"):
        fv.finite_scalar_quantize(torch.zeros(2, 4), [2**16] * 4)
    with pytest.raises(ValueError, match="must not be empty"):
        fv.finite_scalar_quantize(torch.zeros(2, 0), [])
    with pytest.raises(ValueError, match="shape \\(\\.\\.\\., 4\\)"):
        fv.finite_scalar_quantize(z, [3, 3, 3, 3])
    with pytest.raises(TypeError, match="z must be"):
        fv.finite_scalar_quantize(torch.zeros(2, 3, dtype=torch.int64), [3, 3, 3])
    with pytest.raises(TypeError, match="levels\\[0\\] must be an int"):
        fv.finite_scalar_quantize(z, [3.0, 3, 3])
    with pytest.raises(TypeError, match="levels must be a sequence"):
        fv.finite_scalar_quantize(z, 3)
    with pytest.raises(TypeError, match="preserve_symmetry must be a bool"):
        fv.finite_scalar_quantize(z, [3, 3, 3], preserve_symmetry=1)
    with pytest.raises(TypeError, match="index_dtype"):
        fv.finite_scalar_quantize(z, [3, 3, 3], index_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"index_dtype=torch\.int32 cannot hold"):
        fv.finite_scalar_quantize(torch.zeros(1, 16), [4] * 16, index_dtype=torch.int32)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        fv.fsq_indices_to_codes(torch.zeros(3), [3, 3])
    with pytest.raises(TypeError, match="dtype must be a floating"):
        fv.fsq_indices_to_codes(torch.zeros(3, dtype=torch.int64), [3, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="codes must have shape"):
        fv.fsq_codes_to_indices(torch.zeros(3, 2), [3, 3, 3])
    assert fv.finite_scalar_quantize(z, torch.tensor([3, 5, 7])).indices.dtype == torch.int32


# ---------------------------------------------------------------------------------------------
# The native library: every instruction set and thread count, bitwise
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(native.unusable_reason("cpu") is not None, reason="no native library")
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_cpu_bitwise_across_isas_and_threads(mode):
    levels = [8, 5, 5, 5, 4, 3]
    plan = fsq_plan(levels, bool(mode & 1), bool(mode & 2))
    z = _randn((1000, 6), 2.0, torch.float32, "cpu", seed=9)
    g = _randn((1000, 6), 1.0, torch.float32, "cpu", seed=10)
    lv, basis = torch.tensor(plan.levels), torch.tensor(plan.basis)
    a, b = torch.tensor(plan.a), torch.tensor(plan.b)
    cpu = native.implementation("cpu")
    want = None
    for isa, threads in cpu_isas_and_threads():
        codes, index = cpu.finite_scalar_quantize_fwd(z, lv, basis, a, b, mode)
        dz = cpu.finite_scalar_quantize_bwd(g, z, lv, basis, a, b, mode)
        if want is None:
            want = (codes, index, dz)
        assert torch.equal(codes, want[0]), (isa, threads)
        assert torch.equal(index, want[1]), (isa, threads)
        assert torch.equal(dz, want[2]), (isa, threads)


# ---------------------------------------------------------------------------------------------
# The custom op: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_opcheck(backend, mode):
    device = device_for(backend)
    levels = [4, 5, 3] if not mode & 1 else [2, 5, 4]
    plan = fsq_plan(levels, bool(mode & 1), bool(mode & 2))
    z = _randn((6, 3), 1.5, torch.float64, device).requires_grad_()
    lv = torch.tensor(plan.levels, device=device)
    basis = torch.tensor(plan.basis, device=device)
    a = torch.tensor(plan.a, dtype=torch.float64, device=device)
    b = torch.tensor(plan.b, dtype=torch.float64, device=device)
    torch.library.opcheck(_ops.finite_scalar_quantize, (z, lv, basis, a, b, mode, backend))
    torch.library.opcheck(_ops.finite_scalar_quantize,
                          (z.detach()[:0].clone().requires_grad_(), lv, basis, a, b, mode,
                           backend))
    g = _randn((6, 3), 1.0, torch.float64, device)
    torch.library.opcheck(_ops.finite_scalar_quantize_backward,
                          (g, z.detach(), lv, basis, a, b, mode, backend, [True]))


def test_gradcheck(backend):
    """Away from the rounding steps the codes are locally constant plus the straight-through
    term: the op's gradient is that of sg(code - bound) + bound, checked by finite differences
    of the bound (the reference's closed form in float64)."""
    device = device_for(backend)
    z = _randn((4, 3), 1.0, torch.float64, device).requires_grad_()
    codes, _ = fv.finite_scalar_quantize(z, [8, 5, 5])
    g = _randn((4, 3), 1.0, torch.float64, device)
    (dz,) = torch.autograd.grad(codes, z, g)
    plan = fsq_plan([8, 5, 5])
    a = torch.tensor(plan.a, dtype=torch.float64, device=device)
    b = torch.tensor(plan.b, dtype=torch.float64, device=device)
    hw = torch.tensor([4, 2, 2], dtype=torch.float64, device=device)

    def bound(x):
        return torch.tanh(x + b) * a / hw

    torch.autograd.gradcheck(bound, (z.detach().clone().requires_grad_(),))
    (want,) = torch.autograd.grad(bound(z), z, g)
    torch.testing.assert_close(dz, want, rtol=1e-14, atol=1e-15)


def test_compile_fullgraph(backend):
    device = device_for(backend)
    z = _randn((3, 7, 6), 2.0, torch.float32, device).requires_grad_()

    def f(z):
        codes, indices = fv.finite_scalar_quantize(z, [8, 8, 8, 5, 5, 5])
        return (codes * codes).sum(), indices

    torch._dynamo.reset()
    loss, indices = torch.compile(f, fullgraph=True, backend="aot_eager")(z)
    loss.backward()
    got = z.grad.clone()
    z.grad = None
    want_loss, want_indices = f(z)
    want_loss.backward()
    assert torch.equal(loss, want_loss)
    assert torch.equal(indices, want_indices)
    assert torch.equal(got, z.grad)


def test_no_host_sync_in_the_op(backend):
    """The op's results are computed without reading any data on the host (the codebook size
    and the constants come from the levels, never from a tensor)."""
    if device_for(backend).type != "cuda":
        pytest.skip("host syncs are observable on CUDA only")
    z = torch.randn(64, 6, device="cuda")
    fv.finite_scalar_quantize(z, [8, 8, 8, 5, 5, 5])  # warm: constants made once
    torch.cuda.set_sync_debug_mode("error")
    try:
        fv.finite_scalar_quantize(z, [8, 8, 8, 5, 5, 5])
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_reference_constants_match_the_package():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    levels = [8, 5, 4, 3, 1000]
    q = vqp.FSQ(levels, return_indices=False)
    half_l = (q._levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(q._levels % 2 == 0, 0.5, 0.0)
    a, b = reference.fsq_bound_constants(levels, 0)
    assert torch.equal(a, half_l)
    assert torch.equal(b, torch.atanh(offset / half_l))
