"""The custom ops: one table (``OPS``) from which every op's ``torch.library`` registration, fake
(meta) kernel, autograd and eager fast path are made, and the dispatch to the backends.

Every op takes canonical ``(B, N)`` views (dimension 0 the batch, the event flattened; any
strides, stride 0 for broadcast operands) plus the name of the concrete backend that serves it,
which the public functions resolve beforehand. A loss op computes per-sample sums ``(B,)`` and
reduces them itself, as its ``reduction`` argument says (0: none, 1: sum, 2: mean; the same
``torch`` sum and mean as ever, inside the op): one autograd node per loss, no extra op after
it. Forward outputs are float32 (float64 for float64 inputs). Backward ops are custom ops too
(one pass each) and return only the gradients asked for (``needs``).

A row of ``OPS`` names the op's arguments (its schema: tensors first, then the attributes), its
outputs, how many of its tensors take gradients, and what its backward reads. The backends
(``fastvae.ops.reference``, ``fastvae.kernels``, ``fastvae.ops.native``) implement, per row:

    <method>_fwd(*tensors, *attributes) -> outputs        (per-sample sums, never reduced)
    <method>_bwd(*grads, *saved_outputs, *tensors, *backward_attributes, needs) -> grads

without the ``reduction`` attribute (reductions happen here) and with ``needs`` only where the
row says so. The interface, row by row:

    reparameterize_fwd(mu, logvar, eps | None, seed | None, n_samples, keep_noise)
        -> (z (K, B, N), noise: the eps drawn (K, B, N) when keep_noise and eps is None, else
        empty (0,))
    reparameterize_bwd(grad_z, noise, mu, logvar, eps | None, seed | None, needs[3]) -> grads
        (reads the kept noise where it is not empty, else regenerates it from seed)
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
    discretized_mix_logistic_nll_fwd(params (B, P, S), x (B, C, S), n_mixtures, n_bins) -> (B,)
    discretized_mix_logistic_nll_bwd(grad, params, x, n_mixtures, n_bins) -> d_params
    nearest_code_fwd(x (N, D), codebook (K, D), metric) -> (index int64 (N,), dist (N,))
    finite_scalar_quantize_fwd(z (N, D), levels, basis, a, b, mode)
        -> (codes (N, D) in z's dtype, index int64 (N,))
    finite_scalar_quantize_bwd(grad (N, D), z, levels, basis, a, b, mode) -> d_z
    lfq_entropy_fwd(logits (R, C, d), eps) -> (sums (C, 2**d), entropy (R, C))
    lfq_entropy_bwd(grad_sums, grad_entropy, logits, eps, needs[1]) -> [d_logits]
    residual_vq_fwd(x (N, D), codebooks (L, K, D), n_levels (N,) | None, rotation)
        -> (quantized (N, D), indices (N, L), commit (N, L), dist (N, L))
    residual_vq_bwd(grad_q, grad_commit, grad_dist, indices, x, codebooks, n_levels | None,
        rotation, needs[2]) -> grads

Backends see B >= 1 and N >= 1 (empty inputs are answered here), a prior given as both
tensors or neither, ``seed`` as an int64 tensor of one element on the tensors' device, a
per-sample gradient ``(B,)`` (a stride-0 view after a reduction), and return gradients as new
contiguous tensors in each input's dtype, only those with ``needs``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .backends import implementation

# reduction codes of the loss ops
NONE, SUM, MEAN = 0, 1, 2
REDUCTION_CODES = {"none": NONE, "sum": SUM, "mean": MEAN}


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses come back in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class OpSpec:
    """One op of the table; the fields after ``fake`` have defaults that most ops keep."""

    name: str  # fastvae::<name> and fastvae::<name>_backward
    arguments: str  # the forward's schema arguments: tensors first, then attributes
    returns: str  # the forward's schema return
    grads: int  # the first `grads` tensors may receive gradients
    fake: Callable[..., Tensor | tuple[Tensor, ...]]  # (*arguments) -> empty outputs
    method: str = ""  # the backend methods <method>_fwd / <method>_bwd (default: name)
    grad_arguments: str = "Tensor grad"  # the backward's leading arguments: output gradients
    saved_outputs: tuple[int, ...] = ()  # outputs the backward reads (after the gradients)
    backward_attributes: tuple[str, ...] = ()  # attributes the backward takes, by name
    non_differentiable: tuple[int, ...] = ()  # outputs without gradient
    per_sample: int | None = None  # the (B,) output that `reduction` reduces
    needs: bool = True  # the backend backward takes `needs`
    is_empty: Callable[..., bool] = lambda t, *rest: t.numel() == 0
    empty: Callable | None = None  # (*arguments) -> outputs for empty inputs (default: zeros)
    empty_grads: Callable | None = None  # (grads, saved, tensors, needs) -> gradients

    def __post_init__(self):
        self.method = self.method or self.name
        names = [(kind, arg.rsplit(" ", 1)[1]) for kind, arg in
                 ((a.strip().split(" ", 1)[0], a.strip()) for a in self.arguments.split(","))]
        self.n_tensors = sum(kind.startswith("Tensor") for kind, _ in names)
        self.attribute_names = [n for _, n in names[self.n_tensors:]]
        self.n_lead = self.grad_arguments.count("Tensor")  # output gradients, saved outputs
        self.reduction_at = (self.attribute_names.index("reduction")
                             if "reduction" in self.attribute_names else None)
        # backend attributes: the forward's minus `reduction`; the backward's by name
        self.forward_attrs = [i for i, n in enumerate(self.attribute_names) if n != "reduction"]
        self.backward_attrs = [self.attribute_names.index(n) for n in self.backward_attributes]
        self.backend_backward_attrs = [i for i in self.backward_attrs if i != self.reduction_at]
        self.fwd_method = f"{self.method}_fwd"
        self.bwd_method = f"{self.method}_bwd"

    def forward_schema(self) -> str:
        """The forward op's schema, after its name."""
        return f"({self.arguments}, str backend) -> {self.returns}"

    def backward_schema(self) -> str:
        """The backward op's schema, after its name: the output gradients, the saved outputs,
        the forward's tensors, the backward's attributes, the backend and ``needs``."""
        tensor_args = ", ".join(a.strip() for a in self.arguments.split(",")[:self.n_tensors])
        kinds = {a.strip().rsplit(" ", 1)[1]: a.strip()
                 for a in self.arguments.split(",")[self.n_tensors:]}
        attrs = "".join(f", {kinds[name]}" for name in self.backward_attributes)
        return (f"({self.grad_arguments}, {tensor_args}{attrs}, str backend, bool[] needs) "
                "-> Tensor[]")

    def fake_kernels(self) -> tuple[Callable, Callable]:
        """The fake (meta) kernels of the row's forward and backward ops."""

        def forward_fake(*args):
            return self.fake(*args[:-1])

        def backward_fake(*args):
            needs = args[-1]
            tensors = args[self.n_lead:self.n_lead + self.n_tensors]
            return _fake_grads(needs, tensors[:self.grads])

        return forward_fake, backward_fake


def _zeros_like_fake(spec: OpSpec, args: Sequence) -> Tensor | tuple[Tensor, ...]:
    out = spec.fake(*args)
    if isinstance(out, tuple):
        return tuple(o.zero_() for o in out)
    return out.zero_()


def _reduced(t: Tensor, reduction: int) -> Tensor:
    """A (B,) per-sample tensor, or its shape-() reduction (fake: the shape only)."""
    return t if reduction == NONE else t.new_empty(())


def _per_sample_fake(t: Tensor, reduction: int, dtype: torch.dtype) -> Tensor:
    return _reduced(t.new_empty(t.shape[:1], dtype=out_dtype(dtype)), reduction)


def _kl_shape(mu: Tensor, reduce_dim: int) -> tuple[int]:
    return (mu.shape[0],) if reduce_dim == 1 else (mu.shape[1],)


def _iwae_empty(log_px, z, mu, logvar):
    """An empty event leaves only log p(x|z): the log-weights are log_px itself."""
    log_w = log_px.to(out_dtype(z.dtype)).clone()
    return torch.logsumexp(log_w, 0) - math.log(z.shape[0]), log_w


def _iwae_empty_grads(grads, saved, tensors, needs):
    (grad,), (_, log_w) = grads, saved
    out = _zero_grads(needs, tensors)
    if needs[0]:
        out[0] = (grad * torch.exp(log_w - torch.logsumexp(log_w, 0))).to(tensors[0].dtype)
    return out


def _nearest_code_empty(x: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """N = 0, or D = 0 (every code at distance 0, or 1 - 0 for cosine: code 0)."""
    index = x.new_zeros(x.shape[:1], dtype=torch.int64)
    dist = x.new_full(x.shape[:1], 1.0 if metric == "cosine" else 0.0, dtype=out_dtype(x.dtype))
    return index, dist


def _residual_vq_empty(x: Tensor, codebooks: Tensor, n_levels: Tensor | None,
                      rotation: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """N = 0, or D = 0 (every code at distance 0: code 0 at every active level)."""
    N, L = x.shape[0], codebooks.shape[0]
    index = x.new_zeros((N, L), dtype=torch.int64)
    if n_levels is not None:
        active = torch.arange(L, device=x.device) < n_levels[:, None]
        index = torch.where(active, index, -1)
    dist = x.new_zeros((N, L))
    return x.new_zeros(x.shape), index, dist, dist.clone()


OPS: list[OpSpec] = [
    # -> (z, the noise drawn, kept for the backward: (K, B, N) when keep_noise and eps is None,
    # else empty; functional.keeps_noise says when, docs/random-numbers.md)
    OpSpec("reparameterize",
           "Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed, int n_samples, bool keep_noise",
           "(Tensor, Tensor)", grads=3, grad_arguments="Tensor grad_z, Tensor noise",
           saved_outputs=(1,), non_differentiable=(1,),
           fake=lambda mu, lv, eps, seed, K, keep: (
               mu.new_empty((K, *mu.shape)),
               mu.new_empty((K, *mu.shape) if keep and eps is None else (0,)))),
    OpSpec("gaussian_kl",
           "Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, int reduce_dim, "
           "int reduction", "Tensor",
           grads=4, backward_attributes=("reduce_dim", "reduction"), per_sample=0,
           fake=lambda mu, lv, pm, plv, reduce_dim, reduction: _reduced(
               mu.new_empty(_kl_shape(mu, reduce_dim), dtype=out_dtype(mu.dtype)), reduction)),
    OpSpec("bernoulli_nll", "Tensor logits, Tensor target, int reduction", "Tensor",
           grads=2, backward_attributes=("reduction",), per_sample=0,
           fake=lambda logits, target, reduction: _per_sample_fake(logits, reduction,
                                                                   logits.dtype)),
    OpSpec("gaussian_nll",
           "Tensor mean, Tensor target, Tensor? logvar, float logvar_value, int reduction",
           "Tensor", grads=3, backward_attributes=("logvar_value", "reduction"), per_sample=0,
           fake=lambda mean, target, logvar, value, reduction: _per_sample_fake(
               mean, reduction, mean.dtype)),
    OpSpec("sample_and_kl",
           "Tensor mu, Tensor logvar, Tensor seed, int reduce_dim, int reduction",
           "(Tensor, Tensor)", grads=2, grad_arguments="Tensor grad_z, Tensor grad_kl",
           backward_attributes=("reduce_dim", "reduction"), per_sample=1,
           fake=lambda mu, lv, seed, reduce_dim, reduction: (
               mu.new_empty(mu.shape),
               _reduced(mu.new_empty(_kl_shape(mu, reduce_dim), dtype=out_dtype(mu.dtype)),
                        reduction))),
    OpSpec("iwae_log_likelihood",
           "Tensor log_px, Tensor z, Tensor mu, Tensor logvar", "(Tensor, Tensor)",
           grads=4, method="iwae", grad_arguments="Tensor grad, Tensor out, Tensor log_w",
           saved_outputs=(0, 1), non_differentiable=(1,),
           fake=lambda log_px, z, mu, logvar: (
               z.new_empty(z.shape[1:2], dtype=out_dtype(z.dtype)),
               z.new_empty(z.shape[:2], dtype=out_dtype(z.dtype))),
           is_empty=lambda log_px, z, mu, logvar: z.shape[1] == 0 or z.shape[2] == 0,
           empty=_iwae_empty, empty_grads=_iwae_empty_grads),
    OpSpec("continuous_bernoulli_nll", "Tensor logits, Tensor target, int reduction", "Tensor",
           grads=2, backward_attributes=("reduction",), per_sample=0,
           fake=lambda logits, target, reduction: _per_sample_fake(logits, reduction,
                                                                   logits.dtype)),
    # params (B, P, S), x (B, C, S); no gradient flows to x (data on the bin grid)
    OpSpec("discretized_mix_logistic_nll",
           "Tensor params, Tensor x, int n_mixtures, int n_bins, int reduction", "Tensor",
           grads=1, backward_attributes=("n_mixtures", "n_bins", "reduction"), per_sample=0,
           needs=False,
           fake=lambda params, x, M, n_bins, reduction: _per_sample_fake(
               params, reduction, params.dtype)),
    # x (N, D), codebook (K, D): no gradient (vector_quantize gives the quantizer its own)
    OpSpec("nearest_code", "Tensor x, Tensor codebook, str metric", "(Tensor, Tensor)",
           grads=0, non_differentiable=(0, 1),
           fake=lambda x, codebook, metric: (
               x.new_empty(x.shape[:1], dtype=torch.int64),
               x.new_empty(x.shape[:1], dtype=out_dtype(x.dtype))),
           is_empty=lambda x, codebook: x.shape[0] == 0 or x.shape[1] == 0,
           empty=_nearest_code_empty),
    # z (N, D); levels, basis int64 (D,); a, b (D,) the bound's constants in the compute dtype
    # (fastvae/ops/fsq.py); mode: reference.FSQ_SYMMETRIC | FSQ_HARD_CLAMP bits. Codes in z's
    # dtype, the mixed-radix index int64 (exact); the gradient reaches z only.
    OpSpec("finite_scalar_quantize",
           "Tensor z, Tensor levels, Tensor basis, Tensor a, Tensor b, int mode",
           "(Tensor, Tensor)", grads=1, backward_attributes=("mode",), non_differentiable=(1,),
           needs=False,
           fake=lambda z, levels, basis, a, b, mode: (
               z.new_empty(z.shape), z.new_empty(z.shape[:1], dtype=torch.int64))),
    # logits (R, C, d) -> (code sums (C, 2**d), per-row entropy (R, C)): lookup-free
    # quantization's entropy statistics (fastvae/ops/lfq.py)
    OpSpec("lfq_entropy", "Tensor logits, float eps", "(Tensor, Tensor)",
           grads=1, grad_arguments="Tensor grad_sums, Tensor grad_entropy",
           backward_attributes=("eps",),
           fake=lambda logits, eps: (
               logits.new_empty((logits.shape[1], 1 << logits.shape[2]),
                                dtype=out_dtype(logits.dtype)),
               logits.new_empty(logits.shape[:2], dtype=out_dtype(logits.dtype)))),
    # x (N, D), codebooks (L, K, D) in one compute dtype, n_levels int64 (N,) or None; the
    # indices are saved, the residuals recomputed by the backward
    OpSpec("residual_vq", "Tensor x, Tensor codebooks, Tensor? n_levels, int rotation",
           "(Tensor, Tensor, Tensor, Tensor)", grads=2,
           grad_arguments="Tensor grad_q, Tensor grad_commit, Tensor grad_dist, Tensor indices",
           saved_outputs=(1,), non_differentiable=(1,), backward_attributes=("rotation",),
           fake=lambda x, codebooks, n_levels, rotation: (
               x.new_empty(x.shape),
               x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64),
               x.new_empty((x.shape[0], codebooks.shape[0])),
               x.new_empty((x.shape[0], codebooks.shape[0]))),
           is_empty=lambda x, codebooks, n_levels: x.shape[0] == 0 or x.shape[1] == 0,
           empty=_residual_vq_empty),
]


# ---------------------------------------------------------------------------------------------
# Forward and backward of any row
# ---------------------------------------------------------------------------------------------


def _zero_grads(needs: Sequence[bool], like: Sequence[Tensor | None]) -> list[Tensor]:
    return [torch.zeros_like(t, memory_format=torch.contiguous_format)
            for t, need in zip(like, needs, strict=False) if need]


def _fake_grads(needs: Sequence[bool], like: Sequence[Tensor | None]) -> list[Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t, need in zip(like, needs, strict=False) if need]


def _reduce(per_sample: Tensor, reduction: int) -> Tensor:
    if reduction == SUM:
        return per_sample.sum()
    if reduction == MEAN:
        return per_sample.mean()
    return per_sample


def _with_reduction(spec: OpSpec, args: tuple, reduction: int) -> tuple:
    at = spec.n_tensors + spec.reduction_at
    return (*args[:at], reduction, *args[at + 1:])


def _forward(spec: OpSpec, args: tuple, backend: str):
    """The op's value: the backend's per-sample sums, reduced as ``reduction`` says."""
    reduction = NONE if spec.reduction_at is None else args[spec.n_tensors + spec.reduction_at]
    if reduction != NONE:
        args = _with_reduction(spec, args, NONE)
    tensors = args[:spec.n_tensors]
    if spec.is_empty(*tensors):
        out = spec.empty(*args) if spec.empty else _zeros_like_fake(spec, args)
    else:
        attrs = args[spec.n_tensors:]
        out = getattr(implementation(backend), spec.fwd_method)(
            *tensors, *(attrs[i] for i in spec.forward_attrs))
    if reduction == NONE:
        return out
    if isinstance(out, tuple):
        return tuple(_reduce(o, reduction) if i == spec.per_sample else o
                     for i, o in enumerate(out))
    return _reduce(out, reduction)


def _backward(spec: OpSpec, args: tuple, backend: str, needs: list[bool]) -> list[Tensor]:
    """The gradients asked for: ``args`` are (*grads, *saved outputs, *tensors, *backward
    attributes)."""
    n_s = len(spec.saved_outputs)
    n_g = spec.n_lead - n_s
    grads = list(args[:n_g])
    saved = args[n_g:n_g + n_s]
    tensors = args[n_g + n_s:n_g + n_s + spec.n_tensors]
    attrs = args[n_g + n_s + spec.n_tensors:]
    if spec.reduction_at is not None:
        reduction = attrs[spec.backward_attributes.index("reduction")]
        if reduction != NONE:
            B = tensors[0].shape[0]
            g = grads[spec.per_sample]
            grads[spec.per_sample] = (g if reduction == SUM else g / B).expand(B)
    if spec.is_empty(*tensors):
        if spec.empty_grads:
            return spec.empty_grads(grads, saved, tensors, needs)
        return _zero_grads(needs, tensors[:spec.grads])
    backend_attrs = [a for a, name in zip(attrs, spec.backward_attributes, strict=True)
                     if name != "reduction"]
    method = getattr(implementation(backend), spec.bwd_method)
    if not spec.needs:
        return [method(*grads, *saved, *tensors, *backend_attrs)] if needs[0] else []
    return method(*grads, *saved, *tensors, *backend_attrs, needs)


def _setup(spec: OpSpec, ctx, inputs: tuple, output) -> None:
    """``setup_context`` of every op: saves the tensors (and the outputs the backward reads)."""
    outputs = output if isinstance(output, tuple) else (output,)
    if spec.grads:
        ctx.save_for_backward(*(outputs[i] for i in spec.saved_outputs),
                              *inputs[:spec.n_tensors])
    attrs = inputs[spec.n_tensors:-1]
    ctx.attrs = [attrs[i] for i in spec.backward_attrs]
    ctx.backend = inputs[-1]
    ctx.spec = spec
    for i in spec.non_differentiable:
        ctx.mark_non_differentiable(outputs[i])


def _gradients(ctx, *grads) -> tuple:
    """The registered backward of every op: the backward op, then one entry per input."""
    spec: OpSpec = ctx.spec
    if not spec.grads:  # every output non-differentiable: not reached
        return (None,) * (spec.n_tensors + len(spec.attribute_names) + 1)
    needs = list(ctx.needs_input_grad[:spec.grads])
    grads = [g for i, g in enumerate(grads) if i not in spec.non_differentiable]
    args = (*grads, *ctx.saved_tensors, *ctx.attrs)
    it = iter(call(BACKWARD[spec.name], *args, ctx.backend, needs))
    placed = [next(it) if need else None for need in needs]
    return (*placed, *(None,) * (spec.n_tensors - spec.grads + len(spec.attribute_names) + 1))


# ---------------------------------------------------------------------------------------------
# Registration, and the eager fast path
# ---------------------------------------------------------------------------------------------

# Every registered op, forward and backward, by its custom-op object, and the profiler names.
_NAME: dict[object, str] = {}
_IMPL: dict[object, Callable] = {}  # custom-op object -> its Python implementation
SPEC: dict[object, OpSpec] = {}  # forward op -> its row
BACKWARD: dict[str, object] = {}  # row name -> its backward op


def _register(spec: OpSpec):
    def forward(*args):
        return _forward(spec, args[:-1], args[-1])

    def backward(*args):
        return _backward(spec, args[:-2], args[-2], args[-1])

    forward_fake, backward_fake = spec.fake_kernels()
    qualname = f"fastvae::{spec.name}"
    fwd = torch.library.custom_op(qualname, forward, mutates_args=(),
                                  schema=spec.forward_schema())
    fwd.register_fake(forward_fake)
    fwd.register_autograd(_gradients, setup_context=lambda ctx, inputs, output:
                          _setup(spec, ctx, inputs, output))
    _NAME[fwd], _IMPL[fwd], SPEC[fwd] = qualname, forward, spec
    if spec.grads == 0:  # no gradient: no backward op
        return fwd, None
    bwd = torch.library.custom_op(f"{qualname}_backward", backward, mutates_args=(),
                                  schema=spec.backward_schema())
    bwd.register_fake(backward_fake)
    _NAME[bwd], _IMPL[bwd] = f"{qualname}_backward", backward
    BACKWARD[spec.name] = bwd
    return fwd, bwd


class _Eager(torch.autograd.Function):
    """An op's forward, setup and backward as an autograd.Function (the last argument is its
    row)."""

    @staticmethod
    def forward(ctx, *args):
        *inputs, spec = args
        output = _forward(spec, inputs[:-1], inputs[-1])
        _setup(spec, ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled() or not ctx.spec.grads:  # a second derivative: refused
            return *_gradients(ctx, *grads), None
        spec: OpSpec = ctx.spec
        needs = list(ctx.needs_input_grad[:spec.grads])
        if spec.non_differentiable:
            grads = [g for i, g in enumerate(grads) if i not in spec.non_differentiable]
        args = (*grads, *ctx.saved_tensors, *ctx.attrs)
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"fastvae::{spec.name}_backward"):
                out = _backward(spec, args, ctx.backend, needs)
        else:
            out = _backward(spec, args, ctx.backend, needs)
        it = iter(out)
        return (*(next(it) if need else None for need in needs),
                *(None,) * (spec.n_tensors - spec.grads + len(spec.attribute_names) + 2))


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

    Quicker still, where the torch-ABI library ``libfastvae_torch`` is built: eager calls of the
    ``"cpu"`` and ``"cuda"`` backends go to the op's ``.native`` overload, whose kernels and
    autograd are C++ kernels of the dispatcher (``fastvae/ops/native_dispatch.py``): no Python
    runs after this function, forward or backward, and the dispatcher names the ops.
    """
    if not _eager_tensors(args):
        return op(*args)
    if args[-1] in _NATIVE_BACKENDS:
        native = (NATIVE if NATIVE is not None else native_overloads()).get(op)
        if native is not None:
            return native(*args)
    if torch.autograd._profiler_enabled():
        with torch.autograd.profiler.record_function(_NAME[op]):
            return _call_eager(op, args)
    return _call_eager(op, args)


# custom-op object -> its ``.native`` overload (the rows libfastvae_torch serves); None until
# the first call of a native backend loads it ({} without the library).
NATIVE: dict[object, object] | None = None
_NATIVE_BACKENDS = ("cpu", "cuda")
_NATIVE_LOCK = threading.Lock()


def native_overloads() -> dict[object, object]:
    """custom-op object -> its ``.native`` overload, for the rows ``libfastvae_torch`` serves
    (``{}`` without it); the first call loads the library and registers them."""
    global NATIVE
    with _NATIVE_LOCK:  # the overloads are defined once, whichever thread calls first
        if NATIVE is None:
            from . import native_dispatch

            NATIVE = native_dispatch.overloads(tuple(SPEC.items()))
    return NATIVE


def _call_eager(op, args):
    grad = torch.is_grad_enabled()
    spec = SPEC.get(op)
    if spec is None:  # a backward op: second derivatives go to the dispatcher, which refuses
        if grad and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return op(*args)
        return _IMPL[op](*args)
    if grad and any(isinstance(a, Tensor) and a.requires_grad for a in args[:spec.n_tensors]):
        return _Eager.apply(*args, spec)
    return _forward(spec, args[:-1], args[-1])


for _spec in OPS:
    _fwd, _bwd = _register(_spec)
    globals()[_spec.name] = _fwd
    if _bwd is not None:
        globals()[f"{_spec.name}_backward"] = _bwd
del _spec, _fwd, _bwd
