"""The quantizer modules a ``VQVAE`` takes, and how ``build_vqvae`` makes each kind.

Every fastvae-native quantizer follows one protocol (``QuantizerModule``; the VQ-VAE, the
trainer and the command line rely on nothing else):

- ``dim`` (the last dimension of its input), ``codebook_size`` (codes per level: K of a
  ``VectorQuantizer``, ``prod(levels)`` of an FSQ, ``2**bits`` of an LFQ), ``num_levels`` (the
  L codebooks of a residual VQ, else 1);
- ``forward(x (..., dim)) -> QuantizerOutput(quantized, indices, loss, commitment_loss,
  codebook_loss)``, ``loss`` already weighted (what to add to the training loss), indices int64
  ``x.shape[:-1]`` (residual VQ: ``x.shape[:-1] + (L,)``);
- ``nearest(x) -> indices`` (no gradient, no statistics), ``get_codes_from_indices(indices)``
  (the quantized value; residual VQ: the sum over levels);
- ``codebook_usage()``, ``perplexity()``: 0-d (residual VQ: ``(L,)``) tensors over recent
  training steps; ``restarts``: a 0-d int64 buffer (cumulative dead-code restarts).

``QUANTIZERS`` maps ``build_vqvae``'s ``quantizer=`` names to how each is built, which of its
arguments it takes and what its latent dimension is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .quantizer import VectorQuantizer

__all__ = ["QUANTIZERS", "QUANTIZER_OPTIONS", "QuantizerKind", "check_quantizer",
           "level_counts"]

# what a module must have to be a VQ-VAE's quantizer
_MEMBERS = ("dim", "codebook_size", "num_levels", "nearest", "get_codes_from_indices",
            "codebook_usage", "perplexity", "restarts")


def check_quantizer(quantizer: object) -> None:
    """``TypeError`` unless ``quantizer`` is an ``nn.Module`` of the quantizer protocol (see the
    module's docstring), naming the members it lacks."""
    if not isinstance(quantizer, nn.Module):
        raise TypeError(f"quantizer must be a quantizer module (fastvae.VectorQuantizer, "
                        f"ResidualVectorQuantizer, FiniteScalarQuantizer, LookupFreeQuantizer), "
                        f"got {type(quantizer).__name__}")
    missing = [name for name in _MEMBERS if not hasattr(quantizer, name)]
    if missing:
        raise TypeError(f"quantizer {type(quantizer).__name__} does not follow the quantizer "
                        f"protocol: it has no {', '.join(missing)} (see "
                        "fastvae.models.quantizers)")


# The buffers in which fastvae's quantizers keep the code histogram of their recent training
# steps (the protocol has no accessor for it): VectorQuantizer's window total, the residual
# VQ's decayed counts (L, K), FSQ's EMA counts (K,) (per dimension past max_tracked_codes: not
# a code histogram, so not used).
_HISTOGRAMS = ("usage_total", "usage_counts", "usage_ema")


def level_counts(quantizer: nn.Module) -> Tensor | None:
    """The code histogram of the quantizer's recent training steps, ``(L, K)`` (one row per
    level; counts, or decayed counts), or None when the module keeps none over its codes."""
    L, K = quantizer.num_levels, quantizer.codebook_size
    for name in _HISTOGRAMS:
        counts = getattr(quantizer, name, None)
        if isinstance(counts, Tensor) and counts.numel() == L * K and \
                counts.shape[-1] == K:
            return counts.reshape(L, K)
    return None


# -- the kinds ---------------------------------------------------------------------------------

# build_vqvae's quantizer arguments and their defaults ("codebook_size" and "codebook_dim" are
# the size of a level's codebook and the latent dimension, which every kind has)
QUANTIZER_OPTIONS: dict[str, Any] = {
    "decay": 0.99, "commitment_weight": 0.25, "kmeans_init": True, "dead_code_threshold": 1.0,
    "straight_through": "ste", "levels": None, "num_quantizers": None, "entropy_weight": None,
}


@dataclass(frozen=True)
class QuantizerKind:
    """One ``quantizer=`` of ``build_vqvae``: ``options``, the ``QUANTIZER_OPTIONS`` it takes
    (the others must stay at their defaults); ``defaults``, its own defaults for some of them;
    ``resolve(codebook_size, codebook_dim, options) -> (codebook_size, codebook_dim)`` (the
    latent dimension of FSQ and LFQ follows from their codebooks); ``build(dim, K, options)``
    the module."""

    name: str
    options: tuple[str, ...]
    resolve: Callable[[int | None, int | None, dict[str, Any]], tuple[int, int]]
    build: Callable[[int, int, dict[str, Any]], nn.Module]
    defaults: dict[str, Any]


def _learned_size(kind: str):
    def resolve(codebook_size, codebook_dim, options):
        if codebook_size is None:
            raise ValueError(f"quantizer={kind!r} needs codebook_size")
        return codebook_size, 16 if codebook_dim is None else codebook_dim
    return resolve


def _vq(dim: int, K: int, o: dict[str, Any]) -> nn.Module:
    return VectorQuantizer(dim, K, decay=o["decay"], commitment_weight=o["commitment_weight"],
                           kmeans_init=o["kmeans_init"],
                           dead_code_threshold=o["dead_code_threshold"],
                           straight_through=o["straight_through"])


def _rvq(dim: int, K: int, o: dict[str, Any]) -> nn.Module:
    from .residual_vq import ResidualVectorQuantizer

    return ResidualVectorQuantizer(dim, K, o["num_quantizers"], decay=o["decay"],
                                   commitment_weight=o["commitment_weight"],
                                   kmeans_init=o["kmeans_init"],
                                   dead_code_threshold=o["dead_code_threshold"])


def _fsq_resolve(codebook_size, codebook_dim, options):
    levels = options["levels"]
    if levels is None:
        raise ValueError("quantizer='fsq' needs levels (e.g. [8, 5, 5, 5])")
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or level < 2:
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
    K, D = math.prod(levels), len(levels)
    if codebook_size is not None and codebook_size != K:
        raise ValueError(f"quantizer='fsq': codebook_size is prod(levels) = {K}, got "
                         f"{codebook_size} (leave it out)")
    if codebook_dim is not None and codebook_dim != D:
        raise ValueError(f"quantizer='fsq': the latent dimension (codebook_dim) is "
                         f"len(levels) = {D}, got {codebook_dim} (leave it out)")
    options["levels"] = [int(level) for level in levels]
    return K, D


def _fsq(dim: int, K: int, o: dict[str, Any]) -> nn.Module:
    from .fsq import FiniteScalarQuantizer

    return FiniteScalarQuantizer(dim, o["levels"])


def _lfq_resolve(codebook_size, codebook_dim, options):
    if codebook_size is None and codebook_dim is None:
        raise ValueError("quantizer='lfq' needs codebook_size (a power of 2) or codebook_dim")
    bits = codebook_dim if codebook_size is None else int(codebook_size).bit_length() - 1
    if codebook_size is not None and (codebook_size < 2 or codebook_size != 2 ** bits):
        raise ValueError(f"quantizer='lfq': codebook_size must be a power of 2 >= 2, got "
                         f"{codebook_size}")
    if codebook_dim is not None and codebook_dim != bits:
        raise ValueError(f"quantizer='lfq': the latent dimension (codebook_dim) is "
                         f"log2(codebook_size) = {bits}, got {codebook_dim}")
    return 2 ** bits, bits


def _lfq(dim: int, K: int, o: dict[str, Any]) -> nn.Module:
    from .lfq import LookupFreeQuantizer

    return LookupFreeQuantizer(dim, entropy_weight=o["entropy_weight"],
                               commitment_weight=o["commitment_weight"])


_EMA = ("decay", "commitment_weight", "kmeans_init", "dead_code_threshold")
QUANTIZERS: dict[str, QuantizerKind] = {
    "vq": QuantizerKind("vq", (*_EMA, "straight_through"), _learned_size("vq"), _vq, {}),
    "rvq": QuantizerKind("rvq", (*_EMA, "num_quantizers"), _learned_size("rvq"), _rvq,
                         {"num_quantizers": 4}),
    "fsq": QuantizerKind("fsq", ("levels",), _fsq_resolve, _fsq, {}),
    "lfq": QuantizerKind("lfq", ("commitment_weight", "entropy_weight"), _lfq_resolve, _lfq,
                         {"entropy_weight": 0.1}),
}


def quantizer_options(quantizer: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``quantizer`` (its defaults filled in) from ``build_vqvae``'s arguments
    ``given``; a ``ValueError`` names an unknown quantizer and the options it does not take
    (given at other values than their defaults)."""
    kind = QUANTIZERS.get(quantizer)
    if kind is None:
        raise ValueError(f"quantizer must be one of {', '.join(map(repr, QUANTIZERS))}, "
                         f"got {quantizer!r}")
    wrong = [name for name, value in given.items()
             if name not in kind.options and value != QUANTIZER_OPTIONS[name]]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not options of quantizer={quantizer!r} (it takes "
                         f"{', '.join(kind.options)})")
    options = {name: given[name] for name in kind.options}
    for name, value in kind.defaults.items():
        if options[name] is None:
            options[name] = value
    return options
