"""``torch.nn``-style loss modules over the fused ops, for code built around ``nn`` losses."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as F
from . import validation as check


def soft_min_logvar(logvar: Tensor | float, min_var: float) -> Tensor | float:
    """A log-variance bounded below by ``m = log(min_var)``, softly (the soft clip of σ-VAE,
    Rybkin et al. 2021): ``m + softplus(logvar - m) = log(exp(logvar) + min_var)``, i.e. the
    variance used is ``var + min_var`` (a noise floor), computed without overflow. Its gradient
    ``sigmoid(logvar - m)`` fades smoothly below the floor (a hard clamp would cut it, freezing
    a learned variance that crossed it). ``min_var = 0``: ``logvar`` unchanged."""
    if min_var <= 0:
        return logvar
    m = math.log(min_var)
    if isinstance(logvar, Tensor):
        return m + torch.nn.functional.softplus(logvar - m)
    x = logvar - m
    return m + (x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x)))


class _Loss(nn.Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check.reduction(reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class BernoulliNLLLoss(_Loss):
    """``loss(logits, target)``: ``fastvae.bernoulli_nll`` (sum over the event, then the
    reduction over the batch)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.bernoulli_nll(logits, target, reduction=self.reduction)


class GaussianNLLLoss(_Loss):
    """``loss(mean, target, *, logvar=None | var=None)``: ``fastvae.gaussian_nll``.

    The observation noise is given by keyword only, as a log-variance ``logvar=`` or a variance
    ``var=`` (the quantity ``torch.nn.GaussianNLLLoss`` takes as its third argument): a third
    positional argument is a TypeError, so a variance is never read as a log-variance. Without
    either, the module's own (``logvar=`` or ``var=`` at construction, else unit variance).
    ``min_var`` > 0 bounds the variance below, for learned variances: the variance used is
    ``var + min_var`` (``soft_min_logvar``; torch's ``eps`` clamps instead). Unlike torch's module
    the loss sums over the event (``fastvae.gaussian_nll``) and includes ``log(2 pi) / 2``.
    """

    def __init__(self, *, logvar: float | None = None, var: float | None = None,
                 min_var: float = 0.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if logvar is not None and var is not None:
            raise ValueError("give logvar or var, not both")
        if var is not None:
            var = check.number("var", var)
            if not 0 < var < math.inf:
                raise ValueError(f"var must be finite and > 0, got {var}")
            logvar = math.log(var)
        self.logvar = 0.0 if logvar is None else check.number("logvar", logvar)
        if not math.isfinite(self.logvar):
            raise ValueError(f"logvar must be finite, got {self.logvar}")
        self.min_var = check.number("min_var", min_var)
        if not 0 <= self.min_var < math.inf:
            raise ValueError(f"min_var must be finite and >= 0, got {min_var}")

    def forward(self, mean: Tensor, target: Tensor, *args: object,
                logvar: Tensor | float | None = None,
                var: Tensor | float | None = None) -> Tensor:
        if args:
            raise TypeError("GaussianNLLLoss takes the observation noise by keyword: "
                            "logvar=... (a log-variance) or var=... (a variance, the third "
                            "argument of torch.nn.GaussianNLLLoss)")
        if logvar is not None and var is not None:
            raise ValueError("give logvar or var, not both")
        if var is not None:
            lv: Tensor | float = self._log_var(mean, var)
        else:
            lv = self.logvar if logvar is None else logvar
        return F.gaussian_nll(mean, target, soft_min_logvar(lv, self.min_var),
                              reduction=self.reduction)

    @staticmethod
    def _log_var(mean: Tensor, var: Tensor | float) -> Tensor | float:
        """``log(var)``, after the checks of ``gaussian_nll``'s ``logvar`` made in the name the
        caller used, ``var`` (an error about ``log(var)`` would name ``logvar``)."""
        if not isinstance(var, Tensor):
            value = check.number("var", var)
            if not 0 < value < math.inf:
                raise ValueError(f"var must be finite and > 0, got {var}")
            return math.log(value)
        check.tensor("var", var)
        check.tensor("mean", mean)
        check.broadcast_parameter("var", var, "mean", mean)
        check.positive("var", var)
        return torch.log(var)

    def extra_repr(self) -> str:
        return (f"logvar={self.logvar}, min_var={self.min_var}, "
                f"reduction={self.reduction!r}")


class GaussianKLLoss(_Loss):
    """``loss(mu, logvar, prior_mu=None, prior_logvar=None)``: ``fastvae.gaussian_kl``."""

    def __init__(self, reduction: str = "mean", free_bits: float = 0.0) -> None:
        super().__init__(reduction)
        self.free_bits = check.free_bits(free_bits, reduction)

    def forward(self, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
                prior_logvar: Tensor | None = None) -> Tensor:
        return F.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=self.reduction,
                             free_bits=self.free_bits)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, free_bits={self.free_bits}"


class ContinuousBernoulliNLLLoss(_Loss):
    """``loss(logits, target)``: ``fastvae.continuous_bernoulli_nll`` (sum over the event, then
    the reduction over the batch)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.continuous_bernoulli_nll(logits, target, reduction=self.reduction)


__all__ = ["BernoulliNLLLoss", "ContinuousBernoulliNLLLoss", "GaussianKLLoss", "GaussianNLLLoss"]

