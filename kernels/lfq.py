"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): the entropy statistics, in Triton.

For bit logits ``l (R, C, d)`` (``4 inv_temperature s x``), the distribution of row n over the
``2**d`` codes of codebook c factorizes into d Bernoullis, ``p_n(k) = prod_j P(bit_j = b_j(k))``
with ``P(bit_j = 1) = sigmoid(l_nj)``. With the bits split into a high half A (``dA = d // 2``,
the most significant first) and a low half B, ``k = kA 2**dB + kB`` and
``p_n(k) = PA_n(kA) PB_n(kB)``: the half tables are built per tile from the logits, and a
(row, code) pair costs one product. Three kernels, each over 3-D tiles (rows x kA x kB) reduced
in registers in the compute dtype (float32, float64 for float64 inputs: exact accumulation, no
TF32, no ``tl.dot``):

* ``_sums_kernel`` (grid: codebook x kA block x kB block; loop over row tiles):
  ``sums[c, k] = sum_n p_n(k)``, each row tile's sum added to the running one (blocked
  summation). Deterministic: no atomics.
* ``_entropy_kernel`` (grid: codebook x row block): ``eps = 0``: the sum of the d binary
  entropies ``log1p(e) + |l| e / (1 + e)``, ``e = exp(-|l|)``; ``eps > 0``:
  ``-sum_k p log max(p, eps)`` over every pair, ``log p = LA + LB``.
* ``_backward_kernel`` (grid: codebook x row block): ``d l_nj = sigma(-l) S1 - sigma(l) S0``,
  ``S1``/``S0`` the sums of ``W_nk = p_n(k) (G_k + gh_n E_nk)`` over the codes with bit j set /
  clear, ``E = -(max(log p, log eps) + [log p > log eps])`` (with ``eps = 0`` the entropy's part is
  the closed form ``gh dh/dl = -gh l sigma(l) sigma(-l)``).

Memory: the outputs and O(tile) registers; never R x 2**d. The same formulas as
``fastvae.ops.reference.lfq_entropy_fwd`` / ``_bwd`` and ``csrc/lfq.inc``. Written from ``tl``
primitives only (no libdevice: runs under the interpreter).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    compute_dtype,
    interpreted,
    launch,
    log1p_unit,
    next_power_of_2,
    on_device,
    torch_compute_dtype,
)


@triton.jit
def _sigmoid(v):
    e = tl.exp(-tl.abs(v))
    r = 1.0 / (1.0 + e)
    return tl.where(v >= 0.0, r, e * r)


@triton.jit
def _log_sigmoid(v):
    e = tl.exp(-tl.abs(v))
    return -(tl.where(v < 0.0, -v, 0.0) + log1p_unit(e))


@triton.jit
def _bit_entropy(v):
    a = tl.abs(v)
    e = tl.exp(-a)
    return log1p_unit(e) + tl.where(e == 0.0, 0.0, a * (e / (1.0 + e)))


@triton.jit
def _bit_entropy_grad(v):
    e = tl.exp(-tl.abs(v))
    r = 1.0 / (1.0 + e)
    return tl.where(e == 0.0, 0.0, -v * ((e * r) * r))


@triton.jit
def _half(l_row, rmask, s_j, j0, dh, codes, cmask, DTYPE: tl.constexpr, WITH_LOG: tl.constexpr):
    """The half table of bits [j0, j0 + dh) for a tile of rows (``l_row``: their pointers) and
    a block of codes: P (rows, codes) = prod_j P(bit_j = b_j(code)), and log P (or zeros)."""
    P = tl.where(rmask[:, None] & cmask[None, :], 1.0, 0.0).to(DTYPE)
    Lg = tl.zeros(P.shape, DTYPE)
    for j in range(0, dh):
        v = tl.load(l_row + (j0 + j) * s_j, mask=rmask, other=0.0).to(DTYPE)
        bit = ((codes >> (dh - 1 - j)) & 1)[None, :] == 1
        P = P * tl.where(bit, _sigmoid(v)[:, None], _sigmoid(-v)[:, None])
        if WITH_LOG:
            Lg = Lg + tl.where(bit, _log_sigmoid(v)[:, None], _log_sigmoid(-v)[:, None])
    return P, Lg


@triton.jit
def _sums_kernel(l_ptr, s_r, s_c, s_j, out_ptr, o_c, o_k, R, dA, dB, n_a, n_b,
                 BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid // (n_a * n_b)
    ia = (pid // n_b) % n_a
    ib = pid % n_b
    KA = 1 << dA
    KB = 1 << dB
    ca = ia * BLOCK_A + tl.arange(0, BLOCK_A)
    cbb = ib * BLOCK_B + tl.arange(0, BLOCK_B)
    amask = ca < KA
    bmask = cbb < KB
    acc = tl.zeros((BLOCK_A, BLOCK_B), DTYPE)
    base = l_ptr + cb.to(tl.int64) * s_c
    for n0 in range(0, R, BLOCK_R):
        rows = n0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        l_row = base + rows.to(tl.int64) * s_r
        PA, _ = _half(l_row, rmask, s_j, 0, dA, ca, amask, DTYPE, False)
        PB, _ = _half(l_row, rmask, s_j, dA, dB, cbb, bmask, DTYPE, False)
        acc += tl.sum(PA[:, :, None] * PB[:, None, :], axis=0)
    k = ca[:, None].to(tl.int64) * KB + cbb[None, :]
    tl.store(out_ptr + cb.to(tl.int64) * o_c + k * o_k, acc, mask=amask[:, None] & bmask[None, :])


@triton.jit
def _entropy_kernel(l_ptr, s_r, s_c, s_j, h_ptr, h_r, h_c, R, dA, dB, leps, n_rb,
                    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                    CLAMPED: tl.constexpr, DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid // n_rb
    rows = (pid % n_rb) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    l_row = l_ptr + cb.to(tl.int64) * s_c + rows.to(tl.int64) * s_r
    h = tl.zeros((BLOCK_R,), DTYPE)
    if CLAMPED:
        KA = 1 << dA
        KB = 1 << dB
        for a0 in range(0, KA, BLOCK_A):
            ca = a0 + tl.arange(0, BLOCK_A)
            PA, LA = _half(l_row, rmask, s_j, 0, dA, ca, ca < KA, DTYPE, True)
            for b0 in range(0, KB, BLOCK_B):
                cbb = b0 + tl.arange(0, BLOCK_B)
                PB, LB = _half(l_row, rmask, s_j, dA, dB, cbb, cbb < KB, DTYPE, True)
                t = LA[:, :, None] + LB[:, None, :]
                m = tl.where(t > leps, t, leps)
                h -= tl.sum(tl.sum((PA[:, :, None] * PB[:, None, :]) * m, axis=2), axis=1)
    else:
        for j in range(0, dA + dB):
            v = tl.load(l_row + j * s_j, mask=rmask, other=0.0).to(DTYPE)
            h += _bit_entropy(v)
    tl.store(h_ptr + cb.to(tl.int64) * h_c + rows.to(tl.int64) * h_r, h, mask=rmask)


@triton.jit
def _bit_sums(r, codes, dh, valid, DP: tl.constexpr):
    """(rows, DP): the sums of r (rows, codes) over the codes with bit j set, and clear."""
    jj = tl.arange(0, DP)
    bits = ((codes[:, None] >> tl.maximum(dh - 1 - jj[None, :], 0)) & 1).to(r.dtype)
    live = (valid[:, None] & (jj[None, :] < dh)).to(r.dtype)
    s1 = tl.sum(r[:, :, None] * (bits * live)[None, :, :], axis=1)
    s0 = tl.sum(r[:, :, None] * ((1.0 - bits) * live)[None, :, :], axis=1)
    return s1, s0


@triton.jit
def _backward_kernel(g_ptr, g_c, g_k, gh_ptr, gh_r, gh_c, l_ptr, s_r, s_c, s_j,
                     d_ptr, d_r, d_c, d_j, R, dA, dB, leps, n_rb,
                     BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                     DP: tl.constexpr, CLAMPED: tl.constexpr, DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid // n_rb
    rows = (pid % n_rb) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    l_row = l_ptr + cb.to(tl.int64) * s_c + rows.to(tl.int64) * s_r
    gh = tl.load(gh_ptr + cb.to(tl.int64) * gh_c + rows.to(tl.int64) * gh_r, mask=rmask,
                 other=0.0).to(DTYPE)
    KA = 1 << dA
    KB = 1 << dB
    s1a = tl.zeros((BLOCK_R, DP), DTYPE)
    s0a = tl.zeros((BLOCK_R, DP), DTYPE)
    s1b = tl.zeros((BLOCK_R, DP), DTYPE)
    s0b = tl.zeros((BLOCK_R, DP), DTYPE)
    g_base = g_ptr + cb.to(tl.int64) * g_c
    for a0 in range(0, KA, BLOCK_A):
        ca = a0 + tl.arange(0, BLOCK_A)
        amask = ca < KA
        PA, LA = _half(l_row, rmask, s_j, 0, dA, ca, amask, DTYPE, CLAMPED)
        ra = tl.zeros((BLOCK_R, BLOCK_A), DTYPE)
        for b0 in range(0, KB, BLOCK_B):
            cbb = b0 + tl.arange(0, BLOCK_B)
            bmask = cbb < KB
            PB, LB = _half(l_row, rmask, s_j, dA, dB, cbb, bmask, DTYPE, CLAMPED)
            k = ca[:, None].to(tl.int64) * KB + cbb[None, :]
            G = tl.load(g_base + k * g_k, mask=amask[:, None] & bmask[None, :],
                        other=0.0).to(DTYPE)
            coef = G[None, :, :]
            if CLAMPED:
                t = LA[:, :, None] + LB[:, None, :]
                above = t > leps
                e = tl.where(above, t, leps) + tl.where(above, 1.0, 0.0)
                coef = coef - gh[:, None, None] * e
            w = (PA[:, :, None] * PB[:, None, :]) * coef
            ra += tl.sum(w, axis=2)
            t1, t0 = _bit_sums(tl.sum(w, axis=1), cbb, dB, bmask, DP)
            s1b += t1
            s0b += t0
        t1, t0 = _bit_sums(ra, ca, dA, amask, DP)
        s1a += t1
        s0a += t0
    jj = tl.arange(0, DP)
    for half in tl.static_range(2):
        if half == 0:
            j0 = 0
            dh = dA
            s1 = s1a
            s0 = s0a
        else:
            j0 = dA
            dh = dB
            s1 = s1b
            s0 = s0b
        cols = j0 + jj
        m = rmask[:, None] & (jj[None, :] < dh)
        v = tl.load(l_row[:, None] + cols[None, :] * s_j, mask=m, other=0.0).to(DTYPE)
        out = _sigmoid(-v) * s1 - _sigmoid(v) * s0
        if not CLAMPED:
            out += gh[:, None] * _bit_entropy_grad(v)
        ptr = (d_ptr + cb.to(tl.int64) * d_c + rows[:, None].to(tl.int64) * d_r
               + cols[None, :] * d_j)
        tl.store(ptr, out.to(d_ptr.dtype.element_ty), mask=m)


def _blocks(R: int, dA: int, dB: int, interp: bool) -> tuple[int, int, int]:
    KA, KB = 1 << dA, 1 << dB
    if interp:  # few, large programs (each costs ~ms of Python)
        ba, bb = min(next_power_of_2(KA), 64), min(next_power_of_2(KB), 64)
        br = max(1, min(next_power_of_2(R), 65536 // (ba * bb), 256))
        return br, ba, bb
    ba, bb = min(next_power_of_2(KA), 16), min(next_power_of_2(KB), 32)
    return max(1, min(16, 8192 // (ba * bb))), ba, bb


def lfq_entropy_fwd(logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The ``"triton"`` backend of ``lfq_entropy``: ``logits (R, C, d)`` (R, C, d >= 1, any
    strides) -> ``(sums (C, 2**d), entropy (R, C))`` in the compute dtype (module docstring)."""
    R, C, d = logits.shape
    dA, dB = d // 2, d - d // 2
    cdt = torch_compute_dtype(logits.dtype)
    device = logits.device
    sums = torch.empty((C, 1 << d), dtype=cdt, device=device)
    entropy = torch.empty((R, C), dtype=cdt, device=device)
    br, ba, bb = _blocks(R, dA, dB, interpreted(device))
    dtype = compute_dtype(logits.dtype)
    clamped = eps > 0
    leps = math.log(eps) if clamped else 0.0
    n_a, n_b = -(-(1 << dA) // ba), -(-(1 << dB) // bb)
    n_rb = -(-R // br)
    sr, sc, sj = logits.stride()
    op = "fastvae::lfq_entropy"
    with on_device(logits):
        launch(op, _sums_kernel, (C * n_a * n_b,), logits, sr, sc, sj, sums, *sums.stride(),
               R, dA, dB, n_a, n_b, BLOCK_R=br, BLOCK_A=ba, BLOCK_B=bb, DTYPE=dtype)
        launch(op, _entropy_kernel, (C * n_rb,), logits, sr, sc, sj, entropy,
               *entropy.stride(), R, dA, dB, leps, n_rb, BLOCK_R=br, BLOCK_A=ba, BLOCK_B=bb,
               CLAMPED=clamped, DTYPE=dtype)
    return sums, entropy


def lfq_entropy_bwd(grad_sums: Tensor, grad_entropy: Tensor, logits: Tensor, eps: float,
                    needs) -> list[Tensor]:
    """The gradient of the logits, in their dtype, from those of the code sums ``(C, 2**d)``
    and of the per-row entropies ``(R, C)`` (module docstring)."""
    if not needs[0]:
        return []
    R, C, d = logits.shape
    dA, dB = d // 2, d - d // 2
    cdt = torch_compute_dtype(logits.dtype)
    device = logits.device
    gs = grad_sums.to(cdt)
    ge = grad_entropy.to(cdt)
    d_logits = torch.empty((R, C, d), dtype=logits.dtype, device=device)
    br, ba, bb = _blocks(R, dA, dB, interpreted(device))
    if not interpreted(device):
        br = max(1, min(br, 4096 // (ba * bb)))
    dp = max(1, next_power_of_2(max(dA, dB)))
    clamped = eps > 0
    leps = math.log(eps) if clamped else 0.0
    n_rb = -(-R // br)
    with on_device(logits):
        launch("fastvae::lfq_entropy_backward", _backward_kernel, (C * n_rb,),
               gs, *gs.stride(), ge, *ge.stride(), logits, *logits.stride(), d_logits,
               *d_logits.stride(), R, dA, dB, leps, n_rb, BLOCK_R=br, BLOCK_A=ba, BLOCK_B=bb,
               DP=dp, CLAMPED=clamped, DTYPE=compute_dtype(logits.dtype))
    return [d_logits]
