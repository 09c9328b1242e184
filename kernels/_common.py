"""Shared pieces of the Triton kernels: math written from ``tl`` primitives (no libdevice, so it
runs under ``TRITON_INTERPRET=1``), tile indexing, and launch configuration.

Every kernel sees its tensors as ``(B, N)`` views with explicit strides (int64 offsets), loads
upcast to the compute dtype (float32, or float64 for float64 inputs), and is launched on a 1-D
grid of ``(BLOCK_B, BLOCK_N)`` tiles.

Reduction kernels write deterministic partial sums: with ``REDUCE_DIM == 1`` (per-sample sums)
program ``pid`` owns row tile ``pid // n_split`` and the ``pid % n_split``-th run of
``tiles_per_prog`` column tiles, and writes ``partial[row, part]``; with ``REDUCE_DIM == 0``
(per-feature sums, for free bits) rows and columns swap roles. The launcher sums the partials.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------


@triton.jit
def log1p_unit(x):
    """log(1 + x) for x in [0, 1], accurate to a few ulp (Goldberg's trick)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / d))


# The formulas keep every intermediate finite wherever the result is, and form no result by
# cancelling nearly equal numbers where it is well conditioned (docs/numerics.md):
# halvings inside exponents (half_exp), residuals scaled by powers of q = e^(-lv/4) before they
# are squared (quarter_scale, scaled_half, scaled_full), the Bernoulli gradient by the sign of
# the logit. The same formulas, in the same order, as fastvae.reference and csrc/fastvae_math.h.

SQRT_HALF = tl.constexpr(0.7071067811865476)
HALF_LOG_2PI = tl.constexpr(0.9189385332046727)


@triton.jit
def _expm1_tail(x, DTYPE: tl.constexpr):
    """(expm1(x) - x) / x^2 = sum_k x^(k-2) / k!; accurate for |x| <= 1: k = 2..11 in float32
    (the next term is below 0.1 ulp), k = 2..18 in float64."""
    # DTYPE first: a tl.constexpr compares by value, tl.float64 == constexpr is False.
    if DTYPE == tl.float64:  # noqa: SIM300
        # Every float64 constant meets x first (c * x takes x's dtype): a bare acc = c would be
        # a float32 scalar, rounded before it reaches x.
        acc = 1.5619206968586225e-16 * x + 2.8114572543455206e-15
        acc = acc * x + 4.779477332387385e-14
        acc = acc * x + 7.647163731819816e-13
        acc = acc * x + 1.1470745597729725e-11
        acc = acc * x + 1.6059043836821613e-10
        acc = acc * x + 2.08767569878681e-09
        acc = acc * x + 2.505210838544172e-08
    else:
        acc = 2.505210838544172e-08
    acc = acc * x + 2.755731922398589e-07
    acc = acc * x + 2.7557319223985893e-06
    acc = acc * x + 2.48015873015873e-05
    acc = acc * x + 0.0001984126984126984
    acc = acc * x + 0.001388888888888889
    acc = acc * x + 0.008333333333333333
    acc = acc * x + 0.041666666666666664
    acc = acc * x + 0.16666666666666666
    acc = acc * x + 0.5
    return acc


@triton.jit
def half_exp(x):
    """e^x / 2 as (e^(x/2) / 2) * e^(x/2): finite wherever e^x / 2 is."""
    h = tl.exp(0.5 * x)
    return (0.5 * h) * h


@triton.jit
def half_expm1(d, hd, DTYPE: tl.constexpr):
    """expm1(d) / 2 given d and hd = d / 2: the series for |d| < 1, e^d / 2 - 1/2 beyond."""
    small = tl.abs(d) < 1.0
    return tl.where(small, hd + hd * d * _expm1_tail(d, DTYPE), half_exp(d) - 0.5)


@triton.jit
def half_expm1mx(d, hd, DTYPE: tl.constexpr):
    """(expm1(d) - d) / 2 given d and hd = d / 2 (hd stays finite where d = lv - plv would
    overflow): hd d tail(d) for |d| < 1, e^d / 2 - (1/2 + hd) beyond, +inf at d = +inf."""
    small = tl.abs(d) < 1.0
    direct = tl.where(d == float("inf"), d, half_exp(d) - (0.5 + hd))
    return tl.where(small, hd * d * _expm1_tail(d, DTYPE), direct)


@triton.jit
def expm1(x):
    """expm1(x) in x's dtype: the series inside (-1, 1), where exp(x) - 1 cancels, else that."""
    small = tl.abs(x) < 1.0
    return tl.where(small, x + x * x * _expm1_tail(x, x.dtype), tl.exp(x) - 1.0)


@triton.jit
def expm1_neg_small(lv, DTYPE: tl.constexpr):
    """expm1(-lv), accurate for |lv| < 1 (anything beyond)."""
    x = -lv
    return x + x * x * _expm1_tail(x, DTYPE)


@triton.jit
def quarter_scale(lv, DTYPE: tl.constexpr):
    """q = e^(-lv/4), the exponent clamped (at 80 in float32, 600 in float64; NaN passes) where
    any nonzero residual overflows the result anyway: (r q) q = r e^(-lv/2) and
    ((r q) q q) q = r e^(-lv) never overflow where the product does not, and r = 0 gives 0."""
    clamp = 80.0
    if DTYPE == tl.float64:  # noqa: SIM300 (see _expm1_tail)
        clamp = 600.0
    x = -0.25 * lv
    return tl.exp(tl.where(x > clamp, clamp, x))


@triton.jit
def scaled_half(r, q):
    """u = r e^(-lv/2) sqrt(1/2) from q = quarter_scale(lv): u^2 = r^2 e^(-lv) / 2."""
    return (r * q) * (q * SQRT_HALF)


@triton.jit
def scaled_full(r, q):
    """r e^(-lv) from q = quarter_scale(lv)."""
    return (((r * q) * q) * q) * q


@triton.jit
def std_times(t, h):
    """t e^(lv/2) from h = e^(lv/4), as (t h) h: finite wherever the product is; 0 for t = 0."""
    return tl.where(t == 0.0, 0.0, (t * h) * h)


@triton.jit
def _bernoulli_nonhard_inf(l, x):
    return (tl.abs(l) == float("inf")) & (x > 0.0) & (x < 1.0)


@triton.jit
def bernoulli_nll(l, x):
    """-log Bernoulli(x | sigmoid(l)) = |l| a + log1p(e^-|l|), a = 1 - x (l >= 0) or x (l < 0).
    An infinite logit: the limit for a hard target (0 or +inf), NaN for x strictly in (0, 1)."""
    al = tl.abs(l)
    a = tl.where(l >= 0, 1.0 - x, x)
    v = tl.where(a == 0.0, 0.0, al * a) + log1p_unit(tl.exp(-al))
    return tl.where(_bernoulli_nonhard_inf(l, x), float("nan"), v)


@triton.jit
def bernoulli_grad_logits(l, x):
    """sigmoid(l) - x without cancellation: (1 - x) - p for l >= 0, p - x below,
    p = sigmoid(-|l|) = t / (1 + t), t = e^-|l|."""
    t = tl.exp(-tl.abs(l))
    p = t / (1.0 + t)
    d = tl.where(l >= 0, (1.0 - x) - p, p - x)
    return tl.where(_bernoulli_nonhard_inf(l, x), float("nan"), d)


@triton.jit
def iwae_term(z, mu, lv, q):
    """log N(z; 0, I) - log N(z; mu, e^lv) per element, q = quarter_scale(lv):
    u^2 - (z sqrt(1/2))^2 + lv / 2 with u = scaled_half(z - mu, q) (2 pi terms cancel)."""
    u = scaled_half(z - mu, q)
    zh = z * SQRT_HALF
    return (u * u - zh * zh) + 0.5 * lv


@triton.jit
def times_weight(a, p):
    """a * p for an IWAE weight a: exactly 0 for a = 0, also where the partial p overflows."""
    return tl.where(a == 0.0, 0.0, a * p)


@triton.jit
def iwae_grad_parts(z, mu, lv, q, em):
    """The partials of one log-weight in (z, mu, lv), from q = quarter_scale(lv) and
    em = expm1_neg_small(lv): ((z - mu) e^-lv - z, -(z - mu) e^-lv, 1/2 - u^2); the first
    taken as (z - mu) expm1(-lv) - mu for |lv| < 1, where the direct form cancels."""
    r = z - mu
    re = scaled_full(r, q)
    u = scaled_half(r, q)
    d_z = tl.where(tl.abs(lv) < 1.0, r * em - mu, re - z)
    return d_z, -re, 0.5 - u * u


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------


@triton.jit
def tile(tile_b, tile_n, B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column indices (int64) of one tile and its in-bounds mask."""
    rows = tl.cast(tile_b, tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.cast(tile_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    return rows, cols, mask


@triton.jit
def elementwise_tile(pid, n_col_tiles, B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    return tile(pid // n_col_tiles, pid % n_col_tiles, B, N, BLOCK_B, BLOCK_N)


@triton.jit
def reduction_tile(pid, t, tiles_per_prog, n_split, B, N, REDUCE_DIM: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """The t-th tile of program ``pid`` of a reduction kernel (see the module docstring)."""
    outer = pid // n_split
    inner = (pid % n_split) * tiles_per_prog + t
    if REDUCE_DIM == 1:
        return tile(outer, inner, B, N, BLOCK_B, BLOCK_N)
    else:
        return tile(inner, outer, B, N, BLOCK_B, BLOCK_N)


@triton.jit
def store_partial(partial_ptr, acc, pid, n_split, B, N, REDUCE_DIM: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum the accumulator along the reduced dimension and store this program's partials:
    ``partial[row, part]`` (shape (B, n_split)) or ``partial[part, col]`` (shape (n_split, N))."""
    outer = (pid // n_split).to(tl.int64)
    part = pid % n_split
    if REDUCE_DIM == 1:
        rows = outer * BLOCK_B + tl.arange(0, BLOCK_B)
        tl.store(partial_ptr + rows * n_split + part, tl.sum(acc, 1), mask=rows < B)
    else:
        cols = outer * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(partial_ptr + part * N + cols, tl.sum(acc, 0), mask=cols < N)


@triton.jit
def load(ptr, rows, cols, stride_b, stride_n, mask, DTYPE: tl.constexpr):
    """Load a tile of a strided (B, N) view, upcast to the compute dtype."""
    return tl.load(ptr + rows[:, None] * stride_b + cols[None, :] * stride_n,
                   mask=mask, other=0.0).to(DTYPE)


@triton.jit
def cast_rn(value, TY: tl.constexpr):
    """``value`` cast to ``TY``, rounded to nearest (ties to even) for bfloat16 too: the
    conversion a GPU makes (``cvt.rn.bf16.f32``), written out with integer operations, because
    Triton's interpreter truncates float32 -> bfloat16 (half of all values would end one ulp
    toward zero on the CPU). float32 bits + 0x7FFF + (bit 16), then the upper half; a NaN keeps
    its sign and is made quiet (no carry into the exponent); overflow past bfloat16's largest
    finite value rounds to inf, as on a GPU. Other dtypes: the plain cast (numpy rounds to
    nearest under the interpreter, as the GPU does)."""
    if TY == tl.bfloat16:  # noqa: SIM300 (TY first: a constexpr compares by value)
        f = value.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = tl.where(f != f, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(TY)


@triton.jit
def store(ptr, rows, cols, N, value, mask):
    """Store a tile into a contiguous (B, N) tensor, cast to its dtype (rounded to nearest:
    ``cast_rn``)."""
    tl.store(ptr + rows[:, None] * N + cols[None, :], cast_rn(value, ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration (host side)
# ---------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype):
    """tl compute dtype for a torch input dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Tiling:
    block_b: int
    block_n: int
    num_warps: int
    n_row_tiles: int
    n_col_tiles: int

    @property
    def grid(self) -> tuple[int]:
        """One program per tile (elementwise kernels)."""
        return (self.n_row_tiles * self.n_col_tiles,)


# Elements per tile. On a GPU: 1024 with 8 warps, 4 elements per thread (one 16-byte vector of
# float32). ptxas -v (sm_80, sm_90, scripts/check_triton_compile.py): 53-126 registers at most
# per kernel (the most: IWAE, float64), no spill at realistic shapes in any dtype; 4096 elements
# (16 per thread) took 171-255, one 8-warp block per SM, and spilled up to 632 B. Triton's
# interpreter pays ~2 ms per program and vectorizes inside one, so on CPU tensors it gets few,
# large tiles.
_TILE_ELEMS_GPU = 1024
_WARPS_GPU = 8
_TILE_ELEMS_INTERPRETER = 16384


def interpreted(device: torch.device) -> bool:
    """Whether Triton runs ``device``'s tensors under its interpreter (CPU tensors) rather than
    compiled for a GPU (every other device: ``cuda``, and ``meta`` in the offline compile check,
    which must see exactly the GPU's launch configuration)."""
    return device.type == "cpu"


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0): ``triton.next_power_of_2`` on the host.
    Triton 3.9 made that one (and ``triton.cdiv``) a ``constexpr_function``, whose call costs
    3-9 µs on the host: more than the rest of ``tiling`` (benchmarks/NOTES.md)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers: ``triton.cdiv`` on the host (see ``next_power_of_2``)."""
    return -(-a // b)


def tiling(B: int, N: int, device: torch.device) -> Tiling:
    """The tiles of a (B, N) launch on ``device`` (the same for every call with that shape:
    cached)."""
    return _tiling(B, N, interpreted(device))


@functools.lru_cache(maxsize=4096)
def _tiling(B: int, N: int, interpreter: bool) -> Tiling:
    target = _TILE_ELEMS_INTERPRETER if interpreter else _TILE_ELEMS_GPU
    block_n = min(next_power_of_2(N), target)
    block_b = min(next_power_of_2(B), max(1, target // block_n))
    num_warps = _WARPS_GPU if block_b * block_n >= _TILE_ELEMS_GPU else 4
    return Tiling(block_b, block_n, num_warps, cdiv(B, block_b), cdiv(N, block_n))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split(n_outer: int, n_inner: int, device: torch.device) -> tuple[int, int]:
    """How a reduction spreads its ``n_inner`` tiles per output block over programs:
    returns ``(n_split, tiles_per_prog)``. Enough programs to fill the GPU; one per output
    block under the interpreter."""
    if interpreted(device):
        return 1, n_inner
    target_programs = 4 * _sm_count(device.index if device.index is not None else 0)
    n_split = max(1, min(n_inner, math.ceil(target_programs / n_outer)))
    tiles_per_prog = math.ceil(n_inner / n_split)
    return math.ceil(n_inner / tiles_per_prog), tiles_per_prog


def on_device(t: torch.Tensor):
    """Context in which Triton launches for ``t`` go to ``t``'s device."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def strides(t: torch.Tensor | None) -> tuple[int, ...]:
    """Strides of a (.., B, N) view, zeros for an absent tensor."""
    return (0, 0) if t is None else tuple(t.stride())


class Reduction:
    """Host side of a reduction kernel: grid, partial-sum buffer and its final sum."""

    def __init__(self, B: int, N: int, reduce_dim: int, device: torch.device,
                 dtype: torch.dtype):
        self.t = tiling(B, N, device)
        self.reduce_dim = reduce_dim
        outer, inner = ((self.t.n_row_tiles, self.t.n_col_tiles) if reduce_dim == 1
                        else (self.t.n_col_tiles, self.t.n_row_tiles))
        self.n_split, self.tiles_per_prog = split(outer, inner, device)
        self.grid = (outer * self.n_split,)
        shape = (B, self.n_split) if reduce_dim == 1 else (self.n_split, N)
        self.partial = torch.empty(shape, dtype=torch_compute_dtype(dtype), device=device)

    def result(self) -> torch.Tensor:
        if self.n_split == 1:
            return self.partial.view(-1)
        return self.partial.sum(self.reduce_dim)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------


class TritonKernelError(RuntimeError):
    """A Triton kernel failed for one call: to compile for the GPU (``stage == "compile"``),
    to launch (``"launch"``), or under Triton's interpreter (``"run"``).

    The message names the op, the backend (``"triton"``), the kernel and the specialization
    Triton compiles for: every tensor argument's dtype (and a pointer not 16-byte aligned),
    every integer argument's value (Triton specializes on 1, multiples of 16 and >= 2**31),
    the ``tl.constexpr`` flags, tile sizes and ``num_warps``. The original exception is the
    ``__cause__``. fastvae never falls back to another backend when this happens.
    """

    def __init__(self, message: str, op: str, kernel: str, stage: str):
        super().__init__(message)
        self.op = op
        self.kernel = kernel
        self.stage = stage


def _compile_stage(e: BaseException) -> bool:
    """Whether ``e`` was raised while compiling: by Triton's compiler (front end, passes, ptxas,
    loading the binary, all under ``triton/compiler/``), not while binding or launching."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return (isinstance(e, (CompilationError, OutOfResources, PTXASError))
            or any("/triton/compiler/" in frame.filename.replace("\\", "/")
                   for frame in traceback.extract_tb(e.__traceback__)))


def describe_launch(kernel, args: tuple, meta: dict) -> str:
    """The specialization of one launch, in words (for error messages)."""
    parts = []
    for name, value in zip(inspect.signature(kernel.fn).parameters, args, strict=False):
        if isinstance(value, torch.Tensor):
            misaligned = value.data_ptr() % 16 != 0
            parts.append(f"{name}: {str(value.dtype).removeprefix('torch.')}"
                         f"{' (not 16-byte aligned)' if misaligned else ''}")
        elif isinstance(value, (int, float)):
            parts.append(f"{name}={value!r}")
    parts += [f"{name}={getattr(value, '__name__', value)}" for name, value in meta.items()]
    return ", ".join(parts)


# Whether Triton runs kernels under its interpreter (read as Triton reads it, at import).
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The fast path of a launch. ``kernel[grid](*args, **meta)`` binds the arguments to the
# kernel's signature, specializes each one (dtype, 16-byte alignment, integer class), builds
# Triton's cache key and looks the compiled kernel up: per launch, most of the Python side
# (benchmarks/triton_launch.py). For a kernel launched again with the same arguments (same
# integer values, tensor dtypes and alignments, same constexprs and options: what a training
# loop does), ``launch`` keeps the ``CompiledKernel`` that Triton returned for the first one
# and calls its launcher directly, with the grid, the current stream and the arguments in
# signature order, as ``JITFunction.run`` does. The key is finer than Triton's (exact integer
# values where Triton looks at == 1, divisibility by 16 and the 32/64-bit range), so it never
# picks a kernel Triton would not have picked. Only for compiled kernels (never under
# TRITON_INTERPRET, whose kernels are not ``JITFunction``s), and only while nothing wraps
# ``JITFunction.run`` (the offline compile check does) or hooks a kernel before its run;
# anything else the fast path does not know takes Triton's own path. The launcher's calling
# convention is Triton's internal one (3.4 to 3.9 at least: the grid, the stream,
# ``function``, ``packed_metadata``, ``launch_metadata``, the two ``knobs`` hooks, then every
# bound argument, constexprs included; before 3.4 the constexprs were left out): the fast path
# is on only where ``JITFunction.run``'s own source makes exactly that call.
_LAUNCH_CALL = ("kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,"
                "launch_metadata,knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,"
                "*bound_args.values())")


def _convention_known(run) -> bool:
    try:
        source = inspect.getsource(run)
    except (OSError, TypeError):
        return False
    return _LAUNCH_CALL in "".join(source.split())


try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction

    _JIT_RUN = _JITFunction.run
    if not _convention_known(_JIT_RUN):
        _JITFunction = None
except Exception:
    _JITFunction = None

_FAST: dict[tuple, tuple] = {}
_FAST_MAX = 4096  # entries (one per kernel, argument values and device); cleared when full
fast_path_stats = {"hits": 0, "misses": 0}  # read by tests/kernels/test_launch_cache.py


def _fast_entry(kernel, compiled, n_args: int, meta: dict) -> tuple | None:
    """(kernel, compiled kernel, the names and defaults of the parameters after the positional
    arguments) if the launcher can be called directly, else None."""
    if compiled is None or not all(hasattr(compiled, a) for a in
                                   ("run", "function", "packed_metadata", "launch_metadata")):
        return None
    tail = []
    for p in list(inspect.signature(kernel.fn).parameters.values())[n_args:]:
        if p.name not in meta and p.default is inspect.Parameter.empty:
            return None
        tail.append((p.name, p.default))
    return kernel, compiled, tuple(tail)


def _launch_fast(kernel, grid: tuple[int, ...], args: tuple, meta: dict) -> bool:
    """Launch through the cache if this launch is in it (True), else through
    ``kernel[grid]``, remembering the compiled kernel for the next time (False)."""
    device = _driver.active.get_current_device()
    runtime, compilation = _knobs.runtime, _knobs.compilation
    # A tensor by its dtype and 16-byte alignment, an int by its value, anything else by its
    # type and value (True, 1 and 1.0 are different arguments to Triton); the constexprs and
    # options by name, type and value; the knobs that enter Triton's options (3.9).
    # (The kernel by its id, cheaper to hash; the entry holds the kernel to check it.)
    key = (id(kernel), device,
           *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, Tensor)
             else a if type(a) is int else (type(a), a) for a in args],
           *meta, *meta.values(), *map(type, meta.values()),
           runtime.debug, getattr(runtime, "add_stages_inspection_hook", None),
           getattr(compilation, "instrumentation_mode", None),
           getattr(compilation, "fpsan_homomorphic_casts", None))
    entry = _FAST.get(key)
    if entry is None or entry[0] is not kernel:
        fast_path_stats["misses"] += 1
        compiled = kernel.run(*args, grid=grid, warmup=False, **meta)
        entry = _fast_entry(kernel, compiled, len(args), meta)
        if entry is not None:
            if len(_FAST) >= _FAST_MAX:
                _FAST.clear()
            _FAST[key] = entry
        return False
    fast_path_stats["hits"] += 1
    _, compiled, tail = entry
    full = (*args, *[meta.get(name, default) for name, default in tail])
    stream = _driver.active.get_current_stream(device)
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full),
                 runtime.launch_enter_hook, runtime.launch_exit_hook, *full)
    return True


def launch(op: str, kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``; a failure raises :class:`TritonKernelError` naming the
    op (``"fastvae::<name>"``), the backend and the specialization, with the cause chained.

    Under Triton's interpreter the kernel runs with numpy's floating-point warnings off
    (``np.errstate``, per thread): the interpreter computes every lane with numpy, the masked
    ones (loaded as ``other=0``) and both branches of each ``tl.where`` included, so it reported
    divisions by zero, overflows and invalid operations (hundreds per test run) that a GPU
    computes silently under IEEE rules and then discards. The results themselves are what the
    tests check (NaN and inf where they belong, nowhere else).

    A compiled kernel launched again with the same arguments (values, dtypes, alignments) skips
    Triton's argument binding and cache lookup: see ``_launch_fast``."""
    try:
        if (_JITFunction is not None and type(kernel) is _JITFunction and type(grid) is tuple
                and _JITFunction.run is _JIT_RUN and not getattr(kernel, "pre_run_hooks", None)):
            _launch_fast(kernel, grid, args, meta)  # a compiled kernel (the interpreter has none)
        elif _INTERPRETER:
            with np.errstate(all="ignore"):
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)
    except Exception as e:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None and interpreted(device):
            stage, what = "run", "failed under Triton's interpreter"
        elif _compile_stage(e):
            stage, what = "compile", "failed to compile"
        else:
            stage, what = "launch", "failed to launch"
        raise TritonKernelError(
            f"{op} (backend 'triton'): kernel {kernel.fn.__name__} {what} on {device} for "
            f"grid {tuple(grid)} and specialization "
            f"{describe_launch(kernel, args, meta)}: {type(e).__name__}: {e}",
            op, kernel.fn.__name__, stage) from e
