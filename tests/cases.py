"""The op variants and input geometries shared by the value, gradient and autograd tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SEED = 20240611
K = 3
LATENT = 4

# name -> (shape, layout). Layouts: "contiguous"; "strided": every other element of the last
# dimension; "transposed": dimensions reversed in memory; "expanded": one batch row broadcast
# over the batch (stride 0); "expanded_event": one event element broadcast over the event's
# first dimension.
GEOMETRIES = {
    "tiny": ((1, 1), "contiguous"),
    "odd": ((7, 13), "contiguous"),
    "1d": ((6,), "contiguous"),
    "4d": ((2, 3, 4, 5), "contiguous"),
    "empty_batch": ((0, 5), "contiguous"),
    "empty_event": ((3, 0), "contiguous"),
    "strided": ((7, 13), "strided"),
    "transposed": ((7, 13), "transposed"),
    "expanded": ((7, 13), "expanded"),
    "expanded_event": ((7, 13), "expanded_event"),
    "strided_4d": ((2, 3, 4, 5), "strided"),
    "transposed_4d": ((2, 3, 4, 5), "transposed"),
    "expanded_4d": ((2, 3, 4, 5), "expanded"),
}
# Reductions happen after the kernels, so every reduction runs on these geometries only; the
# others use the first reduction of the op ("none" where allowed: the most telling one).
ALL_REDUCTIONS_ON = ("odd", "4d", "empty_batch", "empty_event")


def _round(value: float, dtype: torch.dtype) -> float:
    """A Python number as the test dtype holds it (fv rounds numeric arguments to it)."""
    return torch.tensor(value, dtype=dtype).item()


@dataclass(frozen=True)
class Case:
    """One op variant. ``inputs``: name -> (kind, distribution); kinds: "full" (the geometry's
    shape and layout), "latent" ((B, 4), the geometry's layout), "feature" (the event shape),
    "scalar" (0-d), "samples" ((K, *shape), contiguous), "generated" (made by ``generate``
    from the geometry's shape, in the geometry's layout)."""

    inputs: dict[str, tuple[str, str]]
    call: Callable  # (api, inputs, reduction, dtype) -> Tensor | tuple[Tensor, ...]
    reductions: tuple[str | None, ...] = ("none", "mean", "sum")
    samples: tuple[int, ...] = ()  # outputs in the input dtype (the rest are losses)
    noisy: bool = False  # samples drawn from the RNG
    noisy_grads: tuple[str, ...] = ()  # gradients that depend on the noise
    constants: tuple[str, ...] = ()  # inputs that get no gradient (they never require grad)
    # (geometry shape, generator) -> float64 tensors by name: inputs with a structure of their
    # own (the "generated" ones).
    generate: Callable[[tuple[int, ...], torch.Generator], dict[str, torch.Tensor]] | None = None
    # The least tolerance (rtol, atol) per dtype, where the op's conditioning or the oracle's
    # own formula loses more than the dtype's rounding (helpers.tolerance's ``floor``).
    least_tol: dict[torch.dtype, dict[str, float]] | None = None


KL_INPUTS = {"mu": ("full", "normal"), "logvar": ("full", "logvar")}
NLL_INPUTS = {"mean": ("full", "normal"), "target": ("full", "normal")}
VAE_INPUTS = {"mu": ("latent", "normal"), "logvar": ("latent", "logvar")}


def _tensor_seed(x):
    return torch.tensor(SEED, device=x["mu"].device)


def dmol_inputs(C: int, M: int, n_bins: int) -> Callable:
    """The ``generate`` of a discretized mixture of logistics with C channels and M mixtures:
    for a geometry (B, *event), ``x`` (B, C, *event) on the grid of ``n_bins`` levels of
    [-1, 1] (both edges included) and ``params`` (B, M (1 + 3 C) or 3 M, *event) in its
    layout (M logits, then per channel M means, M log-scales[, M coefficients]).

    The values reach every branch, in the range where float32 is accurate to its rounding:
    logits N(0, 2), log-scales U(-8, 1) (some below the floor of -7, none within 0.05 of it,
    where the gradient jumps), coefficients N(0, 1.5), and each mean placed so that x lies
    N(0, 6) scales from the component's coupled mean. Sharp components then put some inner
    bins below the fallback's 1e-5 and flat ones many, while every log-probability stays
    moderate (its float32 rounding, amplified in the mixture's responsibilities, stays below
    the tolerance: the far tails are test_extremes' rows)."""

    def generate(shape: tuple[int, ...], g: torch.Generator) -> dict[str, torch.Tensor]:
        B, event = shape[0], tuple(shape[1:])
        d = torch.float64
        k = torch.randint(0, n_bins, (B, C, *event), generator=g)
        k.view(-1)[:2] = torch.tensor([0, n_bins - 1])[:k.numel()]
        x = k.to(d) * (2.0 / (n_bins - 1)) - 1.0
        logits = 2 * torch.randn(B, M, *event, generator=g, dtype=d)
        log_s = 9 * torch.rand(B, C, M, *event, generator=g, dtype=d) - 8
        log_s = torch.where((log_s + 7).abs() < 0.05, log_s - 0.1, log_s)
        z = 6 * torch.randn(B, C, M, *event, generator=g, dtype=d)
        xs = x.unsqueeze(2)  # (B, C, 1, *event)
        means = xs - torch.exp(log_s.clamp_min(-7)) * z
        parts = [means, log_s]
        if C == 3:
            coeffs = 1.5 * torch.randn(B, C, M, *event, generator=g, dtype=d)
            t = torch.tanh(coeffs)
            means[:, 1] -= t[:, 0] * xs[:, 0]
            means[:, 2] -= t[:, 1] * xs[:, 0] + t[:, 2] * xs[:, 1]
            parts.append(coeffs)
        body = torch.stack(parts, 2).reshape(B, C * len(parts) * M, *event)
        return {"params": torch.cat((logits, body), 1), "x": x}

    return generate


# The argument (x - mu' +- h) e^-s of a component rounds, in the compute dtype, to about
# 4 u (|x| + |mu'| + the coupling terms) e^-s absolute: up to 1e-3 in float32 at the sharpest
# scale (e^-s = e^7), and the gradient follows it (6e-4 relative seen, 1e-3 allowed). The
# float64 oracle forms each inner bin's probability as a difference of CDFs, which loses up
# to eps / 1e-5 relative (the smallest inner bin it keeps), amplified up to e^7 in the
# gradient of a sharp component.
DMOL_TOL = {torch.float32: dict(rtol=1e-3, atol=1e-6), torch.float64: dict(rtol=1e-8, atol=1e-9)}


def _dmol_case(C: int, M: int, n_bins: int) -> Case:
    return Case({"params": ("generated", "dmol"), "x": ("generated", "dmol")},
                lambda api, x, r, d: api.discretized_mix_logistic_nll(
                    **x, n_mixtures=M, n_bins=n_bins, reduction=r),
                constants=("x",), generate=dmol_inputs(C, M, n_bins),
                least_tol=DMOL_TOL)


CASES = {
    "kl": Case(KL_INPUTS, lambda api, x, r, d: api.gaussian_kl(**x, reduction=r)),
    "kl_prior": Case(
        {**KL_INPUTS, "prior_mu": ("full", "normal"), "prior_logvar": ("full", "logvar")},
        lambda api, x, r, d: api.gaussian_kl(**x, reduction=r)),
    "kl_prior_feature": Case(
        {**KL_INPUTS, "prior_mu": ("feature", "normal"), "prior_logvar": ("feature", "logvar")},
        lambda api, x, r, d: api.gaussian_kl(**x, reduction=r)),
    "kl_prior_mu_only": Case(
        {**KL_INPUTS, "prior_mu": ("feature", "normal")},
        lambda api, x, r, d: api.gaussian_kl(**x, reduction=r)),
    "kl_prior_logvar_scalar": Case(
        {**KL_INPUTS, "prior_logvar": ("scalar", "logvar")},
        lambda api, x, r, d: api.gaussian_kl(**x, reduction=r)),
    "kl_prior_numbers": Case(
        KL_INPUTS,
        lambda api, x, r, d: api.gaussian_kl(x["mu"], x["logvar"], _round(0.25, d),
                                             _round(-0.5, d), reduction=r)),
    "kl_free_bits": Case(
        KL_INPUTS, lambda api, x, r, d: api.gaussian_kl(**x, reduction=r, free_bits=0.3),
        reductions=("mean", "sum")),
    "bernoulli": Case(
        {"logits": ("full", "logits"), "target": ("full", "unit")},
        lambda api, x, r, d: api.bernoulli_nll(**x, reduction=r)),
    "gaussian_nll_default": Case(
        NLL_INPUTS, lambda api, x, r, d: api.gaussian_nll(**x, reduction=r)),
    "gaussian_nll_float": Case(
        NLL_INPUTS,
        lambda api, x, r, d: api.gaussian_nll(**x, logvar=_round(0.4, d), reduction=r)),
    "gaussian_nll_scalar": Case(
        {**NLL_INPUTS, "logvar": ("scalar", "logvar")},
        lambda api, x, r, d: api.gaussian_nll(**x, reduction=r)),
    "gaussian_nll_feature": Case(
        {**NLL_INPUTS, "logvar": ("feature", "logvar")},
        lambda api, x, r, d: api.gaussian_nll(**x, reduction=r)),
    "gaussian_nll_element": Case(
        {**NLL_INPUTS, "logvar": ("full", "logvar")},
        lambda api, x, r, d: api.gaussian_nll(**x, reduction=r)),
    "reparameterize_eps": Case(
        {**KL_INPUTS, "eps": ("full", "normal")},
        lambda api, x, r, d: api.reparameterize(**x), reductions=(None,), samples=(0,)),
    "reparameterize_seed": Case(
        KL_INPUTS, lambda api, x, r, d: api.reparameterize(**x, seed=SEED),
        reductions=(None,), samples=(0,), noisy=True, noisy_grads=("logvar",)),
    "reparameterize_tensor_seed": Case(
        KL_INPUTS, lambda api, x, r, d: api.reparameterize(**x, seed=_tensor_seed(x)),
        reductions=(None,), samples=(0,), noisy=True, noisy_grads=("logvar",)),
    "reparameterize_samples": Case(
        KL_INPUTS, lambda api, x, r, d: api.reparameterize(**x, n_samples=K, seed=SEED),
        reductions=(None,), samples=(0,), noisy=True, noisy_grads=("logvar",)),
    "reparameterize_samples_eps": Case(
        {**KL_INPUTS, "eps": ("samples", "normal")},
        lambda api, x, r, d: api.reparameterize(**x, n_samples=K),
        reductions=(None,), samples=(0,)),
    "sample_and_kl": Case(
        KL_INPUTS, lambda api, x, r, d: api.sample_and_kl(**x, reduction=r, seed=SEED),
        samples=(0,), noisy=True, noisy_grads=("logvar",)),
    "sample_and_kl_free_bits": Case(
        KL_INPUTS,
        lambda api, x, r, d: api.sample_and_kl(**x, reduction=r, free_bits=0.3, seed=SEED),
        reductions=("mean", "sum"), samples=(0,), noisy=True, noisy_grads=("logvar",)),
    "vae_bernoulli": Case(
        {"recon": ("full", "logits"), "x": ("full", "unit"), **VAE_INPUTS},
        lambda api, x, r, d: api.vae_loss(**x, beta=0.5, reduction=r)),
    "vae_gaussian": Case(
        {"recon": ("full", "normal"), "x": ("full", "normal"), **VAE_INPUTS,
         "obs_logvar": ("feature", "logvar")},
        lambda api, x, r, d: api.vae_loss(**x, likelihood="gaussian", beta=2.0, reduction=r)),
    "vae_free_bits": Case(
        {"recon": ("full", "logits"), "x": ("full", "unit"), **VAE_INPUTS},
        lambda api, x, r, d: api.vae_loss(**x, free_bits=0.2, reduction=r),
        reductions=("mean", "sum")),
    "continuous_bernoulli": Case(
        {"logits": ("full", "logits"), "target": ("full", "unit")},
        lambda api, x, r, d: api.continuous_bernoulli_nll(**x, reduction=r)),
    "vae_continuous_bernoulli": Case(
        {"recon": ("full", "logits"), "x": ("full", "unit"), **VAE_INPUTS},
        lambda api, x, r, d: api.vae_loss(**x, likelihood="continuous_bernoulli", beta=0.5,
                                          reduction=r)),
    # RGB, 256 levels: channels coupled through the coefficients, inner bins, both fallbacks.
    "dmol": _dmol_case(3, 2, 256),
    # Grey, 5 levels: wide bins, most of them at an edge.
    "dmol_gray": _dmol_case(1, 3, 5),
    # One component, two levels: every value is an edge (tail masses only).
    "dmol_two_bins": _dmol_case(3, 1, 2),
}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def draw(distribution: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    normal = torch.randn(shape, generator=g, dtype=torch.float64)
    if distribution == "normal":
        return normal
    if distribution == "logvar":
        return 0.7 * normal
    if distribution == "logits":
        return 3.0 * normal
    if distribution == "unit":  # continuous targets in [0, 1], half of them exactly 0 or 1
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        return torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5,
                           u.round(), u)
    raise AssertionError(distribution)


def layout_view(base: torch.Tensor, layout: str) -> tuple[torch.Tensor, Callable]:
    """A leaf holding ``base``'s values in ``layout``, and the view that shows them."""
    if layout == "contiguous" or base.dim() == 0:
        return base, lambda t: t
    if layout == "strided":
        junk = torch.full_like(base, 7.0)  # never to be read
        return torch.stack([base, junk], -1).flatten(-2), lambda t: t[..., ::2]
    if layout == "transposed":
        perm = tuple(reversed(range(base.dim())))
        return base.permute(perm).contiguous(), lambda t: t.permute(perm)
    if layout == "expanded":
        return base[:1].clone(), lambda t: t.expand(base.shape)
    if layout == "expanded_event":
        if base.dim() < 2:
            return base, lambda t: t
        return base[:, :1].clone(), lambda t: t.expand(base.shape)
    raise AssertionError(layout)


def make_inputs(case: Case, shape, layout, dtype, device, g):
    """Leaves (what requires grad), the view of each leaf that the op gets, and the shape each
    input broadcasts to inside the op."""
    B = shape[0]
    shapes = {"full": shape, "latent": (B, LATENT), "feature": shape[1:], "scalar": (),
              "samples": (K, *shape)}
    generated = case.generate(shape, g) if case.generate is not None else {}
    leaves, views, bshapes = {}, {}, {}
    for name, (kind, distribution) in case.inputs.items():
        base = generated[name] if kind == "generated" else draw(distribution, shapes[kind], g)
        own_layout = kind in ("full", "latent", "generated")
        leaf, view = layout_view(base.to(dtype), layout if own_layout else "contiguous")
        leaves[name] = leaf.to(device).requires_grad_(name not in case.constants)
        views[name] = view
        bshapes[name] = shape if kind in ("feature", "scalar") else tuple(base.shape)
    return leaves, views, bshapes


def differentiable(case: Case, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The leaves that get gradients (all but the case's constants)."""
    return {n: t for n, t in leaves.items() if n not in case.constants}


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)
