"""Diagonal-Gaussian distribution objects over the fused ops, for code written around them.

* ``DiagonalGaussianDistribution``: the posterior class of latent-diffusion and diffusers (same
  constructor, attributes and methods), so that an autoencoder written for it swaps one import;
* ``DiagonalNormal``: a ``torch.distributions.Distribution`` (mean and log-variance), the
  one-line replacement of ``Independent(Normal(loc, scale), k)``, with ``kl_divergence``
  registered.

They sit in the op layer beside the ``torch.nn`` loss modules (``losses.py``): thin objects that
hold parameters and call the public functions, with no model logic, importing nothing above the
ops.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, constraints
from torch.distributions.kl import register_kl

from . import functional as F
from . import validation as check
from .reference import gaussian_nll_elementwise

__all__ = ["DiagonalGaussianDistribution", "DiagonalNormal"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _in_layout_of(z: Tensor, like: Tensor) -> Tensor:
    """``z`` (``like``'s shape) laid out in memory as torch's elementwise ops lay out a result
    computed from ``like``: dimensions ordered by ``like``'s strides, outermost first (a
    channels-last ``like`` gives a channels-last result). A copy only where the order differs
    from ``z``'s."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # stable: ties in order
    order = [d for d in order if like.shape[d] != 1] + [d for d in order if like.shape[d] == 1]
    if all(z.shape[d] == 1 for d in range(z.dim())) or order == sorted(order) \
            or z.permute(order).is_contiguous():
        return z
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return z.permute(order).contiguous().permute(inverse)


class DiagonalGaussianDistribution:
    """The diagonal-Gaussian posterior of latent-diffusion / diffusers autoencoders, on the
    fused ops: ``posterior = DiagonalGaussianDistribution(moments)``.

    ``parameters``: the encoder's moments ``(B, 2C, *spatial)`` (any float dtype and layout,
    channels_last included), split with ``torch.chunk(parameters, 2, dim=1)`` into ``mean`` and
    ``logvar``; ``logvar`` is clamped to [-30, 20] with ``torch.clamp`` (its gradient is zero
    outside, as theirs), ``std = exp(logvar / 2)``, ``var = exp(logvar)``.
    ``deterministic=True``: ``std = var = 0`` (zeros like ``mean``), ``sample()`` returns the
    mean, ``kl()`` and ``nll()`` return zeros. The formulas (Rombach et al. 2022, the
    ``ldm.modules.distributions`` and ``diffusers`` classes of this name):

        sample()         = mean + std * eps,  eps ~ N(0, I)
        mode()           = mean
        kl()             = 0.5 * sum(mean^2 + var - 1 - logvar)                     (B,)
        kl(other)        = 0.5 * sum((mean - o.mean)^2 / o.var + var / o.var - 1
                                     - logvar + o.logvar)                          (B,)
        nll(x, dims)     = 0.5 * sum_dims(log(2 pi) + logvar + (x - mean)^2 / var)

    The sums run over every non-batch dimension (theirs over ``[1, 2, 3]``: the same for the
    usual 4-d moments). Computed by ``fastvae.gaussian_kl`` (the expm1 form, ``other`` as the
    prior), ``fastvae.reparameterize`` and ``fastvae.gaussian_nll`` (``dims`` covering every
    non-batch dimension; any other ``dims`` sum the same per-element formula with torch):
    equal to their formulas to float rounding, more exact where theirs cancel (a KL of
    ``logvar`` near 0). Returned losses are float32 for float16/bfloat16 moments (float64 for
    float64), as every fastvae loss; samples have the moments' dtype.

    **Noise.** ``sample`` draws Philox normals (regenerated in backward, never stored), not
    ``torch.randn``: the same seed gives other numbers than theirs, with the same distribution.
    Its key is drawn from ``generator`` (or torch's default generator), so ``generator`` and
    ``torch.manual_seed`` make it reproducible; a CPU generator serves CUDA moments too (as in
    diffusers), its draw moved to the device. To use given noise, e.g. to reproduce their
    samples: ``posterior.sample(eps=torch.randn(shape, generator=g).to(mean))``, ``shape``
    and ``mean`` the posterior's ``mean.shape`` and ``mean``.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        if not isinstance(parameters, Tensor) or parameters.dim() < 2:
            raise ValueError("parameters must be a moments tensor (B, 2C, *spatial), got "
                             + (f"shape {tuple(parameters.shape)}"
                                if isinstance(parameters, Tensor) else type(parameters).__name__))
        if parameters.shape[1] % 2:
            raise ValueError(f"parameters of shape {tuple(parameters.shape)}: dim 1 holds mean "
                             "and log-variance and must have an even size")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = bool(deterministic)

    # std and var: computed on first access (the methods below never need them), then cached
    # as attributes, which code may read or assign as in the original class.
    @functools.cached_property
    def std(self) -> Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @functools.cached_property
    def var(self) -> Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, *,
               eps: Tensor | None = None) -> Tensor:
        """``mean + std * eps`` (``mean``'s shape, dtype and memory layout: channels-last
        moments give a channels-last sample, as ``mean + std * torch.randn_like(mean)``),
        differentiable in the moments. ``eps`` given: used as is (``mean``'s shape and dtype);
        else Philox normals keyed by a draw from ``generator`` (element i of the sample gets
        normal i in ``mean``'s logical order, whatever the layout). Deterministic: ``mean``."""
        if self.deterministic:
            return self.mean + 0.0 if eps is None else self.mean + 0.0 * eps
        if eps is not None:
            if generator is not None:
                raise ValueError("eps is given: generator must be None")
            z = F.reparameterize(self.mean, self.logvar, eps=eps)
        elif generator is not None and generator.device.type != self.mean.device.type:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator)
            z = F.reparameterize(self.mean, self.logvar, seed=seed.to(self.mean.device))
        else:
            z = F.reparameterize(self.mean, self.logvar, generator=generator)
        return _in_layout_of(z, self.mean)

    def mode(self) -> Tensor:
        return self.mean

    def _zeros(self) -> Tensor:
        return self.mean.new_zeros(self.mean.shape[:1], dtype=_loss_dtype(self.mean.dtype))

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """``KL(self || other)`` per sample, ``(B,)``; ``other`` None: the standard normal.
        ``other``: any object with ``mean`` and ``logvar`` broadcastable to this ``mean`` (a
        deterministic ``other`` has no density: ValueError)."""
        if self.deterministic:
            return self._zeros()
        if other is None:
            return F.gaussian_kl(self.mean, self.logvar, reduction="none")
        if getattr(other, "deterministic", False):
            raise ValueError("kl(other): other is deterministic (zero variance); the KL "
                             "divergence to it is infinite")
        for name in ("mean", "logvar"):  # checked here, in the caller's names
            if not hasattr(other, name):
                raise TypeError(f"kl(other): other must have mean and logvar tensors, got "
                                f"{type(other).__name__}")
            check.tensor(f"other.{name}", getattr(other, name))
            check.broadcast_parameter(f"other.{name}", getattr(other, name), "mean", self.mean)
        return F.gaussian_kl(self.mean, self.logvar, other.mean, other.logvar, reduction="none")

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """``-log N(sample | mean, var)`` summed over ``dims``. ``sample``: ``mean``'s shape
        (any float dtype). ``dims`` covering every non-batch dimension (the default for 4-d
        moments): the fused ``gaussian_nll``, shape ``(B,)``; else the same formula summed over
        ``dims`` in float32 (float64)."""
        if self.deterministic:
            return self._zeros()
        check.tensor("sample", sample)
        check.same_device("sample", sample, "mean", self.mean)
        _check_broadcast("sample", sample, "mean", self.mean)
        ndim = self.mean.dim()
        try:
            reduced = sorted({d % ndim for d in dims})
        except TypeError:
            raise TypeError(f"dims must be a sequence of ints, got {dims!r}") from None
        if reduced == list(range(1, ndim)) and tuple(sample.shape) == tuple(self.mean.shape):
            return F.gaussian_nll(self.mean, sample, self.logvar, reduction="none")
        dtype = _loss_dtype(torch.promote_types(self.mean.dtype, sample.dtype))
        terms = gaussian_nll_elementwise(self.mean.to(dtype), sample.to(dtype),
                                         self.logvar.to(dtype))
        return terms.sum(dim=list(dims))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean: {tuple(self.mean.shape)}, "
                f"deterministic={self.deterministic})")


# ---------------------------------------------------------------------------------------------
# torch.distributions
# ---------------------------------------------------------------------------------------------


def _compact(t: Tensor) -> Tensor:
    """``t`` with each broadcast (stride-0) dimension narrowed to size 1: a view that still
    broadcasts to ``t``'s shape, so that a prior such as ``Normal(0., 1.).expand(shape)`` costs
    one element, not one per batch element."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(t.shape, t.stride(), strict=True))
    return t[index] if any(i != slice(None) for i in index) else t


def _as_rows(t: Tensor, batch_shape: torch.Size, event_shape: torch.Size) -> Tensor:
    """``t`` (broadcastable to ``batch_shape + event_shape``) as ``(M, *event_shape)`` with the
    batch dimensions flattened; a ``t`` constant over the batch stays one event, broadcast."""
    full = batch_shape + event_shape
    t = t.reshape((1,) * (len(full) - t.dim()) + tuple(t.shape))
    if all(s == 1 for s in t.shape[:len(batch_shape)]):
        return t.reshape(t.shape[len(batch_shape):]).expand(event_shape).unsqueeze(0)
    return t.expand(full).reshape(-1, *event_shape)


class DiagonalNormal(Distribution):
    """A Gaussian with diagonal covariance, parameterized by mean ``loc`` and log-variance
    ``logvar``: ``Independent(Normal(loc, exp(logvar / 2)), event_dims)``, on the fused ops.

    ``loc``, ``logvar``: tensors (or numbers) that broadcast together; the last ``event_dims``
    dimensions of their shape form the event (1, the default, for a ``(B, D)`` latent; 3 for
    ``(B, C, H, W)``), the rest the batch: ``event_dims`` is ``Independent``'s
    ``reinterpreted_batch_ndims``. ``validate_args``: as every torch distribution (None: torch's
    default, ``Distribution.set_default_validate_args``); checks ``loc`` and ``logvar`` real and
    samples given to ``log_prob`` real, of a broadcastable shape.

    Code written against ``Independent(Normal(mu, std), k)`` switches with one line,
    ``DiagonalNormal(mu, logvar, k)``, and keeps ``rsample``, ``sample``, ``log_prob``,
    ``entropy``, ``mean``, ``mode``, ``stddev``, ``variance`` and
    ``torch.distributions.kl_divergence`` (registered against ``DiagonalNormal``,
    ``Independent(Normal)`` of the same event, and ``Normal`` when ``event_dims == 0``).
    ``rsample`` runs ``fastvae.reparameterize`` (Philox noise keyed by a draw from torch's
    generator, not ``torch.randn``: pass ``eps=`` for given noise), ``log_prob`` and
    ``entropy`` ``fastvae.gaussian_nll``, the KL ``fastvae.gaussian_kl``. Log-densities and KLs
    of float16/bfloat16 parameters are float32 (float64 for float64), as every fastvae loss.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real, "logvar": constraints.real}
    has_rsample = True

    def __init__(self, loc: Tensor | float, logvar: Tensor | float, event_dims: int = 1,
                 validate_args: bool | None = None) -> None:
        event_dims = check.integer("event_dims", event_dims, 0)
        for name, t in (("loc", loc), ("logvar", logvar)):
            if isinstance(t, Tensor):
                check.tensor(name, t)
        if isinstance(loc, Tensor) and isinstance(logvar, Tensor):
            check.same_device("logvar", logvar, "loc", loc)
        _check_broadcast("loc", loc, "logvar", logvar)
        self.loc, self.logvar = torch.distributions.utils.broadcast_all(loc, logvar)
        shape = self.loc.shape
        if event_dims > len(shape):
            raise ValueError(f"event_dims={event_dims} exceeds the {len(shape)} dimensions of "
                             f"the parameters' shape {tuple(shape)}")
        self.event_dims = event_dims
        split = len(shape) - event_dims
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self.event_dims)

    def expand(self, batch_shape: Sequence[int], _instance: DiagonalNormal | None = None):
        new = self._get_checked_instance(DiagonalNormal, _instance)
        shape = torch.Size(batch_shape) + self.event_shape
        new.loc = self.loc.expand(shape)
        new.logvar = self.logvar.expand(shape)
        new.event_dims = self.event_dims
        Distribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    # -- moments ---------------------------------------------------------------------------

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def stddev(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def variance(self) -> Tensor:
        return torch.exp(self.logvar)

    # -- the fused ops ---------------------------------------------------------------------

    def _rows(self, t: Tensor) -> Tensor:
        return _as_rows(t, self.batch_shape, self.event_shape)

    def rsample(self, sample_shape: Sequence[int] = torch.Size(), *,
                eps: Tensor | None = None) -> Tensor:
        """Reparameterized samples, ``sample_shape + batch_shape + event_shape``:
        ``loc + exp(logvar / 2) * eps``, in the common dtype of ``loc`` and ``logvar`` (as
        torch's ``Normal``: a bfloat16 ``loc`` with a float32 log-variance samples in float32);
        ``eps`` (that shape and dtype) given: used as is, else Philox normals."""
        sample_shape = torch.Size(sample_shape)
        shape = self._extended_shape(sample_shape)
        # Every batch element draws its own noise: the parameters as (M, *event), M the batch.
        dtype = torch.promote_types(self.loc.dtype, self.logvar.dtype)
        mu = self.loc.reshape(-1, *self.event_shape).to(dtype)
        lv = self.logvar.reshape(-1, *self.event_shape).to(dtype)
        K = math.prod(sample_shape)
        if eps is not None:
            if tuple(eps.shape) != tuple(shape):
                raise ValueError(f"eps has shape {tuple(eps.shape)}; expected {tuple(shape)}")
            eps = eps.reshape(K, *mu.shape)
        return F.reparameterize(mu, lv, eps=eps, n_samples=K).reshape(shape)

    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log N(value | loc, exp(logvar))`` summed over the event: shape
        ``broadcast(value.shape, batch_shape + event_shape)[:-event_dims]``."""
        check.tensor("value", value)
        check.same_device("value", value, "loc", self.loc)
        if self._validate_args:
            self._validate_sample(value)
        _check_broadcast("value", value, "the distribution (batch_shape + event_shape)",
                         self.loc)
        shape = torch.broadcast_shapes(value.shape, self.loc.shape)
        outer = shape[:len(shape) - self.event_dims]
        x = value.expand(shape).reshape(-1, *self.event_shape)
        mu = _as_rows(self.loc, outer, self.event_shape).expand(x.shape)
        lv = _as_rows(self.logvar, outer, self.event_shape)
        nll = F.gaussian_nll(mu, x, lv, reduction="none")
        return -nll.reshape(outer)

    def entropy(self) -> Tensor:
        """``0.5 * sum(1 + log(2 pi) + logvar)`` over the event, ``batch_shape``: the Gaussian
        NLL of the mean at itself, plus ``N / 2``."""
        lv = self._rows(self.logvar)
        at = lv.detach()  # any mean, observed at itself: the residual is exactly 0
        h = F.gaussian_nll(at, at, lv, reduction="none") + 0.5 * math.prod(self.event_shape)
        return h.expand(math.prod(self.batch_shape)).reshape(self.batch_shape)


def _check_broadcast(name: str, a: Tensor | float, other: str, b: Tensor | float) -> None:
    """ValueError naming both shapes where ``a`` and ``b`` do not broadcast (torch raises a
    RuntimeError from deep inside)."""
    shape_a, shape_b = (tuple(t.shape) if isinstance(t, Tensor) else () for t in (a, b))
    try:
        torch.broadcast_shapes(shape_a, shape_b)
    except RuntimeError:
        raise ValueError(f"{name} of shape {shape_a} does not broadcast with {other} of shape "
                         f"{shape_b}") from None


def _kl_rows(p_loc: Tensor, p_logvar: Tensor, q_loc: Tensor, q_logvar: Tensor,
             event_shape: torch.Size) -> Tensor:
    """``KL(N(p) || N(q))`` summed over the event, over the broadcast batch."""
    _check_broadcast("KL divergence: p (batch_shape + event_shape)", p_loc, "q", q_loc)
    shape = torch.broadcast_shapes(p_loc.shape, p_logvar.shape, q_loc.shape, q_logvar.shape)
    dtype = torch.promote_types(torch.promote_types(p_loc.dtype, p_logvar.dtype),
                                torch.promote_types(q_loc.dtype, q_logvar.dtype))
    p_loc, p_logvar, q_loc, q_logvar = (_compact(t).to(dtype)
                                        for t in (p_loc, p_logvar, q_loc, q_logvar))
    batch = shape[:len(shape) - len(event_shape)]
    mu = p_loc.expand(shape).reshape(-1, *event_shape)
    lv = p_logvar.expand(shape).reshape(-1, *event_shape)
    kl = F.gaussian_kl(mu, lv, _as_rows(q_loc, batch, event_shape),
                       _as_rows(q_logvar, batch, event_shape), reduction="none")
    return kl.reshape(batch)


def _logvar_of(scale: Tensor) -> Tensor:
    """``2 log(scale)``, in float32 at least (a half-precision log would round the prior)."""
    return 2.0 * torch.log(_compact(scale).to(torch.promote_types(scale.dtype, torch.float32)))


def _normal_of(q: Independent, event_dims: int) -> Normal:
    if not isinstance(q.base_dist, Normal) or q.reinterpreted_batch_ndims != event_dims:
        raise NotImplementedError(
            f"KL between a DiagonalNormal with event_dims={event_dims} and "
            f"Independent({type(q.base_dist).__name__}, {q.reinterpreted_batch_ndims})")
    return q.base_dist


def _check_events(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL divergence between distributions of event shapes "
                         f"{tuple(p.event_shape)} and {tuple(q.event_shape)}")


@register_kl(DiagonalNormal, DiagonalNormal)
def _kl_diagonal_diagonal(p: DiagonalNormal, q: DiagonalNormal) -> Tensor:
    _check_events(p, q)
    return _kl_rows(p.loc, p.logvar, q.loc, q.logvar, p.event_shape)


@register_kl(DiagonalNormal, Independent)
def _kl_diagonal_independent(p: DiagonalNormal, q: Independent) -> Tensor:
    base = _normal_of(q, p.event_dims)
    _check_events(p, q)
    return _kl_rows(p.loc, p.logvar, base.loc, _logvar_of(base.scale), p.event_shape)


@register_kl(Independent, DiagonalNormal)
def _kl_independent_diagonal(p: Independent, q: DiagonalNormal) -> Tensor:
    base = _normal_of(p, q.event_dims)
    _check_events(p, q)
    return _kl_rows(base.loc, _logvar_of(base.scale), q.loc, q.logvar, q.event_shape)


@register_kl(DiagonalNormal, Normal)
def _kl_diagonal_normal(p: DiagonalNormal, q: Normal) -> Tensor:
    if p.event_dims:
        raise NotImplementedError(
            f"KL between a DiagonalNormal with event_dims={p.event_dims} and a Normal (event "
            f"shape ()): use Independent(Normal(...), {p.event_dims}) as the prior")
    return _kl_rows(p.loc, p.logvar, q.loc, _logvar_of(q.scale), p.event_shape)


@register_kl(Normal, DiagonalNormal)
def _kl_normal_diagonal(p: Normal, q: DiagonalNormal) -> Tensor:
    if q.event_dims:
        raise NotImplementedError(
            f"KL between a Normal (event shape ()) and a DiagonalNormal with "
            f"event_dims={q.event_dims}")
    return _kl_rows(p.loc, _logvar_of(p.scale), q.loc, q.logvar, q.event_shape)
