"""VQ-VAE (van den Oord et al. 2017): a deterministic encoder, a ``VectorQuantizer`` and a
decoder, with the likelihoods of ``VAE``.

    encoder: x -> z_e (B, D, *spatial): the code dimension D on dim 1 (channels first, the
             layout of convolutional feature maps; an MLP's tokens are (B, D, T))
    decoder: z_q (B, D, *spatial) -> logits (Bernoulli) or mean (Gaussian), of x's shape

The loss is ``nll + vq_loss`` (the reconstruction's negative log-likelihood, in nats per sample
as the VAE's; the quantizer's commitment (and, with a learned codebook, codebook) loss, a mean
over elements, as in vector-quantize-pytorch and taming-transformers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .quantizer import VectorQuantizer
from .vae import LIKELIHOODS, VAE, _mlp, decoder_output_shape, upsampling_layers

PRIORS = ("uniform", "empirical")


class VQVAEOutput(NamedTuple):
    """What ``VQVAE.forward`` returns."""

    loss: Tensor
    nll: Tensor
    vq_loss: Tensor
    indices: Tensor
    z_e: Tensor
    z_q: Tensor
    recon: Tensor


class VQVAE(nn.Module):
    """A VQ-VAE around a user's encoder, decoder and ``fv.VectorQuantizer``.

    ``latent_shape``: ``(D, *spatial)``, the shape of one encoder output; ``D`` must be the
    quantizer's ``dim``. ``likelihood``, ``obs_logvar``, ``min_obs_var``, ``n_mixtures``,
    ``n_bins``: as ``VAE``'s (the same ``nll`` and ``mean_of``).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: VectorQuantizer,
                 latent_shape: Sequence[int], *, likelihood: str = "bernoulli",
                 obs_logvar: float = 0.0, min_obs_var: float = 1e-6, n_mixtures: int = 10,
                 n_bins: int = 256) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, "
                             f"got {likelihood!r}")
        if not isinstance(quantizer, VectorQuantizer):
            raise TypeError(f"quantizer must be a fastvae.VectorQuantizer, got "
                            f"{type(quantizer).__name__}")
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
        return self.quantizer.codebook_size

    def encode(self, x: Tensor) -> Tensor:
        """``z_e (B, D, *spatial)``, the encoder's output."""
        z = self.encoder(x)
        return z.reshape(x.shape[0], *self.latent_shape)

    def quantize(self, z_e: Tensor):
        """The quantizer on ``z_e (B, D, *spatial)``: its output with ``quantized`` moved back to
        ``(B, D, *spatial)`` and ``indices`` of shape ``(B, *spatial)``."""
        out = self.quantizer(z_e.movedim(1, -1))
        return out._replace(quantized=out.quantized.movedim(-1, 1))

    def decode(self, z_q: Tensor) -> Tensor:
        """Decoder output (logits or mean) of quantized latents ``(B, D, *spatial)``."""
        return self.decoder(z_q)

    def encode_indices(self, x: Tensor) -> Tensor:
        """The code indices of ``x``: int64 ``(B, *spatial)`` (no statistics are updated)."""
        with torch.no_grad():
            z = self.encode(x).movedim(1, -1)
            return self.quantizer.nearest(z)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decoder output of code indices ``(B, *spatial)``."""
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
    def sample(self, n: int, *, prior: str = "empirical",
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` images (the likelihood's mean) decoded from codes drawn independently at every
        position: ``prior="uniform"`` over the K codes, or ``"empirical"``: the code histogram of
        the quantizer's last ``usage_window`` training steps (a unigram prior; a learned
        autoregressive prior samples better)."""
        if prior not in PRIORS:
            raise ValueError(f"prior must be 'uniform' or 'empirical', got {prior!r}")
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        K = self.codebook_size
        spatial = self.latent_shape[1:]
        positions = n * math.prod(spatial)
        device = self.quantizer.cluster_size.device
        if prior == "uniform":
            weights = torch.ones(K, device=device)
        else:
            weights = self.quantizer.usage_total.double()
            if not bool(weights.sum() > 0):
                raise ValueError("prior='empirical' needs training steps in the quantizer's "
                                 "usage window; use prior='uniform'")
        if positions == 0:
            indices = torch.zeros(n, *spatial, dtype=torch.int64, device=device)
        else:
            indices = torch.multinomial(weights, positions, replacement=True,
                                        generator=generator)
        return self.mean_of(self.decode_indices(indices.view(n, *spatial)))


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


def build_vqvae(input_shape: Sequence[int], codebook_size: int, *, codebook_dim: int = 16,
                num_tokens: int = 4, arch: str = "mlp", hidden: Sequence[int] | None = None,
                likelihood: str = "bernoulli", obs_logvar: float = 0.0,
                decay: float | None = 0.99, commitment_weight: float = 0.25,
                kmeans_init: bool = True, dead_code_threshold: float = 1.0,
                straight_through: str = "ste", n_mixtures: int = 10,
                n_bins: int = 256) -> VQVAE:
    """A VQ-VAE with ready-made networks: ``arch="mlp"`` (the input flattened to ``num_tokens``
    tokens of ``codebook_dim``: latent ``(codebook_dim, num_tokens)``) or ``"conv"`` (a
    ``(codebook_dim, ceil(H / 2^L), ceil(W / 2^L))`` feature map for ``L = len(hidden)``
    stride-2 layers). The quantizer is ``VectorQuantizer(codebook_dim, codebook_size,
    decay=..., commitment_weight=..., kmeans_init=..., dead_code_threshold=...,
    straight_through=...)``. Its arguments are kept as ``model.build_config``."""
    config = {"input_shape": list(input_shape), "codebook_size": codebook_size,
              "codebook_dim": codebook_dim, "num_tokens": num_tokens, "arch": arch,
              "hidden": None if hidden is None else list(hidden), "likelihood": likelihood,
              "obs_logvar": obs_logvar, "decay": decay, "commitment_weight": commitment_weight,
              "kmeans_init": kmeans_init, "dead_code_threshold": dead_code_threshold,
              "straight_through": straight_through}
    output_shape = decoder_output_shape(input_shape, likelihood, n_mixtures)
    if likelihood == "dmol":
        config.update(n_mixtures=n_mixtures, n_bins=n_bins)
    quantizer = VectorQuantizer(codebook_dim, codebook_size, decay=decay,
                                commitment_weight=commitment_weight, kmeans_init=kmeans_init,
                                dead_code_threshold=dead_code_threshold,
                                straight_through=straight_through)
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
    model = VQVAE(encoder, decoder, quantizer, latent_shape, likelihood=likelihood,
                  obs_logvar=obs_logvar, n_mixtures=n_mixtures, n_bins=n_bins)
    model.build_config = config
    return model
