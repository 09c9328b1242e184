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
import traceback
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------


@triton.jit
def log1p_unit(x):
    """log(1 + x) for x in [0, 1], accurate to a few ulp (Goldberg's trick)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / d))


@triton.jit
def _expm1_tail(x):
    """(expm1(x) - x) / x^2 = sum_k x^(k-2) / k!, k = 2..13; accurate for |x| < 0.5.
    Every constant meets ``x`` first (``c * x``), so it takes x's dtype: a bare ``acc = c``
    would be a float32 scalar, rounded before it reaches a float64 ``x``."""
    acc = 1.6059043836821613e-10 * x + 2.08767569878681e-09
    acc = acc * x + 2.505210838544172e-08
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
def expm1(x):
    small = tl.abs(x) < 0.5
    return tl.where(small, x + x * x * _expm1_tail(x), tl.exp(x) - 1.0)


@triton.jit
def expm1mx(x):
    """expm1(x) - x without cancellation near 0 (and +inf at x = +inf, not inf - inf)."""
    small = tl.abs(x) < 0.5
    direct = tl.where(x == float("inf"), x, tl.exp(x) - 1.0 - x)
    return tl.where(small, x * x * _expm1_tail(x), direct)


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
def store(ptr, rows, cols, N, value, mask):
    """Store a tile into a contiguous (B, N) tensor, cast to its dtype."""
    tl.store(ptr + rows[:, None] * N + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


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


def tiling(B: int, N: int, device: torch.device) -> Tiling:
    target = _TILE_ELEMS_INTERPRETER if interpreted(device) else _TILE_ELEMS_GPU
    block_n = min(triton.next_power_of_2(N), target)
    block_b = min(triton.next_power_of_2(B), max(1, target // block_n))
    num_warps = _WARPS_GPU if block_b * block_n >= _TILE_ELEMS_GPU else 4
    return Tiling(block_b, block_n, num_warps, triton.cdiv(B, block_b), triton.cdiv(N, block_n))


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


def launch(op: str, kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``; a failure raises :class:`TritonKernelError` naming the
    op (``"fastvae::<name>"``), the backend and the specialization, with the cause chained."""
    try:
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
