"""Importance-weighted log-likelihood: Triton kernels and launchers.

With s = (z - mu) * exp(-lv / 2), the log-weight of sample k of row b is
    w[k, b] = log_px[k, b] + sum_j (0.5 * s^2 + 0.5 * lv - 0.5 * z^2)     (log p(z) - log q(z|x))
and the estimate is  ll[b] = logsumexp_k w[k, b] - log K.
Forward writes ll (B,) and the log-weights (K, B), a small statistic saved for backward, which
then takes one pass over z. With a[k, b] = g[b] * exp(w[k, b] - ll[b] - log K):
    d/dlog_px = a,   d/dz = a * (s * exp(-lv / 2) - z),
    d/dmu = -sum_k a * s * exp(-lv / 2),   d/dlv = sum_k a * 0.5 * (1 - s^2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import compute_dtype, elementwise_tile, load, on_device, store, tile, tiling


@triton.jit
def _iwae_fwd_kernel(
    out_ptr, logw_ptr, lpx_ptr, z_ptr, mu_ptr, lv_ptr,
    B, N, K, n_col_tiles,
    s_lpx_k, s_lpx_b, s_z_k, s_z_b, s_z_n, s_mu_b, s_mu_n, s_lv_b, s_lv_n,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    log_k = tl.log(tl.cast(K, DTYPE))
    running_max = tl.full([BLOCK_B], float("-inf"), DTYPE)
    running_sum = tl.zeros([BLOCK_B], DTYPE)
    for k in range(K):
        k64 = tl.cast(k, tl.int64)
        acc = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
        for c in range(n_col_tiles):
            _, cols, mask = tile(pid, c, B, N, BLOCK_B, BLOCK_N)
            z = load(z_ptr + k64 * s_z_k, rows, cols, s_z_b, s_z_n, mask, DTYPE)
            mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
            lv = load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
            s = (z - mu) * tl.exp(-0.5 * lv)
            acc += tl.where(mask, 0.5 * (s * s + lv - z * z), 0.0)
        lpx = tl.load(lpx_ptr + k64 * s_lpx_k + rows * s_lpx_b, mask=row_mask, other=0.0)
        w = lpx.to(DTYPE) + tl.sum(acc, 1)
        tl.store(logw_ptr + k64 * B + rows, w, mask=row_mask)
        # Online log-sum-exp. A NaN log-weight must propagate (tl.maximum drops NaN by
        # default); an infinite one must not become exp(inf - inf) = NaN: a term equal to the
        # maximum is exactly 1, whatever the maximum (-inf for all-zero weights, +inf).
        new_max = tl.maximum(running_max, w, propagate_nan=tl.PropagateNan.ALL)
        rescale = tl.where(running_max == new_max, 1.0, tl.exp(running_max - new_max))
        term = tl.where(w == new_max, 1.0, tl.exp(w - new_max))
        running_sum = running_sum * rescale + term
        running_max = new_max
    tl.store(out_ptr + rows, running_max + tl.log(running_sum) - log_k, mask=row_mask)


@triton.jit
def _iwae_bwd_kernel(
    g_ptr, s_g_b, out_ptr, logw_ptr, z_ptr, mu_ptr, lv_ptr,
    dlpx_ptr, dz_ptr, dmu_ptr, dlv_ptr,
    B, N, K, n_col_tiles,
    s_z_k, s_z_b, s_z_n, s_mu_b, s_mu_n, s_lv_b, s_lv_n,
    NEED_LPX: tl.constexpr, NEED_Z: tl.constexpr, NEED_MU: tl.constexpr,
    NEED_LV: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, mask = elementwise_tile(pid, n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    row_mask = rows < B
    g = tl.load(g_ptr + rows * s_g_b, mask=row_mask, other=0.0).to(DTYPE)
    lse = tl.load(out_ptr + rows, mask=row_mask, other=0.0).to(DTYPE) + tl.log(tl.cast(K, DTYPE))
    mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
    lv = load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
    inv_std = tl.exp(-0.5 * lv)
    d_mu = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    d_lv = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    lpx_rows_end = tl.where(pid % n_col_tiles == 0, B, 0)  # the first column tile writes d/dlog_px
    for k in range(K):
        k64 = tl.cast(k, tl.int64)
        a = g * tl.exp(tl.load(logw_ptr + k64 * B + rows, mask=row_mask, other=0.0) - lse)
        if NEED_LPX:
            tl.store(dlpx_ptr + k64 * B + rows, a.to(dlpx_ptr.dtype.element_ty),
                     mask=rows < lpx_rows_end)
        z = load(z_ptr + k64 * s_z_k, rows, cols, s_z_b, s_z_n, mask, DTYPE)
        s = (z - mu) * inv_std
        a2 = a[:, None]
        if NEED_Z:
            store(dz_ptr + k64 * B * N, rows, cols, N, a2 * (s * inv_std - z), mask)
        d_mu -= a2 * s * inv_std
        d_lv += a2 * 0.5 * (1.0 - s * s)
    if NEED_MU:
        store(dmu_ptr, rows, cols, N, d_mu, mask)
    if NEED_LV:
        store(dlv_ptr, rows, cols, N, d_lv, mask)


def iwae_fwd(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    K, B, N = z.shape
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    out = torch.empty(B, dtype=dtype, device=z.device)
    log_w = torch.empty((K, B), dtype=dtype, device=z.device)
    t = tiling(B, N, z.device)
    with on_device(z):
        _iwae_fwd_kernel[(t.n_row_tiles,)](
            out, log_w, log_px, z, mu, logvar, B, N, K, t.n_col_tiles,
            *log_px.stride(), *z.stride(), *mu.stride(), *logvar.stride(),
            BLOCK_B=t.block_b, BLOCK_N=t.block_n, DTYPE=compute_dtype(z.dtype),
            num_warps=t.num_warps,
        )
    return out, log_w


def iwae_bwd(grad: Tensor, out: Tensor, log_w: Tensor, log_px: Tensor, z: Tensor, mu: Tensor,
             logvar: Tensor, needs: list[bool]) -> list[Tensor]:
    K, B, N = z.shape
    like = (log_px, z, mu, logvar)
    outs = [torch.empty(t.shape, dtype=t.dtype, device=z.device) if need else None
            for t, need in zip(like, needs, strict=True)]
    t = tiling(B, N, z.device)
    with on_device(z):
        _iwae_bwd_kernel[(t.n_row_tiles * t.n_col_tiles,)](
            grad, grad.stride(0), out, log_w, z, mu, logvar,
            *(o if o is not None else z for o in outs),
            B, N, K, t.n_col_tiles,
            *z.stride(), *mu.stride(), *logvar.stride(),
            NEED_LPX=needs[0], NEED_Z=needs[1], NEED_MU=needs[2], NEED_LV=needs[3],
            BLOCK_B=t.block_b, BLOCK_N=t.block_n, DTYPE=compute_dtype(z.dtype),
            num_warps=t.num_warps,
        )
    return [o for o in outs if o is not None]
