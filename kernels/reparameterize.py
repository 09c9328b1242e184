"""Reparameterized sampling: Triton kernels and launchers.

    z[k] = mu + exp(lv / 2) * eps[k],   k = 0..K-1
    d/dmu = sum_k g[k],   d/dlv = 0.5 * exp(lv / 2) * sum_k g[k] * eps[k],
    d/deps[k] = g[k] * exp(lv / 2)
eps is either given (a strided (K, B, N) tensor) or ``tl.randn(seed, i)`` with ``i`` the flat
index of the element in the contiguous (K, B, N) output. The forward also writes the noise it
drew where asked (KEEP: the op keeps it, below a size, docs/random-numbers.md), and the backward
reads it as a given eps; else the backward regenerates it from the same seed. Each program
loads its tile of mu and logvar once and writes the K samples. t * exp(lv / 2) is taken as
(t h) h with h = exp(lv / 4) (std_times): finite wherever the product is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    compute_dtype,
    elementwise_tile,
    launch,
    load,
    on_device,
    std_times,
    store,
    strides,
    tiling,
)


@triton.jit
def noise_tile(eps_ptr, seed, k, rows, cols, B, N, s_eps_k, s_eps_b, s_eps_n, mask,
               HAS_EPS: tl.constexpr, DTYPE: tl.constexpr):
    """The k-th sample's noise on a tile: the given eps, or Philox normals at flat indices."""
    if HAS_EPS:
        eps_k = eps_ptr + tl.cast(k, tl.int64) * s_eps_k
        return load(eps_k, rows, cols, s_eps_b, s_eps_n, mask, DTYPE)
    else:
        flat = (tl.cast(k, tl.int64) * B + rows[:, None]) * N + cols[None, :]
        return tl.randn(seed, flat).to(DTYPE)


@triton.jit
def _reparameterize_fwd_kernel(
    z_ptr, mu_ptr, lv_ptr, eps_ptr, seed_ptr, noise_ptr,
    B, N, K, n_col_tiles,
    s_mu_b, s_mu_n, s_lv_b, s_lv_n, s_eps_k, s_eps_b, s_eps_n,
    HAS_EPS: tl.constexpr, KEEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    DTYPE: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(tl.program_id(0), n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    mu = load(mu_ptr, rows, cols, s_mu_b, s_mu_n, mask, DTYPE)
    h = tl.exp(0.25 * load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE))
    seed = 0
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    for k in range(K):
        eps = noise_tile(eps_ptr, seed, k, rows, cols, B, N, s_eps_k, s_eps_b, s_eps_n, mask,
                         HAS_EPS, DTYPE)
        store(z_ptr + tl.cast(k, tl.int64) * B * N, rows, cols, N, mu + std_times(eps, h), mask)
        if KEEP:
            store(noise_ptr + tl.cast(k, tl.int64) * B * N, rows, cols, N, eps, mask)


@triton.jit
def _reparameterize_bwd_kernel(
    g_ptr, lv_ptr, eps_ptr, seed_ptr, dmu_ptr, dlv_ptr, deps_ptr,
    B, N, K, n_col_tiles,
    s_g_k, s_g_b, s_g_n, s_lv_b, s_lv_n, s_eps_k, s_eps_b, s_eps_n,
    HAS_EPS: tl.constexpr, NEED_MU: tl.constexpr, NEED_LV: tl.constexpr,
    NEED_EPS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(tl.program_id(0), n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    h = tl.exp(0.25 * load(lv_ptr, rows, cols, s_lv_b, s_lv_n, mask, DTYPE))
    seed = 0
    if NEED_LV and not HAS_EPS:
        seed = tl.load(seed_ptr)
    g_sum = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    g_eps_sum = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    for k in range(K):
        g = load(g_ptr + tl.cast(k, tl.int64) * s_g_k, rows, cols, s_g_b, s_g_n, mask, DTYPE)
        g_sum += g
        if NEED_LV:
            eps = noise_tile(eps_ptr, seed, k, rows, cols, B, N, s_eps_k, s_eps_b, s_eps_n,
                             mask, HAS_EPS, DTYPE)
            g_eps_sum += g * eps
        if NEED_EPS:
            store(deps_ptr + tl.cast(k, tl.int64) * B * N, rows, cols, N, std_times(g, h), mask)
    if NEED_MU:
        store(dmu_ptr, rows, cols, N, g_sum, mask)
    if NEED_LV:
        store(dlv_ptr, rows, cols, N, std_times(0.5 * g_eps_sum, h), mask)


def _eps_strides(eps: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if eps is None else tuple(eps.stride())


def reparameterize_fwd(mu: Tensor, logvar: Tensor, eps: Tensor | None, seed: Tensor | None,
                       n_samples: int, keep_noise: bool = False) -> tuple[Tensor, Tensor]:
    B, N = mu.shape
    z = torch.empty((n_samples, B, N), dtype=mu.dtype, device=mu.device)
    keep = keep_noise and eps is None
    noise = mu.new_empty((n_samples, B, N) if keep else (0,))
    t = tiling(B, N, mu.device)
    with on_device(mu):
        launch("fastvae::reparameterize", _reparameterize_fwd_kernel, t.grid,
            z, mu, logvar, mu if eps is None else eps, mu if seed is None else seed,
            noise if keep else z, B, N, n_samples, t.n_col_tiles,
            *strides(mu), *strides(logvar), *_eps_strides(eps),
            HAS_EPS=eps is not None, KEEP=keep, BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(mu.dtype), num_warps=t.num_warps,
        )
    return z, noise


def reparameterize_bwd(grad_z: Tensor, noise: Tensor, mu: Tensor, logvar: Tensor,
                       eps: Tensor | None, seed: Tensor | None, needs: list[bool]) -> list[Tensor]:
    K = grad_z.shape[0]
    B, N = mu.shape
    shapes = [(B, N), (B, N), (K, B, N)]
    dtypes = [mu.dtype, logvar.dtype, mu.dtype if eps is None else eps.dtype]
    if eps is None and noise.numel():  # the noise kept by the forward, read as a given eps
        eps, seed = noise, None
    outs = [torch.empty(shape, dtype=dtype, device=mu.device) if need else None
            for shape, dtype, need in zip(shapes, dtypes, needs, strict=True)]
    t = tiling(B, N, mu.device)
    with on_device(mu):
        launch("fastvae::reparameterize_backward", _reparameterize_bwd_kernel, t.grid,
            grad_z, logvar, mu if eps is None else eps, mu if seed is None else seed,
            *(o if o is not None else mu for o in outs),
            B, N, K, t.n_col_tiles,
            *grad_z.stride(), *strides(logvar), *_eps_strides(eps),
            HAS_EPS=eps is not None, NEED_MU=needs[0], NEED_LV=needs[1], NEED_EPS=needs[2],
            BLOCK_B=t.block_b, BLOCK_N=t.block_n, DTYPE=compute_dtype(mu.dtype),
            num_warps=t.num_warps,
        )
    return [o for o in outs if o is not None]
