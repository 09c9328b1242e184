"""Importance-weighted log-likelihood: Triton kernels and launchers.

With u = (z - mu) * exp(-lv / 2) * sqrt(1/2) (the residual scaled before it is squared, see
``iwae_term`` in _common.py), the log-weight of sample k of row b is
    w[k, b] = log_px[k, b] + sum_j (u^2 - z^2 / 2 + lv / 2)     (log p(z) - log q(z|x))
and the estimate is  ll[b] = logsumexp_k w[k, b] - log K.
Forward writes ll (B,) and the log-weights (K, B), a small statistic saved for backward, which
then takes one pass over z. With a[k, b] = g[b] * exp(w[k, b] - ll[b] - log K):
    d/dlog_px = a,   d/dz = a * ((z - mu) * exp(-lv) - z),
    d/dmu = -sum_k a * (z - mu) * exp(-lv),   d/dlv = sum_k a * (1/2 - u^2)
(``iwae_grad_parts``: no overflow where the result is finite, no cancellation near lv = 0).

Grid: row tiles x column tiles (backward) x chunks of consecutive samples k, so that a GPU is
filled also when B is small and K large (B = 1000, N = 32 is 8 row tiles). Each forward program
reduces its chunk to a per-row pair (max, sum of exp(w - max)); the pairs are merged chunk 0,
1, 2, ... in that order by one more small kernel. Each backward program writes d/dz and
d/dlog_px of its samples, and its chunk's partial d/dmu, d/dlv; the partials are summed over
the chunks in order. The chunking depends on the shapes and the device alone, so results are
bitwise the same run to run. Under Triton's interpreter (CPU tensors) there is one chunk.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    cast_rn,
    compute_dtype,
    elementwise_tile,
    expm1_neg_small,
    iwae_grad_parts,
    iwae_term,
    launch,
    load,
    on_device,
    quarter_scale,
    split,
    store,
    tile,
    tiling,
    times_weight,
    torch_compute_dtype,
)


@triton.jit
def _lse_merge(running_max, running_sum, m, s):
    """Merge two (max, sum of exp(w - max)) pairs. A NaN must propagate (tl.maximum drops NaN
    by default); an infinite maximum must not become exp(inf - inf) = NaN: a pair whose max
    equals the new maximum keeps its sum unscaled, whatever the maximum (-inf for all-zero
    weights, +inf)."""
    new_max = tl.maximum(running_max, m, propagate_nan=tl.PropagateNan.ALL)
    rescale = tl.where(running_max == new_max, 1.0, tl.exp(running_max - new_max))
    scale = tl.where(m == new_max, 1.0, tl.exp(m - new_max))
    return new_max, running_sum * rescale + s * scale


@triton.jit
def _iwae_fwd_kernel(
    out_ptr, logw_ptr, pmax_ptr, psum_ptr, lpx_ptr, z_ptr, mu_ptr, lv_ptr,
    B, N, K, k_per_prog, n_col_tiles,
    s_lpx_k, s_lpx_b, s_z_k, s_z_b, s_z_n, s_mu_b, s_mu_n, s_lv_b, s_lv_n,
    FINAL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    """Program (row tile, chunk): log-weights of samples chunk * k_per_prog ... of its rows;
    FINAL (one chunk): ll itself, else the chunk's (max, sum-exp) pair per row."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    running_max = tl.full([BLOCK_B], float("-inf"), DTYPE)
    running_sum = tl.zeros([BLOCK_B], DTYPE)
    k_start = chunk * k_per_prog
    k_end = tl.minimum(k_start + k_per_prog, K)
    for k in range(k_start, k_end):
        k64 = tl.cast(k, tl.int64)
        acc = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
        for c in range(n_col_tiles):
            _, cols, mask = tile(pid, c, B, N, BLOCK_B, BLOCK_N)
            z = load(z_ptr + k64 * s_z_k, rows, cols, s_z_b, s_z_n, mask, DTYPE)
            mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
            lv = load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
            acc += tl.where(mask, iwae_term(z, mu, lv, quarter_scale(lv, DTYPE)), 0.0)
        lpx = tl.load(lpx_ptr + k64 * s_lpx_k + rows * s_lpx_b, mask=row_mask, other=0.0)
        w = lpx.to(DTYPE) + tl.sum(acc, 1)
        tl.store(logw_ptr + k64 * B + rows, w, mask=row_mask)
        running_max, running_sum = _lse_merge(running_max, running_sum, w, 1.0)
    if FINAL:
        log_k = tl.log(tl.cast(K, DTYPE))
        tl.store(out_ptr + rows, running_max + tl.log(running_sum) - log_k, mask=row_mask)
    else:
        offset = tl.cast(chunk, tl.int64) * B + rows
        tl.store(pmax_ptr + offset, running_max, mask=row_mask)
        tl.store(psum_ptr + offset, running_sum, mask=row_mask)


@triton.jit
def _iwae_merge_kernel(out_ptr, pmax_ptr, psum_ptr, B, K, n_chunks,
                       BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """ll[b] from the chunks' (max, sum-exp) pairs, merged in chunk order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < B
    running_max = tl.full([BLOCK], float("-inf"), DTYPE)
    running_sum = tl.zeros([BLOCK], DTYPE)
    for c in range(n_chunks):
        offset = tl.cast(c, tl.int64) * B + rows
        m = tl.load(pmax_ptr + offset, mask=row_mask, other=float("-inf"))
        s = tl.load(psum_ptr + offset, mask=row_mask, other=0.0)
        running_max, running_sum = _lse_merge(running_max, running_sum, m, s)
    log_k = tl.log(tl.cast(K, DTYPE))
    tl.store(out_ptr + rows, running_max + tl.log(running_sum) - log_k, mask=row_mask)


@triton.jit
def _iwae_bwd_kernel(
    g_ptr, s_g_b, out_ptr, logw_ptr, z_ptr, mu_ptr, lv_ptr,
    dlpx_ptr, dz_ptr, dmu_ptr, dlv_ptr,
    B, N, K, k_per_prog, n_col_tiles,
    s_z_k, s_z_b, s_z_n, s_mu_b, s_mu_n, s_lv_b, s_lv_n,
    NEED_LPX: tl.constexpr, NEED_Z: tl.constexpr, NEED_MU: tl.constexpr,
    NEED_LV: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    """Program (tile, chunk): d/dz, d/dlog_px of the chunk's samples; the chunk's partial
    d/dmu, d/dlv into slice ``chunk`` of (n_chunks, B, N) buffers (the outputs themselves when
    there is one chunk)."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    rows, cols, mask = elementwise_tile(pid, n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    row_mask = rows < B
    g = tl.load(g_ptr + rows * s_g_b, mask=row_mask, other=0.0).to(DTYPE)
    lse = tl.load(out_ptr + rows, mask=row_mask, other=0.0).to(DTYPE) + tl.log(tl.cast(K, DTYPE))
    mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
    lv = load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
    q = quarter_scale(lv, DTYPE)
    em = expm1_neg_small(lv, DTYPE)
    d_mu = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    d_lv = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    lpx_rows_end = tl.where(pid % n_col_tiles == 0, B, 0)  # the first column tile writes d/dlog_px
    k_start = chunk * k_per_prog
    k_end = tl.minimum(k_start + k_per_prog, K)
    for k in range(k_start, k_end):
        k64 = tl.cast(k, tl.int64)
        a = g * tl.exp(tl.load(logw_ptr + k64 * B + rows, mask=row_mask, other=0.0) - lse)
        if NEED_LPX:
            tl.store(dlpx_ptr + k64 * B + rows, cast_rn(a, dlpx_ptr.dtype.element_ty),
                     mask=rows < lpx_rows_end)
        z = load(z_ptr + k64 * s_z_k, rows, cols, s_z_b, s_z_n, mask, DTYPE)
        p_z, p_mu, p_lv = iwae_grad_parts(z, mu, lv, q, em)
        a2 = a[:, None]
        if NEED_Z:
            store(dz_ptr + k64 * B * N, rows, cols, N, times_weight(a2, p_z), mask)
        d_mu += times_weight(a2, p_mu)
        d_lv += a2 * p_lv
    part = tl.cast(chunk, tl.int64) * B * N
    if NEED_MU:
        store(dmu_ptr + part, rows, cols, N, d_mu, mask)
    if NEED_LV:
        store(dlv_ptr + part, rows, cols, N, d_lv, mask)


def _chunks(n_tiles: int, K: int, device: torch.device, k_chunk: int | None) -> tuple[int, int]:
    """(n_chunks, samples per chunk): enough programs to fill the GPU (see ``split``), one chunk
    under the interpreter; ``k_chunk`` forces the samples per chunk (tests)."""
    if k_chunk is None:
        return split(n_tiles, K, device)
    if k_chunk < 1:
        raise ValueError(f"k_chunk must be >= 1, got {k_chunk}")
    return math.ceil(K / k_chunk), k_chunk


def iwae_fwd(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor,
             k_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """ll (B,) and log-weights (K, B), float32 (float64 for float64 z), of z (K, B, N)."""
    K, B, N = z.shape
    dtype = torch_compute_dtype(z.dtype)
    out = torch.empty(B, dtype=dtype, device=z.device)
    log_w = torch.empty((K, B), dtype=dtype, device=z.device)
    t = tiling(B, N, z.device)
    n_chunks, k_per_prog = _chunks(t.n_row_tiles, K, z.device, k_chunk)
    final = n_chunks == 1
    pmax = psum = out
    if not final:
        pmax = torch.empty((n_chunks, B), dtype=dtype, device=z.device)
        psum = torch.empty_like(pmax)
    with on_device(z):
        launch("fastvae::iwae_log_likelihood", _iwae_fwd_kernel, (t.n_row_tiles, n_chunks),
            out, log_w, pmax, psum, log_px, z, mu, logvar, B, N, K, k_per_prog, t.n_col_tiles,
            *log_px.stride(), *z.stride(), *mu.stride(), *logvar.stride(),
            FINAL=final, BLOCK_B=t.block_b, BLOCK_N=t.block_n, DTYPE=compute_dtype(z.dtype),
            num_warps=t.num_warps,
        )
        if not final:
            block = min(triton.next_power_of_2(B), 1024)
            launch("fastvae::iwae_log_likelihood", _iwae_merge_kernel,
                   (triton.cdiv(B, block),),
                out, pmax, psum, B, K, n_chunks, BLOCK=block, DTYPE=compute_dtype(z.dtype),
                num_warps=4,
            )
    return out, log_w


def iwae_bwd(grad: Tensor, out: Tensor, log_w: Tensor, log_px: Tensor, z: Tensor, mu: Tensor,
             logvar: Tensor, needs: list[bool], k_chunk: int | None = None) -> list[Tensor]:
    """Gradients of (log_px, z, mu, logvar) that ``needs`` asks for, in their dtypes."""
    K, B, N = z.shape
    like = (log_px, z, mu, logvar)
    outs = [torch.empty(t.shape, dtype=t.dtype, device=z.device) if need else None
            for t, need in zip(like, needs, strict=True)]
    t = tiling(B, N, z.device)
    n_tiles = t.n_row_tiles * t.n_col_tiles
    n_chunks, k_per_prog = _chunks(n_tiles, K, z.device, k_chunk)
    # Several chunks: partial d/dmu, d/dlv per chunk in the compute dtype, summed below.
    partials = [torch.empty((n_chunks, B, N), dtype=torch_compute_dtype(z.dtype),
                            device=z.device) if n_chunks > 1 and outs[i] is not None else None
                for i in (2, 3)]
    targets = [*outs[:2], *(p if p is not None else o
                            for p, o in zip(partials, outs[2:], strict=True))]
    with on_device(z):
        launch("fastvae::iwae_log_likelihood_backward", _iwae_bwd_kernel, (n_tiles, n_chunks),
            grad, grad.stride(0), out, log_w, z, mu, logvar,
            *(o if o is not None else z for o in targets),
            B, N, K, k_per_prog, t.n_col_tiles,
            *z.stride(), *mu.stride(), *logvar.stride(),
            NEED_LPX=needs[0], NEED_Z=needs[1], NEED_MU=needs[2], NEED_LV=needs[3],
            BLOCK_B=t.block_b, BLOCK_N=t.block_n, DTYPE=compute_dtype(z.dtype),
            num_warps=t.num_warps,
        )
    for p, o in zip(partials, outs[2:], strict=True):
        if p is not None:
            torch.sum(p, 0, out=o) if p.dtype == o.dtype else o.copy_(p.sum(0))
    return [o for o in outs if o is not None]
