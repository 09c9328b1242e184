"""Finite scalar quantization (Mentzer et al. 2023): Triton kernels and launchers.

Per element of dimension j with L levels, hw = L // 2, top = L - 1 - hw and the float32 constants
a, b of ``fastvae.ops.reference.fsq_bound_constants`` (docs/numerics.md):
    tanh bound:  u = z + b, r = round_half_even(tanh(u) a - offset) clamped to [-hw, top],
                 code = (r + 0) / hw, level = r + hw;  d/dz = ((g / hw) a) sech^2(u)
    symmetric:   level = floor(a (tanh(z) + 1) / 2 + 1/2), code = b level - 1;
                 d/dz = (((g b) / 2) a) sech^2(z)
    hard clamp:  clamp(., -1, 1) for tanh, its slope (1 inside [-1, 1], 0 outside) for sech^2
and per row the mixed-radix index sum_j level_j basis_j in int64 (-1 for a row with a NaN).
tanh(u) = sign(u) (1 - e) / (1 + e), e = e^(-2|u|) from ``tl.exp`` (1 - e by the expm1 series
below |2u| = 1), sech^2(u) = 4 e / (1 + e)^2; no libdevice. The kernels launch without fp
fusion: a product that meets an addition is rounded first, as PyTorch rounds it.

A tile is BLOCK_B rows x BLOCK_D (all D <= 64 dimensions), so the forward sums each row's index
inside its program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    cast_rn,
    cdiv,
    compute_dtype,
    expm1_neg_small,
    interpreted,
    launch,
    next_power_of_2,
    on_device,
)

# Rows per program: ~1024 elements on a GPU, ~16384 under the interpreter (~2 ms a program).
_TILE_GPU = 1024
_TILE_INTERPRETER = 16384


@triton.jit
def _tanh_sech2(u, DTYPE: tl.constexpr):
    au = 2.0 * tl.abs(u)
    e = tl.exp(-au)
    em = tl.where(au < 1.0, expm1_neg_small(tl.minimum(au, 1.0), DTYPE), e - 1.0)
    t = -em / (1.0 + e)
    return tl.where(u < 0.0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _round_half_even(x, DTYPE: tl.constexpr):
    """Below 2^23 (2^52) by adding and subtracting that power of two to |x|; above, x is an
    integer already; NaN passes."""
    if DTYPE == tl.float64:  # noqa: SIM108, SIM300 (a constexpr compares by value)
        big = 4503599627370496.0
    else:
        big = 8388608.0
    ax = tl.abs(x)
    r = (ax + big) - big
    return tl.where(ax < big, tl.where(x < 0.0, -r, r), x)


@triton.jit
def _clamp_unit(u):
    """clamp(u, -1, 1), NaN passing."""
    lo = tl.where(u < -1.0, -1.0, u)
    return tl.where(lo > 1.0, 1.0, lo)


@triton.jit
def _dims(levels_ptr, a_ptr, b_ptr, cols, cmask, DTYPE: tl.constexpr):
    L = tl.load(levels_ptr + cols, mask=cmask, other=2)
    hw = L // 2
    a = tl.load(a_ptr + cols, mask=cmask, other=1.0).to(DTYPE)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(DTYPE)
    hw_f = hw.to(DTYPE)
    top = (L - 1 - hw).to(DTYPE)
    offset = tl.where((L % 2) == 0, 0.5, 0.0).to(DTYPE)
    return a, b, hw_f, top, offset


@triton.jit
def _fsq_fwd_kernel(
    z_ptr, levels_ptr, basis_ptr, a_ptr, b_ptr, codes_ptr, index_ptr,
    B, D, s_z_b, s_z_n,
    SYM: tl.constexpr, HARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < B
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    a, b, hw, top, offset = _dims(levels_ptr, a_ptr, b_ptr, cols, cmask, DTYPE)
    z = tl.load(z_ptr + rows[:, None] * s_z_b + cols[None, :] * s_z_n, mask=mask,
                other=0.0).to(DTYPE)
    if SYM:
        if HARD:
            t = _clamp_unit(z)
        else:
            t, _ = _tanh_sech2(z, DTYPE)
        level = tl.floor((a[None, :] * (t + 1.0)) / 2.0 + 0.5)
        code = b[None, :] * level - 1.0
    else:
        u = z + b[None, :]
        if HARD:
            t = _clamp_unit(u)
        else:
            t, _ = _tanh_sech2(u, DTYPE)
        r = _round_half_even(t * a[None, :] - offset[None, :], DTYPE)
        r = tl.where(r < -hw[None, :], -hw[None, :], r)
        r = tl.where(r > top[None, :], top[None, :], r)
        code = (r + 0.0) / hw[None, :]
        level = r + hw[None, :]
    tl.store(codes_ptr + rows[:, None] * D + cols[None, :],
             cast_rn(code, codes_ptr.dtype.element_ty), mask=mask)
    basis = tl.load(basis_ptr + cols, mask=cmask, other=0)
    nan = level != level
    digit = tl.where(nan | ~mask, 0.0, level).to(tl.int64)
    index = tl.sum(digit * basis[None, :], axis=1)
    any_nan = tl.max(tl.where(nan & mask, 1, 0), axis=1)
    tl.store(index_ptr + rows, tl.where(any_nan > 0, -1, index), mask=rmask)


@triton.jit
def _fsq_bwd_kernel(
    g_ptr, z_ptr, levels_ptr, a_ptr, b_ptr, dz_ptr,
    B, D, s_g_b, s_g_n, s_z_b, s_z_n,
    SYM: tl.constexpr, HARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < B)[:, None] & cmask[None, :]
    a, b, hw, _, _ = _dims(levels_ptr, a_ptr, b_ptr, cols, cmask, DTYPE)
    g = tl.load(g_ptr + rows[:, None] * s_g_b + cols[None, :] * s_g_n, mask=mask,
                other=0.0).to(DTYPE)
    z = tl.load(z_ptr + rows[:, None] * s_z_b + cols[None, :] * s_z_n, mask=mask,
                other=0.0).to(DTYPE)
    if SYM:
        u = z
        scaled = ((g * b[None, :]) / 2.0) * a[None, :]
    else:
        u = z + b[None, :]
        scaled = (g / hw[None, :]) * a[None, :]
    if HARD:
        inside = tl.where((u >= -1.0) & (u <= 1.0), 1.0, 0.0).to(DTYPE)
        slope = tl.where(u != u, u, inside)
    else:
        _, slope = _tanh_sech2(u, DTYPE)
    tl.store(dz_ptr + rows[:, None] * D + cols[None, :],
             cast_rn(scaled * slope, dz_ptr.dtype.element_ty), mask=mask)


def _launch_shape(B: int, D: int, device: torch.device) -> tuple[int, int, int]:
    if D > 64:
        raise ValueError(f"finite_scalar_quantize: at most 64 dimensions, got {D}")
    block_d = next_power_of_2(D)
    target = _TILE_INTERPRETER if interpreted(device) else _TILE_GPU
    block_b = min(next_power_of_2(B), max(1, target // block_d))
    return block_b, block_d, cdiv(B, block_b)


def _flags(mode: int) -> dict:
    return {"SYM": bool(mode & 1), "HARD": bool(mode & 2)}


def finite_scalar_quantize_fwd(z: Tensor, levels: Tensor, basis: Tensor, a: Tensor, b: Tensor,
                               mode: int) -> tuple[Tensor, Tensor]:
    """``z (N, D)`` -> ``(codes (N, D) in z's dtype, index int64 (N,))``."""
    B, D = z.shape
    codes = torch.empty((B, D), dtype=z.dtype, device=z.device)
    index = torch.empty(B, dtype=torch.int64, device=z.device)
    block_b, block_d, grid = _launch_shape(B, D, z.device)
    dtype = compute_dtype(z.dtype)
    with on_device(z):
        launch("fastvae::finite_scalar_quantize", _fsq_fwd_kernel, (grid,),
               z, levels.contiguous(), basis.contiguous(), a.contiguous(), b.contiguous(),
               codes, index, B, D, *z.stride(), **_flags(mode),
               BLOCK_B=block_b, BLOCK_D=block_d, DTYPE=dtype, num_warps=4,
               enable_fp_fusion=False)
    return codes, index


def finite_scalar_quantize_bwd(grad: Tensor, z: Tensor, levels: Tensor, basis: Tensor,
                               a: Tensor, b: Tensor, mode: int) -> Tensor:
    """d codes / d z times ``grad (N, D)``, in z's dtype."""
    B, D = z.shape
    d_z = torch.empty((B, D), dtype=z.dtype, device=z.device)
    block_b, block_d, grid = _launch_shape(B, D, z.device)
    dtype = compute_dtype(z.dtype)
    with on_device(z):
        launch("fastvae::finite_scalar_quantize_backward", _fsq_bwd_kernel, (grid,),
               grad, z, levels.contiguous(), a.contiguous(), b.contiguous(), d_z,
               B, D, *grad.stride(), *z.stride(), **_flags(mode),
               BLOCK_B=block_b, BLOCK_D=block_d, DTYPE=dtype, num_warps=4,
               enable_fp_fusion=False)
    return d_z
