"""Gaussian negative log-likelihood: Triton kernels and launchers.

Per element, with q = exp(-lv / 4) (its exponent clamped, see kernels/_common.py) and
u = (x - m) * exp(-lv / 2) * sqrt(1/2) = ((x - m) q) (q sqrt(1/2)), scaled before it is squared
(never exp(-lv) times a square, which overflows or gives 0 * inf for lv far below 0):
    nll = lv / 2 + log(2 pi) / 2 + u^2
    d/dm = -(x - m) * exp(-lv) = -(((x - m) q) q q) q = -d/dx,   d/dlv = 1/2 - u^2
``logvar`` is a tensor read through strides (scalar, per-feature or per-element, broadcast by
stride 0) or, when absent, the float ``lv_value``. Forward sums over the event: shape (B,).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    HALF_LOG_2PI,
    Reduction,
    compute_dtype,
    elementwise_tile,
    launch,
    load,
    on_device,
    quarter_scale,
    reduction_tile,
    scaled_full,
    scaled_half,
    store,
    store_partial,
    strides,
    tiling,
)

LOG_2PI = tl.constexpr(1.8378770664093453)  # log(2 pi); a plain global is a NameError in @jit code


@triton.jit
def _logvar(lv_ptr, lv_value, rows, cols, s_lv_b, s_lv_n, mask,
            HAS_LOGVAR: tl.constexpr, DTYPE: tl.constexpr):
    if HAS_LOGVAR:
        return load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
    else:
        return tl.where(mask, lv_value, lv_value).to(DTYPE)


@triton.jit
def _gaussian_nll_fwd_kernel(
    partial_ptr, m_ptr, x_ptr, lv_ptr, lv_value,
    B, N, tiles_per_prog, n_split,
    s_m_b, s_m_n, s_x_b, s_x_n, s_lv_b, s_lv_n,
    HAS_LOGVAR: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    for t in range(tiles_per_prog):
        rows, cols, mask = reduction_tile(pid, t, tiles_per_prog, n_split, B, N, 1,
                                          BLOCK_B, BLOCK_N)
        m = load(m_ptr, rows, cols, s_m_b, s_m_n, mask, DTYPE)
        x = load(x_ptr, rows, cols, s_x_b, s_x_n, mask, DTYPE)
        lv = _logvar(lv_ptr, lv_value, rows, cols, s_lv_b, s_lv_n, mask, HAS_LOGVAR, DTYPE)
        u = scaled_half(x - m, quarter_scale(lv, DTYPE))
        acc += tl.where(mask, (0.5 * lv + HALF_LOG_2PI) + u * u, 0.0)
    store_partial(partial_ptr, acc, pid, n_split, B, N, 1, BLOCK_B, BLOCK_N)


@triton.jit
def _gaussian_nll_bwd_kernel(
    g_ptr, s_g_b, m_ptr, x_ptr, lv_ptr, lv_value, dm_ptr, dx_ptr, dlv_ptr,
    B, N, n_col_tiles,
    s_m_b, s_m_n, s_x_b, s_x_n, s_lv_b, s_lv_n,
    HAS_LOGVAR: tl.constexpr,
    NEED_M: tl.constexpr, NEED_X: tl.constexpr, NEED_LV: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(tl.program_id(0), n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    g = load(g_ptr, rows, cols, s_g_b, 0, mask, DTYPE)
    m = load(m_ptr, rows, cols, s_m_b, s_m_n, mask, DTYPE)
    x = load(x_ptr, rows, cols, s_x_b, s_x_n, mask, DTYPE)
    lv = _logvar(lv_ptr, lv_value, rows, cols, s_lv_b, s_lv_n, mask, HAS_LOGVAR, DTYPE)
    q = quarter_scale(lv, DTYPE)
    if NEED_M or NEED_X:
        d_x = g * scaled_full(x - m, q)
        if NEED_M:
            store(dm_ptr, rows, cols, N, -d_x, mask)
        if NEED_X:
            store(dx_ptr, rows, cols, N, d_x, mask)
    if NEED_LV:
        u = scaled_half(x - m, q)
        store(dlv_ptr, rows, cols, N, g * (0.5 - u * u), mask)


def _as_tensor_if_fp64(mean: Tensor, logvar: Tensor | None, logvar_value: float):
    """Triton passes Python floats as float32: a float64 call gets its logvar as a tensor."""
    if logvar is None and mean.dtype == torch.float64:
        return torch.full((), logvar_value, dtype=mean.dtype, device=mean.device).expand(mean.shape)
    return logvar


def gaussian_nll_fwd(mean: Tensor, target: Tensor, logvar: Tensor | None,
                     logvar_value: float) -> Tensor:
    B, N = mean.shape
    logvar = _as_tensor_if_fp64(mean, logvar, logvar_value)
    red = Reduction(B, N, 1, mean.device, mean.dtype)
    t = red.t
    with on_device(mean):
        launch("fastvae::gaussian_nll", _gaussian_nll_fwd_kernel, red.grid,
            red.partial, mean, target, mean if logvar is None else logvar, float(logvar_value),
            B, N, red.tiles_per_prog, red.n_split,
            *strides(mean), *strides(target), *strides(logvar),
            HAS_LOGVAR=logvar is not None, BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(mean.dtype), num_warps=t.num_warps,
        )
    return red.result()


def gaussian_nll_bwd(grad: Tensor, mean: Tensor, target: Tensor, logvar: Tensor | None,
                     logvar_value: float, needs: list[bool]) -> list[Tensor]:
    B, N = mean.shape
    logvar = _as_tensor_if_fp64(mean, logvar, logvar_value)
    outs = [torch.empty((B, N), dtype=mean.dtype, device=mean.device) if need else None
            for need in needs]
    t = tiling(B, N, mean.device)
    with on_device(mean):
        launch("fastvae::gaussian_nll_backward", _gaussian_nll_bwd_kernel, t.grid,
            grad, grad.stride(0), mean, target, mean if logvar is None else logvar,
            float(logvar_value), *(o if o is not None else mean for o in outs),
            B, N, t.n_col_tiles, *strides(mean), *strides(target), *strides(logvar),
            HAS_LOGVAR=logvar is not None, NEED_M=needs[0], NEED_X=needs[1], NEED_LV=needs[2],
            BLOCK_B=t.block_b, BLOCK_N=t.block_n, DTYPE=compute_dtype(mean.dtype),
            num_warps=t.num_warps,
        )
    return [o for o in outs if o is not None]
