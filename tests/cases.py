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
    "scalar" (0-d), "samples" ((K, *shape), contiguous)."""

    inputs: dict[str, tuple[str, str]]
    call: Callable  # (api, inputs, reduction, dtype) -> Tensor | tuple[Tensor, ...]
    reductions: tuple[str | None, ...] = ("none", "mean", "sum")
    samples: tuple[int, ...] = ()  # outputs in the input dtype (the rest are losses)
    noisy: bool = False  # samples drawn from the RNG
    noisy_grads: tuple[str, ...] = ()  # gradients that depend on the noise


KL_INPUTS = {"mu": ("full", "normal"), "logvar": ("full", "logvar")}
NLL_INPUTS = {"mean": ("full", "normal"), "target": ("full", "normal")}
VAE_INPUTS = {"mu": ("latent", "normal"), "logvar": ("latent", "logvar")}


def _tensor_seed(x):
    return torch.tensor(SEED, device=x["mu"].device)


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
    leaves, views, bshapes = {}, {}, {}
    for name, (kind, distribution) in case.inputs.items():
        base = draw(distribution, shapes[kind], g).to(dtype)
        leaf, view = layout_view(base, layout if kind in ("full", "latent") else "contiguous")
        leaves[name] = leaf.to(device).requires_grad_()
        views[name] = view
        bshapes[name] = shape if kind in ("feature", "scalar") else shapes[kind]
    return leaves, views, bshapes


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)
