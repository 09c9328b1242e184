"""Discretized mixture of logistics NLL (PixelCNN++): fused Triton kernels and launchers.

Views: ``params`` (B, P, S), ``x`` (B, C, S) with S pixels, any strides (the layout of dim 1 is
in ``fastvae/ops/reference.py``). One program owns ``BLOCK_S`` consecutive pixels of the
flattened (B, S) grid (so one image of few pixels, or many images of one pixel, fill a program
alike), one pixel per thread on a GPU, and loops over the M mixtures (M, C and the bin constants
are constexpr): each pass over the mixtures reads the pixel's parameters once and keeps only
running log-sum-exps (no M-wide tile: no padding of M to a power of two, a few dozen live values
per pixel). The forward makes one pass and writes each pixel's NLL (B x S values, 1 / P of the
parameters' size), summed per sample by the launcher in a fixed order (deterministic). The
backward saves nothing: a first pass gives the two log-sum-exps, a second recomputes each
mixture's terms with their derivatives (cheaper on a GPU than keeping M x C terms per pixel)
and writes d params. The per-channel formulas and their derivatives are those of
``reference._dmol_channel_terms``, with the exponentials shared (see ``_channel``).
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
    expm1_neg_small,
    interpreted,
    launch,
    log1p_unit,
    on_device,
    torch_compute_dtype,
)

# Every constant of the kernels is a tl.constexpr (or a literal operand of an arithmetic op),
# never a Python float kernel argument: the GPU compiler passes a float argument as float32, so
# a float64 kernel would compute with it rounded (h = 1/255 off by 6e-8 relative). A constexpr
# meets its float64 operand unrounded; the bin constants specialize the kernel per n_bins.
LOG_SCALE_MIN = tl.constexpr(-7.0)
LOG_MIN_BIN_PROB = tl.constexpr(math.log(1e-5))
# a, b, m = e^-s (x - mu' (+-h)) of a finite x - mu' bounded to +-(largest finite / 4) of the
# compute dtype (as reference._dmol_bound): beyond it they overflowed, and a component of zero
# responsibility gave 0 * inf = NaN in the gradient. An infinite x - mu' keeps them infinite.
ARG_BOUND_F32 = tl.constexpr(8.5070591730234616e37)
ARG_BOUND_F64 = tl.constexpr(4.4942328371557893e307)
INF = tl.constexpr(float("inf"))


@triton.jit
def _lse_step(mx, sm, v):
    """One more term v of an online log-sum-exp kept as (max, sum of e^(term - max)), with one
    exp: sm e^(mx - v) + 1 when v is the new max, sm + e^(v - mx) otherwise. A term of -inf adds
    nothing (also to an empty sum, where v - mx would be NaN); NaN propagates."""
    up = v > mx
    e = tl.exp(tl.where(up, mx - v, v - mx))
    e = tl.where(v == -float("inf"), 0.0, e)
    return tl.maximum(mx, v), tl.where(up, sm * e + 1.0, sm + e)


@triton.jit
def _tanh_e(u, DTYPE: tl.constexpr):
    """tanh(u) and e = e^(-2|u|), one exp: tanh|u| = -expm1(-2|u|) / (1 + e), the expm1 by its
    series below 1 and e - 1 beyond; sech^2(u) = 4 e / (1 + e)^2 from the same e."""
    au = 2.0 * tl.abs(u)
    e = tl.exp(-au)
    em = tl.where(au < 1.0, expm1_neg_small(tl.minimum(au, 1.0), DTYPE), e - 1.0)
    t = -em / (1.0 + e)
    return tl.where(u < 0.0, -t, t), e


@triton.jit
def _sech2(e):
    """sech^2(u) from e = e^(-2|u|) (no 1 - tanh^2 cancellation)."""
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _bound(u, centered, DTYPE: tl.constexpr):
    """``u`` clamped to +-(largest finite / 4) of DTYPE where ``centered`` is finite; NaN
    passes (comparisons are false)."""
    if DTYPE == tl.float64:  # noqa: SIM108, SIM300 (a constexpr branch, as in _common)
        big = ARG_BOUND_F64
    else:
        big = ARG_BOUND_F32
    clamped = tl.where(u > big, big, tl.where(u < -big, -big, u))
    return tl.where(tl.abs(centered) < INF, clamped, u)


@triton.jit
def _channel(xc, mean, raw_ls, H: tl.constexpr, LOG_2H: tl.constexpr,
             LOG_HALF_BINS: tl.constexpr, GRADS: tl.constexpr, DTYPE: tl.constexpr):
    """log P(bin) of one channel and mixture at pixel value ``xc`` (mean ``mean`` = mu', raw
    log-scale ``raw_ls``) and (GRADS) its derivatives by centered = x - mu' and by the floored
    log-scale s.

    Five exps and four logs, shared by the value and the derivatives: with t_u = e^-|u| for
    u = a, b, m, log sigmoid(u) = min(u, 0) - log1p(t_u), sigmoid(-a) = t_a / (1 + t_a) (a >= 0)
    or 1 / (1 + t_a), likewise sigmoid(+-b); log sigmoid(m) + log sigmoid(-m) = -|m| -
    2 log1p(t_m); tanh(|m| / 2) = -expm1(-|m|) / (1 + t_m); d = 2 h e^-s (no exp), expm1(-d) by
    its series below 1 and e^-d - 1 beyond, d / expm1(d) = e^-d / ratio with ratio =
    -expm1(-d) / d. expm1(a + b) is needed only for |a + b| < 1: its series, no exp."""
    log_s = tl.where(raw_ls < LOG_SCALE_MIN, LOG_SCALE_MIN, raw_ls)  # NaN passes
    inv_s = tl.exp(-log_s)
    centered = xc - mean
    a = _bound(inv_s * (centered + H), centered, DTYPE)
    b = _bound(inv_s * (centered - H), centered, DTYPE)
    m = _bound(inv_s * centered, centered, DTYPE)
    d = inv_s * (2.0 * H)
    t_a = tl.exp(-tl.abs(a))
    t_b = tl.exp(-tl.abs(b))
    t_m = tl.exp(-tl.abs(m))
    e_d = tl.exp(-d)
    ls_a = tl.minimum(a, 0.0) - log1p_unit(t_a)  # log sigmoid(a)
    ls_mb = tl.minimum(-b, 0.0) - log1p_unit(t_b)  # log sigmoid(-b)
    small_d = d < 1.0
    em_d = tl.where(small_d, expm1_neg_small(tl.minimum(d, 1.0), DTYPE), e_d - 1.0)
    ratio = tl.where(d > 0.0, -em_d / tl.where(d > 0.0, d, 1.0), 1.0)
    # log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(-expm1(-d)), the
    # last as log d + log(ratio), log d = log(2h) - s: finite where d underflows
    log_delta = ls_a + ls_mb + (LOG_2H - log_s) + tl.log(ratio)
    log_mid = -tl.abs(m) - 2.0 * log1p_unit(t_m) - log_s - LOG_HALF_BINS
    low = xc < -1.0 + H
    high = xc > 1.0 - H
    use_delta = log_delta > LOG_MIN_BIN_PROB
    value = tl.where(low, ls_a, tl.where(high, ls_mb, tl.where(use_delta, log_delta, log_mid)))
    if GRADS:
        q_a = 1.0 / (1.0 + t_a)
        q_b = 1.0 / (1.0 + t_b)
        sig_ma = tl.where(a >= 0.0, t_a * q_a, q_a)  # sigmoid(-a)
        sig_b = tl.where(b >= 0.0, q_b, t_b * q_b)  # sigmoid(b)
        sig_mb = tl.where(b >= 0.0, t_b * q_b, q_b)  # sigmoid(-b)
        am = tl.abs(m)
        em_m = tl.where(am < 1.0, expm1_neg_small(tl.minimum(am, 1.0), DTYPE), t_m - 1.0)
        th = -em_m / (1.0 + t_m)
        t_half = tl.where(m < 0.0, -th, th)  # tanh(m / 2)
        d_over = tl.where(small_d, 1.0 + em_d, e_d) / ratio  # d / expm1(d)
        # sigmoid(-a) - sigmoid(b) cancels only near a + b = 0: there -sigmoid(-a)
        # sigmoid(-b) expm1(a + b) (series), elsewhere directly (the terms differ by >= 1.6x)
        apb = a + b
        near = tl.abs(apb) < 1.0
        em_apb = expm1_neg_small(-tl.where(near, apb, 0.0), DTYPE)  # expm1(a + b)
        dc_delta = inv_s * tl.where(near, -sig_ma * sig_mb * em_apb, sig_ma - sig_b)
        ds_delta = -(a * sig_ma - b * sig_b + d_over)
        dc = tl.where(low, inv_s * sig_ma, tl.where(
            high, -inv_s * sig_b, tl.where(use_delta, dc_delta, -inv_s * t_half)))
        ds = tl.where(low, -a * sig_ma, tl.where(
            high, b * sig_b, tl.where(use_delta, ds_delta, m * t_half - 1.0)))
        return value, dc, ds
    else:
        return value, value, value


@triton.jit
def _row(p_ptr, r, s_n, pix, imask, DTYPE: tl.constexpr):
    """Row r of params (channel index on dim 1) at the pixels ``pix``, in the compute dtype."""
    return tl.load(p_ptr + r * s_n + pix, mask=imask, other=0.0).to(DTYPE)


@triton.jit
def _pixels(x_ptr, B, S, s_p_b, s_p_s, s_x_b, s_x_c, s_x_s, C: tl.constexpr,
            BLOCK_S: tl.constexpr, DTYPE: tl.constexpr):
    """This program's pixels: flat index i, sample b, pixel s, mask, params offset, x values
    (x1 = x2 = x0 for C = 1)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    imask = i < B * S
    b = i // S
    s = i % S
    xpix = b * s_x_b + s * s_x_s
    x0 = tl.load(x_ptr + xpix, mask=imask, other=0.0).to(DTYPE)
    x1 = x0
    x2 = x0
    if C == 3:
        x1 = tl.load(x_ptr + s_x_c + xpix, mask=imask, other=0.0).to(DTYPE)
        x2 = tl.load(x_ptr + s_x_c + (s_x_c + xpix), mask=imask, other=0.0).to(DTYPE)
    return i, b, s, imask, b * s_p_b + s * s_p_s, x0, x1, x2


@triton.jit
def _log_sums(p_ptr, s_n, pix, imask, x0, x1, x2, H: tl.constexpr, LOG_2H: tl.constexpr,
              LOG_HALF_BINS: tl.constexpr, M: tl.constexpr, C: tl.constexpr,
              BLOCK_S: tl.constexpr, DTYPE: tl.constexpr):
    """log sum_k e^(logit_k) and log sum_k e^(logit_k + sum_c L_ck) of every pixel: one pass
    over the mixtures, online log-sum-exps. Rows of params for mixture k: the logit k; channel
    c's mean, log-scale (and, C = 3, coefficient) (3c + 1) M + k, (3c + 2) M + k, (3c + 3) M + k
    (C = 1: M + k, 2M + k)."""
    l_max = tl.full([BLOCK_S], -float("inf"), DTYPE)
    l_sum = tl.zeros([BLOCK_S], DTYPE)
    j_max = tl.full([BLOCK_S], -float("inf"), DTYPE)
    j_sum = tl.zeros([BLOCK_S], DTYPE)
    for k in range(M):
        logit = _row(p_ptr, k, s_n, pix, imask, DTYPE)
        v, _, _ = _channel(x0, _row(p_ptr, M + k, s_n, pix, imask, DTYPE),
                           _row(p_ptr, 2 * M + k, s_n, pix, imask, DTYPE),
                           H, LOG_2H, LOG_HALF_BINS, False, DTYPE)
        if C == 3:
            t0, _ = _tanh_e(_row(p_ptr, 3 * M + k, s_n, pix, imask, DTYPE), DTYPE)
            v1, _, _ = _channel(x1, _row(p_ptr, 4 * M + k, s_n, pix, imask, DTYPE) + t0 * x0,
                                _row(p_ptr, 5 * M + k, s_n, pix, imask, DTYPE),
                                H, LOG_2H, LOG_HALF_BINS, False, DTYPE)
            t1, _ = _tanh_e(_row(p_ptr, 6 * M + k, s_n, pix, imask, DTYPE), DTYPE)
            t2, _ = _tanh_e(_row(p_ptr, 9 * M + k, s_n, pix, imask, DTYPE), DTYPE)
            mean2 = _row(p_ptr, 7 * M + k, s_n, pix, imask, DTYPE) + t1 * x0 + t2 * x1
            v2, _, _ = _channel(x2, mean2, _row(p_ptr, 8 * M + k, s_n, pix, imask, DTYPE),
                                H, LOG_2H, LOG_HALF_BINS, False, DTYPE)
            v = v + v1 + v2
        l_max, l_sum = _lse_step(l_max, l_sum, logit)
        j_max, j_sum = _lse_step(j_max, j_sum, logit + v)
    return l_max + tl.log(l_sum), j_max + tl.log(j_sum)


@triton.jit
def _dmol_fwd_kernel(
    p_ptr, x_ptr, nll_ptr, B, S, s_p_b, s_p_n, s_p_s, s_x_b, s_x_c, s_x_s,
    H: tl.constexpr, LOG_2H: tl.constexpr, LOG_HALF_BINS: tl.constexpr,
    M: tl.constexpr, C: tl.constexpr, BLOCK_S: tl.constexpr, DTYPE: tl.constexpr,
):
    i, _b, _s, imask, pix, x0, x1, x2 = _pixels(x_ptr, B, S, s_p_b, s_p_s, s_x_b, s_x_c,
                                                s_x_s, C, BLOCK_S, DTYPE)
    log_norm, lse = _log_sums(p_ptr, tl.cast(s_p_n, tl.int64), pix, imask, x0, x1, x2, H,
                              LOG_2H, LOG_HALF_BINS, M, C, BLOCK_S, DTYPE)
    tl.store(nll_ptr + i, log_norm - lse, mask=imask)


@triton.jit
def _dmol_bwd_kernel(
    p_ptr, x_ptr, g_ptr, dp_ptr, B, S, s_p_b, s_p_n, s_p_s, s_x_b, s_x_c, s_x_s,
    H: tl.constexpr, LOG_2H: tl.constexpr, LOG_HALF_BINS: tl.constexpr,
    M: tl.constexpr, C: tl.constexpr, P: tl.constexpr, BLOCK_S: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """d params (B, P, S) contiguous: with r_k = e^(logit_k + sum_c L_ck - lse), d logit_k =
    g (softmax_k - r_k), d mu_ck = g r_k dL/dc, d raw log-scale = -g r_k dL/ds above the floor,
    d coefficient = d mu of the coupled channel times x of the coupling one times sech^2."""
    _i, b, s, imask, pix, x0, x1, x2 = _pixels(x_ptr, B, S, s_p_b, s_p_s, s_x_b, s_x_c, s_x_s,
                                               C, BLOCK_S, DTYPE)
    s_n = tl.cast(s_p_n, tl.int64)
    log_norm, lse = _log_sums(p_ptr, s_n, pix, imask, x0, x1, x2, H, LOG_2H, LOG_HALF_BINS,
                              M, C, BLOCK_S, DTYPE)
    g = tl.load(g_ptr + b, mask=imask, other=0.0).to(DTYPE)
    out_ty = dp_ptr.dtype.element_ty
    S64 = tl.cast(S, tl.int64)
    out = dp_ptr + (b * P * S64 + s)
    for k in range(M):
        logit = _row(p_ptr, k, s_n, pix, imask, DTYPE)
        ls0 = _row(p_ptr, M + M + k, s_n, pix, imask, DTYPE)
        v, dc0, ds0 = _channel(x0, _row(p_ptr, M + k, s_n, pix, imask, DTYPE), ls0,
                               H, LOG_2H, LOG_HALF_BINS, True, DTYPE)
        if C == 3:
            t0, e0 = _tanh_e(_row(p_ptr, 3 * M + k, s_n, pix, imask, DTYPE), DTYPE)
            ls1 = _row(p_ptr, 5 * M + k, s_n, pix, imask, DTYPE)
            v1, dc1, ds1 = _channel(x1, _row(p_ptr, 4 * M + k, s_n, pix, imask, DTYPE) + t0 * x0,
                                    ls1, H, LOG_2H, LOG_HALF_BINS, True, DTYPE)
            t1, e1 = _tanh_e(_row(p_ptr, 6 * M + k, s_n, pix, imask, DTYPE), DTYPE)
            t2, e2 = _tanh_e(_row(p_ptr, 9 * M + k, s_n, pix, imask, DTYPE), DTYPE)
            ls2 = _row(p_ptr, 8 * M + k, s_n, pix, imask, DTYPE)
            mean2 = _row(p_ptr, 7 * M + k, s_n, pix, imask, DTYPE) + t1 * x0 + t2 * x1
            v2, dc2, ds2 = _channel(x2, mean2, ls2, H, LOG_2H, LOG_HALF_BINS, True, DTYPE)
            v = v + v1 + v2
        gr = g * tl.exp(logit + v - lse)
        tl.store(out + k * S64, cast_rn(g * tl.exp(logit - log_norm) - gr, out_ty), mask=imask)
        tl.store(out + (M + k) * S64, cast_rn(gr * dc0, out_ty), mask=imask)
        tl.store(out + (2 * M + k) * S64,
                 cast_rn(tl.where(ls0 >= LOG_SCALE_MIN, -gr * ds0, 0.0), out_ty), mask=imask)
        if C == 3:
            d_mean1 = gr * dc1
            d_mean2 = gr * dc2
            tl.store(out + (3 * M + k) * S64, cast_rn(d_mean1 * x0 * _sech2(e0), out_ty),
                     mask=imask)
            tl.store(out + (4 * M + k) * S64, cast_rn(d_mean1, out_ty), mask=imask)
            tl.store(out + (5 * M + k) * S64,
                     cast_rn(tl.where(ls1 >= LOG_SCALE_MIN, -gr * ds1, 0.0), out_ty), mask=imask)
            tl.store(out + (6 * M + k) * S64, cast_rn(d_mean2 * x0 * _sech2(e1), out_ty),
                     mask=imask)
            tl.store(out + (7 * M + k) * S64, cast_rn(d_mean2, out_ty), mask=imask)
            tl.store(out + (8 * M + k) * S64,
                     cast_rn(tl.where(ls2 >= LOG_SCALE_MIN, -gr * ds2, 0.0), out_ty), mask=imask)
            tl.store(out + (9 * M + k) * S64, cast_rn(d_mean2 * x1 * _sech2(e2), out_ty),
                     mask=imask)


# Pixels per program on a GPU: one per thread, 4 warps. Under Triton's interpreter (CPU
# tensors) a program costs ~2 ms whatever its size: few, wide ones.
_BLOCK_S_GPU = 128
_WARPS_GPU = 4
_BLOCK_S_INTERPRETER = 16384


def _launch(params: Tensor, x: Tensor, n_mixtures: int, n_bins: int, out: Tensor,
            grad: Tensor | None) -> None:
    """The forward (``grad`` None: per-pixel NLL into ``out`` (B, S)) or the backward (d params
    into ``out`` (B, P, S))."""
    B, P, S = params.shape
    C = x.shape[1]
    target = _BLOCK_S_INTERPRETER if interpreted(params.device) else _BLOCK_S_GPU
    block_s = max(16, min(triton.next_power_of_2(B * S), target))
    h = 1.0 / (n_bins - 1)
    meta = dict(H=h, LOG_2H=math.log(2.0 * h), LOG_HALF_BINS=math.log((n_bins - 1) / 2.0),
                M=n_mixtures, C=C, BLOCK_S=block_s,
                DTYPE=compute_dtype(params.dtype), num_warps=_WARPS_GPU)
    grid = (triton.cdiv(B * S, block_s),)
    with on_device(params):
        if grad is None:
            launch("fastvae::discretized_mix_logistic_nll", _dmol_fwd_kernel, grid,
                   params, x, out, B, S, *params.stride(), *x.stride(), **meta)
        else:
            launch("fastvae::discretized_mix_logistic_nll_backward", _dmol_bwd_kernel, grid,
                   params, x, grad, out, B, S, *params.stride(), *x.stride(), P=P, **meta)


def discretized_mix_logistic_nll_fwd(params: Tensor, x: Tensor, n_mixtures: int,
                                     n_bins: int) -> Tensor:
    B, _, S = params.shape
    nll = torch.empty((B, S), dtype=torch_compute_dtype(params.dtype), device=params.device)
    _launch(params, x, n_mixtures, n_bins, nll, None)
    return nll.sum(1)


def discretized_mix_logistic_nll_bwd(grad: Tensor, params: Tensor, x: Tensor, n_mixtures: int,
                                     n_bins: int) -> Tensor:
    d_params = torch.empty(params.shape, dtype=params.dtype, device=params.device)
    grad = grad.to(torch_compute_dtype(params.dtype)).contiguous()
    _launch(params, x, n_mixtures, n_bins, d_params, grad)
    return d_params
