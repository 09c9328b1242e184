"""Diagonal-Gaussian KL divergence: Triton kernels and launchers.

Per element, with d = lv - plv (taken as hd = d / 2 = lv / 2 - plv / 2, which does not
overflow) and u = (mu - pm) * exp(-plv / 2) * sqrt(1/2) (scaled before it is squared):
    kl = u^2 + (expm1(d) - d) / 2
    d/dmu = (mu - pm) * exp(-plv) = -d/dpm,   d/dlv = expm1(d) / 2,
    d/dplv = -(expm1(d) / 2 + u^2).
(docs/numerics.md: the halvings happen inside the exponents, the powers of exp(-plv / 4).)
The prior is given as both tensors or neither: the standard prior (pm = 0, plv = 0) skips
the prior loads (HAS_PRIOR = False).
Forward sums over the event (per sample, (B,)) or over the batch (per feature, (N,)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Reduction,
    compute_dtype,
    elementwise_tile,
    half_expm1,
    half_expm1mx,
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


@triton.jit
def kl_tile(mu_ptr, lv_ptr, pm_ptr, plv_ptr, rows, cols, mask,
            s_mu_b, s_mu_n, s_lv_b, s_lv_n, s_pm_b, s_pm_n, s_plv_b, s_plv_n,
            HAS_PRIOR: tl.constexpr, DTYPE: tl.constexpr):
    """Load a tile and return (mu - pm, (lv - plv) / 2, exp(-plv / 4)): the mean difference, half
    the log-variance difference and the prior's quarter scale (1 for the standard prior)."""
    mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
    lv = load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE)
    if HAS_PRIOR:
        pm = load(pm_ptr, rows, cols, s_pm_b, s_pm_n, mask, DTYPE)
        plv = load(plv_ptr, rows, cols, s_plv_b, s_plv_n, mask, DTYPE)
        return mu - pm, 0.5 * lv - 0.5 * plv, quarter_scale(plv, DTYPE)
    else:
        # q = 1 in the compute dtype: a bare 1.0 would make q * SQRT_HALF a float32 constant
        return mu, 0.5 * lv, tl.cast(1.0, DTYPE)


@triton.jit
def _gaussian_kl_fwd_kernel(
    partial_ptr, mu_ptr, lv_ptr, pm_ptr, plv_ptr,
    B, N, tiles_per_prog, n_split,
    s_mu_b, s_mu_n, s_lv_b, s_lv_n, s_pm_b, s_pm_n, s_plv_b, s_plv_n,
    HAS_PRIOR: tl.constexpr, REDUCE_DIM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    for t in range(tiles_per_prog):
        rows, cols, mask = reduction_tile(pid, t, tiles_per_prog, n_split, B, N, REDUCE_DIM,
                                          BLOCK_B, BLOCK_N)
        diff, hd, q = kl_tile(mu_ptr, lv_ptr, pm_ptr, plv_ptr, rows, cols, mask,
                              s_mu_b, s_mu_n, s_lv_b, s_lv_n, s_pm_b, s_pm_n, s_plv_b, s_plv_n,
                              HAS_PRIOR, DTYPE)
        u = scaled_half(diff, q)
        acc += tl.where(mask, u * u + half_expm1mx(hd + hd, hd, DTYPE), 0.0)
    store_partial(partial_ptr, acc, pid, n_split, B, N, REDUCE_DIM, BLOCK_B, BLOCK_N)


@triton.jit
def _gaussian_kl_bwd_kernel(
    g_ptr, s_g_b, s_g_n,
    mu_ptr, lv_ptr, pm_ptr, plv_ptr,
    dmu_ptr, dlv_ptr, dpm_ptr, dplv_ptr,
    B, N, n_col_tiles,
    s_mu_b, s_mu_n, s_lv_b, s_lv_n, s_pm_b, s_pm_n, s_plv_b, s_plv_n,
    HAS_PRIOR: tl.constexpr, NEED_MU: tl.constexpr, NEED_LV: tl.constexpr,
    NEED_PM: tl.constexpr, NEED_PLV: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(tl.program_id(0), n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    g = load(g_ptr, rows, cols, s_g_b, s_g_n, mask, DTYPE)
    diff, hd, q = kl_tile(mu_ptr, lv_ptr, pm_ptr, plv_ptr, rows, cols, mask,
                          s_mu_b, s_mu_n, s_lv_b, s_lv_n, s_pm_b, s_pm_n, s_plv_b,
                          s_plv_n, HAS_PRIOR, DTYPE)
    d_lv = half_expm1(hd + hd, hd, DTYPE)
    if NEED_MU or NEED_PM:
        d_mu = g * scaled_full(diff, q)
        if NEED_MU:
            store(dmu_ptr, rows, cols, N, d_mu, mask)
        if NEED_PM:
            store(dpm_ptr, rows, cols, N, -d_mu, mask)
    if NEED_LV:
        store(dlv_ptr, rows, cols, N, g * d_lv, mask)
    if NEED_PLV:
        u = scaled_half(diff, q)
        store(dplv_ptr, rows, cols, N, -g * (d_lv + u * u), mask)


def gaussian_kl_fwd(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None,
                    prior_logvar: Tensor | None, reduce_dim: int) -> Tensor:
    B, N = mu.shape
    has_prior = prior_mu is not None
    red = Reduction(B, N, reduce_dim, mu.device, mu.dtype)
    t = red.t
    with on_device(mu):
        launch("fastvae::gaussian_kl", _gaussian_kl_fwd_kernel, red.grid,
            red.partial, mu, logvar, prior_mu if has_prior else mu,
            prior_logvar if has_prior else mu,
            B, N, red.tiles_per_prog, red.n_split,
            *strides(mu), *strides(logvar), *strides(prior_mu), *strides(prior_logvar),
            HAS_PRIOR=has_prior, REDUCE_DIM=reduce_dim, BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(mu.dtype), num_warps=t.num_warps,
        )
    return red.result()


def gaussian_kl_bwd(grad: Tensor, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None,
                    prior_logvar: Tensor | None, reduce_dim: int,
                    needs: list[bool]) -> list[Tensor]:
    B, N = mu.shape
    has_prior = prior_mu is not None
    grad_2d = grad.unsqueeze(1) if reduce_dim == 1 else grad.unsqueeze(0)
    grad_2d = grad_2d.expand(B, N)
    outs = [torch.empty((B, N), dtype=mu.dtype, device=mu.device) if need else None
            for need in needs]
    t = tiling(B, N, mu.device)
    with on_device(mu):
        launch("fastvae::gaussian_kl_backward", _gaussian_kl_bwd_kernel, t.grid,
            grad_2d, *grad_2d.stride(),
            mu, logvar, prior_mu if has_prior else mu, prior_logvar if has_prior else mu,
            *(o if o is not None else mu for o in outs),
            B, N, t.n_col_tiles,
            *strides(mu), *strides(logvar), *strides(prior_mu), *strides(prior_logvar),
            HAS_PRIOR=has_prior, NEED_MU=needs[0], NEED_LV=needs[1], NEED_PM=needs[2],
            NEED_PLV=needs[3], BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(mu.dtype), num_warps=t.num_warps,
        )
    return [o for o in outs if o is not None]
