"""Vector quantization (VQ-VAE, van den Oord et al. 2017): the nearest code without the N x K
distance matrix, and the quantizer losses built on it.

Sections: ``nearest_code`` (the search), ``vector_quantize`` (straight-through quantization
and its losses).
"""

from __future__ import annotations

import math

from torch import Tensor

from . import reference
from . import validation as check

__all__ = ["nearest_code"]


# ---------------------------------------------------------------------------------------------
# nearest_code
# ---------------------------------------------------------------------------------------------


def nearest_code(x: Tensor, codebook: Tensor, *, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """The nearest codebook entry of every vector of ``x``: ``(indices, distances)``.

    ``x``: ``(..., D)``; ``codebook``: ``(K, D)``, same dtype and device. ``indices``: int64 of
    shape ``x.shape[:-1]``; ``distances``: the squared L2 distance ``sum_j (x_j - e_j)^2`` to that
    code (``metric="l2"``) or ``1 - cos(x, e)`` (``metric="cosine"``), float32 (float64 for
    float64 inputs). The argmin of the distances computed in the compute dtype, lowest index on
    ties; never materializes N x K.
    """
    check.tensor("x", x)
    check.tensor("codebook", codebook)
    if metric not in reference.NEAREST_CODE_METRICS:
        raise ValueError(f"metric must be one of {', '.join(reference.NEAREST_CODE_METRICS)}, "
                         f"got {metric!r}")
    if codebook.dim() != 2 or x.dim() < 1 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x must have shape (..., D) and codebook (K, D); got x "
                         f"{tuple(x.shape)} and codebook {tuple(codebook.shape)}")
    check.same_dtype_and_device("codebook", codebook, "x", x)
    N = math.prod(x.shape[:-1])
    if codebook.shape[0] == 0 and N > 0:
        raise ValueError("codebook is empty (K = 0)")
    index, dist = reference.nearest_code_fwd(x.reshape(N, x.shape[-1]), codebook, metric)
    return index.view(x.shape[:-1]), dist.view(x.shape[:-1])
