"""Vector quantization (VQ-VAE, van den Oord et al. 2017): the nearest code without the N x K
distance matrix, and the quantizer losses built on it.

Sections: ``nearest_code`` (the search), ``vector_quantize`` (straight-through quantization
and its losses).
"""

from __future__ import annotations

import math

from torch import Tensor

from . import custom_ops as _ops
from . import reference
from . import validation as check
from .backends import resolve

__all__ = ["nearest_code"]


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
            ``metric``.
    """
    check.tensor("x", x)
    check.tensor("codebook", codebook)
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
