"""The public functions (``import fastvae as fv``): checks, canonical views, reductions.

Conventions (docs/conventions.md): dimension 0 is the batch, every other dimension is the event
and is summed. ``reduction="mean"`` is the batch mean of per-sample sums, ``"sum"`` the sum of
everything, ``"none"`` the per-sample values ``(B,)``. Losses of half-precision inputs come back
in float32; gradients in each input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import custom_ops as _ops
from . import validation as check
from .backends import resolve

__all__ = [
    "bernoulli_nll",
    "continuous_bernoulli_nll",
    "discretized_mix_logistic_nll",
    "gaussian_kl",
    "gaussian_kl_per_dim",
    "gaussian_nll",
    "iwae_log_likelihood",
    "reparameterize",
    "sample_and_kl",
    "vae_loss",
]


# ---------------------------------------------------------------------------------------------
# Plans: the checks of a call signature, run once
# ---------------------------------------------------------------------------------------------

# key -> plan: what a public function derives from its arguments' metadata (shapes, strides,
# dtypes, devices, the other arguments) and the backend in effect, after its checks passed.
_PLANS: dict[tuple, tuple] = {}
MAX_PLANS = 1024


def _meta(t: object) -> tuple:
    """What a plan may depend on of one argument: a tensor's shape, strides, dtype, device;
    anything else's type and value (``2``, ``2.0`` and ``True`` are equal keys otherwise)."""
    if isinstance(t, Tensor):
        return (t.shape, t.stride(), t.dtype, t.device)
    return (type(t), t)


def _planned(key: tuple, prepare: Callable[[], tuple]) -> tuple:
    """``prepare()`` -- a public function's argument checks and what it derives from ``key``
    (its arguments' ``_meta`` and values) -- once per call signature: a repeated signature
    skips the checks, which depend on nothing else (the checks that read the data, opt-in, and
    the backend's resolution, which depends on the backend in effect, run on every call).
    While torch.compile traces, ``prepare()`` runs every time (the compiler specializes on the
    same things)."""
    if torch.compiler.is_compiling():
        return prepare()
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable argument: prepare() names what is wrong with it
        return prepare()
    if plan is None:
        plan = prepare()
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _rows(t: Tensor, *shape: int) -> Tensor:
    """``(B, *event)`` -> ``(B, N)`` (or ``(K, B, *event)`` -> ``(K, B, N)``): a view when the
    strides allow, else a copy. A leading dimension of stride 0 (a broadcast operand) stays
    broadcast: only one slice is copied when the other dimensions do not merge."""
    if t.shape == shape:
        return t
    if shape[0] > 1 and t.stride(0) == 0:
        try:
            return t.view(shape)  # a view of a view: its gradient is never materialized twice
        except RuntimeError:
            return t[0].reshape(1, *shape[1:]).expand(shape)
    return t.reshape(shape)


def _broadcast_rows(t: Tensor, like: Tensor, B: int, N: int) -> Tensor:
    """``t`` broadcast to ``like``'s shape ``(B, *event)``, as ``(B, N)``. A ``t`` without a batch
    dimension of its own (a scalar, per-feature or per-pixel parameter) becomes one event row,
    formed from ``t`` itself (at most N elements copied), expanded over the batch: autograd then
    sums the op's gradient over the batch once, with no B x N intermediate of its own."""
    if t.dim() < like.dim() or t.shape[0] == 1:
        event = t[0] if t.dim() == like.dim() else t
        return event.expand(like.shape[1:]).reshape(1, N).expand(B, N)
    return _rows(t.expand(like.shape), B, N)


def _batch_and_event(t: Tensor) -> tuple[int, int]:
    return t.shape[0], math.prod(t.shape[1:])


def _promote(params: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Parameters and an observation in their common dtype (no copy when they share one):
    the kernels read one dtype per call, and promotion never rounds the wider operand."""
    dtype = torch.promote_types(params.dtype, target.dtype)
    return params.to(dtype), target.to(dtype)


def _broadcast_operand(name: str, value: Tensor | float | None, ref_name: str,
                       ref: Tensor) -> Tensor | None:
    """A Python number becomes a 0-d tensor of ``ref``'s dtype; a tensor must broadcast to
    ``ref`` (any floating dtype: the caller promotes, ``_common_dtype``)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=ref.dtype, device=ref.device)
    check.tensor(name, value)
    check.broadcast_parameter(name, value, ref_name, ref)
    return value


def _common_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the operands compute in: ``torch.promote_types`` over all of them (broadcast
    parameters and observations of another floating dtype promote like torch's ops do)."""
    dtypes = [t.dtype for t in tensors if t is not None]
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _seed_tensor(seed: int | Tensor | None, generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    """The Philox key of one call, as an int64 tensor on ``device`` (never a host sync)."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"a tensor seed must be one int64 element, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed is on {seed.device} but the tensors are on {device}")
        return seed.reshape(1)
    if seed is not None:
        seed = check.integer("seed", seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        return torch.tensor([seed], dtype=torch.int64, device=device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is for {generator.device} but the tensors are on "
                             f"{device}")
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)


# The noise a reparameterize draws is kept for its backward (written by the forward kernel, read
# back instead of regenerated) up to this many elements (K * B * N; 4 MiB in float32), and only
# where the storage dtype is the compute dtype (float32, float64: a kept float16 copy would round
# the float32 noise). Above it, or in half precision, the backward regenerates it. Same noise,
# same formula: the results are bitwise the same either way (docs/random-numbers.md).
KEEP_NOISE_MAX = 1 << 20
_KEEP_NOISE_DTYPES = (torch.float32, torch.float64)


def keeps_noise(dtype: torch.dtype, numel: int) -> bool:
    """Whether a drawn reparameterize noise of ``numel`` elements in ``dtype`` is kept for the
    backward (``KEEP_NOISE_MAX``, docs/random-numbers.md "Kept or regenerated")."""
    return dtype in _KEEP_NOISE_DTYPES and numel <= KEEP_NOISE_MAX


def reparameterize(mu: Tensor, logvar: Tensor, *, eps: Tensor | None = None,
                   n_samples: int | None = None, seed: int | Tensor | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """Reparameterized sample ``z = mu + exp(0.5 * logvar) * eps``.

    ``mu``, ``logvar``: equal shapes. ``eps`` given: used as is (shape of ``mu``, or
    ``(n_samples, *mu.shape)``). Otherwise standard normals from the counter-based Philox
    generator keyed by ``seed`` (drawn from torch's generator, or ``generator``, when None):
    element ``i`` of the output is a pure function of ``(seed, i)``; the forward keeps it for
    the backward up to ``KEEP_NOISE_MAX`` elements in float32/float64, else the backward
    regenerates it (bitwise the same gradients either way). ``n_samples=K`` returns
    ``(K, *mu.shape)``. Returns ``mu``'s dtype.
    """

    def prepare():
        check.tensor("mu", mu)
        check.tensor("logvar", logvar)
        check.pair("logvar", logvar, "mu", mu)
        K = 1 if n_samples is None else check.integer("n_samples", n_samples, 1)
        out_shape = tuple(mu.shape) if n_samples is None else (K, *mu.shape)
        # elementwise op: a scalar is a batch of one
        B, N = _batch_and_event(mu) if mu.dim() > 0 else (1, 1)
        return K, out_shape, B, N

    K, out_shape, B, N = _planned(
        (_ops.reparameterize, _meta(mu), _meta(logvar), _meta(n_samples)), prepare)
    backend = resolve(mu.device)
    if mu.dim() == 0:
        mu, logvar = mu.reshape(1), logvar.reshape(1)
    seed_t = None
    if eps is not None:
        if seed is not None or generator is not None:
            raise ValueError("eps is given: seed and generator must be None")
        check.tensor("eps", eps)
        check.same_dtype_and_device("eps", eps, "mu", mu)
        if tuple(eps.shape) != out_shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}; expected {out_shape} "
                             f"(mu's shape{'' if n_samples is None else ' after n_samples'})")
        eps = eps.reshape(K, B, N)
    if check.validation_enabled():
        check.finite(mu=mu, logvar=logvar, eps=eps)
    if eps is None:  # last: a call that raises leaves torch's generator alone
        seed_t = _seed_tensor(seed, generator, mu.device)
    keep = eps is None and keeps_noise(mu.dtype, K * B * N)
    z, _ = _ops.call(_ops.reparameterize, _rows(mu, B, N), _rows(logvar, B, N), eps, seed_t, K,
                     keep, backend)
    return z.view(out_shape)


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor | float | None = None,
                prior_logvar: Tensor | float | None = None, *, reduction: str = "mean",
                free_bits: float = 0.0) -> Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(prior_mu, diag(exp(prior_logvar))))``, summed over
    the event.

    Per element ``0.5 * ((mu - pm)^2 / e^plv + expm1(lv - plv) - (lv - plv))``; the prior
    defaults to ``N(0, I)``, and ``prior_mu`` / ``prior_logvar`` (tensors or numbers) broadcast
    to ``mu``'s shape; a prior tensor of another floating dtype computes with ``mu`` and
    ``logvar`` in their common dtype (each gradient in its own dtype). ``free_bits=λ > 0``
    floors each latent dimension's batch-mean KL at λ before summing (reduction ``"mean"`` or
    ``"sum"`` only). Returns ``(B,)`` for ``"none"``, else a scalar; float32 (float64 when the
    common dtype is float64).
    """
    if prior_mu is None and prior_logvar is None and free_bits == 0:
        # the common case, planned: N(0, I) prior, no free bits

        def prepare():
            check.free_bits(free_bits, check.reduction(reduction))
            _, _, _, _, B = _kl_operands(mu, logvar, None, None)
            return B, _batch_and_event(mu)[1], _ops.REDUCTION_CODES[reduction]

        B, N, code = _planned((_ops.gaussian_kl, _meta(mu), _meta(logvar),
                                        _meta(reduction), _meta(free_bits)), prepare)
        if check.validation_enabled():
            check.finite(mu=mu, logvar=logvar)
        return _ops.call(_ops.gaussian_kl, _rows(mu, B, N), _rows(logvar, B, N), None, None, 1,
                         code, resolve(mu.device))
    reduction = check.reduction(reduction)
    free_bits = check.free_bits(free_bits, reduction)
    mu, logvar, prior_mu, prior_logvar, B = _kl_operands(mu, logvar, prior_mu, prior_logvar)
    backend = resolve(mu.device)
    if free_bits > 0:
        per_dim = _ops.call(_ops.gaussian_kl, mu, logvar, prior_mu, prior_logvar, 0, _ops.NONE,
                            backend)
        return _free_bits_total(per_dim, B, free_bits, reduction)
    return _ops.call(_ops.gaussian_kl, mu, logvar, prior_mu, prior_logvar, 1,
                     _ops.REDUCTION_CODES[reduction], backend)


def _kl_operands(mu: Tensor, logvar: Tensor, prior_mu: Tensor | float | None,
                 prior_logvar: Tensor | float | None
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, int]:
    """The checked ``(B, N)`` operands of the KL op (a prior as both tensors or neither)."""
    check.tensor("mu", mu)
    check.tensor("logvar", logvar)
    check.batched("mu", mu)
    check.pair("logvar", logvar, "mu", mu)
    prior_mu = _broadcast_operand("prior_mu", prior_mu, "mu", mu)
    prior_logvar = _broadcast_operand("prior_logvar", prior_logvar, "mu", mu)
    check.finite(mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    B, N = _batch_and_event(mu)
    if prior_mu is not None or prior_logvar is not None:
        # a prior of another floating dtype: all four in the common dtype (cast before the
        # prior is expanded, so that a cast never copies B x N; gradients in each own dtype)
        dtype = _common_dtype(mu, prior_mu, prior_logvar)
        mu, logvar = mu.to(dtype), logvar.to(dtype)
        prior_mu = None if prior_mu is None else prior_mu.to(dtype)
        prior_logvar = None if prior_logvar is None else prior_logvar.to(dtype)
        zero = mu.new_zeros(())
        prior_mu = _broadcast_rows(zero if prior_mu is None else prior_mu, mu, B, N)
        prior_logvar = _broadcast_rows(zero if prior_logvar is None else prior_logvar, mu, B, N)
    return _rows(mu, B, N), _rows(logvar, B, N), prior_mu, prior_logvar, B


def gaussian_kl_per_dim(mu: Tensor, logvar: Tensor, prior_mu: Tensor | float | None = None,
                        prior_logvar: Tensor | float | None = None) -> Tensor:
    """The batch-mean KL of each latent dimension, differentiable: element ``j`` is
    ``mean_b KL(N(mu[b, j], e^lv[b, j]) || N(pm[j], e^plv[j]))``, the per-element formula of
    ``gaussian_kl``. Its sum over the event is ``gaussian_kl(..., reduction="mean")``.

    ``mu``, ``logvar``: ``(B, *event)``, equal shapes and dtypes; the prior as in
    ``gaussian_kl``. Returns the event's shape ``mu.shape[1:]`` (``(N,)`` for a flat latent),
    float32 (float64 for float64 inputs); ``nan`` for an empty batch (a mean over nothing).
    One pass of the fused KL op summing over the batch (the free-bits path), gradients
    ``g_j / B`` per element. Use: active-dimension analyses of beta-VAEs, per-dimension
    objectives (e.g. ``torch.clamp_min(kl_per_dim, lam).sum()`` is free bits).
    """
    mu_rows, lv_rows, prior_mu, prior_logvar, B = _kl_operands(mu, logvar, prior_mu,
                                                                prior_logvar)
    per_dim_sum = _ops.call(_ops.gaussian_kl, mu_rows, lv_rows, prior_mu, prior_logvar, 0,
                            _ops.NONE, resolve(mu.device))
    return (per_dim_sum / B).view(mu.shape[1:])


def _free_bits_total(per_dim_sum: Tensor, B: int, free_bits: float, reduction: str) -> Tensor:
    """sum_j max(mean_b kl[b, j], λ) for "mean"; B times that for "sum"."""
    if reduction == "sum":
        return torch.clamp_min(per_dim_sum, free_bits * B).sum()
    return torch.clamp_min(per_dim_sum / B, free_bits).sum()


def _logits_likelihood(op, logits: Tensor, target: Tensor, reduction: str) -> Tensor:
    """A likelihood of (logits, target in [0, 1]) through custom op ``op``: the checks (the
    target an observation, promoted with the logits), canonical rows, the reduction."""

    def prepare():
        check.tensor("logits", logits)
        check.tensor("target", target)
        check.batched("logits", logits)
        check.observation("target", target, "logits", logits)
        code = _ops.REDUCTION_CODES[check.reduction(reduction)]
        B, N = _batch_and_event(logits)
        return torch.promote_types(logits.dtype, target.dtype), B, N, code

    dtype, B, N, code = _planned((op, _meta(logits), _meta(target), _meta(reduction)),
                                 prepare)
    backend = resolve(logits.device)
    if check.validation_enabled():
        check.finite(logits=logits, target=target)
        check.unit_interval("target", target)
    return _ops.call(op, _rows(_as(logits, dtype), B, N), _rows(_as(target, dtype), B, N), code,
                     backend)


def bernoulli_nll(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """``-log Bernoulli(target | sigmoid(logits))``, summed over the event.

    Per element ``max(l, 0) - l * x + log1p(exp(-|l|))``: stable for any finite logits;
    targets in [0, 1], continuous allowed (as ``binary_cross_entropy_with_logits``).
    ``logits`` and ``target``: equal shapes; a target of another floating dtype computes in the
    common dtype (``torch.promote_types``: bfloat16 logits and a float32 target compute in
    float32, the target never rounded), the gradient of ``logits`` in its own dtype. Returns
    ``(B,)`` for ``"none"``, else a scalar; float32 (float64 for float64 inputs).
    """
    return _logits_likelihood(_ops.bernoulli_nll, logits, target, reduction)


def gaussian_nll(mean: Tensor, target: Tensor, logvar: Tensor | float = 0.0, *,
                 reduction: str = "mean") -> Tensor:
    """``-log N(target | mean, exp(logvar))``, summed over the event.

    Per element ``0.5 * (logvar + (target - mean)^2 / exp(logvar) + log(2 pi))``.
    ``logvar``: a float, or a tensor broadcastable to ``mean`` (scalar, per-feature,
    per-element), any floating dtype. ``target``: ``mean``'s shape, any floating dtype. The three
    compute in their common dtype (``torch.promote_types``, as in ``bernoulli_nll``: a float32
    learned log-variance next to a bfloat16 mean under autocast computes in float32), each
    gradient in its own input's dtype. Returns ``(B,)`` for ``"none"``, else a scalar; float32
    (float64 when the common dtype is float64).
    """
    if not isinstance(logvar, Tensor):  # a number: planned

        def prepare():
            check.tensor("mean", mean)
            check.tensor("target", target)
            check.batched("mean", mean)
            check.observation("target", target, "mean", mean)
            code = _ops.REDUCTION_CODES[check.reduction(reduction)]
            return (torch.promote_types(mean.dtype, target.dtype), *_batch_and_event(mean),
                    check.number("logvar", logvar), code)

        dtype, B, N, value, code = _planned(
            (_ops.gaussian_nll, _meta(mean), _meta(target), _meta(logvar), _meta(reduction)),
            prepare)
        backend = resolve(mean.device)
        if check.validation_enabled():
            check.finite(mean=mean, target=target)
        return _ops.call(_ops.gaussian_nll, _rows(_as(mean, dtype), B, N),
                         _rows(_as(target, dtype), B, N), None, value, code, backend)
    check.tensor("mean", mean)
    check.tensor("target", target)
    check.batched("mean", mean)
    check.observation("target", target, "mean", mean)
    reduction = check.reduction(reduction)
    B, N = _batch_and_event(mean)
    if isinstance(logvar, Tensor):
        check.tensor("logvar", logvar)
        check.broadcast_parameter("logvar", logvar, "mean", mean)
        logvar_value = 0.0
        dtype = _common_dtype(mean, target, logvar)
        # promoted before it is expanded: a cast of the expanded view would copy B x N
        logvar_rows = _broadcast_rows(logvar.to(dtype), mean, B, N)
    else:
        logvar_value = check.number("logvar", logvar)
        logvar_rows = None
        dtype = _common_dtype(mean, target)
    check.finite(mean=mean, target=target, logvar=logvar_rows)
    mean, target = mean.to(dtype), target.to(dtype)
    backend = resolve(mean.device)
    return _ops.call(_ops.gaussian_nll, _rows(mean, B, N), _rows(target, B, N), logvar_rows,
                     logvar_value, _ops.REDUCTION_CODES[reduction], backend)


def sample_and_kl(mu: Tensor, logvar: Tensor, *, reduction: str = "mean", free_bits: float = 0.0,
                  eps: Tensor | None = None, seed: int | Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(reparameterize(mu, logvar), gaussian_kl(mu, logvar))`` in one fused pass forward and
    one backward, with the standard-normal prior. The noise is that of ``reparameterize`` with
    the same seed. Returns ``z`` (``mu``'s shape and dtype) and the KL as ``gaussian_kl``.

    ``eps`` (``mu``'s shape and dtype): explicit noise, used as is, e.g. ``torch.randn_like(mu)``
    to reproduce code that draws with ``randn_like``; ``seed`` and ``generator`` must then be
    None. With ``eps`` the sample and the KL are two fused ops (the noise is read, not
    regenerated), with the same values as one.
    """

    def prepare():
        check.tensor("mu", mu)
        check.tensor("logvar", logvar)
        check.batched("mu", mu)
        check.pair("logvar", logvar, "mu", mu)
        fb = check.free_bits(free_bits, check.reduction(reduction))
        code = _ops.NONE if fb > 0 else _ops.REDUCTION_CODES[reduction]
        return (*_batch_and_event(mu), 0 if fb > 0 else 1, code)

    B, N, reduce_dim, code = _planned(
        (_ops.sample_and_kl, _meta(mu), _meta(logvar), _meta(reduction), _meta(free_bits)),
        prepare)
    backend = resolve(mu.device)
    if check.validation_enabled():
        check.finite(mu=mu, logvar=logvar)
    if eps is not None:
        if seed is not None or generator is not None:
            raise ValueError("eps is given: seed and generator must be None")
        z = reparameterize(mu, logvar, eps=eps)
        return z, gaussian_kl(mu, logvar, reduction=reduction, free_bits=free_bits)
    seed_t = _seed_tensor(seed, generator, mu.device)
    z, kl = _ops.call(_ops.sample_and_kl, _rows(mu, B, N), _rows(logvar, B, N), seed_t, reduce_dim,
                      code, backend)
    z = z.view(mu.shape)
    if reduce_dim == 0:
        return z, _free_bits_total(kl, B, free_bits, reduction)
    return z, kl


LIKELIHOODS = ("bernoulli", "gaussian", "continuous_bernoulli")


def vae_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *,
             likelihood: str = "bernoulli", obs_logvar: Tensor | float = 0.0, beta: float = 1.0,
             free_bits: float = 0.0, reduction: str = "mean") -> Tensor:
    """Negative ELBO ``nll(recon, x) + beta * gaussian_kl(mu, logvar)``.

    ``recon`` is logits for ``likelihood="bernoulli"`` and ``"continuous_bernoulli"``, and the
    mean for ``"gaussian"`` (with ``obs_logvar`` as in ``gaussian_nll``). The argument order is
    the classic ``loss_function(recon_x, x, mu, logvar)``. ``recon``/``x`` and ``mu``/``logvar``
    pair up and share the batch size. ``x`` may have another floating dtype than ``recon``
    (under ``torch.autocast`` the decoder returns bfloat16 logits for float32 data): both
    compute in their common dtype, as in ``bernoulli_nll``; ``mu`` and ``logvar`` share one dtype.
    """

    def prepare():
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got "
                             f"{likelihood!r}")
        # Every check before any kernel runs, in this function's own argument names.
        check.number("beta", beta)
        check.tensor("recon", recon)
        check.tensor("x", x)
        check.tensor("mu", mu)
        check.tensor("logvar", logvar)
        check.batched("recon", recon)
        check.batched("mu", mu)
        check.observation("x", x, "recon", recon)
        check.pair("logvar", logvar, "mu", mu)
        check.same_device("mu", mu, "recon", recon)
        if recon.shape[0] != mu.shape[0]:
            raise ValueError(f"recon has batch size {recon.shape[0]} but mu has "
                             f"{mu.shape[0]}")
        if isinstance(obs_logvar, Tensor):
            check.tensor("obs_logvar", obs_logvar)
            check.broadcast_parameter("obs_logvar", obs_logvar, "recon", recon)
        else:
            check.number("obs_logvar", obs_logvar)
        check.free_bits(free_bits, check.reduction(reduction))
        return ()

    _planned((vae_loss, _meta(recon), _meta(x), _meta(mu), _meta(logvar), _meta(obs_logvar),
              _meta(likelihood), _meta(beta), _meta(free_bits), _meta(reduction)), prepare)
    if check.validation_enabled():
        obs_logvar_tensor = obs_logvar if isinstance(obs_logvar, Tensor) else None
        check.finite(recon=recon, x=x, mu=mu, logvar=logvar, obs_logvar=obs_logvar_tensor)
    if likelihood == "bernoulli":
        check.unit_interval("x", x)
        nll = bernoulli_nll(recon, x, reduction=reduction)
    elif likelihood == "continuous_bernoulli":
        check.unit_interval("x", x)
        nll = continuous_bernoulli_nll(recon, x, reduction=reduction)
    else:
        nll = gaussian_nll(recon, x, obs_logvar, reduction=reduction)
    kl = gaussian_kl(mu, logvar, reduction=reduction, free_bits=free_bits)
    return nll + (kl if beta == 1 else beta * kl)


def iwae_log_likelihood(log_px_given_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Importance-weighted estimate of ``log p(x)`` from K samples ``z_k ~ q(z|x)``, shape (B,):

        logsumexp_k [log p(x|z_k) + log N(z_k; 0, I) - log N(z_k; mu, exp(logvar))] - log K

    ``log_px_given_z``: ``(K, B)`` (any float dtype); ``z``: ``(K, B, *event)``; ``mu``,
    ``logvar``: ``(B, *event)``, the dtype of ``z``. One fused pass, accumulated in float32
    (float64 for float64 inputs); the sampled log-weights, never the analytic KL.
    """
    check.tensor("log_px_given_z", log_px_given_z)
    check.tensor("z", z)
    check.tensor("mu", mu)
    check.tensor("logvar", logvar)
    check.batched("mu", mu)
    check.pair("logvar", logvar, "mu", mu)
    check.same_dtype_and_device("z", z, "mu", mu)
    check.same_device("log_px_given_z", log_px_given_z, "mu", mu)
    if z.dim() != mu.dim() + 1 or z.shape[1:] != mu.shape or z.shape[0] < 1:
        raise ValueError(f"z must have shape (K, *mu.shape) with K >= 1; got z "
                         f"{tuple(z.shape)} and mu {tuple(mu.shape)}")
    if log_px_given_z.shape != z.shape[:2]:
        raise ValueError(f"log_px_given_z must have shape (K, B) = {tuple(z.shape[:2])}, got "
                         f"{tuple(log_px_given_z.shape)}")
    check.finite(log_px_given_z=log_px_given_z, z=z, mu=mu, logvar=logvar)
    backend = resolve(mu.device)
    B, N = _batch_and_event(mu)
    K = z.shape[0]
    ll, _ = _ops.call(_ops.iwae_log_likelihood, log_px_given_z, _rows(z, K, B, N),
                      _rows(mu, B, N), _rows(logvar, B, N), backend)
    return ll


def continuous_bernoulli_nll(logits: Tensor, target: Tensor, *,
                             reduction: str = "mean") -> Tensor:
    """``-log CB(target | sigmoid(logits))``, the continuous Bernoulli (Loaiza-Ganem &
    Cunningham 2019), summed over the event: the normalized likelihood of targets in [0, 1].

    Per element ``-log C(l) - x * l + softplus(l)`` with ``C(l) = l / tanh(l / 2)``
    (``C(0) = 2``), i.e. ``bernoulli_nll(l, x) - log C(l)``. Exact for every finite logit: a
    series for ``|l| < 8`` (``l * (1/2 - x) + log(sinh(l/2) / (l/2))``), logarithms of
    ``|l|`` beyond, without overflow or cancellation; gradients likewise
    (``d/dl = 1/2 - x + coth(l/2)/2 - 1/l``, ``d/dx = -l``). The value is in nats and may be
    negative (a density). ``logits`` and ``target``: equal shapes; a target of another floating
    dtype computes in the common dtype, as in ``bernoulli_nll``; targets in [0, 1] (checked
    only with validation on). Returns ``(B,)`` for ``"none"``, else a scalar; float32 (float64
    for float64 inputs). Raises ``TypeError`` for non-float inputs, ``ValueError`` for
    mismatched shapes or devices, a 0-d input or an unknown reduction.
    """
    return _logits_likelihood(_ops.continuous_bernoulli_nll, logits, target, reduction)


def _dmol_check(params: Tensor, x: Tensor, n_mixtures: object,
                n_bins: object) -> tuple[int, int]:
    """The shape and argument checks of the discretized mixture of logistics; returns
    ``(n_mixtures, n_bins)`` as ints."""
    check.tensor("params", params)
    check.tensor("x", x)
    check.same_device("x", x, "params", params)
    n_mixtures = check.integer("n_mixtures", n_mixtures, 1)
    n_bins = check.integer("n_bins", n_bins, 2)
    if x.dim() < 2 or x.shape[1] not in (1, 3):
        raise ValueError(f"x must have shape (B, C, *spatial) with C = 1 or 3, got "
                         f"{tuple(x.shape)}")
    C = x.shape[1]
    P = n_mixtures * (3 if C == 1 else 1 + 3 * C)
    layout = "M logits, means, log-scales" if C == 1 else \
        "M logits, then per channel M means, M log-scales, M coefficients"
    expected = (x.shape[0], P, *x.shape[2:])
    if tuple(params.shape) != expected:
        raise ValueError(f"params must have shape {expected} for x of shape {tuple(x.shape)} "
                         f"and n_mixtures={n_mixtures} ({layout}), got {tuple(params.shape)}")
    return n_mixtures, n_bins


def discretized_mix_logistic_nll(params: Tensor, x: Tensor, *, n_mixtures: int,
                                 n_bins: int = 256, reduction: str = "mean") -> Tensor:
    """Discretized mixture of logistics NLL (PixelCNN++, Salimans et al. 2017), in nats, summed
    over the pixels: one fused pass forward, one backward that recomputes from the inputs.

    ``x``: ``(B, C, *spatial)`` with C = 1 or 3, values on the grid of ``n_bins`` levels of
    [-1, 1] (``-1 + 2 k / (n_bins - 1)``), any float dtype. ``params``: ``(B, P, *spatial)``,
    P = M (1 + 3 C) for C = 3 and 3 M for C = 1, laid out on dim 1 as PixelCNN++ and VDVAE do: M
    mixture logits pi, then per channel M means mu, M log-scales s and (C = 3) M coefficients a.
    Per pixel, with s floored at -7, h = 1 / (n_bins - 1) and the channels coupled
    autoregressively (mu'_R = mu_R, mu'_G = mu_G + tanh(a_0) x_R,
    mu'_B = mu_B + tanh(a_1) x_R + tanh(a_2) x_G):

        P_k(x_c) = sigmoid((x_c - mu'_ck + h) / e^s) - sigmoid((x_c - mu'_ck - h) / e^s)

    with the tails at the edges (x_c = -1: the CDF at -1 + h; x_c = 1: one minus the CDF at
    1 - h) and, for an inner bin of probability below 1e-5, the mid-bin density times the bin
    width, pdf(x_c) * 2h. ``nll = -sum_pixels logsumexp_k (log_softmax(pi)_k + sum_c log
    P_k(x_c))``: the probabilities of all ``n_bins ** C`` values of a pixel sum to 1.

    ``x`` of another float dtype computes in the common dtype (``torch.promote_types``, like
    the other likelihoods: float32 ``params`` and a float64 ``x`` compute in float64). Returns
    ``(B,)`` for ``reduction="none"``, else a scalar; float32 (float64 when the common dtype is
    float64). The gradient flows to ``params`` only, in its own dtype. Raises TypeError for
    non-float tensors or non-integer ``n_mixtures``/``n_bins`` (any ``__index__`` integer is
    one), ValueError for shapes that do not match this layout, ``n_mixtures < 1``,
    ``n_bins < 2``, tensors on two devices, or (validation on) non-finite values, ``x`` outside
    [-1, 1] or ``x`` off the grid of ``n_bins`` levels by more than rounding in ``x``'s dtype
    (unquantized data: the bin probabilities of such an ``x`` are those of a neighbouring grid
    value's bin shifted by the offset, not a likelihood of the data).
    """
    n_mixtures, n_bins = _dmol_check(params, x, n_mixtures, n_bins)
    reduction = check.reduction(reduction)
    check.finite(params=params, x=x)
    if check.data_checks_on() and not bool(((x >= -1) & (x <= 1)).all()):
        raise ValueError("x must lie in [-1, 1] (validation is on)")
    check.on_grid("x", x, n_bins)  # before promotion: the rounding allowed is x's dtype's
    params, x = _promote(params, x)
    backend = resolve(params.device)
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    return _ops.call(_ops.discretized_mix_logistic_nll, params.reshape(B, params.shape[1], S),
                     x.reshape(B, C, S), n_mixtures, n_bins, _ops.REDUCTION_CODES[reduction],
                     backend)


def discretized_mix_logistic_sample(params: Tensor, *, n_mixtures: int, n_bins: int = 256,
                                    most_likely: bool = False,
                                    generator: torch.Generator | None = None) -> Tensor:
    """Images from the discretized mixture of logistics of ``params`` (the layout of
    ``discretized_mix_logistic_nll``; C = 3 when dim 1 holds 10 M values, C = 1 for 3 M).

    Per pixel, as PixelCNN++: a component k ~ softmax(pi) (Gumbel-max), then channel by channel
    ``x_c = mu'_ck + e^(s_ck) (log u - log(1 - u))``, u ~ U(1e-5, 1 - 1e-5), with mu' coupled to
    the channels already drawn; each value clamped to [-1, 1] and rounded to the grid of
    ``n_bins`` levels. ``most_likely=True``: the most probable value instead, deterministic:
    channel by channel, the grid value v of highest probability given the channels chosen
    before, ``argmax_v logsumexp_k(w_k + log P_k(v))`` with w_k the log-softmax of the logits
    plus component k's log-probabilities of the chosen channels (the mixture's mode for one
    channel; for three, each channel's conditional mode in turn). Returns ``(B, C, *spatial)``
    in ``params``' dtype, values in [-1, 1] on the grid. ``generator`` drives the draws.
    """
    check.tensor("params", params)
    n_mixtures = check.integer("n_mixtures", n_mixtures, 1)
    n_bins = check.integer("n_bins", n_bins, 2)
    if params.dim() < 2 or params.shape[1] not in (3 * n_mixtures, 10 * n_mixtures):
        raise ValueError(f"params must have shape (B, 3 M or 10 M, *spatial) with "
                         f"M = n_mixtures = {n_mixtures}, got {tuple(params.shape)}")
    M = n_mixtures
    C = 1 if params.shape[1] == 3 * M else 3
    J = 2 if C == 1 else 3
    p = params.detach().float() if params.dtype != torch.float64 else params.detach()
    B, spatial = p.shape[0], p.shape[2:]
    body = p[:, M:].reshape(B, C, J, M, *spatial)
    logits = p[:, :M]

    def uniform(shape):
        u = torch.rand(shape, dtype=p.dtype, device=p.device, generator=generator)
        return u * (1 - 2e-5) + 1e-5

    if most_likely:
        return _dmol_mode(logits, body, C, n_bins).to(params.dtype)
    gumbel = -torch.log(-torch.log(uniform(logits.shape)))
    k = (logits + gumbel).argmax(1, keepdim=True)

    def pick(t):  # (B, M, *spatial) -> (B, *spatial) at the chosen component
        return t.gather(1, k).squeeze(1)

    h = 2.0 / (n_bins - 1)
    xs: list[Tensor] = []
    for c in range(C):
        mu = pick(body[:, c, 0])
        if C == 3 and c == 1:
            mu = mu + torch.tanh(pick(body[:, 0, 2])) * xs[0]
        if C == 3 and c == 2:
            mu = mu + torch.tanh(pick(body[:, 1, 2])) * xs[0] + \
                torch.tanh(pick(body[:, 2, 2])) * xs[1]
        u = uniform(mu.shape)
        log_s = torch.clamp_min(pick(body[:, c, 1]), -7.0)
        value = mu + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        value = torch.round((value.clamp(-1.0, 1.0) + 1.0) / h) * h - 1.0
        xs.append(value)
    return torch.stack(xs, 1).to(params.dtype)


def _dmol_mode(logits: Tensor, body: Tensor, C: int, n_bins: int) -> Tensor:
    """The most likely value of a DMoL, channel by channel given the channels before (see
    ``discretized_mix_logistic_sample``); logits (B, M, *spatial), body (B, C, J, M, *spatial).
    One pass over the grid per channel, each (B, M, *spatial)."""
    from .reference import DMOL_LOG_SCALE_MIN, _dmol_channel_terms

    w = torch.log_softmax(logits, 1)
    h = 2.0 / (n_bins - 1)
    xs: list[Tensor] = []
    for c in range(C):
        mu = body[:, c, 0]
        for j in range(c):  # coupling: coefficient block (G: 0 on R; B: 1 on R, 2 on G)
            mu = mu + torch.tanh(body[:, c - 1 + j, 2]) * xs[j].unsqueeze(1)
        log_s = torch.clamp_min(body[:, c, 1], DMOL_LOG_SCALE_MIN)
        best_score = torch.full_like(logits[:, 0], -math.inf)
        best = torch.full_like(logits[:, 0], -1.0)
        for i in range(n_bins):
            v = i * h - 1.0
            term = _dmol_channel_terms(v - mu, log_s, torch.full_like(mu, v), n_bins, False)[0]
            score = torch.logsumexp(w + term, 1)
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best = torch.where(better, v, best)
        chosen = best.unsqueeze(1)
        w = w + _dmol_channel_terms(chosen - mu, log_s, chosen.expand_as(mu), n_bins, False)[0]
        xs.append(best)
    return torch.stack(xs, 1)
