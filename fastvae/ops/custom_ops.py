"""The custom ops: ``torch.library`` registration, fake (meta) kernels, autograd, and dispatch.

Every op takes canonical ``(B, N)`` views (dimension 0 the batch, the event flattened; any
strides, stride 0 for broadcast operands) plus the name of the concrete backend that serves it,
which the public functions resolve beforehand. Forward ops return per-sample sums ``(B,)``
(``reduce_dim=1``) or per-feature sums ``(N,)`` (``reduce_dim=0``, for free bits), in float32
(float64 for float64 inputs); reductions over the batch happen in the public functions, so a
``grad`` here is always one value per sample (or per feature), read from device memory.
Backward ops are custom ops too (one pass each) and return only the gradients asked for.

The backend interface (``fastvae.ops.reference``, ``fastvae.kernels``, ``fastvae.ops.native``):

    reparameterize_fwd(mu, logvar, eps | None, seed | None, n_samples) -> z (K, B, N)
    reparameterize_bwd(grad_z, mu, logvar, eps | None, seed | None, needs[3]) -> grads
    gaussian_kl_fwd(mu, logvar, prior_mu | None, prior_logvar | None, reduce_dim) -> kl
    gaussian_kl_bwd(grad, mu, logvar, prior_mu, prior_logvar, reduce_dim, needs[4]) -> grads
    bernoulli_nll_fwd(logits, target) -> (B,)
    bernoulli_nll_bwd(grad, logits, target, needs[2]) -> grads
    gaussian_nll_fwd(mean, target, logvar | None, logvar_value) -> (B,)
    gaussian_nll_bwd(grad, mean, target, logvar | None, logvar_value, needs[3]) -> grads
    sample_and_kl_fwd(mu, logvar, seed, reduce_dim) -> (z (B, N), kl)
    sample_and_kl_bwd(grad_z, grad_kl, mu, logvar, seed, reduce_dim, needs[2]) -> grads
    iwae_fwd(log_px (K, B), z (K, B, N), mu, logvar) -> (ll (B,), log_weights (K, B))
    iwae_bwd(grad, ll, log_weights, log_px, z, mu, logvar, needs[4]) -> grads
    continuous_bernoulli_nll_fwd(logits, target) -> (B,)
    continuous_bernoulli_nll_bwd(grad, logits, target, needs[2]) -> grads

Backends see B >= 1 and N >= 1 (empty inputs are answered here), a prior given as both
tensors or neither, ``seed`` as an int64 tensor of one element on the tensors' device, and
return gradients as new contiguous tensors in each input's dtype, only those with ``needs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .backends import implementation


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses come back in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduced_shape(mu: Tensor, reduce_dim: int) -> tuple[int]:
    return (mu.shape[0],) if reduce_dim == 1 else (mu.shape[1],)


def _empty_grads(needs: Sequence[bool], like: Sequence[Tensor | None]) -> list[Tensor]:
    return [torch.zeros_like(t, memory_format=torch.contiguous_format)
            for t, need in zip(like, needs, strict=True) if need]


def _fake_grads(needs: Sequence[bool], like: Sequence[Tensor | None]) -> list[Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t, need in zip(like, needs, strict=True) if need]


def _place(grads: Sequence[Tensor], needs: Sequence[bool]) -> list[Tensor | None]:
    """Spread the gradients a backward op returned over the inputs that asked for them."""
    it = iter(grads)
    return [next(it) if need else None for need in needs]


# ---------------------------------------------------------------------------------------------
# Registration, and the eager fast path
# ---------------------------------------------------------------------------------------------

# The Python function behind each custom op, and (setup_context, backward) of each op that has
# autograd: the eager path below runs them without the dispatcher.
_IMPL: dict[object, Callable] = {}
_AUTOGRAD: dict[object, tuple[Callable, Callable]] = {}
_NAME: dict[object, str] = {}


def _custom_op(name: str):
    """``torch.library.custom_op("fastvae::<name>")``, recording the implementation."""
    def register(fn):
        op = torch.library.custom_op(f"fastvae::{name}", fn, mutates_args=())
        _IMPL[op] = fn
        _NAME[op] = f"fastvae::{name}"
        return op
    return register


class _Eager(torch.autograd.Function):
    """An op's registered setup_context and backward, as an autograd.Function (the last
    argument is the op)."""

    @staticmethod
    def forward(ctx, *args):
        *inputs, op = args
        output = _IMPL[op](*inputs)
        setup, _ = _AUTOGRAD[op]
        setup(ctx, inputs, output)
        ctx.op = op
        return output

    @staticmethod
    def backward(ctx, *grads):
        _, grad = _AUTOGRAD[ctx.op]
        return *grad(ctx, *grads), None


def _eager_tensors(args) -> bool:
    """Every tensor argument is an ordinary eager tensor (not fake, functional, batched or
    another subclass) and no dispatch mode is tracing."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return False
    return all(type(a) in (Tensor, torch.nn.Parameter)
               and not torch._C._functorch.is_functorch_wrapped_tensor(a)
               for a in args if isinstance(a, Tensor))


def call(op, *args):
    """Run custom op ``op``. Eager calls on ordinary tensors go straight to its implementation,
    under an autograd.Function when a gradient is needed; tracing (torch.compile, make_fx,
    opcheck), tensor subclasses and second derivatives (which the backward ops refuse) go
    through the dispatcher. Same kernels, same results: this only skips the dispatcher's Python
    overhead (~50 us per op and direction).

    The dispatcher names every op it runs in profiler traces (``fastvae::gaussian_kl``, and
    ``fastvae::gaussian_kl_backward`` in the backward pass); the fast path records the same
    name itself while a profiler runs. The check is one call into C (~0.1 us) when none does.
    """
    if not _eager_tensors(args):
        return op(*args)
    if torch.autograd._profiler_enabled():
        with torch.autograd.profiler.record_function(_NAME[op]):
            return _call_eager(op, args)
    return _call_eager(op, args)


def _call_eager(op, args):
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return _Eager.apply(*args, op) if op in _AUTOGRAD else op(*args)
    return _IMPL[op](*args)


# ---------------------------------------------------------------------------------------------
# reparameterize
# ---------------------------------------------------------------------------------------------


@_custom_op("reparameterize")
def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor | None, seed: Tensor | None,
                   n_samples: int, backend: str) -> Tensor:
    if mu.numel() == 0:
        return mu.new_empty((n_samples, *mu.shape))
    return implementation(backend).reparameterize_fwd(mu, logvar, eps, seed, n_samples)


@reparameterize.register_fake
def _(mu, logvar, eps, seed, n_samples, backend):
    return mu.new_empty((n_samples, *mu.shape))


@_custom_op("reparameterize_backward")
def reparameterize_backward(grad_z: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor | None,
                            seed: Tensor | None, backend: str,
                            needs: list[bool]) -> list[Tensor]:
    if mu.numel() == 0:
        return _empty_grads(needs, (mu, logvar, eps))
    return implementation(backend).reparameterize_bwd(grad_z, mu, logvar, eps, seed, needs)


@reparameterize_backward.register_fake
def _(grad_z, mu, logvar, eps, seed, backend, needs):
    return _fake_grads(needs, (mu, logvar, eps))


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, eps, seed, _, backend = inputs
    ctx.save_for_backward(mu, logvar, eps, seed)
    ctx.backend = backend


def _reparameterize_grad(ctx, grad_z):
    needs = list(ctx.needs_input_grad[:3])
    grads = call(reparameterize_backward, grad_z, *ctx.saved_tensors, ctx.backend, needs)
    return *_place(grads, needs), None, None, None


reparameterize.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)
_AUTOGRAD[reparameterize] = (_reparameterize_setup, _reparameterize_grad)


# ---------------------------------------------------------------------------------------------
# gaussian_kl
# ---------------------------------------------------------------------------------------------


@_custom_op("gaussian_kl")
def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None,
                reduce_dim: int, backend: str) -> Tensor:
    if mu.numel() == 0:
        return mu.new_zeros(_reduced_shape(mu, reduce_dim), dtype=out_dtype(mu.dtype))
    return implementation(backend).gaussian_kl_fwd(mu, logvar, prior_mu, prior_logvar,
                                                   reduce_dim)


@gaussian_kl.register_fake
def _(mu, logvar, prior_mu, prior_logvar, reduce_dim, backend):
    return mu.new_empty(_reduced_shape(mu, reduce_dim), dtype=out_dtype(mu.dtype))


@_custom_op("gaussian_kl_backward")
def gaussian_kl_backward(grad: Tensor, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None,
                         prior_logvar: Tensor | None, reduce_dim: int, backend: str,
                         needs: list[bool]) -> list[Tensor]:
    if mu.numel() == 0:
        return _empty_grads(needs, (mu, logvar, prior_mu, prior_logvar))
    return implementation(backend).gaussian_kl_bwd(grad, mu, logvar, prior_mu, prior_logvar,
                                                   reduce_dim, needs)


@gaussian_kl_backward.register_fake
def _(grad, mu, logvar, prior_mu, prior_logvar, reduce_dim, backend, needs):
    return _fake_grads(needs, (mu, logvar, prior_mu, prior_logvar))


def _gaussian_kl_setup(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar, reduce_dim, backend = inputs
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)
    ctx.reduce_dim, ctx.backend = reduce_dim, backend


def _gaussian_kl_grad(ctx, grad):
    needs = list(ctx.needs_input_grad[:4])
    grads = call(gaussian_kl_backward, grad, *ctx.saved_tensors, ctx.reduce_dim, ctx.backend, needs)
    return *_place(grads, needs), None, None


gaussian_kl.register_autograd(_gaussian_kl_grad, setup_context=_gaussian_kl_setup)
_AUTOGRAD[gaussian_kl] = (_gaussian_kl_setup, _gaussian_kl_grad)


# ---------------------------------------------------------------------------------------------
# bernoulli_nll
# ---------------------------------------------------------------------------------------------


@_custom_op("bernoulli_nll")
def bernoulli_nll(logits: Tensor, target: Tensor, backend: str) -> Tensor:
    if logits.numel() == 0:
        return logits.new_zeros(logits.shape[:1], dtype=out_dtype(logits.dtype))
    return implementation(backend).bernoulli_nll_fwd(logits, target)


@bernoulli_nll.register_fake
def _(logits, target, backend):
    return logits.new_empty(logits.shape[:1], dtype=out_dtype(logits.dtype))


@_custom_op("bernoulli_nll_backward")
def bernoulli_nll_backward(grad: Tensor, logits: Tensor, target: Tensor, backend: str,
                           needs: list[bool]) -> list[Tensor]:
    if logits.numel() == 0:
        return _empty_grads(needs, (logits, target))
    return implementation(backend).bernoulli_nll_bwd(grad, logits, target, needs)


@bernoulli_nll_backward.register_fake
def _(grad, logits, target, backend, needs):
    return _fake_grads(needs, (logits, target))


def _bernoulli_nll_setup(ctx, inputs, output):
    logits, target, backend = inputs
    ctx.save_for_backward(logits, target)
    ctx.backend = backend


def _bernoulli_nll_grad(ctx, grad):
    needs = list(ctx.needs_input_grad[:2])
    grads = call(bernoulli_nll_backward, grad, *ctx.saved_tensors, ctx.backend, needs)
    return *_place(grads, needs), None


bernoulli_nll.register_autograd(_bernoulli_nll_grad, setup_context=_bernoulli_nll_setup)
_AUTOGRAD[bernoulli_nll] = (_bernoulli_nll_setup, _bernoulli_nll_grad)


# ---------------------------------------------------------------------------------------------
# gaussian_nll
# ---------------------------------------------------------------------------------------------


@_custom_op("gaussian_nll")
def gaussian_nll(mean: Tensor, target: Tensor, logvar: Tensor | None, logvar_value: float,
                 backend: str) -> Tensor:
    if mean.numel() == 0:
        return mean.new_zeros(mean.shape[:1], dtype=out_dtype(mean.dtype))
    return implementation(backend).gaussian_nll_fwd(mean, target, logvar, logvar_value)


@gaussian_nll.register_fake
def _(mean, target, logvar, logvar_value, backend):
    return mean.new_empty(mean.shape[:1], dtype=out_dtype(mean.dtype))


@_custom_op("gaussian_nll_backward")
def gaussian_nll_backward(grad: Tensor, mean: Tensor, target: Tensor, logvar: Tensor | None,
                          logvar_value: float, backend: str,
                          needs: list[bool]) -> list[Tensor]:
    if mean.numel() == 0:
        return _empty_grads(needs, (mean, target, logvar))
    return implementation(backend).gaussian_nll_bwd(grad, mean, target, logvar, logvar_value,
                                                    needs)


@gaussian_nll_backward.register_fake
def _(grad, mean, target, logvar, logvar_value, backend, needs):
    return _fake_grads(needs, (mean, target, logvar))


def _gaussian_nll_setup(ctx, inputs, output):
    mean, target, logvar, logvar_value, backend = inputs
    ctx.save_for_backward(mean, target, logvar)
    ctx.logvar_value, ctx.backend = logvar_value, backend


def _gaussian_nll_grad(ctx, grad):
    needs = list(ctx.needs_input_grad[:3])
    grads = call(gaussian_nll_backward, grad, *ctx.saved_tensors, ctx.logvar_value, ctx.backend,
                                  needs)
    return *_place(grads, needs), None, None


gaussian_nll.register_autograd(_gaussian_nll_grad, setup_context=_gaussian_nll_setup)
_AUTOGRAD[gaussian_nll] = (_gaussian_nll_setup, _gaussian_nll_grad)


# ---------------------------------------------------------------------------------------------
# sample_and_kl
# ---------------------------------------------------------------------------------------------


@_custom_op("sample_and_kl")
def sample_and_kl(mu: Tensor, logvar: Tensor, seed: Tensor, reduce_dim: int,
                  backend: str) -> tuple[Tensor, Tensor]:
    if mu.numel() == 0:
        kl = mu.new_zeros(_reduced_shape(mu, reduce_dim), dtype=out_dtype(mu.dtype))
        return mu.new_empty(mu.shape), kl
    return implementation(backend).sample_and_kl_fwd(mu, logvar, seed, reduce_dim)


@sample_and_kl.register_fake
def _(mu, logvar, seed, reduce_dim, backend):
    kl = mu.new_empty(_reduced_shape(mu, reduce_dim), dtype=out_dtype(mu.dtype))
    return mu.new_empty(mu.shape), kl


@_custom_op("sample_and_kl_backward")
def sample_and_kl_backward(grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor,
                           seed: Tensor, reduce_dim: int, backend: str,
                           needs: list[bool]) -> list[Tensor]:
    if mu.numel() == 0:
        return _empty_grads(needs, (mu, logvar))
    return implementation(backend).sample_and_kl_bwd(grad_z, grad_kl, mu, logvar, seed,
                                                     reduce_dim, needs)


@sample_and_kl_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, seed, reduce_dim, backend, needs):
    return _fake_grads(needs, (mu, logvar))


def _sample_and_kl_setup(ctx, inputs, output):
    mu, logvar, seed, reduce_dim, backend = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.reduce_dim, ctx.backend = reduce_dim, backend


def _sample_and_kl_grad(ctx, grad_z, grad_kl):
    needs = list(ctx.needs_input_grad[:2])
    mu, logvar, seed = ctx.saved_tensors
    grads = call(sample_and_kl_backward, grad_z, grad_kl, mu, logvar, seed, ctx.reduce_dim,
                                   ctx.backend, needs)
    return *_place(grads, needs), None, None, None


sample_and_kl.register_autograd(_sample_and_kl_grad, setup_context=_sample_and_kl_setup)
_AUTOGRAD[sample_and_kl] = (_sample_and_kl_setup, _sample_and_kl_grad)


# ---------------------------------------------------------------------------------------------
# iwae_log_likelihood
# ---------------------------------------------------------------------------------------------


def _iwae_log_weights_without_event(log_px: Tensor, z: Tensor) -> Tensor:
    """An empty event leaves only log p(x|z): the log-weights are log_px itself."""
    return log_px.to(out_dtype(z.dtype)).clone()


@_custom_op("iwae_log_likelihood")
def iwae_log_likelihood(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor,
                        backend: str) -> tuple[Tensor, Tensor]:
    K, B, N = z.shape
    if B == 0 or N == 0:
        log_w = _iwae_log_weights_without_event(log_px, z)
        return torch.logsumexp(log_w, 0) - math.log(K), log_w
    return implementation(backend).iwae_fwd(log_px, z, mu, logvar)


@iwae_log_likelihood.register_fake
def _(log_px, z, mu, logvar, backend):
    K, B, _ = z.shape
    dtype = out_dtype(z.dtype)
    return z.new_empty((B,), dtype=dtype), z.new_empty((K, B), dtype=dtype)


@_custom_op("iwae_log_likelihood_backward")
def iwae_log_likelihood_backward(grad: Tensor, out: Tensor, log_w: Tensor, log_px: Tensor,
                                 z: Tensor, mu: Tensor, logvar: Tensor, backend: str,
                                 needs: list[bool]) -> list[Tensor]:
    _, B, N = z.shape
    if B == 0 or N == 0:
        weights = grad * torch.exp(log_w - torch.logsumexp(log_w, 0))
        grads = _empty_grads(needs, (log_px, z, mu, logvar))
        if needs[0]:
            grads[0] = weights.to(log_px.dtype)
        return grads
    return implementation(backend).iwae_bwd(grad, out, log_w, log_px, z, mu, logvar, needs)


@iwae_log_likelihood_backward.register_fake
def _(grad, out, log_w, log_px, z, mu, logvar, backend, needs):
    return _fake_grads(needs, (log_px, z, mu, logvar))


def _iwae_setup(ctx, inputs, output):
    log_px, z, mu, logvar, backend = inputs
    out, log_w = output
    ctx.save_for_backward(out, log_w, log_px, z, mu, logvar)
    ctx.backend = backend
    ctx.mark_non_differentiable(log_w)


def _iwae_grad(ctx, grad, _grad_log_w):
    needs = list(ctx.needs_input_grad[:4])
    grads = call(iwae_log_likelihood_backward, grad, *ctx.saved_tensors, ctx.backend, needs)
    return *_place(grads, needs), None


iwae_log_likelihood.register_autograd(_iwae_grad, setup_context=_iwae_setup)
_AUTOGRAD[iwae_log_likelihood] = (_iwae_setup, _iwae_grad)


# ---------------------------------------------------------------------------------------------
# continuous_bernoulli_nll
# ---------------------------------------------------------------------------------------------


@_custom_op("continuous_bernoulli_nll")
def continuous_bernoulli_nll(logits: Tensor, target: Tensor, backend: str) -> Tensor:
    if logits.numel() == 0:
        return logits.new_zeros(logits.shape[:1], dtype=out_dtype(logits.dtype))
    return implementation(backend).continuous_bernoulli_nll_fwd(logits, target)


@continuous_bernoulli_nll.register_fake
def _(logits, target, backend):
    return logits.new_empty(logits.shape[:1], dtype=out_dtype(logits.dtype))


@_custom_op("continuous_bernoulli_nll_backward")
def continuous_bernoulli_nll_backward(grad: Tensor, logits: Tensor, target: Tensor, backend: str,
                                      needs: list[bool]) -> list[Tensor]:
    if logits.numel() == 0:
        return _empty_grads(needs, (logits, target))
    return implementation(backend).continuous_bernoulli_nll_bwd(grad, logits, target, needs)


@continuous_bernoulli_nll_backward.register_fake
def _(grad, logits, target, backend, needs):
    return _fake_grads(needs, (logits, target))


def _continuous_bernoulli_nll_grad(ctx, grad):
    needs = list(ctx.needs_input_grad[:2])
    grads = call(continuous_bernoulli_nll_backward, grad, *ctx.saved_tensors, ctx.backend, needs)
    return *_place(grads, needs), None


continuous_bernoulli_nll.register_autograd(_continuous_bernoulli_nll_grad,
                                           setup_context=_bernoulli_nll_setup)
_AUTOGRAD[continuous_bernoulli_nll] = (_bernoulli_nll_setup, _continuous_bernoulli_nll_grad)


# ---------------------------------------------------------------------------------------------
# discretized_mix_logistic_nll
# ---------------------------------------------------------------------------------------------
# Backend interface (views: params (B, P, S), x (B, C, S); S pixels, P = M (1 + 3C) or 3M):
#   discretized_mix_logistic_nll_fwd(params, x, n_mixtures, n_bins) -> (B,)
#   discretized_mix_logistic_nll_bwd(grad, params, x, n_mixtures, n_bins) -> d_params (B, P, S)
# No gradient flows to x (data on the bin grid).


@_custom_op("discretized_mix_logistic_nll")
def discretized_mix_logistic_nll(params: Tensor, x: Tensor, n_mixtures: int, n_bins: int,
                                 backend: str) -> Tensor:
    if params.numel() == 0:
        return params.new_zeros(params.shape[:1], dtype=out_dtype(params.dtype))
    return implementation(backend).discretized_mix_logistic_nll_fwd(params, x, n_mixtures,
                                                                    n_bins)


@discretized_mix_logistic_nll.register_fake
def _(params, x, n_mixtures, n_bins, backend):
    return params.new_empty(params.shape[:1], dtype=out_dtype(params.dtype))


@_custom_op("discretized_mix_logistic_nll_backward")
def discretized_mix_logistic_nll_backward(grad: Tensor, params: Tensor, x: Tensor,
                                          n_mixtures: int, n_bins: int,
                                          backend: str) -> Tensor:
    if params.numel() == 0:
        return torch.zeros_like(params, memory_format=torch.contiguous_format)
    return implementation(backend).discretized_mix_logistic_nll_bwd(grad, params, x, n_mixtures,
                                                                    n_bins)


@discretized_mix_logistic_nll_backward.register_fake
def _(grad, params, x, n_mixtures, n_bins, backend):
    return torch.empty_like(params, memory_format=torch.contiguous_format)


def _dmol_setup(ctx, inputs, output):
    params, x, n_mixtures, n_bins, backend = inputs
    ctx.save_for_backward(params, x)
    ctx.n_mixtures, ctx.n_bins, ctx.backend = n_mixtures, n_bins, backend


def _dmol_grad(ctx, grad):
    params, x = ctx.saved_tensors
    d_params = None
    if ctx.needs_input_grad[0]:
        d_params = call(discretized_mix_logistic_nll_backward, grad, params, x, ctx.n_mixtures,
                        ctx.n_bins, ctx.backend)
    return d_params, None, None, None, None


discretized_mix_logistic_nll.register_autograd(_dmol_grad, setup_context=_dmol_setup)
_AUTOGRAD[discretized_mix_logistic_nll] = (_dmol_setup, _dmol_grad)


# ---------------------------------------------------------------------------------------------
# nearest_code (vector quantization)
# ---------------------------------------------------------------------------------------------
# Backend interface (views: x (N, D), codebook (K, D), one dtype; N, K, D >= 1):
#   nearest_code_fwd(x, codebook, metric) -> (index int64 (N,), dist (N,) float32 / float64)
# No gradient: the index is an integer and the distances are marked non-differentiable
# (vector_quantize gives the quantizer its gradients).


def _nearest_code_empty(x: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """N = 0, or D = 0 (every code at distance 0, or 1 - 0 for cosine: code 0)."""
    N = x.shape[0]
    index = x.new_zeros((N,), dtype=torch.int64)
    dist = x.new_full((N,), 1.0 if metric == "cosine" else 0.0, dtype=out_dtype(x.dtype))
    return index, dist


@_custom_op("nearest_code")
def nearest_code(x: Tensor, codebook: Tensor, metric: str, backend: str) -> tuple[Tensor, Tensor]:
    if x.shape[0] == 0 or x.shape[1] == 0:
        return _nearest_code_empty(x, codebook, metric)
    return implementation(backend).nearest_code_fwd(x, codebook, metric)


@nearest_code.register_fake
def _(x, codebook, metric, backend):
    N = x.shape[0]
    return x.new_empty((N,), dtype=torch.int64), x.new_empty((N,), dtype=out_dtype(x.dtype))


def _nearest_code_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _nearest_code_grad(ctx, grad_index, grad_dist):
    return None, None, None, None


nearest_code.register_autograd(_nearest_code_grad, setup_context=_nearest_code_setup)
_AUTOGRAD[nearest_code] = (_nearest_code_setup, _nearest_code_grad)
