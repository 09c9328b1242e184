"""Property-based tests: every op on every backend against the float64 oracle.

Hypothesis draws each example: the op's variant (prior, free bits, logvar kind, given or drawn
noise, samples, likelihood), the dtype, a shape from 1-D to 5-D (empty batch or event, single
elements, odd and prime sizes), a memory layout per input (contiguous, permuted, strided with an
offset, expanded with stride 0 along some dimensions), the reduction, and values either ordinary
or spanning wide ranges (logits to +-1e4, logvar from -100 to 80; narrower where a float16
gradient would overflow -- the overflow itself is ``test_extremes``'s). Values come from a torch
generator seeded by the example, so hypothesis shrinks shapes, layouts and choices, not digits.

Every output and every gradient is checked by ``accuracy.check``: within ``rtol`` of the oracle
relative to the size of the terms it sums and cancels, the gradients of broadcast inputs against
the sum of their per-element terms (as in ``test_ops``).

Reproducible and bounded: the "fastvae" hypothesis profile (``conftest.py``) derandomizes the
examples; ``EXAMPLES`` sets how many each op gets on each backend (fewer under Triton's
interpreter), on inputs of at most ``MAX_NUMEL`` elements.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import accuracy
import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, NOISE_TOL, TOL, Oracle, loss_dtype
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import fastvae as fv
from fastvae.ops import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter

# Examples per op (test function) and backend, and the largest input drawn. To search harder
# locally: FASTVAE_PROPERTY_EXAMPLES=2000 HYPOTHESIS_PROFILE=fastvae-explore pytest ...
EXAMPLES = {"triton": 40, "cpu": 100, "torch": 100, "cuda": 100}
if os.environ.get("FASTVAE_PROPERTY_EXAMPLES"):
    EXAMPLES = dict.fromkeys(EXAMPLES, int(os.environ["FASTVAE_PROPERTY_EXAMPLES"]))
MAX_NUMEL = {"triton": 256, "cpu": 600, "torch": 600, "cuda": 600}

FREE_BITS = 0.3
SIZES = (1, 2, 3, 5, 7, 11, 13, 17, 31)

# ---------------------------------------------------------------------------------------------
# Drawing an example
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    """What hypothesis drew: plain data, printed when an example fails."""

    variant: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    reduction: str | None
    layouts: dict[str, tuple]
    spreads: dict[str, str]
    seed: int
    extra: dict = field(default_factory=dict)


@st.composite
def shapes(draw, max_numel: int, min_dims: int = 1, max_dims: int = 5) -> tuple[int, ...]:
    ndim = draw(st.integers(min_dims, max_dims))
    # Empty batches and events, one in about a dozen draws each.
    batch = draw(st.sampled_from((0, *(1, 2, 3, 5, 7, 13) * 2)))
    shape, budget = [batch], max_numel // max(batch, 1)
    for _ in range(ndim - 1):
        size = draw(st.sampled_from((0, *SIZES * 3)).filter(lambda s, b=budget: s <= max(b, 1)))
        shape.append(size)
        budget //= max(size, 1)
    return tuple(shape)


@st.composite
def layouts(draw, shape: tuple[int, ...]) -> tuple:
    """("contiguous",) | ("permuted", perm) | ("strided", dim, offset) | ("expanded", dims)."""
    if not shape:
        return ("contiguous",)
    kind = draw(st.sampled_from(("contiguous", "permuted", "strided", "expanded")))
    if kind == "permuted":
        return kind, tuple(draw(st.permutations(range(len(shape)))))
    if kind == "strided":
        return kind, draw(st.integers(0, len(shape) - 1)), draw(st.integers(0, 1))
    if kind == "expanded":
        dims = [d for d, size in enumerate(shape) if size >= 1]
        chosen = draw(st.sets(st.sampled_from(dims), min_size=1)) if dims else set()
        return kind, tuple(sorted(chosen))
    return (kind,)


def lay_out(values: torch.Tensor, layout: tuple):
    """A tensor holding ``values`` in ``layout`` (the leaf), and the view of it the op gets.
    ``expanded`` keeps the first slice along its dimensions: the values seen are constant there."""
    kind = layout[0]
    if kind == "permuted":
        perm = layout[1]
        inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
        return values.permute(perm).contiguous(), lambda t: t.permute(inverse)
    if kind == "strided":
        _, dim, offset = layout
        size = list(values.shape)
        size[dim] = 2 * size[dim] + offset
        storage = torch.full(size, 7.0, dtype=values.dtype)  # never read
        index = [slice(None)] * values.dim()
        index[dim] = slice(offset, offset + 2 * values.shape[dim], 2)
        storage[tuple(index)] = values
        return storage, lambda t: t[tuple(index)]
    if kind == "expanded":
        shape = values.shape
        for d in layout[1]:
            values = values.narrow(d, 0, 1)
        return values.clone(), lambda t: t.expand(shape)
    return values, lambda t: t


# Value distributions by role. "wide" spans wide ranges where the results fit the dtype's
# gradients; float16 gets "narrow" limits (its gradients overflow beyond 65504).
def draw_values(role: str, shape, g: torch.Generator, spread: str, dtype) -> torch.Tensor:
    half = dtype == torch.float16
    normal = torch.randn(shape, generator=g, dtype=torch.float64)
    uniform = torch.rand(shape, generator=g, dtype=torch.float64)
    pick = torch.rand(shape, generator=g, dtype=torch.float64)

    def specials(values):
        choice = torch.randint(len(values), shape, generator=g)
        return torch.tensor(values, dtype=torch.float64)[choice]

    def span(lo, hi):
        return lo + (hi - lo) * uniform

    if role == "unit":  # continuous targets in [0, 1], half of them exactly 0 or 1
        return torch.where(pick < 0.5, uniform.round(), uniform)
    if role == "eps":
        return normal
    if spread == "normal":
        scale = {"logits": 3.0, "logvar": 0.7, "logvar_p": 0.7, "prior_logvar": 0.5,
                 "nll_logvar": 0.5, "iwae_logvar": 0.5, "log_px": 3.0}.get(role, 1.0)
        return scale * normal
    if role == "mu":
        return torch.where(pick < 0.4, specials([1e4, -1e4, 100.0, -1e-20, 1e-20, 0.0]),
                           30 * normal)
    if role == "mu_small":
        return (10 if half else 100) * normal
    if role in ("logvar", "logvar_p"):
        hi = 10.0 if half else (80.0 if role == "logvar" else 50.0)
        return torch.where(pick < 0.3, 1e-6 * normal, span(-100.0, hi))
    if role == "prior_logvar":
        return span(0.0, 10.0) if half else span(-30.0, 30.0)
    if role == "logits":
        return torch.where(pick < 0.4, specials([1e4, -1e4, 1e3, -88.0, 20.0, -20.0, 0.0]),
                           30 * normal)
    if role == "value":
        return torch.where(pick < 0.2, torch.zeros_like(normal), (10 if half else 100) * normal)
    if role == "nll_logvar":
        return span(-3.0, 80.0) if half else span(-30.0, 80.0)
    if role == "iwae_logvar":
        return span(-4.0, 4.0) if half else span(-20.0, 20.0)
    if role == "log_px":
        return 1e3 * normal
    raise AssertionError(role)


# ---------------------------------------------------------------------------------------------
# Running an example
# ---------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    leaves: dict[str, torch.Tensor]  # on the device, in the test dtype, requiring grad
    views: dict  # name -> the view of the leaf the op gets
    x64: dict[str, torch.Tensor]  # float64 leaves with the same values
    full: dict[str, torch.Tensor]  # float64 leaves, each input broadcast to its full shape


def _fits(layout: tuple, shape: tuple[int, ...]) -> bool:
    kind = layout[0]
    if kind == "permuted":
        return len(layout[1]) == len(shape)
    if kind == "strided":
        return layout[1] < len(shape)
    if kind == "expanded":
        return all(d < len(shape) and shape[d] >= 1 for d in layout[1])
    return True


def build(ex: Example, specs: dict[str, tuple[str, tuple, tuple]], device) -> Inputs:
    """Inputs ``name -> (role, own shape, shape it broadcasts to)``, each in the layout drawn
    for it (contiguous when none fits its shape)."""
    g = torch.Generator().manual_seed(ex.seed)
    leaves, views, x64, full = {}, {}, {}, {}
    for name, (role, own_shape, full_shape) in specs.items():
        values = draw_values(role, own_shape, g, ex.spreads.get(name, "normal"), ex.dtype)
        values = values.to(ex.dtype).double()
        values = torch.where(torch.isfinite(values), values, 0.0)  # what the dtype holds
        layout = ex.layouts.get(name, ("contiguous",))
        stored, view = lay_out(values, layout if _fits(layout, own_shape) else ("contiguous",))
        leaves[name] = stored.to(ex.dtype).to(device).requires_grad_()
        views[name] = view
        x64[name] = stored.clone().requires_grad_()
        full[name] = view(x64[name]).detach().expand(full_shape).clone().requires_grad_()
    return Inputs(leaves, views, x64, full)


def upstreams(outs, g: torch.Generator):
    """Upstream gradients in [-1, 1], in each output's dtype (on its device) and in float64."""
    ups = [(2 * torch.rand(o.shape, generator=g, dtype=torch.float64) - 1).to(o.dtype)
           for o in outs]
    return [u.to(o.device) for u, o in zip(ups, outs, strict=True)], [u.double() for u in ups]


def reduce_terms(terms: torch.Tensor, reduction: str, free_bits: float) -> torch.Tensor:
    """The reduction of docs/conventions.md (and free bits) of per-element terms, as the
    reference computes it."""
    B = terms.shape[0]
    rows = terms.reshape(B, math.prod(terms.shape[1:]))
    if free_bits > 0:
        if reduction == "mean":
            return torch.clamp_min(rows.mean(0), free_bits).sum()
        return torch.clamp_min(rows.sum(0), free_bits * B).sum()
    per_sample = rows.sum(1)
    return {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean()}[reduction]


def element_weights(terms: torch.Tensor, upstream: torch.Tensor, reduction: str,
                    free_bits: float) -> torch.Tensor:
    """|d output / d term| times |upstream|, per element of ``terms``."""
    B = terms.shape[0]
    u = upstream.abs()
    if reduction == "none":
        return u.reshape(B, *([1] * (terms.dim() - 1))).expand(terms.shape)
    scale = u / B if reduction == "mean" else u
    w = torch.full(terms.shape, float(scale), dtype=torch.float64)
    if free_bits > 0:
        per_feature = terms.reshape(B, math.prod(terms.shape[1:])).mean(0)
        active = (per_feature > free_bits).to(torch.float64).reshape(terms.shape[1:])
        w = w * active
    return w


class Checker:
    """Collects the float64 truth and slack of every output and of each input's gradient."""

    def __init__(self, ex: Example, inputs: Inputs):
        self.ex, self.inputs = ex, inputs
        self.grad_slack = {name: torch.zeros_like(t) for name, t in inputs.full.items()}

    def loss_part(self, terms: torch.Tensor, value_slack: torch.Tensor,
                  grad_slack: dict[str, torch.Tensor], upstream: torch.Tensor, *,
                  reduction: str, free_bits: float = 0.0, weight: float = 1.0) -> torch.Tensor:
        """One sum of elementwise ``terms`` (float64) into a loss: returns its value slack
        (the reduction of |terms| + slack) and adds its gradient slack."""
        terms = terms.detach()
        if free_bits > 0 and terms.shape[0] > 0:
            per_feature = terms.reshape(terms.shape[0], math.prod(terms.shape[1:])).mean(0)
            # A feature within rounding of the floor may take either side of the clamp.
            assume(bool(((per_feature - free_bits).abs()
                         > 1e-4 * (per_feature.abs() + free_bits)).all()))
        w = weight * element_weights(terms, upstream, reduction, free_bits)
        for name, slack in grad_slack.items():
            self.grad_slack[name] = self.grad_slack[name] + w * slack.expand(terms.shape)
        return weight * reduce_terms(terms.abs() + value_slack.expand(terms.shape),
                                     "none" if reduction == "none" else "sum", 0.0) \
            / (terms.shape[0] if reduction == "mean" and terms.shape[0] else 1)

    def check_output(self, i: int, actual, expected, slack, dtype, n_summed: int,
                     noisy: bool = False):
        if expected.isnan().any():  # "mean" over an empty batch: nan, as torch
            assert actual.isnan().all(), f"output {i}: {actual}, expected nan"
            return
        rtol = _rtol(dtype, noisy) + n_summed * _roundoff(self.ex.dtype)
        accuracy.check(f"output {i}", actual, expected, slack, dtype, rtol)

    def check_grads(self, grads: dict[str, torch.Tensor], terms: dict[str, torch.Tensor],
                    noisy: tuple[str, ...] = (), rtol_floor: float = 0.0):
        """Gradients of the leaves against the oracle's per-element terms mapped back onto
        them (summed over broadcast elements), slack included (in units of an rtol of at least
        ``rtol_floor``)."""
        inputs = self.inputs
        for name, grad in grads.items():
            seen = inputs.views[name](inputs.x64[name]).expand(inputs.full[name].shape)
            t, slack = terms[name], self.grad_slack[name]
            want, abs_sum = (torch.autograd.grad(seen, inputs.x64[name], v, retain_graph=True)[0]
                             for v in (t, t.abs() + slack))
            fan_in = max(1, seen.numel() // max(1, inputs.x64[name].numel()))
            # Autograd sums a broadcast input's terms one dimension at a time, rounding each
            # partial sum to the input's dtype: half an ulp more per broadcast dimension.
            stages = sum(1 for size, stride in zip(seen.shape, seen.stride(), strict=True)
                         if stride == 0 and size > 1)
            rtol = max(rtol_floor,
                       _rtol(self.ex.dtype, name in noisy) + fan_in * _roundoff(self.ex.dtype)
                       + stages * torch.finfo(self.ex.dtype).eps / 2)
            assert grad.shape == inputs.leaves[name].shape
            accuracy.check(f"d/d{name}", grad, want, abs_sum - want.abs(), self.ex.dtype, rtol)


def _rtol(dtype, noisy=False) -> float:
    rtol = TOL[dtype]["rtol"]
    return max(rtol, NOISE_TOL["rtol"]) if noisy else rtol


def _roundoff(dtype) -> float:
    return accuracy.UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]


def _grads(outs, inputs: Inputs, ups):
    names = list(inputs.leaves)
    used = [o for o in outs if o.requires_grad]
    grads = torch.autograd.grad(used, [inputs.leaves[n] for n in names],
                                [u for o, u in zip(outs, ups, strict=True) if o.requires_grad],
                                allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(inputs.leaves[n]))
            for n, g in zip(names, grads, strict=True)}


def _oracle_grads(expected, inputs: Inputs, ups64):
    names = list(inputs.full)
    used = [(e, u) for e, u in zip(expected, ups64, strict=True) if e.requires_grad]
    grads = torch.autograd.grad([e for e, _ in used], [inputs.full[n] for n in names],
                                [u for _, u in used], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(inputs.full[n]))
            for n, g in zip(names, grads, strict=True)}


def _views(inputs: Inputs) -> dict[str, torch.Tensor]:
    return {n: inputs.views[n](t) for n, t in inputs.leaves.items()}


def run_property(backend: str, strategy, body):
    """Run ``body(example)`` on ``EXAMPLES[backend]`` examples of ``strategy``."""

    @settings(max_examples=EXAMPLES.get(backend, 20))
    @given(ex=strategy(MAX_NUMEL.get(backend, 600)))
    def run(ex):
        note(f"{ex}")
        body(ex)

    run()


def _common(draw, max_numel, inputs: tuple[str, ...], variant: str, reductions, **shape_kw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes(max_numel, **shape_kw))
    reduction = draw(st.sampled_from(reductions)) if reductions else None
    lays = {name: draw(layouts(shape)) for name in inputs}
    spreads = {name: draw(st.sampled_from(("normal", "wide"))) for name in inputs}
    return Example(variant, dtype, shape, reduction, lays, spreads,
                   draw(st.integers(0, 2**31 - 1)))


def _loss_dtype_for(ex: Example) -> torch.dtype:
    return loss_dtype(ex.dtype)


# ---------------------------------------------------------------------------------------------
# gaussian_kl
# ---------------------------------------------------------------------------------------------

KL_VARIANTS = ("standard", "prior_full", "prior_feature", "prior_mu_scalar_logvar",
               "prior_numbers", "free_bits", "prior_free_bits")


@st.composite
def kl_examples(draw, max_numel):
    variant = draw(st.sampled_from(KL_VARIANTS))
    free = "free_bits" in variant
    ex = _common(draw, max_numel, ("mu", "logvar", "prior_mu", "prior_logvar"), variant,
                 ("mean", "sum") if free else ("none", "mean", "sum"))
    if variant == "prior_numbers":  # (prior_mu, prior_logvar); float16 gradients stay finite
        choices = [(0.25, -0.5), (-3.0, 20.0), (3.0, 5.0)]
        if ex.dtype != torch.float16:
            choices.append((1e3, -20.0))
        ex.extra["numbers"] = draw(st.sampled_from(choices))
    return ex


def kl_body(ex: Example, device):
    shape, event = ex.shape, ex.shape[1:]
    has_prior = "prior" in ex.variant
    mu_role, lv_role = ("mu_small", "logvar_p") if has_prior else ("mu", "logvar")
    specs = {"mu": (mu_role, shape, shape), "logvar": (lv_role, shape, shape)}
    if ex.variant in ("prior_full", "prior_free_bits"):
        specs |= {"prior_mu": ("mu_small", shape, shape),
                  "prior_logvar": ("prior_logvar", shape, shape)}
    elif ex.variant == "prior_feature":
        specs |= {"prior_mu": ("mu_small", event, shape),
                  "prior_logvar": ("prior_logvar", event, shape)}
    elif ex.variant == "prior_mu_scalar_logvar":
        specs |= {"prior_mu": ("mu_small", event, shape),
                  "prior_logvar": ("prior_logvar", (), shape)}
    inputs = build(ex, specs, device)
    free_bits = FREE_BITS if "free_bits" in ex.variant else 0.0
    numbers = ex.extra.get("numbers")
    if numbers is not None:
        numbers = tuple(torch.tensor(v, dtype=ex.dtype).item() for v in numbers)

    def call(api, x):
        if numbers is not None:
            return api.gaussian_kl(x["mu"], x["logvar"], *numbers, reduction=ex.reduction)
        return api.gaussian_kl(**x, reduction=ex.reduction, free_bits=free_bits)

    out = call(fv, _views(inputs))
    expected = call(Oracle, inputs.full)
    g = torch.Generator().manual_seed(ex.seed + 1)
    ups, ups64 = upstreams([out], g)
    full = {k: v.detach() for k, v in inputs.full.items()}
    pm, plv = full.get("prior_mu"), full.get("prior_logvar")
    if numbers is not None:
        pm, plv = (torch.full(shape, v, dtype=torch.float64) for v in numbers)
    terms = reference.kl_elementwise(full["mu"], full["logvar"], pm, plv).expand(shape)
    slack = accuracy.kl_slack(full["mu"], full["logvar"], pm, plv)
    checker = Checker(ex, inputs)
    value_slack = checker.loss_part(terms, slack.pop("value"),
                                    {k: slack[k] for k in inputs.full}, ups64[0],
                                    reduction=ex.reduction, free_bits=free_bits)
    checker.check_output(0, out, expected, value_slack, _loss_dtype_for(ex),
                         _n_summed(shape, ex.reduction))
    checker.check_grads(_grads([out], inputs, ups), _oracle_grads([expected], inputs, ups64))


def _n_summed(shape, reduction) -> int:
    n = math.prod(shape)
    return n if reduction != "none" else math.prod(shape[1:])


def test_gaussian_kl(backend, device):
    run_property(backend, kl_examples, lambda ex: kl_body(ex, device))


# ---------------------------------------------------------------------------------------------
# bernoulli_nll
# ---------------------------------------------------------------------------------------------


@st.composite
def bernoulli_examples(draw, max_numel):
    return _common(draw, max_numel, ("logits", "target"), "bernoulli", ("none", "mean", "sum"))


def bernoulli_body(ex: Example, device):
    shape = ex.shape
    inputs = build(ex, {"logits": ("logits", shape, shape), "target": ("unit", shape, shape)},
                   device)
    out = fv.bernoulli_nll(**_views(inputs), reduction=ex.reduction)
    expected = Oracle.bernoulli_nll(**inputs.full, reduction=ex.reduction)
    ups, ups64 = upstreams([out], torch.Generator().manual_seed(ex.seed + 1))
    full = {k: v.detach() for k, v in inputs.full.items()}
    terms = F.binary_cross_entropy_with_logits(full["logits"], full["target"], reduction="none")
    slack = accuracy.bernoulli_slack(full["logits"], full["target"])
    checker = Checker(ex, inputs)
    value_slack = checker.loss_part(terms, slack.pop("value"), slack, ups64[0],
                                    reduction=ex.reduction)
    checker.check_output(0, out, expected, value_slack, _loss_dtype_for(ex),
                         _n_summed(shape, ex.reduction))
    checker.check_grads(_grads([out], inputs, ups), _oracle_grads([expected], inputs, ups64))


def test_bernoulli_nll(backend, device):
    run_property(backend, bernoulli_examples, lambda ex: bernoulli_body(ex, device))


# ---------------------------------------------------------------------------------------------
# gaussian_nll
# ---------------------------------------------------------------------------------------------


@st.composite
def gaussian_nll_examples(draw, max_numel):
    variant = draw(st.sampled_from(("float", "scalar", "feature", "full")))
    ex = _common(draw, max_numel, ("mean", "target", "logvar"), variant,
                 ("none", "mean", "sum"))
    ex.extra["value"] = draw(st.sampled_from((0.0, -2.5, 0.4, 30.0)))
    return ex


def gaussian_nll_body(ex: Example, device):
    shape, event = ex.shape, ex.shape[1:]
    specs = {"mean": ("value", shape, shape), "target": ("value", shape, shape)}
    own = {"scalar": (), "feature": event, "full": shape}.get(ex.variant)
    if own is not None:
        specs["logvar"] = ("nll_logvar", own, shape)
    inputs = build(ex, specs, device)
    number = torch.tensor(ex.extra["value"], dtype=ex.dtype).item()
    views = _views(inputs)
    out = fv.gaussian_nll(views["mean"], views["target"], views.get("logvar", number),
                          reduction=ex.reduction)
    full = inputs.full
    expected = Oracle.gaussian_nll(full["mean"], full["target"], full.get("logvar", number),
                                   reduction=ex.reduction)
    ups, ups64 = upstreams([out], torch.Generator().manual_seed(ex.seed + 1))
    d = {k: v.detach() for k, v in full.items()}
    lv = d.get("logvar", torch.full(shape, number, dtype=torch.float64))
    terms = reference.gaussian_nll_elementwise(d["mean"], d["target"], lv).expand(shape)
    slack = accuracy.gaussian_nll_slack(d["mean"], d["target"], lv)
    checker = Checker(ex, inputs)
    value_slack = checker.loss_part(terms, slack.pop("value"),
                                    {k: slack[k] for k in full}, ups64[0],
                                    reduction=ex.reduction)
    checker.check_output(0, out, expected, value_slack, _loss_dtype_for(ex),
                         _n_summed(shape, ex.reduction))
    checker.check_grads(_grads([out], inputs, ups), _oracle_grads([expected], inputs, ups64))


def test_gaussian_nll(backend, device):
    run_property(backend, gaussian_nll_examples, lambda ex: gaussian_nll_body(ex, device))


# ---------------------------------------------------------------------------------------------
# reparameterize and sample_and_kl
# ---------------------------------------------------------------------------------------------


@st.composite
def reparameterize_examples(draw, max_numel):
    variant = draw(st.sampled_from(("seed", "eps", "samples_seed", "samples_eps",
                                    "tensor_seed")))
    ex = _common(draw, max_numel // 3, ("mu", "logvar", "eps"), variant, None)
    ex.extra["K"] = draw(st.integers(1, 3)) if variant.startswith("samples") else None
    if ex.extra["K"] is not None:
        ex.layouts["eps"] = draw(layouts((ex.extra["K"], *ex.shape)))
    return ex


def _sample_part(checker: Checker, z64, u_z, mu, logvar, eps, noisy):
    """Slack of z = mu + e^(lv/2) eps (per sample k) and of its gradient terms."""
    slack = accuracy.sample_slack(mu, logvar, eps, noisy)
    u = u_z.abs()
    checker.grad_slack["mu"] = checker.grad_slack["mu"] + (u * slack["mu"]).sum(0)
    checker.grad_slack["logvar"] = (checker.grad_slack["logvar"]
                                    + (u * slack["logvar"]).sum(0))
    return slack["value"].reshape(z64.shape)


def reparameterize_body(ex: Example, device):
    shape, K = ex.shape, ex.extra["K"]
    out_shape = shape if K is None else (K, *shape)
    given_eps = ex.variant in ("eps", "samples_eps")
    specs = {"mu": ("mu", shape, shape), "logvar": ("logvar", shape, shape)}
    if given_eps:
        specs["eps"] = ("eps", out_shape, out_shape)
    inputs = build(ex, specs, device)
    seed = 1234 + ex.seed
    kwargs = {} if K is None else {"n_samples": K}
    views = _views(inputs)
    if given_eps:
        out = fv.reparameterize(views["mu"], views["logvar"], eps=views["eps"], **kwargs)
    else:
        s = torch.tensor(seed, device=device) if ex.variant == "tensor_seed" else seed
        out = fv.reparameterize(views["mu"], views["logvar"], seed=s, **kwargs)
    full = inputs.full
    expected = Oracle.reparameterize(full["mu"], full["logvar"], eps=full.get("eps"),
                                     seed=None if given_eps else seed, **kwargs)
    ups, ups64 = upstreams([out], torch.Generator().manual_seed(ex.seed + 1))
    d = {k: v.detach() for k, v in full.items()}
    eps = d["eps"] if given_eps else reference.noise(seed, out_shape, "cpu").double()
    checker = Checker(ex, inputs)
    samples = (K or 1, *shape)
    z_slack = _sample_part(checker, out, ups64[0].reshape(samples), d["mu"], d["logvar"],
                           eps.reshape(samples), not given_eps)
    noisy = not given_eps
    checker.check_output(0, out, expected, z_slack, ex.dtype, 0, noisy=noisy)
    checker.check_grads(_grads([out], inputs, ups), _oracle_grads([expected], inputs, ups64),
                        noisy=("logvar",) if noisy else ())


def test_reparameterize(backend, device):
    run_property(backend, reparameterize_examples, lambda ex: reparameterize_body(ex, device))


@st.composite
def sample_and_kl_examples(draw, max_numel):
    free = draw(st.booleans())
    return _common(draw, max_numel, ("mu", "logvar"), "free_bits" if free else "plain",
                   ("mean", "sum") if free else ("none", "mean", "sum"))


def sample_and_kl_body(ex: Example, device):
    shape = ex.shape
    inputs = build(ex, {"mu": ("mu", shape, shape), "logvar": ("logvar", shape, shape)},
                   device)
    free_bits = FREE_BITS if ex.variant == "free_bits" else 0.0
    seed = 99 + ex.seed
    z, kl = fv.sample_and_kl(**_views(inputs), reduction=ex.reduction, free_bits=free_bits,
                             seed=seed)
    z64, kl64 = Oracle.sample_and_kl(**inputs.full, reduction=ex.reduction,
                                     free_bits=free_bits, seed=seed)
    ups, ups64 = upstreams([z, kl], torch.Generator().manual_seed(ex.seed + 1))
    d = {k: v.detach() for k, v in inputs.full.items()}
    eps = reference.noise(seed, shape, "cpu").double()
    checker = Checker(ex, inputs)
    z_slack = _sample_part(checker, z64, ups64[0][None], d["mu"], d["logvar"], eps[None], True)
    terms = reference.kl_elementwise(d["mu"], d["logvar"])
    slack = accuracy.kl_slack(d["mu"], d["logvar"])
    # d/dmu = g_z + g_kl mu and d/dlv = (z part) + 0.5 expm1(lv) g_kl: the parts may cancel.
    kl_grad_slack = {"mu": d["mu"].abs(), "logvar": 0.5 * torch.expm1(d["logvar"]).abs()}
    kl_slack = checker.loss_part(terms, slack["value"], kl_grad_slack, ups64[1],
                                 reduction=ex.reduction, free_bits=free_bits)
    checker.check_output(0, z, z64, z_slack, ex.dtype, 0, noisy=True)
    checker.check_output(1, kl, kl64, kl_slack, _loss_dtype_for(ex),
                         _n_summed(shape, ex.reduction))
    checker.check_grads(_grads([z, kl], inputs, ups),
                        _oracle_grads([z64, kl64], inputs, ups64), noisy=("logvar",))


def test_sample_and_kl(backend, device):
    run_property(backend, sample_and_kl_examples, lambda ex: sample_and_kl_body(ex, device))


# ---------------------------------------------------------------------------------------------
# vae_loss
# ---------------------------------------------------------------------------------------------


@st.composite
def vae_examples(draw, max_numel):
    likelihood = draw(st.sampled_from(("bernoulli", "gaussian")))
    free = draw(st.booleans())
    ex = _common(draw, max_numel, ("recon", "x", "mu", "logvar", "obs_logvar"),
                 likelihood + ("_free_bits" if free else ""),
                 ("mean", "sum") if free else ("none", "mean", "sum"))
    ex.extra["latent"] = draw(st.sampled_from((1, 2, 5, 8)))
    latent = (ex.shape[0], ex.extra["latent"])
    ex.layouts["mu"], ex.layouts["logvar"] = draw(layouts(latent)), draw(layouts(latent))
    ex.extra["beta"] = draw(st.sampled_from((0.0, 0.5, 1.0, 4.0)))
    return ex


def vae_body(ex: Example, device):
    shape = ex.shape
    latent = (shape[0], ex.extra["latent"])
    bernoulli = ex.variant.startswith("bernoulli")
    specs = {"recon": ("logits" if bernoulli else "value", shape, shape),
             "x": ("unit" if bernoulli else "value", shape, shape),
             "mu": ("mu", latent, latent), "logvar": ("logvar", latent, latent)}
    if not bernoulli:
        specs["obs_logvar"] = ("nll_logvar", shape[1:], shape)
    inputs = build(ex, specs, device)
    free_bits = FREE_BITS if ex.variant.endswith("free_bits") else 0.0
    kwargs = dict(likelihood="bernoulli" if bernoulli else "gaussian", beta=ex.extra["beta"],
                  free_bits=free_bits, reduction=ex.reduction)
    out = fv.vae_loss(**_views(inputs), **kwargs)
    expected = Oracle.vae_loss(**inputs.full, **kwargs)
    ups, ups64 = upstreams([out], torch.Generator().manual_seed(ex.seed + 1))
    d = {k: v.detach() for k, v in inputs.full.items()}
    checker = Checker(ex, inputs)
    if bernoulli:
        terms = F.binary_cross_entropy_with_logits(d["recon"], d["x"], reduction="none")
        slack = accuracy.bernoulli_slack(d["recon"], d["x"])
        nll_grad_slack = {"recon": slack["logits"], "x": slack["target"]}
    else:
        terms = reference.gaussian_nll_elementwise(d["recon"], d["x"], d["obs_logvar"])
        slack = accuracy.gaussian_nll_slack(d["recon"], d["x"], d["obs_logvar"])
        nll_grad_slack = {"recon": slack["mean"], "x": slack["target"],
                          "obs_logvar": slack["logvar"]}
    value_slack = checker.loss_part(terms, slack["value"], nll_grad_slack, ups64[0],
                                    reduction=ex.reduction)
    kl_terms = reference.kl_elementwise(d["mu"], d["logvar"])
    kl = accuracy.kl_slack(d["mu"], d["logvar"])
    value_slack = value_slack + checker.loss_part(
        kl_terms, kl["value"], {"mu": kl["mu"], "logvar": kl["logvar"]}, ups64[0],
        reduction=ex.reduction, free_bits=free_bits, weight=ex.extra["beta"])
    n = max(_n_summed(shape, ex.reduction), _n_summed(latent, ex.reduction))
    checker.check_output(0, out, expected, value_slack, _loss_dtype_for(ex), n)
    checker.check_grads(_grads([out], inputs, ups), _oracle_grads([expected], inputs, ups64))


def test_vae_loss(backend, device):
    run_property(backend, vae_examples, lambda ex: vae_body(ex, device))


# ---------------------------------------------------------------------------------------------
# iwae_log_likelihood
# ---------------------------------------------------------------------------------------------


@st.composite
def iwae_examples(draw, max_numel):
    K = draw(st.integers(1, 4))
    ex = _common(draw, max_numel // K, ("log_px", "z", "mu", "logvar"), "iwae", None)
    ex.extra["K"] = K
    ex.layouts["z"] = draw(layouts((K, *ex.shape)))
    ex.layouts["log_px"] = draw(layouts((K, ex.shape[0])))
    return ex


def iwae_body(ex: Example, device):
    shape, K = ex.shape, ex.extra["K"]
    specs = {"log_px": ("log_px", (K, shape[0]), (K, shape[0])),
             "mu": ("mu_small", shape, shape), "logvar": ("iwae_logvar", shape, shape)}
    inputs = build(ex, specs, device)
    # z ~ q(z|x) at the scale of the posterior: z = mu + e^(lv/2) * normal, in the test dtype.
    g = torch.Generator().manual_seed(ex.seed + 2)
    mu, lv = (inputs.views[n](inputs.x64[n]).detach() for n in ("mu", "logvar"))
    z_values = (mu + torch.exp(0.5 * lv) * torch.randn((K, *shape), generator=g,
                                                       dtype=torch.float64))
    z_values = z_values.to(ex.dtype).double()
    z_values = torch.where(torch.isfinite(z_values), z_values, 0.0)
    stored, view = lay_out(z_values, ex.layouts.get("z", ("contiguous",)))
    inputs.leaves["z"] = stored.to(ex.dtype).to(device).requires_grad_()
    inputs.views["z"] = view
    inputs.x64["z"] = stored.clone().requires_grad_()
    inputs.full["z"] = view(inputs.x64["z"]).detach().clone().requires_grad_()
    views = _views(inputs)
    out = fv.iwae_log_likelihood(views["log_px"], views["z"], views["mu"], views["logvar"])
    full = inputs.full
    expected = reference.iwae_log_likelihood(full["log_px"], full["z"], full["mu"],
                                             full["logvar"])
    ups, ups64 = upstreams([out], torch.Generator().manual_seed(ex.seed + 1))
    d = {k: v.detach() for k, v in full.items()}
    n_summed = math.prod(shape[1:]) + K
    rtol = _rtol(_loss_dtype_for(ex)) + n_summed * _roundoff(ex.dtype)
    slack = accuracy.iwae_slack(d["log_px"], d["z"], d["mu"], d["logvar"], ups64[0], rtol)
    checker = Checker(ex, inputs)
    for name in ("log_px", "z", "mu", "logvar"):
        checker.grad_slack[name] = slack[name]
    checker.check_output(0, out, expected, slack["value"], _loss_dtype_for(ex), n_summed)
    checker.check_grads(_grads([out], inputs, ups), _oracle_grads([expected], inputs, ups64),
                        rtol_floor=rtol)


def test_iwae_log_likelihood(backend, device):
    run_property(backend, iwae_examples, lambda ex: iwae_body(ex, device))


def test_every_backend_has_a_budget():
    """A backend added later gets its examples and sizes declared here, not a default."""
    for name in fv.backends():
        assert name in EXAMPLES
        assert name in MAX_NUMEL


# ---------------------------------------------------------------------------------------------
# continuous_bernoulli_nll
# ---------------------------------------------------------------------------------------------


@st.composite
def continuous_bernoulli_examples(draw, max_numel):
    return _common(draw, max_numel, ("logits", "target"), "continuous_bernoulli",
                   ("none", "mean", "sum"))


def continuous_bernoulli_body(ex: Example, device):
    shape = ex.shape
    inputs = build(ex, {"logits": ("logits", shape, shape), "target": ("unit", shape, shape)},
                   device)
    out = fv.continuous_bernoulli_nll(**_views(inputs), reduction=ex.reduction)
    expected = Oracle.continuous_bernoulli_nll(**inputs.full, reduction=ex.reduction)
    ups, ups64 = upstreams([out], torch.Generator().manual_seed(ex.seed + 1))
    full = {k: v.detach() for k, v in inputs.full.items()}
    terms = reference.continuous_bernoulli_nll_elementwise(full["logits"], full["target"])
    slack = accuracy.continuous_bernoulli_slack(full["logits"], full["target"])
    checker = Checker(ex, inputs)
    value_slack = checker.loss_part(terms, slack.pop("value"), slack, ups64[0],
                                    reduction=ex.reduction)
    checker.check_output(0, out, expected, value_slack, _loss_dtype_for(ex),
                         _n_summed(shape, ex.reduction))
    checker.check_grads(_grads([out], inputs, ups), _oracle_grads([expected], inputs, ups64))


def test_continuous_bernoulli_nll(backend, device):
    run_property(backend, continuous_bernoulli_examples,
                 lambda ex: continuous_bernoulli_body(ex, device))
