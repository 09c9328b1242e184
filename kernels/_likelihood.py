"""The kernels and launchers of every likelihood with one target per element: one forward and one
backward kernel serve them all, each op passing its per-element formulas as ``tl.constexpr``
``@triton.jit`` functions (Triton compiles one kernel per formula, as it would a copy).

Operands, each a strided ``(B, N)`` view: the parameter ``a`` (logits, or the mean), the
target ``x`` and an optional second parameter ``c`` (the Gaussian's log-variance), which is
either a tensor (``HAS_C``) or the float ``c_value`` everywhere. An op supplies:

    value(a, x, c, DTYPE) -> nll                      per element, summed over the event: (B,)
    grads(g, a, x, c, DTYPE) -> (d_a, d_x, d_c)       g times the partials, g the (B,) gradient

in the compute dtype (``DTYPE``); a gradient that is not asked for is not stored (and the GPU
compiler drops its arithmetic and the loads only it reads). An op without a second parameter
ignores ``c`` (and returns anything for ``d_c``, never stored). The ops: ``bernoulli_nll``,
``continuous_bernoulli_nll`` (``logits_likelihood``) and ``gaussian_nll``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Reduction,
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
def _second(c_ptr, c_value, rows, cols, s_c_b, s_c_n, mask,
            HAS_C: tl.constexpr, DTYPE: tl.constexpr):
    """The second parameter's tile: loaded, or ``c_value`` everywhere."""
    if HAS_C:
        return load(c_ptr, rows, cols, s_c_b, s_c_n, mask, DTYPE)
    else:
        return tl.where(mask, c_value, c_value).to(DTYPE)


@triton.jit
def _likelihood_fwd_kernel(
    partial_ptr, a_ptr, x_ptr, c_ptr, c_value,
    B, N, tiles_per_prog, n_split,
    s_a_b, s_a_n, s_x_b, s_x_n, s_c_b, s_c_n,
    VALUE: tl.constexpr, HAS_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_B, BLOCK_N], DTYPE)
    for t in range(tiles_per_prog):
        rows, cols, mask = reduction_tile(pid, t, tiles_per_prog, n_split, B, N, 1,
                                          BLOCK_B, BLOCK_N)
        a = load(a_ptr, rows, cols, s_a_b, s_a_n, mask, DTYPE)
        x = load(x_ptr, rows, cols, s_x_b, s_x_n, mask, DTYPE)
        c = _second(c_ptr, c_value, rows, cols, s_c_b, s_c_n, mask, HAS_C, DTYPE)
        acc += tl.where(mask, VALUE(a, x, c, DTYPE), 0.0)
    store_partial(partial_ptr, acc, pid, n_split, B, N, 1, BLOCK_B, BLOCK_N)


@triton.jit
def _likelihood_bwd_kernel(
    g_ptr, s_g_b, a_ptr, x_ptr, c_ptr, c_value, da_ptr, dx_ptr, dc_ptr,
    B, N, n_col_tiles,
    s_a_b, s_a_n, s_x_b, s_x_n, s_c_b, s_c_n,
    GRADS: tl.constexpr, HAS_C: tl.constexpr,
    NEED_A: tl.constexpr, NEED_X: tl.constexpr, NEED_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(tl.program_id(0), n_col_tiles, B, N, BLOCK_B, BLOCK_N)
    g = load(g_ptr, rows, cols, s_g_b, 0, mask, DTYPE)
    a = load(a_ptr, rows, cols, s_a_b, s_a_n, mask, DTYPE)
    x = load(x_ptr, rows, cols, s_x_b, s_x_n, mask, DTYPE)
    c = _second(c_ptr, c_value, rows, cols, s_c_b, s_c_n, mask, HAS_C, DTYPE)
    d_a, d_x, d_c = GRADS(g, a, x, c, DTYPE)
    if NEED_A:
        store(da_ptr, rows, cols, N, d_a, mask)
    if NEED_X:
        store(dx_ptr, rows, cols, N, d_x, mask)
    if NEED_C:
        store(dc_ptr, rows, cols, N, d_c, mask)


def likelihood_fwd(op: str, value, a: Tensor, x: Tensor, c: Tensor | None = None,
                   c_value: float = 0.0) -> Tensor:
    """The per-sample sums (B,) of ``value`` over the event, launched as ``op``
    (``"fastvae::<name>"``)."""
    B, N = a.shape
    red = Reduction(B, N, 1, a.device, a.dtype)
    t = red.t
    with on_device(a):
        launch(op, _likelihood_fwd_kernel, red.grid,
            red.partial, a, x, a if c is None else c, float(c_value),
            B, N, red.tiles_per_prog, red.n_split, *strides(a), *strides(x), *strides(c),
            VALUE=value, HAS_C=c is not None, BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(a.dtype), num_warps=t.num_warps,
        )
    return red.result()


def likelihood_bwd(op: str, grads, grad: Tensor, a: Tensor, x: Tensor, c: Tensor | None,
                   c_value: float, needs: list[bool]) -> list[Tensor]:
    """The gradients asked for in ``needs`` (of a, x[, c]; ``grads``'s results), each (B, N)
    in a's dtype, launched as ``op`` (``"fastvae::<name>_backward"``)."""
    B, N = a.shape
    outs = [torch.empty((B, N), dtype=a.dtype, device=a.device) if need else None
            for need in needs]
    ptrs = [a if o is None else o for o in outs]  # a stands in for an output not asked for
    if len(needs) == 2:  # an op without c
        ptrs.append(a)
        needs = (*needs, False)
    t = tiling(B, N, a.device)
    with on_device(a):
        launch(op, _likelihood_bwd_kernel, t.grid,
            grad, grad.stride(0), a, x, a if c is None else c, float(c_value), *ptrs,
            B, N, t.n_col_tiles, *strides(a), *strides(x), *strides(c),
            GRADS=grads, HAS_C=c is not None, NEED_A=needs[0], NEED_X=needs[1],
            NEED_C=needs[2], BLOCK_B=t.block_b, BLOCK_N=t.block_n,
            DTYPE=compute_dtype(a.dtype), num_warps=t.num_warps,
        )
    return [o for o in outs if o is not None]


def logits_likelihood(name: str, value, grads) -> tuple[Callable, Callable]:
    """The backend's ``<name>_fwd(logits, target) -> (B,)`` and
    ``<name>_bwd(grad, logits, target, needs[2]) -> grads`` for a likelihood of logits and a
    target, from its per-element ``value`` and ``grads`` (module docstring; ``c`` unused)."""
    forward_op, backward_op = f"fastvae::{name}", f"fastvae::{name}_backward"

    def fwd(logits: Tensor, target: Tensor) -> Tensor:
        return likelihood_fwd(forward_op, value, logits, target)

    def bwd(grad: Tensor, logits: Tensor, target: Tensor, needs: list[bool]) -> list[Tensor]:
        return likelihood_bwd(backward_op, grads, grad, logits, target, None, 0.0, needs)

    fwd.__name__ = fwd.__qualname__ = f"{name}_fwd"
    bwd.__name__ = bwd.__qualname__ = f"{name}_bwd"
    fwd.__doc__ = f"{name} per sample: (B,) sums over the event of (B, N) logits and target."
    bwd.__doc__ = (f"{name}'s gradients in (logits, target), those asked for in ``needs``, each "
                   "(B, N) in the logits' dtype, from the (B,) gradient ``grad``.")
    return fwd, bwd
