"""Residual vector quantization (SoundStream, Zeghidour et al. 2021; Encodec, Défossez et al.
2022): L codebooks applied one after another to what the previous ones left, all levels in one
fused op each way (``fastvae::residual_vq``), never an N x K matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import custom_ops as _ops
from . import validation as check
from .backends import resolve
from .quantize import check_quantize_args

__all__ = ["RVQOutput", "residual_vector_quantize"]


class RVQOutput(NamedTuple):
    """What ``residual_vector_quantize`` returns: ``quantized (..., D)``, ``indices (..., L)``
    int64 (-1 at dropped levels), ``loss`` (the sum over levels of both terms),
    ``commitment_loss`` and ``codebook_loss`` per level (``(L,)``, or ``(..., L)`` with
    ``reduction="none"``; the commitment already weighted by ``beta``)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commitment_loss: Tensor
    codebook_loss: Tensor


def _levels_tensor(n_levels: object, batch_shape: torch.Size, L: int,
                   device: torch.device) -> Tensor | None:
    """``n_levels`` as an int64 ``(N,)`` tensor on ``device`` (None: every level)."""
    if n_levels is None:
        return None
    N = math.prod(batch_shape)
    if isinstance(n_levels, Tensor):
        if n_levels.dtype.is_floating_point or n_levels.dtype.is_complex \
                or n_levels.dtype == torch.bool:
            raise TypeError(f"n_levels must be an integer tensor, got {n_levels.dtype}")
        if n_levels.device != device:
            raise ValueError(f"n_levels is on {n_levels.device} but x is on {device}; "
                             "all tensors of a call must be on one device")
        if n_levels.dim() != 0 and n_levels.shape != batch_shape:
            raise ValueError(f"n_levels must have shape x.shape[:-1] = {tuple(batch_shape)} "
                             f"(or be a number), got {tuple(n_levels.shape)}")
        check.indices_in_range("n_levels", n_levels, 0, L + 1, "levels per vector, L = "
                               f"{L}")
        if n_levels.dim() == 0:
            return n_levels.to(torch.int64).expand(N).contiguous()
        return n_levels.to(torch.int64).reshape(N).contiguous()
    value = check.integer("n_levels", n_levels)
    if not 0 <= value <= L:
        raise ValueError(f"n_levels must be in [0, {L}], got {value}")
    if value == L:
        return None
    return torch.full((N,), value, dtype=torch.int64, device=device)


def residual_vector_quantize(x: Tensor, codebooks: Tensor, *, n_levels: int | Tensor | None = None,
                             beta: float = 0.25, straight_through: str = "ste",
                             reduction: str = "mean") -> RVQOutput:
    """Residual vector quantization of every vector of ``x`` by ``L`` codebooks.

    The algorithm of SoundStream (Zeghidour et al. 2021, *SoundStream: An End-to-End Neural
    Audio Codec*, algorithm 1) and Encodec (Défossez et al. 2022), as
    vector-quantize-pytorch's ``ResidualVQ`` computes it: ``r_0 = x``; for l = 0 .. L-1,
    ``i_l = argmin_k |r_l - C_l[k]|^2`` (``fv.nearest_code``: exact, lowest index on ties),
    ``c_l = C_l[i_l]``, ``r_{l+1} = r_l - c_l``; ``quantized = sum_l c_l``. All levels run in one
    fused op (``fastvae::residual_vq``, every backend bitwise the same: docs/numerics.md, "the
    residual"); memory O(N (D + L) + L K D), never N x K; the backward recomputes the residuals
    from the indices.

    Quantize dropout (SoundStream section 3.3): ``n_levels`` limits the levels per vector: level
    l is active for a vector when ``l < n_levels``; the inactive levels have index -1, add
    nothing to ``quantized`` and have zero losses. ``None``: all L.

    Gradients, with the codes subtracted stopped (``r_{l+1} = r_l - sg(c_l)``, the package's
    ``quant_grad_frac=0``) so that every residual passes gradients to ``x`` by the identity:

    - ``quantized``: each active level passes the incoming gradient straight through to its
      residual (``straight_through="ste"``: the identity, ``r_l + sg(c_l - r_l)``;
      ``"rotation"``: the rotation trick of Fifty et al. 2024 per level); so with ``"ste"`` the
      gradient reaching ``x`` is ``n_active * g``, as the package's per-level STE sums to.
    - ``commitment_loss[l] = beta |r_l - sg(c_l)|^2`` (gradient to ``x``);
      ``codebook_loss[l] = |sg(r_l) - c_l|^2`` (gradient to ``codebooks[l]``, rows by index).
    - ``loss``: the sum over levels of both.

    Reduction (per level, as ``vector_quantize``): ``"mean"`` (default) the sum over vectors
    and D divided by the number of elements of ``x`` (the package's ``mse_loss`` per layer;
    dropped vectors count as 0), ``"sum"``, or ``"none"``: per vector, ``(..., L)`` (``loss``
    then ``x.shape[:-1]``).

    Args:
        x: ``(..., D)`` floating tensor, any strides.
        codebooks: ``(L, K, D)``, floating, on ``x``'s device; L, K >= 1. ``x`` and the codebooks
            are computed in their common dtype, at least float32.
        n_levels: None, an int in [0, L], or an integer tensor of shape ``x.shape[:-1]`` (or
            0-d) on ``x``'s device (values beyond [0, L] act as 0 or L; no host sync; with
            ``fastvae.set_validation(True)`` they are refused, with a host sync).
        beta: the commitment weight (>= 0, finite).
        straight_through: ``"ste"`` or ``"rotation"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``RVQOutput(quantized, indices, loss, commitment_loss, codebook_loss)``: ``quantized``
        in ``x``'s dtype, ``indices`` int64 ``x.shape[:-1] + (L,)``, losses in float32 (float64
        for float64 inputs).

    Raises:
        TypeError: non-floating ``x``/``codebooks``, a non-integer ``n_levels``, a non-number
            ``beta``.
        ValueError: shapes, devices, an empty codebook (L = 0 or K = 0), ``n_levels`` out of
            range or of the wrong shape, ``beta``, ``straight_through``, ``reduction``.
    """
    beta, compute = check_quantize_args(x, "codebooks", codebooks, "L, K, D", straight_through,
                                        beta, reduction)
    L, K, D = codebooks.shape
    if L == 0 or K == 0:
        raise ValueError(f"codebooks is empty (L = {L}, K = {K})")
    batch_shape = x.shape[:-1]
    N = math.prod(batch_shape)
    levels = _levels_tensor(n_levels, batch_shape, L, x.device)
    xc = x.reshape(N, D).to(compute)
    cb = codebooks.to(compute)
    q, indices, commit, dist = _ops.call(_ops.residual_vq, xc, cb, levels,
                                         int(straight_through == "rotation"), resolve(x.device))
    quantized = q.to(x.dtype).view(x.shape)
    if reduction == "none":
        commitment_loss = beta * commit.view(*batch_shape, L)
        codebook_loss = dist.view(*batch_shape, L)
    else:
        commitment_loss = beta * commit.sum(0)
        codebook_loss = dist.sum(0)
        if reduction == "mean":
            commitment_loss = commitment_loss / (N * D)
            codebook_loss = codebook_loss / (N * D)
    loss = (codebook_loss + commitment_loss).sum(-1)
    return RVQOutput(quantized, indices.view(*batch_shape, L), loss, commitment_loss,
                     codebook_loss)
