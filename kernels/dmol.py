"""Discretized mixture of logistics NLL (PixelCNN++): fused Triton kernels and launchers.

Views: ``params`` (B, P, S), ``x`` (B, C, S) with S pixels, any strides (the layout of dim 1 is
in ``fastvae/ops/reference.py``). One program owns ``BLOCK_S`` consecutive pixels of the
flattened (B, S) grid (so one image of few pixels, or many images of one pixel, fill a program
alike) and keeps the ``M x C`` terms of each pixel in registers as ``(BLOCK_M, BLOCK_S)`` tiles
(M and C are constexpr); it reads ``params`` and ``x`` once. The forward writes each pixel's
NLL (B x S values, 1 / P of the parameters' size), summed per sample by the launcher in a fixed
order (deterministic); the backward recomputes everything from ``params`` and ``x`` and writes
d params. The per-channel formulas and their derivatives are those
of ``reference._dmol_channel_terms``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    compute_dtype,
    expm1,
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


@triton.jit
def _log_sigmoid(u):
    return tl.where(u < 0.0, u, 0.0) - log1p_unit(tl.exp(-tl.abs(u)))


@triton.jit
def _sigmoid(u):
    e = tl.exp(-tl.abs(u))
    return tl.where(u >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh(u):
    e = tl.exp(-2.0 * tl.abs(u))
    t = -expm1(-2.0 * tl.abs(u)) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _sech2(u):
    e = tl.exp(-2.0 * tl.abs(u))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _channel(centered, log_s, xc, H: tl.constexpr, LOG_2H: tl.constexpr,
             LOG_HALF_BINS: tl.constexpr, GRADS: tl.constexpr):
    """log P(bin) of one channel for every mixture, and (GRADS) its derivatives by
    centered = x - mu' and by the log-scale."""
    inv_s = tl.exp(-log_s)
    a = inv_s * (centered + H)
    b = inv_s * (centered - H)
    m = inv_s * centered
    log_d = LOG_2H - log_s
    d = tl.exp(log_d)
    ratio = tl.where(d > 0.0, -expm1(-d) / tl.where(d > 0.0, d, 1.0), 1.0)
    ls_a = _log_sigmoid(a)
    ls_mb = _log_sigmoid(-b)
    log_delta = ls_a + ls_mb + log_d + tl.log(ratio)
    log_mid = _log_sigmoid(m) + _log_sigmoid(-m) - log_s - LOG_HALF_BINS
    low = xc < -1.0 + H
    high = xc > 1.0 - H
    use_delta = log_delta > LOG_MIN_BIN_PROB
    value = tl.where(low, ls_a, tl.where(high, ls_mb, tl.where(use_delta, log_delta, log_mid)))
    if GRADS:
        sig_ma = _sigmoid(-a)
        sig_b = _sigmoid(b)
        t_half = _tanh(0.5 * m)
        em = expm1(d)
        d_over = tl.where(d > 0.0, d / tl.where(d > 0.0, em, 1.0), 1.0)
        apb = a + b
        near = tl.abs(apb) < 1.0
        dc_delta = inv_s * tl.where(near, -sig_ma * _sigmoid(-b) * expm1(tl.where(near, apb, 0.0)),
                                    sig_ma - sig_b)
        ds_delta = -(a * sig_ma - b * sig_b + d_over)
        dc = tl.where(low, inv_s * sig_ma, tl.where(
            high, -inv_s * sig_b, tl.where(use_delta, dc_delta, -inv_s * t_half)))
        ds = tl.where(low, -a * sig_ma, tl.where(
            high, b * sig_b, tl.where(use_delta, ds_delta, m * t_half - 1.0)))
        return value, dc, ds
    else:
        return value, value, value


@triton.jit
def _load_param(p_ptr, j, k, pix, s_p_n, mask, DTYPE: tl.constexpr):
    """Rows j + k (a (BLOCK_M,) index) of params at the pixels of offsets ``pix``: a
    (BLOCK_M, BLOCK_S) tile."""
    return tl.load(p_ptr + (j + k)[:, None] * s_p_n + pix[None, :], mask=mask,
                   other=0.0).to(DTYPE)


@triton.jit
def _coupled(p_ptr, c, k, pix, s_p_n, mask, x0, x1, M: tl.constexpr, C: tl.constexpr,
             J: tl.constexpr, DTYPE: tl.constexpr):
    """mu' and the floored log-scale of channel c (a compile-time value), and the raw
    log-scale."""
    base = M + c * J * M
    mean = _load_param(p_ptr, base, k, pix, s_p_n, mask, DTYPE)
    raw_ls = _load_param(p_ptr, base + M, k, pix, s_p_n, mask, DTYPE)
    if C == 3:
        if c == 1:
            a0 = _load_param(p_ptr, 3 * M, k, pix, s_p_n, mask, DTYPE)
            mean = mean + _tanh(a0) * x0[None, :]
        if c == 2:
            a1 = _load_param(p_ptr, 6 * M, k, pix, s_p_n, mask, DTYPE)
            a2 = _load_param(p_ptr, 9 * M, k, pix, s_p_n, mask, DTYPE)
            mean = mean + _tanh(a1) * x0[None, :] + _tanh(a2) * x1[None, :]
    return mean, tl.maximum(raw_ls, LOG_SCALE_MIN), raw_ls


@triton.jit
def _dmol_kernel(
    p_ptr, x_ptr, nll_ptr, g_ptr, dp_ptr,
    B, S, s_p_b, s_p_n, s_p_s, s_x_b, s_x_c, s_x_s,
    H: tl.constexpr, LOG_2H: tl.constexpr, LOG_HALF_BINS: tl.constexpr,
    M: tl.constexpr, C: tl.constexpr, J: tl.constexpr, P: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, DTYPE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    imask = i < B * S
    b = i // S
    s = i % S
    k = tl.arange(0, BLOCK_M)
    mask = (k < M)[:, None] & imask[None, :]
    pix = b * s_p_b + s * s_p_s
    xpix = b * s_x_b + s * s_x_s
    x0 = tl.load(x_ptr + xpix, mask=imask, other=0.0).to(DTYPE)
    x1 = x0
    if C == 3:
        x1 = tl.load(x_ptr + s_x_c + xpix, mask=imask, other=0.0).to(DTYPE)
    logits = _load_param(p_ptr, 0, k, pix, s_p_n, mask, DTYPE)
    logits = tl.where(mask, logits, -float("inf"))
    lmax = tl.max(logits, 0)
    lmax = tl.where(imask, lmax, 0.0)
    log_norm = lmax + tl.log(tl.sum(tl.where(mask, tl.exp(logits - lmax[None, :]), 0.0), 0))
    log_norm = tl.where(imask, log_norm, 0.0)
    joint = logits - log_norm[None, :]
    for c in tl.static_range(C):
        xc = tl.load(x_ptr + c * s_x_c + xpix, mask=imask, other=0.0).to(DTYPE)
        mean, log_s, raw_ls = _coupled(p_ptr, c, k, pix, s_p_n, mask, x0, x1, M, C, J, DTYPE)
        value, _, _ = _channel(xc[None, :] - mean, log_s, xc[None, :], H, LOG_2H,
                               LOG_HALF_BINS, False)
        joint += value
    joint = tl.where(mask, joint, -float("inf"))
    jmax = tl.max(joint, 0)
    jmax_safe = tl.where(jmax == -float("inf"), 0.0, jmax)
    lse = jmax_safe + tl.log(tl.sum(tl.where(mask, tl.exp(joint - jmax_safe[None, :]), 0.0), 0))
    if not BACKWARD:
        tl.store(nll_ptr + i, -lse, mask=imask)
    else:
        g = tl.load(g_ptr + b, mask=imask, other=0.0).to(DTYPE)
        gr = g[None, :] * tl.exp(joint - lse[None, :])
        out_ty = dp_ptr.dtype.element_ty
        offs = k[:, None] * S + (b * (P * S) + s)[None, :]
        d_logits = g[None, :] * tl.exp(logits - log_norm[None, :]) - gr
        tl.store(dp_ptr + offs, d_logits.to(out_ty), mask=mask)
        for c in tl.static_range(C):
            xc = tl.load(x_ptr + c * s_x_c + xpix, mask=imask, other=0.0).to(DTYPE)
            mean, log_s, raw_ls = _coupled(p_ptr, c, k, pix, s_p_n, mask, x0, x1, M, C, J,
                                           DTYPE)
            _, dc, ds = _channel(xc[None, :] - mean, log_s, xc[None, :], H, LOG_2H,
                                 LOG_HALF_BINS, True)
            d_mean = gr * dc
            d_ls = tl.where(raw_ls >= LOG_SCALE_MIN, -gr * ds, 0.0)
            base = M + c * J * M
            tl.store(dp_ptr + base * S + offs, d_mean.to(out_ty), mask=mask)
            tl.store(dp_ptr + (base + M) * S + offs, d_ls.to(out_ty), mask=mask)
            if C == 3:
                if c == 1:
                    a0 = _load_param(p_ptr, 3 * M, k, pix, s_p_n, mask, DTYPE)
                    tl.store(dp_ptr + 3 * M * S + offs,
                             (d_mean * x0[None, :] * _sech2(a0)).to(out_ty), mask=mask)
                if c == 2:
                    a1 = _load_param(p_ptr, 6 * M, k, pix, s_p_n, mask, DTYPE)
                    a2 = _load_param(p_ptr, 9 * M, k, pix, s_p_n, mask, DTYPE)
                    tl.store(dp_ptr + 6 * M * S + offs,
                             (d_mean * x0[None, :] * _sech2(a1)).to(out_ty), mask=mask)
                    tl.store(dp_ptr + 9 * M * S + offs,
                             (d_mean * x1[None, :] * _sech2(a2)).to(out_ty), mask=mask)


def _launch(params: Tensor, x: Tensor, n_mixtures: int, n_bins: int, nll: Tensor,
            grad: Tensor | None, d_params: Tensor | None) -> None:
    B, P, S = params.shape
    C = x.shape[1]
    block_m = triton.next_power_of_2(n_mixtures)
    # Triton's interpreter pays per program: few, wide ones on CPU tensors.
    target = 16384 if interpreted(params.device) else 1024
    block_s = max(16, min(triton.next_power_of_2(B * S), target // block_m))
    h = 1.0 / (n_bins - 1)
    with on_device(params):
        launch("fastvae::discretized_mix_logistic_nll" + ("_backward" if grad is not None else ""),
               _dmol_kernel, (triton.cdiv(B * S, block_s),),
            params, x, nll, nll if grad is None else grad,
            params if d_params is None else d_params,
            B, S, *params.stride(), *x.stride(),
            H=h, LOG_2H=math.log(2.0 * h), LOG_HALF_BINS=math.log((n_bins - 1) / 2.0),
            M=n_mixtures, C=C, J=2 if C == 1 else 3, P=P, BACKWARD=d_params is not None,
            BLOCK_M=block_m, BLOCK_S=block_s, DTYPE=compute_dtype(params.dtype),
            num_warps=4 if block_m * block_s <= 1024 else 8,
        )


def discretized_mix_logistic_nll_fwd(params: Tensor, x: Tensor, n_mixtures: int,
                                     n_bins: int) -> Tensor:
    B, _, S = params.shape
    nll = torch.empty((B, S), dtype=torch_compute_dtype(params.dtype), device=params.device)
    _launch(params, x, n_mixtures, n_bins, nll, None, None)
    return nll.sum(1)


def discretized_mix_logistic_nll_bwd(grad: Tensor, params: Tensor, x: Tensor, n_mixtures: int,
                                     n_bins: int) -> Tensor:
    d_params = torch.empty(params.shape, dtype=params.dtype, device=params.device)
    grad = grad.to(torch_compute_dtype(params.dtype)).contiguous()
    _launch(params, x, n_mixtures, n_bins, grad, grad, d_params)
    return d_params
