"""``fv.build_vae``: the VAE of ``fastvae.models.vae.build_vae``, or with ``quantizer="vq"``
(``"rvq"``, ``"fsq"``, ``"lfq"``) the VQ-VAE of ``fastvae.models.vqvae.build_vqvae`` (a module
above both, so that neither imports the other's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .quantizers import QUANTIZERS
from .vae import VAE
from .vae import build_vae as _build_vae
from .vqvae import VQVAE, build_vqvae

__all__ = ["build_vae"]

# build_vae's settings of the KL term, and their defaults: a VQ-VAE has none
_KL_SETTINGS = {"beta": 1.0, "free_bits": 0.0, "logvar_limit": None}


def build_vae(input_shape: Sequence[int], latent_dim: int, *, quantizer: str | None = None,
              codebook_size: int | None = None, **options: Any) -> VAE | VQVAE:
    """A VAE with the ready-made MLP or convolutional networks: ``fastvae.models.vae.build_vae
    (input_shape, latent_dim, **options)`` (``arch``, ``hidden``, ``likelihood``,
    ``obs_logvar``, ``beta``, ``free_bits``, ``logvar_limit``, ``n_mixtures``, ``n_bins``).

    ``quantizer="vq"``, ``"rvq"``, ``"fsq"`` or ``"lfq"``: a VQ-VAE instead (``fastvae.VQVAE``,
    van den Oord et al. 2017), ``build_vqvae(input_shape, codebook_size, quantizer=quantizer,
    codebook_dim=latent_dim, **options)``: the same network options, and the quantizer's
    (``num_tokens``, ``decay``, ``commitment_weight``, ``kmeans_init``,
    ``dead_code_threshold``, ``straight_through``; ``num_quantizers`` for ``"rvq"``, ``levels``
    for ``"fsq"`` (``latent_dim`` must be ``len(levels)``), ``entropy_weight`` for ``"lfq"``
    (``latent_dim`` must be ``log2(codebook_size)``)). ``codebook_size`` is then required
    (except for FSQ, where it is ``prod(levels)``), and the KL's settings (``beta``,
    ``free_bits``, ``logvar_limit``) must be left at their defaults. Raises ``ValueError`` for
    these rules, ``TypeError`` for an unknown keyword."""
    if quantizer is None:
        if codebook_size is not None:
            raise ValueError("codebook_size needs a quantizer (quantizer='vq', 'rvq', 'fsq' or "
                             "'lfq')")
        return _build_vae(input_shape, latent_dim, **options)
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be None or one of {', '.join(map(repr, QUANTIZERS))}, "
                         f"got {quantizer!r}")
    if codebook_size is None and quantizer != "fsq":
        raise ValueError(f"quantizer={quantizer!r} needs codebook_size")
    kl = [name for name, default in _KL_SETTINGS.items()
          if name in options and options.pop(name) != default]
    if kl:
        raise ValueError(f"{', '.join(kl)}: settings of the VAE's KL term, which a VQ-VAE "
                         f"(quantizer={quantizer!r}) does not have")
    return build_vqvae(input_shape, codebook_size, quantizer=quantizer,
                       codebook_dim=latent_dim, **options)
