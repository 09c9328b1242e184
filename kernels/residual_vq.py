"""Residual vector quantization (SoundStream, Encodec): Triton kernels and launchers.

``residual_vq_fwd``: for l = 0 .. L-1, the nearest code of the running residual
(``nearest_code``'s screen with ``tl.dot`` and exact rescoring, kernels/nearest_code.py, on the
residual buffer and level l's codebook), then ``_update_kernel`` (per row block): the code
gathered by its index, ``r = r - c`` and ``q = q + c`` for the active rows (``l < n_levels``),
the index (-1 inactive) and the distance (0 inactive) written to column l. One order, that of
every backend (fastvae/ops/reference.py ``residual_vq_fwd``, docs/numerics.md "the residual"):
each operation rounded, no fusion (``enable_fp_fusion=False``). Memory: the residual and the
sum (N x D), the search's O(N + K D); nothing N x K, no host sync.

``residual_vq_bwd``: ``_bwd_kernel`` (per row block, levels in a loop) recomputes the residuals
from the indices (nothing L x N x D saved) and accumulates ``d x += ST_l(g) + 2 g_commit_l
(r_l - c_l)`` over the active levels (``ST``: the identity, or the rotation trick). The
codebooks' gradient (a learned codebook) replays the forward's residual updates level by level
with ``_update_kernel`` and index-adds ``-2 g_dist_l r_{l+1}`` (``r_{l+1} = r_l - c_l``, the
same bits as the reference's difference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import compute_dtype, interpreted, launch, on_device
from .nearest_code import _sqrt_rn, nearest_code_fwd

OP = "fastvae::residual_vq"


@triton.jit
def _update_kernel(r_ptr, q_ptr, e_ptr, s_e_k, s_e_d, idx_ptr, dist_ptr, lev_ptr, s_lev,
                   index_ptr, s_i_n, commit_ptr, out_dist_ptr, s_o_n, level, N, D,
                   HAS_LEVELS: tl.constexpr, WRITE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """Rows [pid BLOCK_R, ...): c = e[idx] (level l's codebook), r = r - c, q = q + c where the
    row is active; with WRITE, index/commit/dist column ``level`` (strides s_i_n, s_o_n per
    row). r, q: contiguous (N, D) in the compute dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    if HAS_LEVELS:
        active = row_ok & (level < tl.load(lev_ptr + rows * s_lev, mask=row_ok, other=0))
    else:
        active = row_ok
    k = tl.load(idx_ptr + rows, mask=active, other=-1)
    active = active & (k >= 0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = active[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        c = tl.load(e_ptr + k[:, None] * s_e_k + cols.to(tl.int64)[None, :] * s_e_d, mask=m,
                    other=0.0).to(DTYPE)
        r = tl.load(r_ptr + off, mask=m, other=0.0)
        tl.store(r_ptr + off, r - c, mask=m)
        if q_ptr is not None:
            q = tl.load(q_ptr + off, mask=m, other=0.0)
            tl.store(q_ptr + off, q + c, mask=m)
    if WRITE:
        d = tl.load(dist_ptr + rows, mask=active, other=0.0)
        tl.store(index_ptr + rows * s_i_n + level, tl.where(active, k, -1), mask=row_ok)
        tl.store(commit_ptr + rows * s_o_n + level, tl.where(active, d, 0.0), mask=row_ok)
        tl.store(out_dist_ptr + rows * s_o_n + level, tl.where(active, d, 0.0), mask=row_ok)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 256)


def _block_rows(N: int, D: int, device: torch.device) -> int:
    if interpreted(device):
        return max(1, min(triton.next_power_of_2(N), 16384 // _block_d(D)))
    return 32


def residual_vq_fwd(x: Tensor, codebooks: Tensor, n_levels: Tensor | None,
                    rotation: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``"triton"`` backend of ``residual_vq``: ``x (N, D)`` and ``codebooks (L, K, D)`` in
    one compute dtype (float32/float64), any strides; ``n_levels`` int64 ``(N,)`` or None.
    Returns ``(quantized (N, D), indices (N, L), commit (N, L), dist (N, L))``, bitwise those of
    ``fastvae.ops.reference.residual_vq_fwd``."""
    N, D = x.shape
    L = codebooks.shape[0]
    device = x.device
    r = x.contiguous().clone()
    q = torch.zeros_like(r)
    index = torch.empty((N, L), dtype=torch.int64, device=device)
    commit = torch.empty((N, L), dtype=x.dtype, device=device)
    dist = torch.empty((N, L), dtype=x.dtype, device=device)
    br, bd = _block_rows(N, D, device), _block_d(D)
    dtype = compute_dtype(x.dtype)
    levels = n_levels if n_levels is not None else index  # unused when HAS_LEVELS is False
    for level in range(L):
        e = codebooks[level]
        idx, d = nearest_code_fwd(r, e, "l2")
        with on_device(x):
            launch(OP, _update_kernel, (triton.cdiv(N, br),),
                   r, q, e, e.stride(0), e.stride(1), idx, d, levels, levels.stride(0),
                   index, index.stride(0), commit, dist, commit.stride(0), level, N, D,
                   HAS_LEVELS=n_levels is not None, WRITE=True, BLOCK_R=br, BLOCK_D=bd,
                   DTYPE=dtype, enable_fp_fusion=False)
    return q, index, commit, dist


@triton.jit
def _bwd_kernel(gq_ptr, s_g_n, s_g_d, gc_ptr, s_gc_n, s_gc_l, idx_ptr, s_i_n, s_i_l,
                x_ptr, s_x_n, s_x_d, e_ptr, s_e_l, s_e_k, s_e_d, dx_ptr, N, D, L,
                ROTATION: tl.constexpr, TINY: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """d x for rows [pid BLOCK_R, ...) (D <= BLOCK_D: a row in registers), levels in order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    m = row_ok[:, None] & (cols < D)[None, :]
    cols64 = cols.to(tl.int64)[None, :]
    r = tl.load(x_ptr + rows[:, None] * s_x_n + cols64 * s_x_d, mask=m, other=0.0).to(DTYPE)
    g = tl.load(gq_ptr + rows[:, None] * s_g_n + cols64 * s_g_d, mask=m, other=0.0).to(DTYPE)
    dx = tl.zeros([BLOCK_R, BLOCK_D], DTYPE)
    for level in range(L):
        k = tl.load(idx_ptr + rows * s_i_n + level * s_i_l, mask=row_ok, other=-1)
        active = k >= 0
        ma = m & active[:, None]
        c = tl.load(e_ptr + level * s_e_l + tl.maximum(k, 0)[:, None] * s_e_k + cols64 * s_e_d,
                    mask=ma, other=0.0).to(DTYPE)
        gc = tl.load(gc_ptr + rows * s_gc_n + level * s_gc_l, mask=row_ok & active,
                     other=0.0).to(DTYPE)
        e = r - c
        if ROTATION:
            tiny = tl.full([BLOCK_R], TINY, DTYPE)
            rn = _sqrt_rn(tl.sum(r * r, axis=1), DTYPE)
            cn = _sqrt_rn(tl.sum(c * c, axis=1), DTYPE)
            rd = tl.maximum(rn, tiny)
            cd = tl.maximum(cn, tiny)
            u = r / rd[:, None]
            ch = c / cd[:, None]
            w = u + ch
            wn = _sqrt_rn(tl.sum(w * w, axis=1), DTYPE)
            w = w / tl.maximum(wn, tiny)[:, None]
            lam = cn / rd
            wg = tl.sum(w * g, axis=1)
            cg = tl.sum(ch * g, axis=1)
            rot = lam[:, None] * (g - 2.0 * w * wg[:, None] + 2.0 * u * cg[:, None])
            ok = (rn > 0) & ((wn > 1e-6) | (cn == 0))
            st = tl.where(ok[:, None], rot, g)
        else:
            st = g
        dx = tl.where(ma, dx + (st + 2.0 * gc[:, None] * e), dx)
        r = tl.where(ma, e, r)
    tl.store(dx_ptr + rows[:, None] * D + cols64, dx, mask=m)


def residual_vq_bwd(grad_q: Tensor, grad_commit: Tensor, grad_dist: Tensor, indices: Tensor,
                    x: Tensor, codebooks: Tensor, n_levels: Tensor | None, rotation: int,
                    needs: list[bool]) -> list[Tensor]:
    """The gradients of ``x`` and ``codebooks`` asked for (inactive levels: the -1 indices)."""
    N, D = x.shape
    L, K, _ = codebooks.shape
    device = x.device
    dtype = compute_dtype(x.dtype)
    out = []
    if needs[0]:
        dx = torch.empty((N, D), dtype=x.dtype, device=device)
        bd = triton.next_power_of_2(max(D, 1))
        br = (max(1, min(triton.next_power_of_2(N), 16384 // bd)) if interpreted(device)
              else max(1, min(32, 4096 // bd)))
        g = grad_q.to(x.dtype)
        gc = grad_commit.to(x.dtype)
        with on_device(x):
            launch(OP, _bwd_kernel, (triton.cdiv(N, br),),
                   g, g.stride(0), g.stride(1), gc, gc.stride(0), gc.stride(1),
                   indices, indices.stride(0), indices.stride(1), x, x.stride(0), x.stride(1),
                   codebooks, *codebooks.stride(), dx, N, D, L,
                   ROTATION=bool(rotation), TINY=torch.finfo(x.dtype).tiny, BLOCK_R=br,
                   BLOCK_D=bd, DTYPE=dtype, enable_fp_fusion=False)
        out.append(dx)
    if needs[1]:
        dcb = torch.zeros((L, K, D), dtype=x.dtype, device=device)
        r = x.contiguous().clone()
        br, bd = _block_rows(N, D, device), _block_d(D)
        gd = grad_dist.to(x.dtype)
        for level in range(L):
            e = codebooks[level]
            idx = indices[:, level].contiguous()
            with on_device(x):
                launch(OP, _update_kernel, (triton.cdiv(N, br),),
                       r, None, e, e.stride(0), e.stride(1), idx, r, idx, idx.stride(0),
                       idx, 0, r, r, 0, level, N, D,
                       HAS_LEVELS=False, WRITE=False, BLOCK_R=br, BLOCK_D=bd,
                       DTYPE=dtype, enable_fp_fusion=False)
            active = idx >= 0
            dcb[level].index_add_(0, idx.clamp_min(0),
                                  torch.where(active[:, None], -2 * gd[:, level, None] * r, 0))
        out.append(dcb)
    return out
