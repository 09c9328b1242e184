"""Small plain-torch modules of the quantizer protocol (``fastvae.models.quantizers``), with
its shapes and members and nothing else, as a user's own quantizer would be: a residual VQ of
``VectorQuantizer`` levels, a finite scalar quantizer without a usage histogram, a sign
(lookup-free) quantizer with one. They test that the VQ-VAE relies on the protocol only."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import fastvae as fv


class StackedRVQ(nn.Module):
    """Residual VQ: level l quantizes what levels < l left; indices ``(..., L)``."""

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int = 2) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.num_levels = dim, codebook_size, num_quantizers
        self.layers = nn.ModuleList(fv.VectorQuantizer(dim, codebook_size, decay=0.9,
                                                       kmeans_init=True, dead_code_threshold=1.0)
                                    for _ in range(num_quantizers))

    @property
    def restarts(self) -> Tensor:
        return torch.stack([q.restarts for q in self.layers]).sum()

    @property
    def usage_total(self) -> Tensor:
        return torch.stack([q.usage_total for q in self.layers])

    def forward(self, x: Tensor) -> fv.QuantizerOutput:
        residual, total = x, 0
        outs = []
        for q in self.layers:
            out = q(residual)
            outs.append(out)
            total = total + out.quantized
            residual = residual - out.quantized.detach()
        quantized = x + (total - x).detach() if x.requires_grad else total
        return fv.QuantizerOutput(quantized, torch.stack([o.indices for o in outs], -1),
                                  sum(o.loss for o in outs),
                                  sum(o.commitment_loss for o in outs),
                                  sum(o.codebook_loss for o in outs))

    @torch.no_grad()
    def nearest(self, x: Tensor) -> Tensor:
        indices, residual = [], x
        for q in self.layers:
            i = q.nearest(residual)
            indices.append(i)
            residual = residual - q.get_codes_from_indices(i)
        return torch.stack(indices, -1)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return sum(q.get_codes_from_indices(indices[..., i]) for i, q in enumerate(self.layers))

    def codebook_usage(self) -> Tensor:
        return torch.stack([q.codebook_usage() for q in self.layers])

    def perplexity(self) -> Tensor:
        return torch.stack([q.perplexity() for q in self.layers])


class RoundingFSQ(nn.Module):
    """Finite scalar quantization: ``round`` of a tanh-bounded value on ``levels[d]`` points,
    the straight-through gradient; indices the mixed-radix code. No loss, no histogram."""

    def __init__(self, levels: list[int]) -> None:
        super().__init__()
        self.levels = list(levels)
        self.dim, self.codebook_size, self.num_levels = len(levels), math.prod(levels), 1
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))
        self.register_buffer("_levels", torch.tensor(levels))
        basis = [math.prod(levels[:d]) for d in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis))

    def _digits(self, x: Tensor) -> Tensor:
        return ((torch.tanh(x) + 1) / 2 * (self._levels - 1)).round().long()

    def _values(self, digits: Tensor) -> Tensor:
        return digits.float() / (self._levels - 1) * 2 - 1

    def forward(self, x: Tensor) -> fv.QuantizerOutput:
        digits = self._digits(x.detach())
        values = self._values(digits).to(x.dtype)
        quantized = x + (values - x).detach()
        zero = x.new_zeros(())
        return fv.QuantizerOutput(quantized, (digits * self._basis).sum(-1), zero, zero, zero)

    def nearest(self, x: Tensor) -> Tensor:
        return (self._digits(x.detach()) * self._basis).sum(-1)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return self._values(indices[..., None] // self._basis % self._levels)

    def codebook_usage(self) -> Tensor:
        return torch.zeros(())

    def perplexity(self) -> Tensor:
        return torch.zeros(())


class SignLFQ(nn.Module):
    """Lookup-free quantization: ``sign`` per dimension, indices the bits, a commitment loss;
    keeps a usage histogram of its training steps (``usage_total``)."""

    def __init__(self, dim: int, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.num_levels = dim, 2 ** dim, 1
        self.commitment_weight = commitment_weight
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))
        self.register_buffer("usage_total", torch.zeros(2 ** dim, dtype=torch.int64))
        self.register_buffer("_bits", 2 ** torch.arange(dim))

    def forward(self, x: Tensor) -> fv.QuantizerOutput:
        values = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
        indices = self.nearest(x)
        if self.training:
            self.usage_total += torch.bincount(indices.flatten(), minlength=self.codebook_size)
        commitment = self.commitment_weight * (x - values).square().mean()
        zero = x.new_zeros(())
        return fv.QuantizerOutput(x + (values - x).detach(), indices, commitment, commitment,
                                  zero)

    def nearest(self, x: Tensor) -> Tensor:
        return ((x.detach() > 0).long() * self._bits).sum(-1)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return torch.where(indices[..., None] // self._bits % 2 == 1, 1.0, -1.0)

    def codebook_usage(self) -> Tensor:
        return (self.usage_total > 0).float().mean()

    def perplexity(self) -> Tensor:
        p = self.usage_total.double() / self.usage_total.sum().clamp_min(1)
        return torch.exp(-torch.special.xlogy(p, p).sum()).float()

