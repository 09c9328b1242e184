"""Vector quantization (VQ-VAE, van den Oord et al. 2017): the nearest code without the N x K
distance matrix, and the quantizer losses built on it.

Sections: ``nearest_code`` (the search), ``vector_quantize`` (straight-through quantization
and its losses).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import custom_ops as _ops
from . import reference
from . import validation as check
from .backends import resolve

__all__ = ["VQOutput", "nearest_code", "vector_quantize"]


# ---------------------------------------------------------------------------------------------
# nearest_code
# ---------------------------------------------------------------------------------------------


def nearest_code(x: Tensor, codebook: Tensor, *, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """The nearest codebook entry of every vector of ``x``: ``(indices, distances)``.

    ``metric="l2"``: ``d(x, e) = sum_j (x_j - e_j)^2``, the squared Euclidean distance;
    ``metric="cosine"``: ``d(x, e) = 1 - sum_j x^_j e^_j`` with ``x^ = x / max(|x|, 1e-12)``
    (likewise ``e^``). The search of VQ-VAE (van den Oord, Vinyals & Kavukcuoglu, *Neural
    Discrete Representation Learning*, NeurIPS 2017), fused and tiled over the codebook: memory
    O(N + K D), never the N x K distance matrix.

    Exact: ``indices`` is the argmin over the codes of the distances computed in the compute
    dtype (float32, float64 for float64 inputs; bfloat16 and float16 are computed in float32)
    in one fixed order (``acc = acc + (x_j - e_j)^2`` for j = 0 .. D-1, each operation rounded;
    docs/numerics.md), the lowest index among equal distances; every backend returns bitwise
    the same indices and distances. The expanded form ``|x|^2 - 2 x.e + |e|^2`` of other
    libraries cancels: it picks the wrong code for most vectors near a common offset. A NaN
    distance never wins; a vector with no distance below +inf (NaN in it) gets code 0 and its
    distance (NaN).

    Args:
        x: ``(..., D)`` floating tensor, any strides.
        codebook: ``(K, D)``, the same dtype and device as ``x``; K >= 1 (unless x is empty).
        metric: ``"l2"`` or ``"cosine"``.

    Returns:
        ``indices``: int64 of shape ``x.shape[:-1]``; ``distances``: the distance to that code,
        same shape, float32 (float64 for float64 inputs). Neither is differentiable (the index is
        an integer; the distances are marked non-differentiable: ``vector_quantize`` gives the
        quantizer its gradients).

    Raises:
        TypeError: ``x`` or ``codebook`` is not a floating tensor, or their dtypes differ.
        ValueError: shapes or devices that do not match; an empty codebook; an unknown
            ``metric``; with ``fastvae.set_validation(True)``, non-finite values.
    """
    check.tensor("x", x)
    check.tensor("codebook", codebook)
    check.finite(x=x, codebook=codebook)
    if not isinstance(metric, str) or metric not in reference.NEAREST_CODE_METRICS:
        raise ValueError(f"metric must be one of {', '.join(reference.NEAREST_CODE_METRICS)}, "
                         f"got {metric!r}")
    if codebook.dim() != 2 or x.dim() < 1 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x must have shape (..., D) and codebook (K, D); got x "
                         f"{tuple(x.shape)} and codebook {tuple(codebook.shape)}")
    check.same_dtype_and_device("codebook", codebook, "x", x)
    N, D = math.prod(x.shape[:-1]), x.shape[-1]
    if codebook.shape[0] == 0 and N > 0:
        raise ValueError("codebook is empty (K = 0)")
    index, dist = _ops.call(_ops.nearest_code, x.reshape(N, D), codebook, metric,
                            resolve(x.device))
    return index.view(x.shape[:-1]), dist.view(x.shape[:-1])


# ---------------------------------------------------------------------------------------------
# vector_quantize
# ---------------------------------------------------------------------------------------------

STRAIGHT_THROUGH = ("ste", "rotation")


def check_quantize_args(x: Tensor, name: str, codebook: Tensor, shape: str,
                        straight_through: str, beta: float,
                        reduction: str) -> tuple[float, torch.dtype]:
    """The argument checks ``vector_quantize`` and ``residual_vector_quantize`` share: ``x``
    (..., D) and the codebook ``name`` of ``shape`` (``"K, D"`` or ``"L, K, D"``) floating
    tensors on one device, ``straight_through``, ``beta`` (finite, >= 0) and ``reduction``.
    Returns ``beta`` as a float and the compute dtype (float64 if either tensor is float64,
    else float32). Raises ``TypeError`` / ``ValueError`` naming the argument."""
    check.tensor("x", x)
    check.tensor(name, codebook)
    if straight_through not in STRAIGHT_THROUGH:
        raise ValueError(f"straight_through must be one of {', '.join(STRAIGHT_THROUGH)}, "
                         f"got {straight_through!r}")
    beta = check.number("beta", beta)
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    check.reduction(reduction)
    if codebook.dim() != shape.count(",") + 1 or x.dim() < 1 \
            or x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"x must have shape (..., D) and {name} ({shape}); got x "
                         f"{tuple(x.shape)} and {name} {tuple(codebook.shape)}")
    check.same_device(name, codebook, "x", x)
    check.finite(x=x, **{name: codebook})
    compute = torch.promote_types(x.dtype, codebook.dtype)
    return beta, (torch.float64 if compute == torch.float64 else torch.float32)


class VQOutput(NamedTuple):
    """What ``vector_quantize`` returns. ``loss = codebook_loss + commitment_loss`` (the latter
    already weighted by ``beta``)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commitment_loss: Tensor
    codebook_loss: Tensor


def _normalize(t: Tensor) -> Tensor:
    """Rows of ``t`` scaled to unit norm (zero rows stay zero), as ``nearest_code``'s cosine."""
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _RotationTrick(torch.autograd.Function):
    """Forward: ``q`` itself. Backward: the gradient of ``sg(lambda R) x`` with respect to ``x``,
    ``lambda R^T g = lambda (g - 2 r (r.g) + 2 u (q_hat.g))`` (Fifty et al. 2024, eq. 4.2:
    ``R = I - 2 r r^T + 2 q_hat u^T`` with ``u = x/|x|``, ``q_hat = q/|q|``,
    ``r = (u + q_hat)/|u + q_hat|``, ``lambda = |q|/|x|``). Rows where the rotation is not
    defined (``x = 0``, or ``x`` pointing exactly away from ``q``) pass the gradient straight
    through. Saves ``x`` and ``q`` (O(N D))."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, q)
        return q.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, q = ctx.saved_tensors
        xn = x.norm(dim=-1, keepdim=True)
        qn = q.norm(dim=-1, keepdim=True)
        u = x / xn.clamp_min(torch.finfo(x.dtype).tiny)
        qh = q / qn.clamp_min(torch.finfo(q.dtype).tiny)
        w = u + qh
        wn = w.norm(dim=-1, keepdim=True)
        r = w / wn.clamp_min(torch.finfo(w.dtype).tiny)
        lam = qn / xn.clamp_min(torch.finfo(x.dtype).tiny)
        rotated = lam * (g - 2 * r * (r * g).sum(-1, keepdim=True)
                         + 2 * u * (qh * g).sum(-1, keepdim=True))
        # the rotation exists for x != 0 and u != -q_hat (|u + q_hat| > 0); q = 0 gives lambda 0
        ok = (xn > 0) & ((wn > 1e-6) | (qn == 0))
        return torch.where(ok, rotated, g), None


def _straight_through(x: Tensor, q: Tensor, mode: str) -> Tensor:
    """The value of ``q`` (exactly) with a gradient to ``x`` only: the identity (``"ste"``,
    ``x + sg(q - x)`` of van den Oord et al. 2017, written ``sg(q) + (x - sg(x))`` so that the
    value is ``q`` bit for bit) or the rotation trick (``"rotation"``, Fifty et al. 2024)."""
    if mode == "rotation":
        return _RotationTrick.apply(x, q.detach())
    return q.detach() + (x - x.detach())


def vector_quantize(x: Tensor, codebook: Tensor, *, metric: str = "l2", beta: float = 0.25,
                    straight_through: str = "ste", reduction: str = "mean") -> VQOutput:
    """Quantize every vector of ``x`` to its nearest codebook entry, with the VQ-VAE losses
    (van den Oord et al. 2017).

    ``x``: ``(..., D)``; ``codebook``: ``(K, D)``; floating dtypes, one device (the two may have
    different dtypes: both are computed in their common dtype, at least float32). The search is
    ``nearest_code`` (exact, lowest index on ties, never N x K). With ``q = codebook[indices]``:

    - ``quantized``: the value of ``q`` (in ``x``'s dtype) whose gradient goes to ``x`` only:
      ``straight_through="ste"``, the identity (``x + sg(q - x)``), or ``"rotation"``, the rotation
      trick of Fifty et al. 2024 ("Restructuring Vector Quantization with the Rotation Trick"):
      ``sg(lambda R) x`` with ``R`` the rotation taking ``x/|x|`` to ``q/|q|`` and
      ``lambda = |q|/|x|``, so the gradient reaching ``x`` is ``lambda R^T`` times the incoming
      one (rows with ``x = 0`` or ``x`` antiparallel to ``q`` fall back to the identity).
    - ``codebook_loss``: ``|sg(x) - q|^2`` (gradient to the codebook rows only).
    - ``commitment_loss``: ``beta |x - sg(q)|^2`` (gradient to ``x`` only; ``beta`` is on this
      term, as in the paper).
    - ``loss = codebook_loss + commitment_loss``.

    Reduction, as ``torch.nn.functional.mse_loss`` and the VQ libraries (taming-transformers,
    vector-quantize-pytorch), so that ``beta = 0.25`` means what it means there:
    ``"mean"`` (default) the mean over all elements of ``x``; ``"sum"`` the sum over all
    elements; ``"none"`` per vector, summed over ``D``: shape ``x.shape[:-1]``.

    ``metric="cosine"`` searches by ``1 - cos`` and quantizes the unit vectors: ``x`` and the
    codebook rows are divided by their norms first (``quantized`` is the unit code; the losses
    are between unit vectors, ``2 (1 - cos)``; the gradient flows through the normalization).

    Losses are float32 (float64 for float64 inputs). Memory: the search is O(N + K); autograd
    keeps O(N D) (the gathered rows and differences), nothing N x K; the codebook's gradient is
    an index-add of the rows' gradients.

    Raises ``TypeError`` for non-floating tensors, ``ValueError`` for shapes, devices, ``metric``,
    ``straight_through``, ``reduction`` or a negative/non-finite ``beta``.
    """
    if metric not in reference.NEAREST_CODE_METRICS:
        raise ValueError(f"metric must be one of {', '.join(reference.NEAREST_CODE_METRICS)}, "
                         f"got {metric!r}")
    beta, compute = check_quantize_args(x, "codebook", codebook, "K, D", straight_through,
                                        beta, reduction)
    xc = x.to(compute)
    cb = codebook.to(compute)
    if metric == "cosine":
        xc = _normalize(xc)
    indices, _ = nearest_code(xc.detach(), cb.detach(), metric=metric)
    q = cb.index_select(0, indices.reshape(-1)).view(xc.shape)
    if metric == "cosine":
        q = _normalize(q)
    quantized = _straight_through(xc, q, straight_through).to(x.dtype)
    codebook_loss = (xc.detach() - q).square()
    commitment_loss = (xc - q.detach()).square()
    if reduction == "mean":
        codebook_loss, commitment_loss = codebook_loss.mean(), commitment_loss.mean()
    elif reduction == "sum":
        codebook_loss, commitment_loss = codebook_loss.sum(), commitment_loss.sum()
    else:
        codebook_loss, commitment_loss = codebook_loss.sum(-1), commitment_loss.sum(-1)
    commitment_loss = beta * commitment_loss
    return VQOutput(quantized, indices, codebook_loss + commitment_loss, commitment_loss,
                    codebook_loss)
