"""Bernoulli negative log-likelihood from logits: Triton kernels and launchers.

Per element, exact for any finite logit l and target x in [0, 1] (kernels/_common.py):
    nll = |l| * a + log1p(exp(-|l|)),  a = 1 - x for l >= 0, x below  (= max(l, 0) - l * x)
    d/dl = sigmoid(l) - x = (1 - x) - p for l >= 0, p - x below,  p = sigmoid(-|l|)
    d/dx = -l
An infinite logit gives the limit for a hard target (x = 0 or 1), NaN for x inside (0, 1).
Forward sums over the event: per-sample values, shape (B,).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Reduction,
    bernoulli_grad_logits,
    bernoulli_nll,
    compute_dtype,
    elementwise_tile,
    launch,
    load,
    on_device,
    reduction_tile,
    store,
    store_partial,
    strides,
    tiling,
)


@triton.jit
def _bernoulli_nll_fwd_kernel(
    partial_ptr, l_ptr, x_ptr,
    B, N, tiles_per_prog, n_split,
    s_l_b, s_l_n, s_x_b, s_x_n,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    for t in range(tiles_per_prog):
        rows, cols, mask = reduction_tile(pid, t, tiles_per_prog, n_split, B, N, 1,
                                          BLOCK_B, BLOCK_N)
        l = load(l_ptr, rows, cols, s_l_b, s_l_n, mask, DTYPE)
        x = load(x_ptr, rows, cols, s_x_b, s_x_n, mask, DTYPE)
        acc += tl.where(mask, bernoulli_nll(l, x), 0.0)
    store_partial(partial_ptr, acc, pid, n_split, B, N, 1, BLOCK_B, BLOCK_N)


@triton.jit
def _bernoulli_nll_bwd_kernel(
    g_ptr, s_g_b, l_ptr, x_ptr, dl_ptr, dx_ptr,
    B, N, n_col_tiles,
    s_l_b, s_l_n, s_x_b, s_x_n,
    NEED_L: tl.constexpr, NEED_X: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(tl.program_id(0), n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    g = load(g_ptr, rows, cols, s_g_b, 0, mask, DTYPE)
    l = load(l_ptr, rows, cols, s_l_b, s_l_n, mask, DTYPE)
    if NEED_L:
        x = load(x_ptr, rows, cols, s_x_b, s_x_n, mask, DTYPE)
        store(dl_ptr, rows, cols, N, g * bernoulli_grad_logits(l, x), mask)
    if NEED_X:
        store(dx_ptr, rows, cols, N, -g * l, mask)


def bernoulli_nll_fwd(logits: Tensor, target: Tensor) -> Tensor:
    B, N = logits.shape
    red = Reduction(B, N, 1, logits.device, logits.dtype)
    t = red.t
    with on_device(logits):
        launch("fastvae::bernoulli_nll", _bernoulli_nll_fwd_kernel, red.grid,
            red.partial, logits, target, B, N, red.tiles_per_prog, red.n_split,
            *strides(logits), *strides(target),
            BLOCK_B=t.block_b, BLOCK_N=t.block_n, DTYPE=compute_dtype(logits.dtype),
            num_warps=t.num_warps,
        )
    return red.result()


def bernoulli_nll_bwd(grad: Tensor, logits: Tensor, target: Tensor,
                      needs: list[bool]) -> list[Tensor]:
    B, N = logits.shape
    outs = [torch.empty((B, N), dtype=logits.dtype, device=logits.device) if need else None
            for need in needs]
    t = tiling(B, N, logits.device)
    with on_device(logits):
        launch("fastvae::bernoulli_nll_backward", _bernoulli_nll_bwd_kernel, t.grid,
            grad, grad.stride(0), logits, target,
            *(o if o is not None else logits for o in outs),
            B, N, t.n_col_tiles, *strides(logits), *strides(target),
            NEED_L=needs[0], NEED_X=needs[1], BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(logits.dtype), num_warps=t.num_warps,
        )
    return [o for o in outs if o is not None]
