"""The native library (csrc/, fastvae/ops/native.py): what is specific to the "cpu" and "cuda"
backends. The op matrix of tests/ops/test_ops.py runs on them too (they are in fv.backends()).

Covered here: the library loads and registers; Philox integers bit for bit and normals to float
rounding against fastvae.reference (and Triton's interpreter); every op of the backend interface
on the cpu backend against the float64 reference, through strided, broadcast and multi-unit
geometries, with every CPU kernel set this machine runs (baseline, AVX2, AVX-512); bitwise
determinism across runs and thread counts; concurrent callers and fork(); a missing or broken
library; errors reported by the library; and the same checks on a GPU for the cuda backend
(marked gpu).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import threading
import zlib

import accuracy
import pytest
import torch
from cases import dmol_inputs

import fastvae as fv
from fastvae.ops import backends as _backend
from fastvae.ops import native as _native
from fastvae.ops import reference
from fastvae.ops.fsq import fsq_plan

pytestmark = pytest.mark.skipif(_native.unusable_reason("cpu") is not None,
                                reason=f"native library: {_native.unusable_reason('cpu')}")

CPU = _native.implementation("cpu") if _native.unusable_reason("cpu") is None else None
CUDA = torch.cuda.is_available() and _native.unusable_reason("cuda") is None
ISAS = _native.cpu_isas()  # the CPU kernel sets this machine runs (each tested)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Tolerances by the dtype of the value checked: sums come back in float32/float64, gradients and
# samples in the input dtype (one rounding to it).
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NOISE_ATOL = 5e-6  # normals are float32 on every backend, each with its own log/cos
# The mixture of logistics: a sharp component's argument (x - mu' +- h) e^-s rounds to
# ~4 u (|x| + |mu'|) e^7 absolute in the compute dtype (cases.DMOL_TOL), on top of the
# output's rounding.
OP_RTOL = {op: {torch.float64: 1e-10, torch.float32: 1e-3, torch.float16: 2e-3,
                torch.bfloat16: 1e-2}
           for op in ("discretized_mix_logistic_nll_fwd", "discretized_mix_logistic_nll_bwd")}


@pytest.fixture(params=ISAS)
def isa(request):
    """Each CPU kernel set this machine can run, restored to "auto" afterwards."""
    _native.set_cpu_isa(request.param)
    yield request.param
    _native.set_cpu_isa("auto")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_library_loads_and_registers_cpu():
    lib, reason = _native.load()
    assert reason is None
    assert lib is not None
    assert lib.fv_abi_version() == _native.ABI_VERSION
    assert "cpu" in fv.backends()
    assert _native.cpu_isa() == _native.cpu_isas()[0]
    assert "baseline" in _native.cpu_isas()
    assert "cpu kernels" in _native.build_info()
    # auto serves CPU tensors with the cpu backend
    assert _backend.resolve(torch.device("cpu")) == "cpu"


@pytest.fixture
def relocated(monkeypatch):
    """Point the loader elsewhere (FASTVAE_NATIVE_LIB); the real library is found again after."""
    def point_to(path):
        monkeypatch.setenv("FASTVAE_NATIVE_LIB", str(path))
        _native.load.cache_clear()

    yield point_to
    monkeypatch.delenv("FASTVAE_NATIVE_LIB", raising=False)
    _native.load.cache_clear()


def test_missing_library_leaves_torch_working(relocated, tmp_path):
    relocated(tmp_path / "libfastvae_native.so")
    reason = _native.unusable_reason("cpu")
    assert "not built" in reason
    assert str(tmp_path) in reason
    assert "cpu" not in fv.backends()
    assert "torch" in fv.backends()
    with pytest.raises(RuntimeError, match="not built"):
        fv.set_backend("cpu")
    with pytest.raises(RuntimeError, match="not built"):
        fv.set_backend("cuda")
    with fv.use_backend("torch"):
        assert torch.isfinite(fv.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)))


def test_broken_library_says_why(relocated, tmp_path):
    broken = tmp_path / "libfastvae_native.so"
    broken.write_bytes(b"\x7fELF this is not a shared library")
    relocated(broken)
    reason = _native.unusable_reason("cpu")
    assert "loading the native library" in reason
    assert "failed" in reason
    with pytest.raises(RuntimeError, match="loading the native library"):
        fv.set_backend("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a GPU-less machine")
def test_cuda_backend_unusable_without_gpu_says_why():
    reason = _native.unusable_reason("cuda")
    assert reason is not None
    assert "CUDA" in reason
    with pytest.raises(RuntimeError, match="CUDA"):
        fv.set_backend("cuda")


def test_library_errors_become_runtime_errors():
    mu = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="seed is required"):
        CPU.sample_and_kl_fwd(mu, mu, None, 1)
    with pytest.raises(RuntimeError, match="reduce_dim"):
        CPU.gaussian_kl_fwd(mu, mu, None, None, 2)
    lib, _ = _native.load()
    call = _native._Call()  # all zero: B = 0
    assert lib.fv_cpu_run(4, ctypes.byref(call)) == 1
    assert b"sizes must be >= 1" in lib.fv_last_error()
    assert lib.fv_cpu_run(99, ctypes.byref(call)) == 1


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------

SEEDS_AND_OFFSETS = [(0, 0), (123456789, 5), (2**62 - 1, 2**32 - 700), (0xDEADBEEFCAFE, 2**40)]


@pytest.mark.parametrize(("seed", "offset"), SEEDS_AND_OFFSETS)
def test_philox_integers_bit_exact(seed, offset):
    lib, _ = _native.load()
    n = 4096
    out = (ctypes.c_uint32 * (2 * n))()
    lib.fv_philox_host(seed, offset, n, out)
    got = torch.tensor(list(out), dtype=torch.int64).view(n, 2)
    c0, c1, _, _ = reference.philox4x32(torch.tensor(seed), torch.arange(offset, offset + n))
    assert torch.equal(got[:, 0], c0)
    assert torch.equal(got[:, 1], c1)


def _native_randn(seed: int, offset: int, n: int) -> torch.Tensor:
    lib, _ = _native.load()
    out = torch.empty(n, dtype=torch.float32)
    lib.fv_randn_host(seed, offset, n, ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_float)))
    return out


@pytest.mark.parametrize(("seed", "offset"), SEEDS_AND_OFFSETS)
def test_normals_match_reference(seed, offset, isa):
    n = 3000  # crosses 2**32 in the third case: the carry into the counter's high word
    got = _native_randn(seed, offset, n)
    want = reference.philox_randn(seed, torch.arange(offset, offset + n))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in fv.backends()])
def test_same_seed_same_noise_across_backends(backend):
    zeros = torch.zeros(7, 150)
    kwargs = dict(n_samples=2, seed=987654321)
    with fv.use_backend("cpu"):
        native = fv.reparameterize(zeros, zeros, **kwargs)
    with fv.use_backend(backend):
        other = fv.reparameterize(zeros, zeros, **kwargs)
    torch.testing.assert_close(native, other, rtol=0, atol=2e-6)
    with fv.use_backend("cpu"):
        z, _ = fv.sample_and_kl(zeros, zeros, seed=987654321)
    torch.testing.assert_close(z, native[0], rtol=0, atol=0)  # the noise of sample 0


# ---------------------------------------------------------------------------------------------
# Every op of the backend interface against the float64 reference
# ---------------------------------------------------------------------------------------------

# (B, N) and a layout: contiguous, transposed storage, every other column, or a broadcast
# parameter operand. The larger ones span several work units (16384 columns; 64 rows for
# per-feature sums) and a chunk tail. Rows of N <= 128 go 256 // N to a chunk (the loops run
# across rows): "column", "narrow" and "two_rows" end in a partial chunk of rows.
GEOMETRIES = {
    "one": ((1, 1), "contiguous"),
    "small": ((5, 37), "contiguous"),
    "transposed": ((33, 21), "transposed"),
    "strided": ((9, 300), "strided"),
    "broadcast": ((70, 40), "broadcast"),
    "wide": ((2, 16500), "contiguous"),
    "tall": ((200, 19), "contiguous"),
    "column": ((300, 1), "contiguous"),
    "narrow": ((260, 3), "transposed"),
    "two_rows": ((5, 128), "strided"),
}


def _make(shape, layout, dtype, g, scale=1.0, shift=0.0, broadcast=False):
    B, N = shape
    if layout == "transposed":
        t = torch.randn(N, B, generator=g, dtype=torch.float64).t()
    elif layout == "strided":
        t = torch.randn(B, 2 * N, generator=g, dtype=torch.float64)[:, ::2]
    elif layout == "broadcast" and broadcast:
        t = torch.randn(1, N, generator=g, dtype=torch.float64).expand(B, N)
    else:
        t = torch.randn(B, N, generator=g, dtype=torch.float64)
    return (t * scale + shift).to(dtype)


@contextlib.contextmanager
def _one_thread():
    """For the float64 oracle: torch's OpenMP threads crawl on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _oracle(op, args):
    with _one_thread():
        return getattr(reference, op)(*(_ref(a) for a in args))


def _ref(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.double()
    return t


def _compare(got, want, dtype, noisy=False, op=""):
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert a.is_contiguous()
        if a.dtype == torch.int64:  # nearest_code's indices: exact
            assert torch.equal(a, b)
            continue
        rtol = OP_RTOL[op][dtype] if op in OP_RTOL else RTOL[a.dtype]
        if b.numel() == 0:  # e.g. reparameterize's noise output when it is not kept
            continue
        atol = rtol * max(1.0, b.abs().max().item()) + (NOISE_ATOL if noisy else 0.0)
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


def _cases(geometry, dtype, g):
    """(op name, args) pairs for one geometry: every op, its variants and gradient subsets."""
    shape, layout = GEOMETRIES[geometry]
    B, N = shape
    mu = _make(shape, layout, dtype, g)
    lv = _make(shape, layout, dtype, g, 0.7, -0.5)
    pm = _make(shape, layout, dtype, g, 0.5, broadcast=True)
    plv = _make(shape, layout, dtype, g, 0.5, 0.2, broadcast=True)
    x = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    logits = _make(shape, layout, dtype, g, 4.0)
    seed = torch.tensor([20240607], dtype=torch.int64)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g_rows = torch.randn(B, generator=g, dtype=torch.float64).to(out_dtype)
    g_cols = torch.randn(N, generator=g, dtype=torch.float64).to(out_dtype)
    K = 3
    eps = _make((K * B, N), "contiguous", dtype, g).view(K, B, N)
    gz3 = _make((K * B, N), "contiguous", dtype, g).view(K, B, N)
    gz = _make(shape, layout, dtype, g)
    none = mu.new_empty((0,))  # no kept noise
    yield "reparameterize_fwd", (mu, lv, eps, None, K), False
    yield "reparameterize_fwd", (mu, lv, eps, None, K, True), False  # eps given: nothing kept
    yield "reparameterize_fwd", (mu, lv, None, seed, 2), True
    yield "reparameterize_fwd", (mu, lv, None, seed, 2, True), True  # the noise kept
    yield "reparameterize_bwd", (gz3, none, mu, lv, eps, None, [True, True, True]), False
    yield "reparameterize_bwd", (gz3[:2], none, mu, lv, None, seed, [False, True, False]), True
    yield "reparameterize_bwd", (gz3[:2], eps[:2], mu, lv, None, seed, [True, True, False]), False
    for rd in (1, 0):
        yield "gaussian_kl_fwd", (mu, lv, None, None, rd), False
        yield "gaussian_kl_fwd", (mu, lv, pm, plv, rd), False
        grad = g_rows if rd == 1 else g_cols
        yield "gaussian_kl_bwd", (grad, mu, lv, pm, plv, rd, [True, True, True, True]), False
        yield "gaussian_kl_bwd", (grad, mu, lv, None, None, rd, [False, True, False, False]), False
        yield "sample_and_kl_fwd", (mu, lv, seed, rd), True
        yield "sample_and_kl_bwd", (gz, grad, mu, lv, seed, rd, [True, True]), True
    yield "bernoulli_nll_fwd", (logits, x), False
    yield "bernoulli_nll_bwd", (g_rows, logits, x, [True, True]), False
    yield "bernoulli_nll_bwd", (g_rows, logits, x, [True, False]), False
    yield "gaussian_nll_fwd", (mu, x, plv, 0.0), False
    yield "gaussian_nll_fwd", (mu, x, None, -1.25), False
    yield "gaussian_nll_bwd", (g_rows, mu, x, plv, 0.0, [True, True, True]), False
    yield "gaussian_nll_bwd", (g_rows, mu, x, None, 0.75, [True, False, False]), False
    yield "continuous_bernoulli_nll_fwd", (logits, x), False
    yield "continuous_bernoulli_nll_bwd", (g_rows, logits, x, [True, True]), False
    yield "continuous_bernoulli_nll_bwd", (g_rows, logits, x, [True, False]), False
    # The nearest code: the rows against 37 codes of the geometry's layout (indices exact,
    # distances to the float64 oracle's rounding; test_nearest_code.py holds them bitwise)
    # (at most 64 columns: a float32 sum of 16500 squares is not within float32's tolerance)
    D = min(N, 64)
    codebook = _make((37, D), layout, dtype, g)
    for metric in ("l2", "cosine"):
        yield "nearest_code_fwd", (mu[:, :D], codebook, metric), False
    # Finite scalar quantization: the first (at most) 6 columns, every mode (codes to the
    # dtype's tolerance, indices exact: the random rows fall near no rounding boundary)
    D = min(N, 6)
    for mode in range(4):
        levels = ([2, 5, 4, 3, 6, 7] if mode & 1 else [8, 5, 4, 3, 6, 7])[:D]
        plan = fsq_plan(levels, bool(mode & 1), bool(mode & 2))
        consts = (torch.tensor(plan.levels), torch.tensor(plan.basis),
                  torch.tensor(plan.a, dtype=out_dtype), torch.tensor(plan.b, dtype=out_dtype))
        yield "finite_scalar_quantize_fwd", (mu[:, :D], *consts, mode), False
        yield "finite_scalar_quantize_bwd", (gz[:, :D], mu[:, :D], *consts, mode), False
    # LFQ's entropy statistics: the rows' first 6 columns as 2 codebooks of 3 bit logits (the
    # geometry's layout), the exact entropy and the clamped one
    if N >= 6:
        lq = mu[:, :6].unflatten(-1, (2, 3))
        g_sums = torch.randn(2, 8, generator=g, dtype=torch.float64).to(out_dtype)
        g_ent = torch.randn(B, 2, generator=g, dtype=torch.float64).to(out_dtype)
        for clamp in (0.0, 1e-5):
            yield "lfq_entropy_fwd", (lq, clamp), False
            yield "lfq_entropy_bwd", (g_sums, g_ent, lq, clamp, [True]), False
    # The mixture of logistics, RGB with M = 2 and grey with M = 3: params (B, P, N) and x
    # (B, C, N) on the grid, in the geometry's layout (a broadcast params row for "broadcast");
    # grey on the smaller geometries only (the float64 oracle of "wide" takes seconds).
    for C, M, n_bins in ((3, 2, 256), (1, 3, 5))[:2 if B * N <= 10000 else 1]:
        inputs = dmol_inputs(C, M, n_bins)((B, N), g)
        params, pixels = (_dmol_layout(inputs[k], layout, k == "params").to(dtype)
                          for k in ("params", "x"))
        yield "discretized_mix_logistic_nll_fwd", (params, pixels, M, n_bins), False
        yield "discretized_mix_logistic_nll_bwd", (g_rows, params, pixels, M, n_bins), False


def _dmol_layout(t, layout, broadcast):
    """A (B, P, N) tensor in the layout of a geometry."""
    if layout == "transposed":
        return t.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    if layout == "strided":
        return torch.stack([t, torch.full_like(t, 7.0)], -1).flatten(-2)[..., ::2]
    if layout == "broadcast" and broadcast:
        return t[:1].expand(t.shape)
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_every_op_against_reference(geometry, dtype, isa):
    g = torch.Generator().manual_seed(zlib.crc32(geometry.encode()))
    for op, args, noisy in _cases(geometry, dtype, g):
        got = getattr(CPU, op)(*args)
        want = _oracle(op, args)
        if isinstance(got, list) or op.endswith("_bwd"):
            outs = got if isinstance(got, (list, tuple)) else [got]
            for a, arg in zip(outs, _grad_inputs(op, args), strict=True):
                assert a.dtype == arg.dtype, f"{op}: gradient dtype {a.dtype} for {arg.dtype}"
        try:
            _compare(got, want, dtype, noisy, op)
        except AssertionError as e:
            raise AssertionError(f"{op} on {geometry}, {dtype}: {e}") from None


def _grad_inputs(op, args):
    """The inputs whose gradients a backward call returns, in order."""
    if op == "reparameterize_bwd":
        _gz, _noise, mu, lv, eps, _, needs = args
        like = [mu, lv, eps if eps is not None else mu]
    elif op == "gaussian_kl_bwd":
        like, needs = [args[1]] * 4, args[6]
    elif op == "discretized_mix_logistic_nll_bwd":
        like, needs = [args[1]], [True]
    elif op in ("bernoulli_nll_bwd", "continuous_bernoulli_nll_bwd"):
        like, needs = [args[1]] * 2, args[3]
    elif op == "gaussian_nll_bwd":
        like, needs = [args[1]] * 3, args[5]
    elif op == "finite_scalar_quantize_bwd":
        like, needs = [args[1]], [True]
    elif op == "lfq_entropy_bwd":
        like, needs = [args[2]], args[4]
    else:  # sample_and_kl_bwd
        like, needs = [args[2], args[3]], args[6]
    return [t for t, need in zip(like, needs, strict=True) if need]


def test_extreme_values_stay_finite_and_propagate_nan():
    logits = torch.tensor([[1e4, -1e4, 0.0, 30.0, -30.0, float("nan")]])
    x = torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0, 1.0]])
    nll = CPU.bernoulli_nll_fwd(logits[:, :5], x[:, :5])
    want = reference.bernoulli_nll_fwd(logits[:, :5].double(), x[:, :5].double())
    torch.testing.assert_close(nll.double(), want, rtol=1e-6, atol=0)
    assert torch.isnan(CPU.bernoulli_nll_fwd(logits, x)).all()
    lv = torch.tensor([[-100.0, -20.0, -1e-4, 1e-6, 0.3, 80.0]])
    kl = CPU.gaussian_kl_fwd(torch.zeros_like(lv), lv, None, None, 0)
    torch.testing.assert_close(kl.double(), reference.gaussian_kl_fwd(
        torch.zeros_like(lv).double(), lv.double(), None, None, 0), rtol=1e-6, atol=0)
    assert kl[2] > 0
    assert kl[3] > 0


# ---------------------------------------------------------------------------------------------
# IWAE: iwae_fwd / iwae_bwd
# ---------------------------------------------------------------------------------------------

IWAE_KS = (1, 3, 17)
# log_px has a dtype of its own: the z dtype, or (K = 3) another one.
OTHER_DTYPE = {torch.float32: torch.float16, torch.float64: torch.float32,
               torch.float16: torch.bfloat16, torch.bfloat16: torch.float64}
ALL_GRADS = [True, True, True, True]
GRAD_SUBSETS = (ALL_GRADS, [True, False, False, False], [False, True, False, False],
                [False, False, True, True])


def _compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _iwae_inputs(geometry, dtype, K, g, device="cpu"):
    """log_px (K, B), z (K, B, N), mu, logvar (B, N) and grad (B,) for one geometry: z and the
    parameters transposed, strided (every other column) or broadcast (z along K, mu and logvar
    along B); log_px non-contiguous (every other element of a transposed storage) except for the
    contiguous "small" case; grad strided, or stride 0 for "broadcast". Built on ``device`` as
    views of stored tensors, so that the layout survives the move."""
    (B, N), layout = GEOMETRIES[geometry]

    def rand(*shape, scale=1.0, shift=0.0, dt=dtype):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(dt).to(device)

    if layout == "transposed":
        mu, lv = rand(N, B, scale=0.5).t(), rand(N, B, scale=0.5, shift=-0.3).t()
        z = rand(N, B, K).permute(2, 1, 0)
    elif layout == "strided":
        mu = rand(B, 2 * N, scale=0.5)[:, ::2]
        lv = rand(B, 2 * N, scale=0.5, shift=-0.3)[:, ::2]
        z = rand(K, B, 2 * N)[..., ::2]
    elif layout == "broadcast":
        mu = rand(1, N, scale=0.5).expand(B, N)
        lv = rand(1, N, scale=0.5, shift=-0.3).expand(B, N)
        z = rand(1, B, N).expand(K, B, N)
    else:
        mu, lv, z = rand(B, N, scale=0.5), rand(B, N, scale=0.5, shift=-0.3), rand(K, B, N)
    lpx_dtype = OTHER_DTYPE[dtype] if K == 3 else dtype
    if geometry == "small":
        log_px = rand(K, B, scale=3.0, shift=-20.0, dt=lpx_dtype)
    else:
        log_px = rand(B, 2 * K, scale=3.0, shift=-20.0, dt=lpx_dtype)[:, ::2].t()
    if layout == "broadcast":
        grad = rand(1, dt=_compute(dtype)).expand(B)
    else:
        grad = rand(2 * B, dt=_compute(dtype))[::2]
    return log_px, z, mu, lv, grad


def _check_iwae(got, want, slack, rtol_c, what):
    """|got - want| <= RTOL[got's dtype] * max(1, max |want|) (the tolerance of every op here)
    + rtol_c * slack: the log-weights are sums, known to rtol_c (the compute dtype's RTOL) times
    the size of their terms, and the normalized weights inherit that (accuracy.iwae_slack)."""
    got_d = got.double().cpu()
    assert got_d.shape == want.shape, what
    tol = RTOL[got.dtype] * max(1.0, want.abs().max().item()) + rtol_c * slack
    err = (got_d - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} off; worst error "
                           f"{(err - tol).max().item():.3g} past the tolerance")


def _check_iwae_case(backend, log_px, z, mu, lv, grad, what):
    """Forward and backward (every gradient subset) of ``backend`` against the float64
    reference, on the inputs as their dtype holds them."""
    d64 = [t.double().cpu() for t in (log_px, z, mu, lv, grad)]
    want_ll, want_lw = reference.iwae_fwd(*d64[:4])
    rtol_c = RTOL[_compute(z.dtype)]
    slack = accuracy.iwae_slack(*d64[:4], d64[4], rtol_c)
    ll, log_w = backend.iwae_fwd(log_px, z, mu, lv)
    for t in (ll, log_w):
        assert t.dtype == _compute(z.dtype)
        assert t.is_contiguous()
    _check_iwae(ll, want_ll, slack["value"], rtol_c, f"{what}: ll")
    _check_iwae(log_w, want_lw, slack["value"], rtol_c, f"{what}: log_w")
    for needs in GRAD_SUBSETS:
        got = backend.iwae_bwd(grad, ll, log_w, log_px, z, mu, lv, needs)
        want = reference.iwae_bwd(d64[4], want_ll, want_lw, *d64[:4], needs)
        names = [n for n, need in zip(("log_px", "z", "mu", "logvar"), needs, strict=True)
                 if need]
        like = {"log_px": log_px, "z": z, "mu": mu, "logvar": lv}
        assert len(got) == len(names)
        for a, b, name in zip(got, want, names, strict=True):
            assert a.dtype == like[name].dtype, f"{what}: d {name} dtype"
            assert a.is_contiguous(), f"{what}: d {name} not contiguous"
            _check_iwae(a, b, slack[name], rtol_c, f"{what}: d {name} (needs {needs})")


@pytest.mark.parametrize("K", IWAE_KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_iwae_against_reference(geometry, dtype, K, isa):
    g = torch.Generator().manual_seed(zlib.crc32(f"iwae {geometry} {K}".encode()))
    with _one_thread():
        _check_iwae_case(CPU, *_iwae_inputs(geometry, dtype, K, g), f"{geometry}, {dtype}, K={K}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_iwae_many_samples(dtype, isa):
    """K past the forward's tiles of 64 samples (and a chunk tail of columns)."""
    g = torch.Generator().manual_seed(11)
    B, N, K = 7, 300, 150
    z = torch.randn(K, B, N, generator=g, dtype=torch.float64).to(dtype)
    mu = (0.5 * torch.randn(B, N, generator=g, dtype=torch.float64)).to(dtype)
    lv = (0.5 * torch.randn(B, N, generator=g, dtype=torch.float64) - 0.3).to(dtype)
    log_px = (3 * torch.randn(K, B, generator=g, dtype=torch.float64) - 20).to(dtype)
    grad = torch.randn(B, generator=g, dtype=torch.float64).to(_compute(dtype))
    with _one_thread():
        _check_iwae_case(CPU, log_px, z, mu, lv, grad, f"K={K}, {dtype}")


def _iwae_special_inputs():
    """Rows of log_px: finite; one NaN; one +inf; all -inf; two -inf; two +inf."""
    g = torch.Generator().manual_seed(5)
    K, B, N = 4, 6, 7
    nan, inf = float("nan"), float("inf")
    log_px = torch.randn(K, B, generator=g) - 3
    log_px[1, 1] = nan
    log_px[2, 2] = inf
    log_px[:, 3] = -inf
    log_px[[0, 2], 4] = -inf
    log_px[[1, 3], 5] = inf
    z = torch.randn(K, B, N, generator=g)
    mu = 0.5 * torch.randn(B, N, generator=g)
    lv = 0.5 * torch.randn(B, N, generator=g) - 0.3
    grad = torch.randn(B, generator=g)
    return log_px, z, mu, lv, grad


def _assert_same_specials(got, want, what):
    """Equal NaN pattern and infinities; finite values to float32 accuracy."""
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=what)


def _check_iwae_specials(backend, inputs, others):
    log_px, z, mu, lv, grad = inputs
    ll, log_w = backend.iwae_fwd(log_px, z, mu, lv)
    # NaN propagates, +inf gives +inf, all -inf gives -inf (the Triton kernel's guards), rows
    # with some -inf weights are finite.
    assert torch.isfinite(ll[[0, 4]]).all()
    assert torch.isnan(ll[1])
    assert ll[2] == float("inf")
    assert ll[3] == float("-inf")
    assert ll[5] == float("inf")
    grads = backend.iwae_bwd(grad, ll, log_w, log_px, z, mu, lv, ALL_GRADS)
    d_lpx, d_z, d_mu, d_lv = grads
    for t in (d_lpx[:, [0, 4]], d_z[:, [0, 4]], d_mu[[0, 4]], d_lv[[0, 4]]):
        assert torch.isfinite(t).all()  # rows of finite ll: finite gradients
    for name, other in others.items():
        want_ll, want_lw = other.iwae_fwd(*(t.cpu() for t in inputs[:4]))
        _assert_same_specials(ll, want_ll, f"ll vs {name}")
        _assert_same_specials(log_w, want_lw, f"log_w vs {name}")
        want = other.iwae_bwd(grad.cpu(), want_ll, want_lw, *(t.cpu() for t in inputs[:4]),
                              ALL_GRADS)
        for a, b, n in zip(grads, want, ("log_px", "z", "mu", "logvar"), strict=True):
            _assert_same_specials(a, b, f"d {n} vs {name}")


def test_iwae_nan_and_inf_log_weights(isa):
    others = {"torch": reference}
    if "triton" in fv.backends():
        others["triton"] = _backend.implementation("triton")
    _check_iwae_specials(CPU, _iwae_special_inputs(), others)


def test_iwae_bitwise_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(3)
    cases = []
    for K, B, N in ((100, 300, 40), (5, 3, 20000)):
        z = torch.randn(K, B, N, generator=g)
        mu, lv = 0.5 * torch.randn(B, N, generator=g), 0.5 * torch.randn(B, N, generator=g)
        cases.append((torch.randn(K, B, generator=g) - 10, z, mu, lv, torch.randn(B, generator=g)))
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            run = []
            for log_px, z, mu, lv, grad in cases:
                ll, log_w = CPU.iwae_fwd(log_px, z, mu, lv)
                run += [ll, log_w, *CPU.iwae_bwd(grad, ll, log_w, log_px, z, mu, lv, ALL_GRADS)]
            runs.append(run)
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


def test_every_interface_op_is_native():
    """No fallback: each op of the backend interface is a method of the native backend, and a
    name that is not one fails loudly."""
    interface = [n for n in dir(reference) if n.endswith(("_fwd", "_bwd"))]
    assert sorted(interface) == sorted(_native.OPS)
    for name in interface:
        assert callable(getattr(_native.NativeBackend, name, None)), name
    with pytest.raises(AttributeError):
        CPU.no_such_op_fwd  # noqa: B018


def test_iwae_operand_dtypes_checked():
    log_px, z, mu, lv, grad = _iwae_special_inputs()
    ll, log_w = CPU.iwae_fwd(log_px, z, mu, lv)
    K, _, N = z.shape
    with pytest.raises(RuntimeError, match="compute dtype"):  # ll in float64, by hand
        CPU._call("iwae_bwd", mu, (_native._per_row_view(grad, K, N, torch.float32),
                                   _native._per_row_view(ll, K, N, torch.float64),
                                   _native._samples_view(log_w, N), z, mu, lv),
                  (None, torch.empty_like(z), None, None), K=K)


# ---------------------------------------------------------------------------------------------
# Determinism, threads, fork
# ---------------------------------------------------------------------------------------------


def _workload(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(300, 20000, generator=g)
    lv = torch.randn(300, 20000, generator=g) * 0.5
    s = torch.tensor([7], dtype=torch.int64)
    return mu, lv, s


def _results(mu, lv, s):
    z, kl_rows = CPU.sample_and_kl_fwd(mu, lv, s, 1)
    _, kl_cols = CPU.sample_and_kl_fwd(mu, lv, s, 0)
    nll = CPU.bernoulli_nll_fwd(mu, torch.sigmoid(lv))
    grads = CPU.sample_and_kl_bwd(lv, kl_rows, mu, lv, s, 1, [True, True])
    return [z, kl_rows, kl_cols, nll, *grads]


def test_bitwise_deterministic_across_runs_and_thread_counts():
    inputs = _workload()
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            runs.append(_results(*inputs))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("N", [1, 3, 16, 17, 128])
def test_narrow_rows_same_bits_in_every_layout(N):
    """Chunks of whole narrow rows read an operand in place, as one strided run, or row by row
    (transposed storage, a per-row gradient): the same values give the same bits."""
    g = torch.Generator().manual_seed(N)
    B = 700
    mu, lv, logits = (torch.randn(B, N, generator=g) for _ in range(3))
    x = torch.rand(B, N, generator=g)
    grad = torch.randn(B, generator=g)
    s = torch.tensor([11], dtype=torch.int64)

    def run(layout):
        a, b, c, t = (layout(v) for v in (mu, lv, logits, x))
        z, kl = CPU.sample_and_kl_fwd(a, b, s, 1)
        return [z, kl, *CPU.sample_and_kl_bwd(a, grad, a, b, s, 1, [True, True]),
                CPU.bernoulli_nll_fwd(c, t), *CPU.bernoulli_nll_bwd(grad, c, t, [True, True]),
                CPU.gaussian_kl_fwd(a, b, None, None, 1)]

    def transposed(v):
        return v.t().contiguous().t()

    def strided(v):
        return torch.stack([v, v], dim=-1)[..., 0]

    want = run(lambda v: v)
    for layout in (transposed, strided):
        for a, b in zip(run(layout), want, strict=True):
            assert torch.equal(a, b), layout.__name__


def test_concurrent_callers_get_correct_results():
    inputs = _workload(1)
    expected = _results(*inputs)
    results, errors = [None] * 4, []

    def worker(i):
        try:
            results[i] = _results(*inputs)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        for a, b in zip(expected, r, strict=True):
            assert torch.equal(a, b)


_FORK_INPUTS: tuple = ()


def _child(queue):
    # torch's own OpenMP pool does not survive fork(): the child runs no torch math, only ours.
    mu, lv = _FORK_INPUTS
    queue.put(math.fsum(CPU.gaussian_kl_fwd(mu, lv, None, None, 1).tolist()))


def test_thread_pool_survives_fork():
    global _FORK_INPUTS
    mu, lv, _ = _workload(2)
    _FORK_INPUTS = (mu, lv)
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        # the pool's threads exist now
        expected = math.fsum(CPU.gaussian_kl_fwd(mu, lv, None, None, 1).tolist())
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        p = ctx.Process(target=_child, args=(queue,))
        p.start()
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, "the forked child hung or failed"
        assert queue.get(timeout=5) == expected
    finally:
        torch.set_num_threads(before)
        _FORK_INPUTS = ()


# ---------------------------------------------------------------------------------------------
# CUDA (needs a GPU)
# ---------------------------------------------------------------------------------------------

CUDA_GEOMETRIES = ["small", "transposed", "strided", "broadcast", "wide", "tall"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU or library built without CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", CUDA_GEOMETRIES)
def test_cuda_every_op_against_reference(geometry, dtype):
    gpu = _native.implementation("cuda")
    g = torch.Generator().manual_seed(zlib.crc32(geometry.encode()))
    for op, args, noisy in _cases(geometry, dtype, g):
        dev_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        got = getattr(gpu, op)(*dev_args)
        got = [t.cpu() for t in got] if isinstance(got, (list, tuple)) else got.cpu()
        want = _oracle(op, args)
        try:
            _compare(got, want, dtype, noisy, op)
        except AssertionError as e:
            raise AssertionError(f"cuda {op} on {geometry}, {dtype}: {e}") from None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU or library built without CUDA")
@pytest.mark.parametrize("K", IWAE_KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", CUDA_GEOMETRIES)
def test_cuda_iwae_against_reference(geometry, dtype, K):
    gpu = _native.implementation("cuda")
    g = torch.Generator().manual_seed(zlib.crc32(f"iwae {geometry} {K}".encode()))
    inputs = _iwae_inputs(geometry, dtype, K, g, device="cuda")
    with _one_thread():
        _check_iwae_case(gpu, *inputs, f"cuda {geometry}, {dtype}, K={K}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU or library built without CUDA")
def test_cuda_iwae_specials_and_determinism():
    gpu = _native.implementation("cuda")
    inputs = [t.cuda() for t in _iwae_special_inputs()]
    _check_iwae_specials(gpu, inputs, {"cpu": CPU, "torch": reference})
    # many samples, many rows, a long event (several blocks per row): bitwise run to run
    g = torch.Generator().manual_seed(9)
    for K, B, N in ((150, 700, 40), (3, 2, 300000)):
        log_px = (torch.randn(K, B, generator=g) - 10).cuda()
        z = torch.randn(K, B, N, generator=g).cuda()
        mu = (0.5 * torch.randn(B, N, generator=g)).cuda()
        lv = (0.5 * torch.randn(B, N, generator=g)).cuda()
        grad = torch.randn(B, generator=g).cuda()
        runs = []
        for _ in range(2):
            ll, log_w = gpu.iwae_fwd(log_px, z, mu, lv)
            runs.append([ll, log_w, *gpu.iwae_bwd(grad, ll, log_w, log_px, z, mu, lv, ALL_GRADS)])
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)
        cpu_ll, _ = CPU.iwae_fwd(log_px.cpu(), z.cpu(), mu.cpu(), lv.cpu())
        torch.testing.assert_close(runs[0][0].cpu(), cpu_ll, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU or library built without CUDA")
def test_cuda_noise_matches_cpu_and_is_deterministic_on_a_side_stream():
    mu, lv, s = (t[:64, :5000] for t in _workload(3))
    cpu = _results(mu, lv, s)
    gpu = _native.implementation("cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        args = [t.cuda() for t in (mu, lv, s)]
        runs = []
        for _ in range(2):
            z, kl_rows = gpu.sample_and_kl_fwd(*args, 1)
            _, kl_cols = gpu.sample_and_kl_fwd(*args, 0)
            runs.append([z, kl_rows, kl_cols])
    stream.synchronize()
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(runs[0][0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1].cpu(), cpu[1], rtol=1e-5, atol=1e-3)
