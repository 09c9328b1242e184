"""Gaussian negative log-likelihood: the per-element formulas, and the launchers made from them
(the kernels: ``kernels/_likelihood.py``).

Per element, with q = exp(-lv / 4) (its exponent clamped, see kernels/_common.py) and
u = (x - m) * exp(-lv / 2) * sqrt(1/2) = ((x - m) q) (q sqrt(1/2)), scaled before it is squared
(never exp(-lv) times a square, which overflows or gives 0 * inf for lv far below 0):
    nll = lv / 2 + log(2 pi) / 2 + u^2
    d/dm = -(x - m) * exp(-lv) = -(((x - m) q) q q) q = -d/dx,   d/dlv = 1/2 - u^2
``logvar`` is a tensor read through strides (scalar, per-feature or per-element, broadcast by
stride 0) or, when absent, the float ``lv_value``. Forward sums over the event: shape (B,).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import HALF_LOG_2PI, quarter_scale, scaled_full, scaled_half
from ._likelihood import likelihood_bwd, likelihood_fwd


@triton.jit
def _gaussian_value(m, x, lv, DTYPE: tl.constexpr):
    """The per-element value, lv the log-variance (loaded, or ``lv_value`` everywhere)."""
    u = scaled_half(x - m, quarter_scale(lv, DTYPE))
    return (0.5 * lv + HALF_LOG_2PI) + u * u


@triton.jit
def _gaussian_grads(g, m, x, lv, DTYPE: tl.constexpr):
    """g times the partials in (m, x, lv)."""
    q = quarter_scale(lv, DTYPE)
    d_x = g * scaled_full(x - m, q)
    u = scaled_half(x - m, q)
    return -d_x, d_x, g * (0.5 - u * u)


def _as_tensor_if_fp64(mean: Tensor, logvar: Tensor | None, logvar_value: float):
    """Triton passes Python floats as float32: a float64 call gets its logvar as a tensor."""
    if logvar is None and mean.dtype == torch.float64:
        return torch.full((), logvar_value, dtype=mean.dtype, device=mean.device).expand(mean.shape)
    return logvar


def gaussian_nll_fwd(mean: Tensor, target: Tensor, logvar: Tensor | None,
                     logvar_value: float) -> Tensor:
    """The per-sample sums (B,) over the event of (B, N) mean and target; the log-variance a
    (B, N) view or, when None, ``logvar_value`` everywhere."""
    return likelihood_fwd("fastvae::gaussian_nll", _gaussian_value, mean, target,
                          _as_tensor_if_fp64(mean, logvar, logvar_value), logvar_value)


def gaussian_nll_bwd(grad: Tensor, mean: Tensor, target: Tensor, logvar: Tensor | None,
                     logvar_value: float, needs: list[bool]) -> list[Tensor]:
    """The gradients in (mean, target, logvar) asked for in ``needs``, each (B, N) in the
    mean's dtype, from the (B,) gradient ``grad``."""
    return likelihood_bwd("fastvae::gaussian_nll_backward", _gaussian_grads, grad, mean, target,
                          _as_tensor_if_fp64(mean, logvar, logvar_value), logvar_value, needs)
