"""Lookup-free quantization (LFQ; Yu et al. 2023, "Language Model Beats Diffusion -- Tokenizer
is Key to Visual Generation", MAGVIT-v2), with its entropy loss computed without the N x 2**d
matrix of code probabilities.

Sections: ``lfq_entropy`` (the two entropies, all-reduced under ``torch.distributed``) and
``lookup_free_quantize`` (sign quantization, indices, the losses). The math and where it
differs from vector-quantize-pytorch: docs/conventions.md ("Lookup-free quantization").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import custom_ops as _ops
from . import validation as check
from .backends import resolve

__all__ = ["LFQEntropy", "LFQOutput", "lfq_entropy", "lookup_free_quantize"]

MAX_BITS = 30  # bits per codebook: the code sums hold 2**d values per codebook


class LFQEntropy(NamedTuple):
    """What ``lfq_entropy`` returns: two 0-d tensors (float32, float64 for float64 inputs)."""

    per_sample_entropy: Tensor
    codebook_entropy: Tensor


class LFQOutput(NamedTuple):
    """What ``lookup_free_quantize`` returns. ``loss = entropy_weight * (per_sample_entropy -
    diversity_gamma * codebook_entropy) + commitment_weight * commitment_loss``; the three terms
    are returned unweighted."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    per_sample_entropy: Tensor
    codebook_entropy: Tensor
    commitment_loss: Tensor


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _resolve_sync(sync: bool | None) -> bool:
    if sync is None:
        return _world_size() > 1
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool or None, got {type(sync).__name__}")
    if sync and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sync=True needs an initialized torch.distributed process group")
    return sync


def _float(name: str, value: object, *, positive: bool = False) -> float:
    value = check.number(name, value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, "
                         f"got {value}")
    return value


def _split_codebooks(x: Tensor, num_codebooks: int) -> tuple[Tensor, int]:
    """``x (..., C d)`` as ``(..., C, d)``; checks."""
    C = check.integer("num_codebooks", num_codebooks, 1)
    if x.dim() < 1:
        raise ValueError("x must have shape (..., num_codebooks * bits), got a 0-d tensor")
    if x.shape[-1] % C != 0 or x.shape[-1] == 0:
        raise ValueError(f"the last dimension of x ({x.shape[-1]}) must be a positive multiple "
                         f"of num_codebooks ({C})")
    d = x.shape[-1] // C
    if d > MAX_BITS:
        raise ValueError(f"at most {MAX_BITS} bits per codebook (2**bits codes each), got {d}")
    return x.unflatten(-1, (C, d)), d


def _bit_scale(codebook_scale: float, d: int, spherical: bool) -> float:
    """The magnitude of a code's coordinates: ``s``, or ``s / sqrt(d)`` on the sphere."""
    return codebook_scale / math.sqrt(d) if spherical else codebook_scale


def _entropy_of_average(sums: Tensor, n: int, eps: float) -> Tensor:
    """``mean_c H(a_c)``, ``a_c = sums_c / n``; ``H(a) = -sum_k a_k log max(a_k, eps)``
    (``0 log 0 = 0`` with gradient 0 there when ``eps = 0``)."""
    a = sums / n
    if eps > 0:
        terms = a * torch.log(a.clamp(min=eps))
    else:
        terms = a * torch.log(torch.where(a > 0, a, 1.0))
    return -terms.sum(-1).mean()


def lfq_entropy(x: Tensor, *, num_codebooks: int = 1, inv_temperature: float = 100.0,
                codebook_scale: float = 1.0, spherical: bool = False, eps: float = 0.0,
                sync: bool | None = None) -> LFQEntropy:
    """The two entropies of LFQ's entropy loss (Yu et al. 2023, eq. 5), never forming the
    N x 2**d matrix of code probabilities.

    ``x (..., C d)`` is read as N = prod(x.shape[:-1]) rows of C codebooks of d bits. The
    implicit codebook of each is ``{-s, s}^d`` (``s = codebook_scale``; ``spherical``: the
    l2-normalized codes ``{-s, s}^d / sqrt(d)`` of binary spherical quantization, Zhao et al.
    2024; ``x`` is used as given: normalize it first, as ``lookup_free_quantize`` does). Row n's
    distribution over the codes is ``p_n(k) = softmax_k(2 inv_temperature x_n . c_k)``, which
    factorizes into d Bernoullis, ``P(bit_j = 1) = sigmoid(4 inv_temperature s' x_nj)`` with
    ``s'`` the codes' coordinate magnitude. Returns, averaged over the C codebooks:

    - ``per_sample_entropy = mean_n H(p_n)``, over this process's rows;
    - ``codebook_entropy = H(a)``, ``a(k) = mean_n p_n(k)``, the batch-average distribution:
      with ``sync``, over the rows of every rank (the code sums are all-reduced with a
      differentiable all-reduce, so that DDP's averaged gradients equal one process's on the
      concatenated batch; every rank must call it, with the same C and d).

    ``H(p) = -sum_k p_k log max(p_k, eps)``. ``eps = 0`` (default) is the exact entropy (the
    per-sample one in closed form, O(N d): the sum of d binary entropies); ``eps = 1e-5`` is
    vector-quantize-pytorch's clamped formula (``log(clamp(p, 1e-5))`` in both entropies),
    computed over every (row, code) pair in tiles. The batch average's code sums are
    accumulated over tiles of rows as a product of two half tables (2**(d/2) codes each):
    memory O(C 2**d + tile 2**(d/2)), work O(N C 2**d).

    Args:
        x: ``(..., num_codebooks * d)`` floating tensor (float16, bfloat16, float32, float64;
            any strides), 1 <= d <= 30.
        num_codebooks: C.
        inv_temperature: the softmax's inverse temperature (>= 0).
        codebook_scale: s (> 0).
        spherical: codes on the sphere of radius s (see above).
        eps: the clamp of the probabilities inside the logarithms (>= 0).
        sync: all-reduce the code sums over ``torch.distributed``; ``None``: when it is
            initialized with world size > 1.

    Returns:
        ``LFQEntropy(per_sample_entropy, codebook_entropy)``: 0-d, float32 (float64 for
        float64 ``x``; half-precision inputs are computed in float32), differentiable in ``x``.
        With no rows, both are NaN (means over nothing), as ``torch.mean``.

    Raises:
        TypeError: ``x`` is not a floating tensor; a non-number option; a non-bool ``sync``.
        ValueError: a last dimension that is not a positive multiple of ``num_codebooks`` or
            more than 30 bits; a negative or non-finite ``inv_temperature``, ``eps``, or a
            non-positive ``codebook_scale``; ``sync=True`` without a process group.
    """
    check.tensor("x", x)
    check.finite(x=x)
    xs, d = _split_codebooks(x, num_codebooks)
    inv_temperature = _float("inv_temperature", inv_temperature)
    codebook_scale = _float("codebook_scale", codebook_scale, positive=True)
    eps = _float("eps", eps)
    sync = _resolve_sync(sync)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = xs.reshape(-1, *xs.shape[-2:])
    scale = 4.0 * inv_temperature * _bit_scale(codebook_scale, d, bool(spherical))
    logits = rows.to(compute) * scale
    sums, entropy = _ops.call(_ops.lfq_entropy, logits, eps, resolve(x.device))
    n = rows.shape[0]
    if sync:
        from torch.distributed.nn.functional import all_reduce  # differentiable (backward: sum)

        sums = all_reduce(sums)
        n = n * dist.get_world_size()
    per_sample = entropy.mean()
    codebook = _entropy_of_average(sums, n, eps)
    return LFQEntropy(per_sample, codebook)


def lookup_free_quantize(x: Tensor, *, num_codebooks: int = 1, codebook_scale: float = 1.0,
                         spherical: bool = False, inv_temperature: float = 100.0,
                         entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
                         commitment_weight: float = 0.25, eps: float = 0.0,
                         entropy: bool = True, sync: bool | None = None) -> LFQOutput:
    """Lookup-free quantization (Yu et al. 2023, MAGVIT-v2, sec. 3.1) with its entropy loss.

    ``x (..., C d)`` is C codebooks of d bits per row (``spherical``: each group of d is first
    l2-normalized and scaled to radius s, binary spherical quantization, Zhao et al. 2024).
    With ``s = codebook_scale``:

    - ``quantized = where(x > 0, s, -s)`` (``s / sqrt(d)`` on the sphere; 0 goes to ``-s``),
      in ``x``'s dtype and shape, with the straight-through gradient (its value is the code
      exactly; its gradient goes to ``x`` as the identity, through the normalization when
      spherical);
    - ``indices``: the bits ``[x_j > 0]``, the first of the d the most significant
      (``sum_j [x_j > 0] 2**(d - 1 - j)``), int64 of shape ``x.shape[:-1]`` for one codebook,
      ``x.shape[:-1] + (C,)`` for several;
    - ``per_sample_entropy``, ``codebook_entropy``: ``fv.lfq_entropy`` of the (normalized) x
      with ``inv_temperature``, ``eps``, ``sync`` (0 when ``entropy=False``: no O(N 2**d)
      work, e.g. in evaluation);
    - ``commitment_loss = mean((x - sg(quantized))**2)`` over the elements;
    - ``loss = entropy_weight * (per_sample_entropy - diversity_gamma * codebook_entropy) +
      commitment_weight * commitment_loss``.

    Losses are 0-d float32 (float64 for float64 ``x``). The arguments, their checks and the
    errors raised are those of ``lfq_entropy``, plus ``entropy_weight``, ``diversity_gamma``
    and ``commitment_weight`` (finite, >= 0; ``ValueError`` otherwise).
    """
    check.tensor("x", x)
    check.finite(x=x)
    xs, d = _split_codebooks(x, num_codebooks)
    C = xs.shape[-2]
    s = _float("codebook_scale", codebook_scale, positive=True)
    entropy_weight = _float("entropy_weight", entropy_weight)
    diversity_gamma = _float("diversity_gamma", diversity_gamma)
    commitment_weight = _float("commitment_weight", commitment_weight)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = xs.to(compute)
    if spherical:
        xc = torch.nn.functional.normalize(xc, dim=-1) * s
    positive = xc.detach() > 0
    level = _bit_scale(s, d, bool(spherical))
    q = torch.where(positive, level, -level).to(compute)
    weights = 1 << torch.arange(d - 1, -1, -1, device=x.device)
    indices = (positive.to(torch.int64) * weights).sum(-1)
    if C == 1:
        indices = indices.squeeze(-1)
    quantized = (q + (xc - xc.detach())).flatten(-2).to(x.dtype)
    commitment = (xc - q).square().mean()
    if entropy:
        ps, cb = lfq_entropy(xc.flatten(-2), num_codebooks=C, inv_temperature=inv_temperature,
                             codebook_scale=s, spherical=bool(spherical), eps=eps, sync=sync)
    else:
        _float("inv_temperature", inv_temperature)
        _float("eps", eps)
        ps = cb = xc.new_zeros(())
    loss = entropy_weight * (ps - diversity_gamma * cb) + commitment_weight * commitment
    return LFQOutput(quantized, indices, loss, ps, cb, commitment)
