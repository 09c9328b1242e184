"""``torch.nn``-style loss modules over the fused ops, for code built around ``nn`` losses."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional as F
from . import validation as check


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
    """``loss(mean, target, logvar=None)``: ``fastvae.gaussian_nll``. ``logvar`` defaults to the
    module's ``logvar`` (a float given at construction, 0.0 unless said)."""

    def __init__(self, logvar: float = 0.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.logvar = check.number("logvar", logvar)

    def forward(self, mean: Tensor, target: Tensor,
                logvar: Tensor | float | None = None) -> Tensor:
        lv = self.logvar if logvar is None else logvar
        return F.gaussian_nll(mean, target, lv, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"logvar={self.logvar}, reduction={self.reduction!r}"


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


__all__ = ["BernoulliNLLLoss", "GaussianKLLoss", "GaussianNLLLoss", "ContinuousBernoulliNLLLoss"]

