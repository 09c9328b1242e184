"""VQ-VAE (van den Oord et al. 2017): a deterministic encoder, a quantizer and a decoder, with
the likelihoods of ``VAE``. The quantizer is any module of the quantizer protocol
(``fastvae.models.quantizers``): ``VectorQuantizer``, a residual VQ (Zeghidour et al. 2021), FSQ
(Mentzer et al. 2023) or LFQ (Yu et al. 2023).

    encoder: x -> z_e (B, D, *spatial): the code dimension D on dim 1 (channels first, the
             layout of convolutional feature maps; an MLP's tokens are (B, D, T))
    decoder: z_q (B, D, *spatial) -> logits (Bernoulli) or mean (Gaussian), of x's shape

The loss is ``nll + vq_loss`` (the reconstruction's negative log-likelihood, in nats per sample
as the VAE's; the quantizer's ``loss``: its commitment (and, with a learned codebook, codebook)
loss, LFQ's entropy loss, a mean over elements as in vector-quantize-pytorch and
taming-transformers; FSQ has none).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .quantizers import QUANTIZERS, check_quantizer, level_counts, quantizer_options
from .vae import LIKELIHOODS, VAE, _mlp, decoder_output_shape, upsampling_layers

PRIORS = ("uniform", "empirical")


class VQVAEOutput(NamedTuple):
    """What ``VQVAE.forward`` returns."""

    loss: Tensor
    nll: Tensor
    vq_loss: Tensor
    indices: Tensor  # (B, *spatial), or (B, *spatial, L) for a residual VQ of L levels
    z_e: Tensor
    z_q: Tensor
    recon: Tensor


class VQVAE(nn.Module):
    """A VQ-VAE around a user's encoder, decoder and quantizer module.

    ``quantizer``: ``fv.VectorQuantizer`` or any module of the quantizer protocol
    (``fastvae.models.quantizers``: ``dim``, ``codebook_size``, ``num_levels``, ``forward``
    returning a ``QuantizerOutput``, ``nearest``, ``get_codes_from_indices``,
    ``codebook_usage``, ``perplexity``, ``restarts``); anything else is a ``TypeError``.
    ``latent_shape``: ``(D, *spatial)``, the shape of one encoder output; ``D`` must be the
    quantizer's ``dim`` (``ValueError``). ``likelihood``, ``obs_logvar``, ``min_obs_var``,
    ``n_mixtures``, ``n_bins``: as ``VAE``'s (the same ``nll`` and ``mean_of``).

    Code indices are int64 ``(B, *spatial)``, or ``(B, *spatial, L)`` with a residual VQ of
    ``L = quantizer.num_levels`` levels.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: nn.Module,
                 latent_shape: Sequence[int], *, likelihood: str = "bernoulli",
                 obs_logvar: float = 0.0, min_obs_var: float = 1e-6, n_mixtures: int = 10,
                 n_bins: int = 256) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, "
                             f"got {likelihood!r}")
        check_quantizer(quantizer)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if not self.latent_shape or self.latent_shape[0] != quantizer.dim:
            raise ValueError(f"latent_shape must be (D, *spatial) with D = the quantizer's dim "
                             f"{quantizer.dim}, got {self.latent_shape}")
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.likelihood = likelihood
        self.min_obs_var = float(min_obs_var)
        self.n_mixtures, self.n_bins = int(n_mixtures), int(n_bins)
        self.obs_logvar: float | nn.Parameter = float(obs_logvar)
        if likelihood == "gaussian_learned":
            self.obs_logvar = nn.Parameter(torch.tensor(float(obs_logvar)))

    # the likelihood: VAE's own methods (they read likelihood, obs_logvar, min_obs_var,
    # n_mixtures and n_bins, which this class holds too)
    nll = VAE.nll
    mean_of = VAE.mean_of

    @property
    def codebook_size(self) -> int:
        """Codes per level (K; FSQ: ``prod(levels)``, LFQ: ``2**bits``)."""
        return self.quantizer.codebook_size

    @property
    def num_levels(self) -> int:
        """The quantizer's levels L (a residual VQ's codebooks; 1 for the others)."""
        return self.quantizer.num_levels

    def encode(self, x: Tensor) -> Tensor:
        """``z_e (B, D, *spatial)``, the encoder's output."""
        z = self.encoder(x)
        return z.reshape(x.shape[0], *self.latent_shape)

    def quantize(self, z_e: Tensor):
        """The quantizer on ``z_e (B, D, *spatial)``: its output with ``quantized`` moved back to
        ``(B, D, *spatial)`` and ``indices`` of shape ``(B, *spatial)`` (``(B, *spatial, L)``
        for a residual VQ)."""
        out = self.quantizer(z_e.movedim(1, -1))
        return out._replace(quantized=out.quantized.movedim(-1, 1))

    def decode(self, z_q: Tensor) -> Tensor:
        """Decoder output (logits or mean) of quantized latents ``(B, D, *spatial)``."""
        return self.decoder(z_q)

    def encode_indices(self, x: Tensor) -> Tensor:
        """The code indices of ``x``: int64 ``(B, *spatial)`` (``(B, *spatial, L)`` for a
        residual VQ); no statistics are updated."""
        with torch.no_grad():
            z = self.encode(x).movedim(1, -1)
            return self.quantizer.nearest(z)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decoder output of code indices ``(B, *spatial)`` (``(B, *spatial, L)`` for a
        residual VQ: the sum of the levels' codes is decoded)."""
        codes = self.quantizer.get_codes_from_indices(indices)
        return self.decode(codes.movedim(-1, 1))

    def forward(self, x: Tensor, *, reduction: str = "mean") -> VQVAEOutput:
        """``loss = nll + vq_loss`` and its parts; a training-mode call updates the codebook."""
        z_e = self.encode(x)
        out = self.quantize(z_e)
        recon = self.decode(out.quantized)
        nll = self.nll(recon, x, reduction)
        vq_loss = out.loss
        if reduction == "none":
            vq_loss = vq_loss.expand(nll.shape)
        return VQVAEOutput(nll + vq_loss, nll, vq_loss, out.indices, z_e, out.quantized, recon)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The likelihood's mean at the quantized encoding of ``x``."""
        return self.mean_of(self.decode_indices(self.encode_indices(x)))

    @torch.no_grad()
    def sample(self, n: int, *, prior: str | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` images (the likelihood's mean) decoded from codes drawn independently at every
        position (and, for a residual VQ, at every level): ``prior="uniform"`` over the K codes
        (``torch.randint``: FSQ's and LFQ's implicit codebooks of 2^32 codes too), or
        ``"empirical"``: the code histogram (of each level) of the quantizer's recent training
        steps (``usage_total``; a unigram prior; a learned autoregressive prior samples
        better). ``None``: ``default_prior``. ``ValueError`` for an unknown prior, ``n < 0``,
        or an empirical prior with no histogram (a quantizer that keeps none, or no training
        steps)."""
        prior = self.default_prior if prior is None else prior
        if prior not in PRIORS:
            raise ValueError(f"prior must be 'uniform' or 'empirical', got {prior!r}")
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        indices = self.draw_indices(n, prior, generator)
        return self.mean_of(self.decode_indices(indices))

    @property
    def default_prior(self) -> str:
        """``"empirical"`` when the quantizer keeps a code histogram (``usage_total``), else
        ``"uniform"``."""
        return "uniform" if level_counts(self.quantizer) is None else "empirical"

    @torch.no_grad()
    def draw_indices(self, n: int, prior: str = "empirical",
                     generator: torch.Generator | None = None) -> Tensor:
        """The codes ``sample`` decodes: int64 ``(n, *spatial)`` (``(n, *spatial, L)``)."""
        L, K = self.num_levels, self.codebook_size
        shape = (n, *self.latent_shape[1:], *((L,) if L > 1 else ()))
        positions = math.prod(shape) // L
        device = next(itertools.chain(self.parameters(), self.buffers()),
                      torch.empty(0)).device
        if prior == "uniform" or positions == 0:
            return torch.randint(0, K, shape, generator=generator, device=device)
        counts = level_counts(self.quantizer)
        if counts is None:
            raise ValueError(f"prior='empirical': {type(self.quantizer).__name__} keeps no code "
                             "histogram (usage_total); use prior='uniform'")
        if not bool((counts.sum(1) > 0).all()):
            raise ValueError("prior='empirical' needs training steps in the quantizer's "
                             "usage window; use prior='uniform'")
        levels = []
        for row in counts:  # over the used codes only: K may exceed multinomial's 2^24
            used = row.nonzero()[:, 0]
            draws = torch.multinomial(row[used].double(), positions, replacement=True,
                                      generator=generator)
            levels.append(used[draws])
        return torch.stack(levels, -1).view(shape).to(device)


# -- ready-made networks -----------------------------------------------------------------------


def vq_conv_encoder(input_shape: Sequence[int], codebook_dim: int,
                    channels: Sequence[int] = (32, 64)) -> nn.Module:
    """Strided 3x3 convolutions (each halves H and W, rounding up), then a 1x1 convolution to
    ``codebook_dim``: ``x (B, C, H, W) -> z_e (B, codebook_dim, h, w)``."""
    c = input_shape[0]
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.SiLU()]
        c = out
    return nn.Sequential(*layers, nn.Conv2d(c, codebook_dim, 1))


def vq_conv_decoder(codebook_dim: int, output_shape: Sequence[int],
                    channels: Sequence[int] = (64, 32)) -> nn.Module:
    """A 1x1 convolution, then 4x4 transposed convolutions that each double H and W, cropped to
    ``output_shape``: ``z_q (B, codebook_dim, h, w) -> (B, C, H, W)``."""
    c_out, height, width = output_shape
    return nn.Sequential(nn.Conv2d(codebook_dim, channels[0], 1), nn.SiLU(),
                         *upsampling_layers(channels, c_out, height, width))


def build_vqvae(input_shape: Sequence[int], codebook_size: int | None = None, *,
                quantizer: str = "vq", codebook_dim: int | None = None, num_tokens: int = 4,
                arch: str = "mlp", hidden: Sequence[int] | None = None,
                likelihood: str = "bernoulli", obs_logvar: float = 0.0,
                decay: float | None = 0.99, commitment_weight: float = 0.25,
                kmeans_init: bool = True, dead_code_threshold: float = 1.0,
                straight_through: str = "ste", levels: Sequence[int] | None = None,
                num_quantizers: int | None = None, entropy_weight: float | None = None,
                n_mixtures: int = 10, n_bins: int = 256) -> VQVAE:
    """A VQ-VAE with ready-made networks: ``arch="mlp"`` (the input flattened to ``num_tokens``
    tokens of dimension D: latent ``(D, num_tokens)``) or ``"conv"`` (a ``(D, ceil(H / 2^L),
    ceil(W / 2^L))`` feature map for ``L = len(hidden)`` stride-2 layers).

    ``quantizer`` chooses the quantizer and the arguments it takes (``ValueError`` naming any
    other given at a value other than its default):

    - ``"vq"``: ``VectorQuantizer(D, codebook_size, decay=..., commitment_weight=...,
      kmeans_init=..., dead_code_threshold=..., straight_through=...)`` (van den Oord et al.
      2017); ``codebook_size`` required, ``D = codebook_dim`` (default 16);
    - ``"rvq"``: ``ResidualVectorQuantizer(D, codebook_size, num_quantizers, ...)`` with the
      same EMA arguments (Zeghidour et al. 2021): ``num_quantizers`` levels (default 4) of
      ``codebook_size`` codes each;
    - ``"fsq"``: ``FiniteScalarQuantizer(levels)`` (Mentzer et al. 2023): ``D = len(levels)``
      and ``codebook_size = prod(levels)`` (either may be given only at that value);
    - ``"lfq"``: ``LookupFreeQuantizer`` (Yu et al. 2023) of ``D = log2(codebook_size)`` bits
      (``codebook_size`` a power of 2, or ``codebook_dim`` the bits) with ``entropy_weight``
      (default 0.1) and ``commitment_weight``.

    Its arguments (those of its quantizer) are kept as ``model.build_config``."""
    given = {"decay": decay, "commitment_weight": commitment_weight, "kmeans_init": kmeans_init,
             "dead_code_threshold": dead_code_threshold, "straight_through": straight_through,
             "levels": levels, "num_quantizers": num_quantizers,
             "entropy_weight": entropy_weight}
    options = quantizer_options(quantizer, given)
    codebook_size, codebook_dim = QUANTIZERS[quantizer].resolve(codebook_size, codebook_dim,
                                                                options)
    config: dict[str, Any] = {
        "input_shape": list(input_shape), "codebook_size": codebook_size,
        "codebook_dim": codebook_dim, "num_tokens": num_tokens, "arch": arch,
        "hidden": None if hidden is None else list(hidden), "likelihood": likelihood,
        "obs_logvar": obs_logvar, "quantizer": quantizer, **options}
    output_shape = decoder_output_shape(input_shape, likelihood, n_mixtures)
    if likelihood == "dmol":
        config.update(n_mixtures=n_mixtures, n_bins=n_bins)
    module = QUANTIZERS[quantizer].build(codebook_dim, codebook_size, options)
    if arch == "mlp":
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        hidden = tuple(hidden or (256, 256))
        flat = codebook_dim * num_tokens
        encoder: nn.Module = nn.Sequential(nn.Flatten(),
                                           *_mlp([math.prod(input_shape), *hidden, flat]),
                                           nn.Unflatten(1, (codebook_dim, num_tokens)))
        decoder: nn.Module = nn.Sequential(nn.Flatten(),
                                           *_mlp([flat, *reversed(hidden),
                                                  math.prod(output_shape)]),
                                           nn.Unflatten(1, output_shape))
        latent_shape: tuple[int, ...] = (codebook_dim, num_tokens)
    elif arch == "conv":
        if len(input_shape) != 3:
            raise ValueError(f"arch 'conv' needs (C, H, W) inputs, got {tuple(input_shape)}")
        channels = tuple(hidden or (32, 64))
        encoder = vq_conv_encoder(input_shape, codebook_dim, channels)
        decoder = vq_conv_decoder(codebook_dim, output_shape, tuple(reversed(channels)))
        h, w = input_shape[1], input_shape[2]
        for _ in channels:
            h, w = -(-h // 2), -(-w // 2)
        latent_shape = (codebook_dim, h, w)
    else:
        raise ValueError(f"arch must be 'mlp' or 'conv', got {arch!r}")
    model = VQVAE(encoder, decoder, module, latent_shape, likelihood=likelihood,
                  obs_logvar=obs_logvar, n_mixtures=n_mixtures, n_bins=n_bins)
    model.build_config = config
    return model
