"""Fused reparameterized sample and standard-prior KL: one pass forward, one pass backward.

    z = mu + exp(lv / 2) * eps,   kl = (mu sqrt(1/2))^2 + (expm1(lv) - lv) / 2   (see gaussian_kl)
    d/dmu = g_z + g_kl * mu,   d/dlv = exp(lv / 2) * (eps * g_z / 2) + g_kl * expm1(lv) / 2
with t * exp(lv / 2) taken as (t h) h, h = exp(lv / 4) (std_times), the halvings inside the
exponents (kernels/_common.py): nothing overflows where the result does not.
eps = ``tl.randn(seed, b * N + j)``, the same noise as ``reparameterize`` with that seed, and
regenerated in backward. The KL sums per sample (REDUCE_DIM = 1) or per feature (0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    SQRT_HALF,
    Reduction,
    compute_dtype,
    elementwise_tile,
    half_expm1,
    half_expm1mx,
    launch,
    load,
    on_device,
    reduction_tile,
    std_times,
    store,
    store_partial,
    strides,
    tiling,
)


@triton.jit
def _sample_and_kl_fwd_kernel(
    z_ptr, partial_ptr, mu_ptr, lv_ptr, seed_ptr,
    B, N, tiles_per_prog, n_split,
    s_mu_b, s_mu_n, s_lv_b, s_lv_n,
    REDUCE_DIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    for t in range(tiles_per_prog):
        rows, cols, mask = reduction_tile(pid, t, tiles_per_prog, n_split, B, N, REDUCE_DIM,
                                          BLOCK_B, BLOCK_N)
        mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
        lv = load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
        eps = tl.randn(seed, rows[:, None] * N + cols[None, :]).to(DTYPE)
        store(z_ptr, rows, cols, N, mu + std_times(eps, tl.exp(0.25 * lv)), mask)
        u = mu * SQRT_HALF
        acc += tl.where(mask, u * u + half_expm1mx(lv, 0.5 * lv, DTYPE), 0.0)
    store_partial(partial_ptr, acc, pid, n_split, B, N, REDUCE_DIM, BLOCK_B, BLOCK_N)


@triton.jit
def _sample_and_kl_bwd_kernel(
    gz_ptr, gkl_ptr, mu_ptr, lv_ptr, seed_ptr, dmu_ptr, dlv_ptr,
    B, N, n_col_tiles,
    s_gz_b, s_gz_n, s_gkl_b, s_gkl_n, s_mu_b, s_mu_n, s_lv_b, s_lv_n,
    NEED_MU: tl.constexpr, NEED_LV: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(tl.program_id(0), n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    gz = load(gz_ptr, rows, cols, s_gz_b, s_gz_n, mask, DTYPE)
    gkl = load(gkl_ptr, rows, cols, s_gkl_b, s_gkl_n, mask, DTYPE)
    if NEED_MU:
        mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
        store(dmu_ptr, rows, cols, N, gz + gkl * mu, mask)
    if NEED_LV:
        lv = load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
        eps = tl.randn(tl.load(seed_ptr), rows[:, None] * N + cols[None, :]).to(DTYPE)
        kl_part = gkl * half_expm1(lv, 0.5 * lv, DTYPE)
        d_lv = std_times(0.5 * gz * eps, tl.exp(0.25 * lv)) + kl_part
        # where the KL's part overflows it dominates (never inf - inf)
        d_lv = tl.where(tl.abs(kl_part) == float("inf"), kl_part, d_lv)
        store(dlv_ptr, rows, cols, N, d_lv, mask)


def sample_and_kl_fwd(mu: Tensor, logvar: Tensor, seed: Tensor,
                      reduce_dim: int) -> tuple[Tensor, Tensor]:
    B, N = mu.shape
    z = torch.empty((B, N), dtype=mu.dtype, device=mu.device)
    red = Reduction(B, N, reduce_dim, mu.device, mu.dtype)
    t = red.t
    with on_device(mu):
        launch("fastvae::sample_and_kl", _sample_and_kl_fwd_kernel, red.grid,
            z, red.partial, mu, logvar, seed, B, N, red.tiles_per_prog, red.n_split,
            *strides(mu), *strides(logvar),
            REDUCE_DIM=reduce_dim, BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(mu.dtype), num_warps=t.num_warps,
        )
    return z, red.result()


def sample_and_kl_bwd(grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor, seed: Tensor,
                      reduce_dim: int, needs: list[bool]) -> list[Tensor]:
    B, N = mu.shape
    gkl = (grad_kl.unsqueeze(1) if reduce_dim == 1 else grad_kl.unsqueeze(0)).expand(B, N)
    outs = [torch.empty((B, N), dtype=t.dtype, device=mu.device) if need else None
            for t, need in zip((mu, logvar), needs, strict=True)]
    t = tiling(B, N, mu.device)
    with on_device(mu):
        launch("fastvae::sample_and_kl_backward", _sample_and_kl_bwd_kernel, t.grid,
            grad_z, gkl, mu, logvar, seed, *(o if o is not None else mu for o in outs),
            B, N, t.n_col_tiles,
            *grad_z.stride(), *gkl.stride(), *strides(mu), *strides(logvar),
            NEED_MU=needs[0], NEED_LV=needs[1], BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(mu.dtype), num_warps=t.num_warps,
        )
    return [o for o in outs if o is not None]
