"""Nearest code (vector quantization): Triton kernels and launcher, exact and never N x K.

For rows x (N, D) and a codebook e (K, D), ``nearest_code_fwd`` returns for each row the index
of the code at the smallest distance (the lowest index on ties) and that distance:
    "l2":     d_k = sum_j (x_j - e_k,j)^2                 (squared Euclidean)
    "cosine": d_k = 1 - sum_j xh_j eh_k,j,   xh = x / max(|x|, 1e-12), likewise eh
The distances are computed DIRECTLY (never as |x|^2 - 2 x.e + |e|^2, which cancels), in the
compute dtype (float32; float64 for float64 inputs), in one order over j = 0 .. D-1 with every
operation rounded (no fused multiply-add: those kernels launch with enable_fp_fusion=False):
acc = acc + t * t with t = x_j - e_j; for "cosine" acc = acc + xh_j * eh_j, d = 1 - acc, the
norm sqrt(n) with n = n + x_j * x_j likewise, square root and division correctly rounded. The
same operations in the same order as the other backends (csrc/nearest_code.inc), so that the
results agree bit for bit. A row with no distance below +inf (NaN in x, an overflow) gets
code 0 and its distance.

Algorithm (three small kernels and the search):

1. ``_prep_kernel`` writes the codebook the search reads, once, contiguous in the compute
   dtype: for "l2" centred, e' = e - c with c the codebook's mean (any c works; centring only
   shrinks the numbers the screen cancels), for "cosine" normalized; and each code's
   |e'|^2 (K,). For "cosine" it also writes the row norms max(|x|, 1e-12) (N,).
2. ``_search_kernel`` (grid: blocks of BLOCK_M rows x splits of the codebook, so that a GPU is
   filled when N is small; loop over the split's tiles of BLOCK_K codes, and over D in chunks
   of BLOCK_D) SCREENS with ``tl.dot`` (float32 with input_precision
   "ieee": no TF32 rounding): v_k = |e'_k|^2 - 2 x'.e'_k ("l2", x' = x - c, so that
   d_k = |x'|^2 + v_k) or v_k = -2 xh.eh_k ("cosine", d_k = 1 + v_k / 2). With the error
   bound eps_k of v_k (below), it keeps per row the running threshold
       T = min over the codes seen of  w_k + R max(|x'|^2 + w_k, 0),   w_k = v_k + eps_k
   (R = 2G for "l2", 0 for "cosine") and appends, in index order, every code with
   v_k - eps_k <= T (the candidates) to the row's list for that split (capacity CAP),
   counting them. Each split's T bounds the split's codes alone: the union of the lists is
   the same kind of superset. Memory: O(N n_split CAP + K D); nothing N x K.
3. ``_rescore_kernel`` (grid: blocks of rows) computes the candidates' distances directly and
   keeps the smallest, the lowest index on ties (splits in code order, each list in index
   order, a later candidate wins only when strictly closer). A split that listed more than CAP
   candidates for a row (duplicates, all codes equal, vectors far from the codebook's mean,
   non-finite values) is rescored against each of its codes: slower, still exact.

The margin (docs/numerics.md). u = unit roundoff (2^-24, 2^-53), G = (2D + 16) u. Every code
whose screened value could belong to the direct argmin is a candidate:
  * screen error: a dot product of D terms in ANY order (tl.dot's order is the hardware's)
    errs by at most gamma_D sum_j |a_j b_j| <= gamma_D (|a|^2 + |b|^2) / 2
    (gamma_n = n u / (1 - n u)); the centring roundings fl(x - c), fl(e - c) perturb each
    product by 2u more, and the final subtraction by u: |v~_k - v_k| <= gamma_{D+3} (|x'|^2 +
    2|e'_k|^2) for "l2", gamma_{D+1} (|xh|^2 + |eh_k|^2) for "cosine";
  * direct-distance error: D rounded squares of rounded differences, summed in order, give
    d^_k = d_k (1 + theta), |theta| <= gamma_{D+2}; so d^_k' <= d^_k implies
    d_k' <= d_k (1 + g) / (1 - g) <= d_k + 2.1 gamma_{D+2} d_k, and for "cosine" (rounding of
    1 - s) v_k' <= v_k + (the two dot errors) + 4u (1 + |xh|^2 + |eh_k|^2 ...);
  * eps_k = G (|x'|^2 + 2|e'_k|^2) + (D + 4) TINY ("l2"), (G + 4u)(|xh|^2 + |eh_k|^2) + 4u +
    (D + 4) TINY ("cosine"): twice the bounds above (which covers the norms' own rounding, the
    rounding of the few operations that form eps, w, T), and TINY = 2^-120 (2^-1016 in float64)
    per term for underflow (subnormal or flushed products).
  Then for the direct argmin k' and EVERY finite-screened code k:
    v~_k' - eps_k' <= v_k' <= v_k + 2.1 gamma d_k <= w_k + R max(|x'|^2 + w_k, 0),
  so v~_k' - eps_k' <= T at the end, and T only decreases: k' passed the test when its tile
  was screened, whatever came later. Codes whose screened values are not finite (overflow,
  inf, NaN) are always candidates and never lower T; a row whose |x'|^2 is not finite makes
  every code a candidate (the full rescoring). Assumes D u <= 0.01 (D <= 160000 in float32).
The candidates are a superset of {k'}, and the rescoring takes the direct argmin over them:
the result is the direct argmin over all K codes, lowest index on ties, by construction.

Under Triton's interpreter (CPU tensors) the tiles are large and there is one row block where
possible; ``tl.dot`` runs as numpy's matmul, sqrt_rn and div_rn are correctly rounded there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import compute_dtype, interpreted, launch, on_device, split, torch_compute_dtype

# Candidates kept per row before a row falls back to rescoring every code. Random data adds one
# each time a row's running best improves (about ln(K / BLOCK_K) times) plus near ties.
CAP = 16


@triton.jit
def _sqrt_rn(x, DTYPE: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is approximate in float32; exact in float64)."""
    if DTYPE == tl.float64:  # noqa: SIM300 (a constexpr compares by value)
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div_rn(x, y, DTYPE: tl.constexpr):
    """Correctly rounded division (``/`` is 2-ulp div.full in float32; exact in float64)."""
    if DTYPE == tl.float64:  # noqa: SIM300
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _norm_clamped(src_ptr, rows, s_r, s_d, D, mask, DTYPE: tl.constexpr):
    """|x| = sqrt(n), n = ((x_0 x_0 + x_1 x_1) + ...) in j order, each operation rounded
    (launched without fp fusion), then max(|x|, 1e-12) with NaN passing."""
    n = tl.zeros(rows.shape, DTYPE)
    for j in range(D):
        v = tl.load(src_ptr + rows * s_r + tl.cast(j, tl.int64) * s_d, mask=mask,
                    other=0.0).to(DTYPE)
        n = n + v * v
    nrm = _sqrt_rn(n, DTYPE)
    floor = tl.full(rows.shape, 1e-12, DTYPE)  # made in DTYPE: 1e-12 exactly as a double
    return tl.where(nrm < floor, floor, nrm)


@triton.jit
def _prep_kernel(src_ptr, s_r, s_d, c_ptr, out_ptr, s_out, sq_ptr, norm_ptr, n_rows, D,
                 NORMALIZE: tl.constexpr, WRITE_OUT: tl.constexpr, BLOCK_R: tl.constexpr,
                 DTYPE: tl.constexpr):
    """Rows of ``src`` (n_rows, D): with WRITE_OUT, out = src - c (NORMALIZE False) or
    src / max(|src|, 1e-12) (NORMALIZE True), contiguous, and sq = |out|^2; with NORMALIZE and
    not WRITE_OUT, norm = max(|src|, 1e-12) only."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < n_rows
    if NORMALIZE:
        nrm = _norm_clamped(src_ptr, rows, s_r, s_d, D, mask, DTYPE)
        if not WRITE_OUT:
            tl.store(norm_ptr + rows, nrm, mask=mask)
    if WRITE_OUT:
        sq = tl.zeros([BLOCK_R], DTYPE)
        for j in range(D):
            v = tl.load(src_ptr + rows * s_r + tl.cast(j, tl.int64) * s_d, mask=mask,
                    other=0.0).to(DTYPE)
            o = _div_rn(v, nrm, DTYPE) if NORMALIZE else v - tl.load(c_ptr + j).to(DTYPE)
            tl.store(out_ptr + rows * s_out + j, o, mask=mask)
            sq = sq + o * o
        tl.store(sq_ptr + rows, sq, mask=mask)


@triton.jit
def _x_chunk(x_ptr, rows, cols, s_x_n, s_x_d, mask, c_ptr, xnorm, D,
             COSINE: tl.constexpr, DTYPE: tl.constexpr):
    """A (BLOCK_M, BLOCK_D) chunk of the screened rows: x - c ("l2") or x / |x| ("cosine")."""
    x = tl.load(x_ptr + rows[:, None] * s_x_n + cols.to(tl.int64)[None, :] * s_x_d, mask=mask,
                other=0.0).to(DTYPE)
    if COSINE:
        x = _div_rn(x, xnorm[:, None], DTYPE)
    else:
        x = x - tl.load(c_ptr + cols, mask=cols < D, other=0.0).to(DTYPE)[None, :]
    return tl.where(mask, x, 0.0)


@triton.jit
def _dot(x, e, acc, DTYPE: tl.constexpr):
    """acc + x e^T; float32 with input_precision "ieee" (no TF32 rounding of the inputs)."""
    if DTYPE == tl.float32:  # noqa: SIM300 (a constexpr compares by value)
        return tl.dot(x, tl.trans(e), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(e), acc)


@triton.jit
def _search_kernel(
    x_ptr, s_x_n, s_x_d, c_ptr, xnorm_ptr, eb_ptr, esq_ptr, cand_ptr, count_ptr,
    N, K, D, s_eb, n_code_tiles, n_d_chunks, n_split, tiles_per_split,
    COSINE: tl.constexpr, ONE_CHUNK: tl.constexpr, CAP: tl.constexpr, U: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):
    """Screen the codes of split program_id(1) (tiles_per_split code tiles) for BLOCK_M rows
    with tl.dot; append their candidates to the split's list (module doc)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    part = tl.program_id(1)
    list_row = rows * n_split + part  # this split's list and count of each row
    row_ok = rows < N
    dd = tl.arange(0, BLOCK_D)
    xnorm = tl.full([BLOCK_M], 1.0, DTYPE)
    if COSINE:
        xnorm = tl.load(xnorm_ptr + rows, mask=row_ok, other=1.0)
    # |x'|^2 (any order: only the margin uses it)
    xx = tl.zeros([BLOCK_M], DTYPE)
    for c in range(n_d_chunks):
        cols = c * BLOCK_D + dd
        m = row_ok[:, None] & (cols < D)[None, :]
        xc = _x_chunk(x_ptr, rows, cols, s_x_n, s_x_d, m, c_ptr, xnorm, D, COSINE, DTYPE)
        xx += tl.sum(xc * xc, 1)
    if ONE_CHUNK:  # D <= BLOCK_D: the rows' chunk stays in registers for every code tile
        x0 = _x_chunk(x_ptr, rows, dd, s_x_n, s_x_d, row_ok[:, None] & (dd < D)[None, :],
                      c_ptr, xnorm, D, COSINE, DTYPE)
    d_f = tl.cast(D, DTYPE)
    g = (2.0 * d_f + 16.0) * U
    tiny = (d_f + 4.0) * TINY
    if COSINE:
        g = g + 4.0 * U
        eps_row = g * xx + (4.0 * U + tiny)
    else:
        eps_row = g * xx + tiny
    running = tl.full([BLOCK_M], float("inf"), DTYPE)
    count = tl.zeros([BLOCK_M], tl.int32)
    t_end = tl.minimum((part + 1) * tiles_per_split, n_code_tiles)
    for t in range(part * tiles_per_split, t_end):
        codes = t * BLOCK_K + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        codes64 = codes.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_K], DTYPE)
        # eb is zero-padded to (n_code_tiles BLOCK_K, n_d_chunks BLOCK_D): no masks
        if ONE_CHUNK:
            ec = tl.load(eb_ptr + codes64[:, None] * BLOCK_D + dd[None, :])
            acc = _dot(x0, ec, acc, DTYPE)
        else:
            for c in range(n_d_chunks):
                cols = c * BLOCK_D + dd
                xc = _x_chunk(x_ptr, rows, cols, s_x_n, s_x_d,
                              row_ok[:, None] & (cols < D)[None, :], c_ptr, xnorm, D, COSINE,
                              DTYPE)
                ec = tl.load(eb_ptr + codes64[:, None] * s_eb + cols[None, :])
                acc = _dot(xc, ec, acc, DTYPE)
        esq = tl.load(esq_ptr + codes64)
        if COSINE:
            v = -2.0 * acc
            eps = eps_row[:, None] + (g * esq)[None, :]
        else:
            v = esq[None, :] - 2.0 * acc
            eps = eps_row[:, None] + (2.0 * g * esq)[None, :]
        w = v + eps
        lo = v - eps
        ok = row_ok[:, None] & code_ok[None, :]
        finite_w = ok & (tl.abs(w) < float("inf"))
        running = tl.minimum(running, tl.min(tl.where(finite_w, w, float("inf")), 1))
        thresh = running if COSINE else running + 2.0 * g * tl.maximum(xx + running, 0.0)
        # NaN or -inf: not (lo > T), so a candidate
        cand = ok & ~(lo > thresh[:, None])
        n_cand = tl.sum(cand.to(tl.int32), 1)
        if tl.max(n_cand, 0) > 0:
            # append them in index order: the row's candidates as bits of an int64 (BLOCK_K <=
            # 64), then one per step, the lowest set bit, its position read from the exponent
            # of its (exact) float32 value; usually a single step
            bit = tl.full([BLOCK_K], 1, tl.int64) << tl.arange(0, BLOCK_K).to(tl.int64)
            bits = tl.sum(tl.where(cand, bit[None, :], 0), 1)
            for step in range(tl.minimum(tl.max(n_cand, 0), CAP)):
                low = bits & -bits
                pos = ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 127
                slot = count + step
                tl.store(cand_ptr + list_row * CAP + slot, (t * BLOCK_K + pos).to(tl.int64),
                         mask=(step < n_cand) & (slot < CAP))
                bits = bits ^ low
        count += n_cand
    tl.store(count_ptr + list_row, count, mask=row_ok)


@triton.jit
def _direct(x_ptr, s_x_n, s_x_d, e_ptr, s_e_k, s_e_d, rows, idx, mask, xnorm, D,
            COSINE: tl.constexpr, DTYPE: tl.constexpr):
    """The distance of each row to code idx[row], directly, in j order, every operation rounded
    (the kernels that call this are launched without fp fusion):
    acc = acc + (x_j - e_j) * (x_j - e_j), or acc = acc + xh_j * eh_j and 1 - acc."""
    acc = tl.zeros(rows.shape, DTYPE)
    for j in range(D):
        j64 = tl.cast(j, tl.int64)
        xv = tl.load(x_ptr + rows * s_x_n + j64 * s_x_d, mask=mask, other=0.0).to(DTYPE)
        ev = tl.load(e_ptr + idx * s_e_k + j64 * s_e_d, mask=mask, other=0.0).to(DTYPE)
        if COSINE:
            acc = acc + _div_rn(xv, xnorm, DTYPE) * ev
        else:
            t = xv - ev
            acc = acc + t * t
    if COSINE:
        acc = 1.0 - acc
    return acc


@triton.jit
def _rescore_kernel(
    x_ptr, s_x_n, s_x_d, e_ptr, s_e_k, s_e_d, xnorm_ptr, cand_ptr, count_ptr,
    idx_ptr, dist_ptr, N, K, D, n_split, codes_per_split,
    COSINE: tl.constexpr, CAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KF: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """The direct distances of each row's candidates, split by split (all the split's codes
    when it listed more than CAP); the smallest, lowest index on ties."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    xnorm = tl.full([BLOCK_R], 1.0, DTYPE)
    if COSINE:
        xnorm = tl.load(xnorm_ptr + rows, mask=row_ok, other=1.0)
    best = tl.full([BLOCK_R], float("inf"), DTYPE)
    best_idx = tl.zeros([BLOCK_R], tl.int64)
    # splits in code order, each list in code order, a later code only when strictly closer
    for part in range(n_split):
        list_row = rows * n_split + part
        count = tl.load(count_ptr + list_row, mask=row_ok, other=0)
        listed = row_ok & (count <= CAP)
        n_slots = tl.max(tl.where(listed, count, 0), 0)
        for s in range(n_slots):
            active = listed & (s < count)
            idx = tl.load(cand_ptr + list_row * CAP + s, mask=active, other=0)
            d = _direct(x_ptr, s_x_n, s_x_d, e_ptr, s_e_k, s_e_d, rows, idx, active, xnorm, D,
                        COSINE, DTYPE)
            better = active & (d < best)
            best = tl.where(better, d, best)
            best_idx = tl.where(better, idx, best_idx)
        full = row_ok & (count > CAP)
        if tl.max(full.to(tl.int32), 0) > 0:
            # every code of the split, BLOCK_KF at a time: the tile's least distance, lowest
            # index among equal ones (NaN never wins: as +inf)
            k_lo = part * codes_per_split
            k_hi = tl.minimum(k_lo + codes_per_split, K)
            for t in range(tl.cdiv(k_hi - k_lo, BLOCK_KF)):
                codes = k_lo + t * BLOCK_KF + tl.arange(0, BLOCK_KF)
                code_ok = codes < k_hi
                acc = tl.zeros([BLOCK_R, BLOCK_KF], DTYPE)
                for j in range(D):
                    j64 = tl.cast(j, tl.int64)
                    xv = tl.load(x_ptr + rows * s_x_n + j64 * s_x_d, mask=full,
                                 other=0.0).to(DTYPE)
                    if COSINE:
                        xv = _div_rn(xv, xnorm, DTYPE)
                    ev = tl.load(e_ptr + codes.to(tl.int64) * s_e_k + j64 * s_e_d,
                                 mask=code_ok, other=0.0).to(DTYPE)
                    if COSINE:
                        acc = acc + xv[:, None] * ev[None, :]
                    else:
                        diff = xv[:, None] - ev[None, :]
                        acc = acc + diff * diff
                if COSINE:
                    acc = 1.0 - acc
                acc = tl.where(full[:, None] & code_ok[None, :] & (acc == acc), acc,
                               float("inf"))
                d = tl.min(acc, 1)
                k_min = tl.min(tl.where(acc == d[:, None], codes[None, :], K), 1).to(tl.int64)
                better = full & (d < best)
                best = tl.where(better, d, best)
                best_idx = tl.where(better, k_min, best_idx)
    # no distance below +inf (NaN in x, an overflow): code 0 and its distance, as the other
    # backends
    none = row_ok & ~(best < float("inf"))
    if tl.max(none.to(tl.int32), 0) > 0:
        zero = tl.zeros([BLOCK_R], tl.int64)
        d0 = _direct(x_ptr, s_x_n, s_x_d, e_ptr, s_e_k, s_e_d, rows, zero, none, xnorm, D,
                     COSINE, DTYPE)
        best = tl.where(none, d0, best)
        best_idx = tl.where(none, zero, best_idx)
    tl.store(idx_ptr + rows, best_idx, mask=row_ok)
    tl.store(dist_ptr + rows, best, mask=row_ok)


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
_TINY = {torch.float32: 2.0**-120, torch.float64: 2.0**-1016}


def _search_tiles(D: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_D, num_warps) of the search; BLOCK_K <= 64 (a row's candidates
    in one tile are the bits of an int64).

    On a GPU a float32 tl.dot with input_precision "ieee" runs on the FMA units, each thread
    holding its rows' and codes' operands for a whole BLOCK_D chunk in registers. ptxas -v
    (triton 3.9, sm_80 and sm_90, float32, N x D = 4096 x 64 contiguous and padded, 256 x 300,
    2^31 + 1 x 1; K = 16384): 32 x 64 x 8 with 4 warps takes 160-168 registers and does not
    spill; 64 x 64 x 16 took 168-202 and spilled 4-20 B, 64 x 64 x 8 220-254 and 12 B, 128-row
    tiles 40-60 B. Under the interpreter: large tiles (few programs)."""
    if interpreted(device):
        return 64, 64, min(max(16, triton.next_power_of_2(D)), 64), 4
    if dtype == torch.float64:
        return 32, 32, 16, 4
    return 32, 64, 8, 4


def _max_registers(device: torch.device, n: int) -> dict:
    """``maxnreg`` for a GPU compile: with it ptxas allocates up to n registers per thread; left
    to itself it aimed at higher occupancy and spilled 4-20 B (fp16 cosine search on sm_90 at
    128 registers, fp64 rescoring on sm_80 at 72)."""
    return {} if interpreted(device) else {"maxnreg": n}


def nearest_code_fwd(x: Tensor, codebook: Tensor, metric: str,
                     tiles_per_split: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``"triton"`` backend of ``nearest_code`` on canonical views: ``x (N, D)``,
    ``codebook (K, D)``, one floating dtype, any strides, one device.

    Returns ``(indices int64 (N,), distances (N,))``, distances in float32 (float64 for float64
    inputs): the squared Euclidean distance (``metric="l2"``) or ``1 - cos`` (``"cosine"``) to
    the nearest code, computed directly as in ``fastvae.ops.reference.nearest_code_fwd``,
    lowest index on ties (module docstring: the screen with ``tl.dot``, its margin, the exact
    rescoring). K = 0 gives index 0 and distance inf, D = 0 distance 0 ("l2") or 1 ("cosine").

    The codebook's tiles are split over programs so that a GPU is filled when N is small (one
    split under the interpreter); ``tiles_per_split`` forces the code tiles per split (tests).
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x (N, D) and codebook (K, D) must share D; got x {tuple(x.shape)} "
                         f"and codebook {tuple(codebook.shape)}")
    N, D = x.shape
    K = codebook.shape[0]
    device = x.device
    cdt = torch_compute_dtype(x.dtype)
    cosine = metric == "cosine"
    indices = torch.zeros(N, dtype=torch.int64, device=device)
    if N == 0 or K == 0 or D == 0:
        fill = float("inf") if K == 0 else (1.0 if cosine else 0.0)
        return indices, torch.full((N,), fill, dtype=cdt, device=device)
    distances = torch.empty(N, dtype=cdt, device=device)
    dtype = compute_dtype(x.dtype)
    interp = interpreted(device)

    def block_r(n: int) -> int:
        return min(triton.next_power_of_2(n), 1024) if interp else 128

    bm, bk, bd, warps = _search_tiles(D, device, cdt)
    n_code_tiles, n_d_chunks = triton.cdiv(K, bk), triton.cdiv(D, bd)
    # the screened codebook, zero-padded to whole tiles (unmasked, aligned loads)
    eb = torch.zeros((n_code_tiles * bk, n_d_chunks * bd), dtype=cdt, device=device)
    esq = torch.zeros(n_code_tiles * bk, dtype=cdt, device=device)
    xnorm = torch.empty(N if cosine else 1, dtype=cdt, device=device)
    center = (torch.zeros(1, dtype=cdt, device=device) if cosine
              else codebook.to(cdt).mean(0))
    n_row_blocks = triton.cdiv(N, bm)
    if tiles_per_split is None:
        n_split, tiles_per_split = split(n_row_blocks, n_code_tiles, device)
    else:
        if tiles_per_split < 1:
            raise ValueError(f"tiles_per_split must be >= 1, got {tiles_per_split}")
        n_split = triton.cdiv(n_code_tiles, tiles_per_split)
    cand = torch.empty((N, n_split, CAP), dtype=torch.int64, device=device)
    count = torch.empty((N, n_split), dtype=torch.int32, device=device)
    op = "fastvae::nearest_code"
    with on_device(x):
        launch(op, _prep_kernel, (triton.cdiv(K, block_r(K)),),
               codebook, *codebook.stride(), center, eb, eb.stride(0), esq, esq, K, D,
               NORMALIZE=cosine, WRITE_OUT=True, BLOCK_R=block_r(K), DTYPE=dtype,
               enable_fp_fusion=False)
        if cosine:
            launch(op, _prep_kernel, (triton.cdiv(N, block_r(N)),),
                   x, *x.stride(), center, eb, eb.stride(0), esq, xnorm, N, D,
                   NORMALIZE=True, WRITE_OUT=False, BLOCK_R=block_r(N), DTYPE=dtype,
                   enable_fp_fusion=False)
        launch(op, _search_kernel, (n_row_blocks, n_split),
               x, *x.stride(), center, xnorm, eb, esq, cand, count,
               N, K, D, eb.stride(0), n_code_tiles, n_d_chunks, n_split, tiles_per_split,
               COSINE=cosine, ONE_CHUNK=n_d_chunks == 1, CAP=CAP, U=_UNIT_ROUNDOFF[cdt],
               TINY=_TINY[cdt],
               BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, DTYPE=dtype, num_warps=warps,
               **_max_registers(device, 168))
        # "cosine" rescores against the normalized codebook eb (contiguous), "l2" against the
        # codebook itself.
        e_src = eb if cosine else codebook
        launch(op, _rescore_kernel, (triton.cdiv(N, block_r(N)),),
               x, *x.stride(), e_src, *e_src.stride(), xnorm, cand, count,
               indices, distances, N, K, D, n_split, tiles_per_split * bk,
               COSINE=cosine, CAP=CAP, BLOCK_R=block_r(N),
               BLOCK_KF=8 if cdt == torch.float64 else 16, DTYPE=dtype,
               num_warps=4, enable_fp_fusion=False, **_max_registers(device, 128))
    return indices, distances
