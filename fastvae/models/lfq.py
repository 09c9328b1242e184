"""Lookup-free quantizer modules on ``fv.lookup_free_quantize`` / ``fv.lfq_entropy``: the
fastvae-native ``LookupFreeQuantizer`` and ``LFQ``, a drop-in for ``vector_quantize_pytorch``'s
class of that name (its constructor, its call, its state_dict).

Neither holds the implicit codebook (2**d codes per codebook) nor an N x 2**d matrix: the
entropy loss runs on the tiled ``lfq_entropy`` op, codes are made from indices by their bits.
Under ``torch.distributed`` the batch-average distribution is all-reduced every training step
by every rank (its code sums, through a differentiable all-reduce).
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import validation as check
from ..ops.lfq import MAX_BITS, lfq_entropy, lookup_free_quantize
from .quantizer import (
    QuantizerOutput,
    _number,
    _pack_channel_first,
    _positive_int,
    _QuantizerModule,
    _unpack_channel_first,
)

__all__ = ["LFQ", "LookupFreeQuantizer"]


def _bits_of(indices: Tensor, d: int) -> Tensor:
    """``indices (...)`` -> ``(..., d)`` bits as bools, the most significant first."""
    shifts = torch.arange(d - 1, -1, -1, device=indices.device)
    return ((indices.to(torch.int64)[..., None] >> shifts) & 1).bool()


# ---------------------------------------------------------------------------------------------
# LookupFreeQuantizer: the fastvae-native module
# ---------------------------------------------------------------------------------------------


class LookupFreeQuantizer(_QuantizerModule):
    """Lookup-free quantization (Yu et al. 2023, MAGVIT-v2) of ``x (..., dim)``: ``dim =
    num_codebooks * bits``, each group of ``bits`` quantized to ``{-s, s}^bits`` by sign.

    ``forward(x)`` -> ``QuantizerOutput(quantized, indices, loss, commitment_loss,
    codebook_loss)`` from ``fv.lookup_free_quantize``: ``commitment_loss`` is
    ``commitment_weight * mean((x - sg(q))**2)``, ``codebook_loss`` the entropy loss
    ``entropy_weight * (per_sample_entropy - diversity_gamma * codebook_entropy)`` (the term that
    spreads the codes; it may be negative), ``loss`` their sum. In evaluation the entropy is not
    computed (``codebook_loss`` is 0), the commitment is. ``indices``: int64 ``x.shape[:-1]``
    (``x.shape[:-1] + (num_codebooks,)`` for several codebooks).

    Arguments:
        dim: the last dimension of x, a multiple of ``num_codebooks``.
        num_codebooks: C; ``codebook_size = 2**(dim // C)`` codes per codebook.
        codebook_scale, spherical, inv_temperature, eps: as in ``fv.lfq_entropy``.
        entropy_weight, diversity_gamma, commitment_weight: the weights of the loss.
        usage_window: the horizon, in training steps, of ``codebook_usage()`` (codes chosen in
            the last ``usage_window`` steps) and of ``perplexity()`` (an exponential moving
            average of the code histogram with decay ``1 - 1/usage_window``).
        sync: all-reduce the entropy's code sums and the usage statistics over
            ``torch.distributed`` ranks; ``None``: when initialized with world size > 1.

    Buffers (O(C 2**bits), no window x K ring): ``last_used`` (C, K) int64, the step at which
    each code was last chosen (-1: never); ``usage_ema`` (C, K) float32; ``steps``; ``restarts``
    (always 0: LFQ has no dead codes to restart).
    """

    num_levels = 1

    def __init__(self, dim: int, *, num_codebooks: int = 1, codebook_scale: float = 1.0,
                 spherical: bool = False, inv_temperature: float = 100.0,
                 entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
                 commitment_weight: float = 0.25, eps: float = 0.0, usage_window: int = 100,
                 sync: bool | None = None) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.num_codebooks = _positive_int("num_codebooks", num_codebooks)
        if dim % num_codebooks:
            raise ValueError(f"dim ({dim}) must be a multiple of num_codebooks "
                             f"({num_codebooks})")
        self.bits = dim // num_codebooks
        if self.bits > MAX_BITS:
            raise ValueError(f"at most {MAX_BITS} bits per codebook, got {self.bits}")
        self.codebook_size = 1 << self.bits
        self.codebook_scale = _number("codebook_scale", codebook_scale)
        if self.codebook_scale <= 0:
            raise ValueError(f"codebook_scale must be > 0, got {codebook_scale}")
        self.spherical = bool(spherical)
        self.inv_temperature = _number("inv_temperature", inv_temperature)
        self.entropy_weight = _number("entropy_weight", entropy_weight)
        self.diversity_gamma = _number("diversity_gamma", diversity_gamma)
        self.commitment_weight = _number("commitment_weight", commitment_weight)
        self.eps = _number("eps", eps)
        self.usage_window = _positive_int("usage_window", usage_window)
        self.sync = sync
        C, K = self.num_codebooks, self.codebook_size
        self.register_buffer("last_used", torch.full((C, K), -1, dtype=torch.int64))
        self.register_buffer("usage_ema", torch.zeros(C, K))
        self._register_counters()

    def extra_repr(self) -> str:
        return (f"{self.dim}, num_codebooks={self.num_codebooks}, "
                f"codebook_size={self.codebook_size}, spherical={self.spherical}")

    def forward(self, x: Tensor) -> QuantizerOutput:
        self._check(x)
        sync = self._sync() if self.training else False
        out = lookup_free_quantize(
            x, num_codebooks=self.num_codebooks, codebook_scale=self.codebook_scale,
            spherical=self.spherical, inv_temperature=self.inv_temperature,
            entropy_weight=self.entropy_weight, diversity_gamma=self.diversity_gamma,
            commitment_weight=self.commitment_weight, eps=self.eps, entropy=self.training,
            sync=sync)
        commitment = self.commitment_weight * out.commitment_loss
        entropy = self.entropy_weight * (out.per_sample_entropy
                                         - self.diversity_gamma * out.codebook_entropy)
        if self.training:
            self._update(out.indices, sync)
        return QuantizerOutput(out.quantized, out.indices, commitment + entropy, commitment,
                               entropy)

    @torch.no_grad()
    def _update(self, indices: Tensor, sync: bool) -> None:
        C, K = self.num_codebooks, self.codebook_size
        flat = indices.reshape(-1, C) + torch.arange(C, device=indices.device) * K
        counts = torch.zeros(C * K, device=indices.device).index_add_(
            0, flat.reshape(-1), torch.ones(flat.numel(), device=indices.device))
        if sync:
            torch.distributed.all_reduce(counts)
        counts = counts.view(C, K)
        self.last_used.copy_(torch.where(counts > 0, self.steps, self.last_used))
        self.usage_ema.lerp_(counts, 1.0 / self.usage_window)
        self.steps.add_(1)

    def nearest(self, x: Tensor) -> Tensor:
        """The indices of ``x (..., dim)`` (its sign bits), without gradients or statistics."""
        self._check(x)
        bits = x.detach().unflatten(-1, (self.num_codebooks, self.bits)) > 0
        weights = 1 << torch.arange(self.bits - 1, -1, -1, device=x.device)
        indices = (bits.to(torch.int64) * weights).sum(-1)
        return indices.squeeze(-1) if self.num_codebooks == 1 else indices

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The quantized values of ``indices`` (``(...)``, or ``(..., C)`` for several
        codebooks) -> ``(..., dim)`` float32."""
        check.indices_in_range("indices", indices, 0, self.codebook_size, "a code")
        if self.num_codebooks == 1:
            indices = indices[..., None]
        level = self.codebook_scale / (math.sqrt(self.bits) if self.spherical else 1.0)
        bits = _bits_of(indices, self.bits)
        return torch.where(bits, level, -level).to(torch.float32).flatten(-2)

    def codebook_usage(self) -> Tensor:
        """The fraction of codes chosen in the last ``usage_window`` training steps, averaged
        over the codebooks (0-d float32; no host sync)."""
        recent = (self.last_used >= 0) & (self.last_used >= self.steps - self.usage_window)
        return recent.float().mean()

    def perplexity(self) -> Tensor:
        """``exp(H)`` of the moving-average code histogram, averaged over the codebooks (0-d
        float32, between 1 and 2**bits; 0 before the first training step)."""
        ema = self.usage_ema.double()
        total = ema.sum(-1, keepdim=True)
        p = ema / total.clamp_min(1e-300)
        h = -torch.special.xlogy(p, p).sum(-1)
        return torch.where(total[:, 0] > 0, torch.exp(h), 0.0).mean().float()


# ---------------------------------------------------------------------------------------------
# LFQ: the drop-in for vector_quantize_pytorch.LFQ (1.32.0)
# ---------------------------------------------------------------------------------------------

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

_IDENTITY = object()  # marks the default straight_through_activation (an nn.Identity)

_PACKAGE_ARGS: dict[str, Any] = {
    "dim": None,
    "codebook_size": None,
    "entropy_loss_weight": 0.1,
    "commitment_loss_weight": 0.0,
    "diversity_gamma": 1.0,
    "straight_through_activation": _IDENTITY,
    "num_codebooks": 1,
    "keep_num_codebooks_dim": None,
    "codebook_scale": 1.0,
    "frac_per_sample_entropy": 1.0,
    "has_projections": None,
    "projection_has_bias": True,
    "soft_clamp_input_value": None,
    "cosine_sim_project_in": False,
    "cosine_sim_project_in_scale": None,
    "channel_first": None,
    "experimental_softplus_entropy_loss": False,
    "entropy_loss_offset": 5.0,
    "spherical": False,
    "force_quantization_f32": True,
    "orthogonal_rotation": False,
}

# the package's log clamp inside both entropies
PACKAGE_EPS = 1e-5


class CosineSimLinear(nn.Module):
    """``normalize(x) @ normalize(W, dim=0) * scale`` with ``W (dim_in, dim_out)`` (the
    package's ``cosine_sim_project_in``; same parameter name and shape)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


class LFQ(nn.Module):
    """A drop-in for ``vector_quantize_pytorch.LFQ`` (version 1.32.0) whose entropy loss never
    builds the N x 2**d matrix of code probabilities (nor the 2**d x d codebook): the tiled
    ``fv.lfq_entropy`` op with the package's clamp ``eps = 1e-5`` in both entropies.

    Same constructor (keyword arguments, same defaults), same call
    ``lfq(x, inv_temperature=100., return_loss_breakdown=False, mask=None)`` ->
    ``(quantized, indices, entropy_aux_loss)`` (and ``LossBreakdown(per_sample_entropy,
    batch_entropy, commitment)`` with ``return_loss_breakdown``) for ``x (B, N, dim)`` or images
    and videos ``(B, dim, ...)`` (``channel_first``), same ``indices_to_codes``, same state_dict
    keys (``mask``, ``project_in``/``project_out``, ``orthogonal_rot``), so checkpoints load
    both ways. In training: ``aux_loss = entropy_loss_weight * (per_sample_entropy -
    diversity_gamma * batch_entropy) + commitment_loss_weight * commitment``; in evaluation the
    losses are 0. Under ``torch.distributed`` the batch average is all-reduced, as the
    package does.

    Supported besides the defaults: ``num_codebooks``, ``keep_num_codebooks_dim``,
    ``codebook_scale``, projections (``has_projections``, ``projection_has_bias``,
    ``cosine_sim_project_in`` and its scale), ``soft_clamp_input_value``, ``channel_first``,
    ``experimental_softplus_entropy_loss`` and ``entropy_loss_offset``, ``spherical``,
    ``force_quantization_f32`` (False keeps the quantization in x's dtype; the entropy is
    computed in float32 either way), ``orthogonal_rotation``, and ``mask`` in the call (which,
    as in the package, selects rows by boolean indexing: a host sync). Not supported, raising
    ``TypeError`` naming them: a ``straight_through_activation`` other than the default
    identity, ``frac_per_sample_entropy < 1`` (a random subset of rows). Differences: the
    ``codebook`` buffer (2**d x d, non-persistent) does not exist (``indices_to_codes`` makes
    codes from bits); the entropies are computed from the factorized probabilities (equal to
    the package's softmax to float rounding).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        for name in kwargs:
            if name not in _PACKAGE_ARGS:
                raise TypeError(f"LFQ got an unexpected keyword argument {name!r}")
        a = {**_PACKAGE_ARGS, **kwargs}
        unsupported = []
        sta = a["straight_through_activation"]
        if sta is not _IDENTITY and type(sta) is not nn.Identity:
            unsupported.append(f"straight_through_activation={sta!r}")
        frac = _number("frac_per_sample_entropy", a["frac_per_sample_entropy"])
        if not 0 < frac <= 1:
            raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {frac}")
        if frac < 1:
            unsupported.append(f"frac_per_sample_entropy={frac!r}")
        if unsupported:
            raise TypeError(f"fastvae.LFQ does not support {', '.join(unsupported)} "
                            "(vector-quantize-pytorch arguments)")
        dim, codebook_size = a["dim"], a["codebook_size"]
        if dim is None and codebook_size is None:
            raise ValueError("either dim or codebook_size must be given")
        if codebook_size is not None:
            codebook_size = _positive_int("codebook_size", codebook_size)
            if codebook_size & (codebook_size - 1):
                raise ValueError(f"codebook_size must be a power of 2, got {codebook_size}")
        else:
            codebook_size = 1 << _positive_int("dim", dim)
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_size.bit_length() - 1
        if self.codebook_dim > MAX_BITS:
            raise ValueError(f"at most 2**{MAX_BITS} codes per codebook, got {codebook_size}")
        self.num_codebooks = _positive_int("num_codebooks", a["num_codebooks"])
        codebook_dims = self.codebook_dim * self.num_codebooks
        self.dim = codebook_dims if dim is None else _positive_int("dim", dim)
        has_projections = (self.dim != codebook_dims if a["has_projections"] is None
                           else bool(a["has_projections"]))
        self.codebook_scale = _number("codebook_scale", a["codebook_scale"])
        if a["cosine_sim_project_in"]:
            scale = (self.codebook_scale if a["cosine_sim_project_in_scale"] is None
                     else _number("cosine_sim_project_in_scale", a["cosine_sim_project_in_scale"]))
            make_in = lambda: CosineSimLinear(self.dim, codebook_dims, scale=scale)
        else:
            make_in = lambda: nn.Linear(self.dim, codebook_dims,
                                        bias=bool(a["projection_has_bias"]))
        self.project_in = make_in() if has_projections else nn.Identity()
        self.project_out = (nn.Linear(codebook_dims, self.dim, bias=bool(a["projection_has_bias"]))
                            if has_projections else nn.Identity())
        self.has_projections = has_projections
        keep = a["keep_num_codebooks_dim"]
        keep = self.num_codebooks > 1 if keep is None else bool(keep)
        if self.num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1")
        self.keep_num_codebooks_dim = keep
        self.channel_first = a["channel_first"]
        self.spherical = bool(a["spherical"])
        self.orthogonal_rotation = bool(a["orthogonal_rotation"])
        if self.orthogonal_rotation:
            rot = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)
        self.frac_per_sample_entropy = frac
        self.diversity_gamma = _number("diversity_gamma", a["diversity_gamma"])
        self.entropy_loss_weight = _number("entropy_loss_weight", a["entropy_loss_weight"])
        self.commitment_loss_weight = _number("commitment_loss_weight",
                                              a["commitment_loss_weight"])
        clamp = a["soft_clamp_input_value"]
        if clamp is not None:
            clamp = _number("soft_clamp_input_value", clamp)
            if clamp < self.codebook_scale:
                raise ValueError("soft_clamp_input_value must be >= codebook_scale")
        self.soft_clamp_input_value = clamp
        self.entropy_loss_offset = float(a["entropy_loss_offset"])
        self.experimental_softplus_entropy_loss = bool(a["experimental_softplus_entropy_loss"])
        self.force_quantization_f32 = bool(a["force_quantization_f32"])
        self.activation = nn.Identity()
        self.register_buffer("mask", 2 ** torch.arange(self.codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _l2norm(self, t: Tensor) -> Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """The codes of ``indices`` (``(..., C)`` with ``keep_num_codebooks_dim``, else
        ``(...)``) -> ``(..., dim)`` (``(B, dim, ...)`` for images and videos)."""
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        transpose = is_img_or_video if self.channel_first is None else self.channel_first
        check.indices_in_range("indices", indices, 0, self.codebook_size, "a code")
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = _bits_of(indices, self.codebook_dim).to(self.dtype)
        codes = self._l2norm(bits * self.codebook_scale * 2 - self.codebook_scale)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if transpose:
            codes = codes.movedim(-1, 1)
        return codes

    def forward(self, x: Tensor, inv_temperature: float = 100.0,
                return_loss_breakdown: bool = False, mask: Tensor | None = None):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        is_img_or_video = x.ndim >= 4
        transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if transpose:
            x, spatial = _pack_channel_first(x)
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have {self.dim} features (dimension "
                             f"{1 if transpose else -1}), got shape {tuple(x.shape)}")
        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            v = self.soft_clamp_input_value
            x = (x / v).tanh() * v
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        x = self._l2norm(x)
        orig_dtype = x.dtype
        if self.force_quantization_f32:
            x = x.float()
        original = x
        s = self.codebook_scale
        quantized = torch.where(x > 0, s, -s).to(x.dtype)
        indices = ((quantized > 0).int() * self.mask.int()).sum(-1)
        quantized = self._l2norm(quantized)
        x = x + (quantized - x).detach() if self.training else quantized
        if self.training:
            rows = original if mask is None else original[mask]
            ps, cb = lfq_entropy(rows.flatten(-2), num_codebooks=self.num_codebooks,
                                 inv_temperature=inv_temperature, codebook_scale=s,
                                 spherical=self.spherical, eps=PACKAGE_EPS)
            aux = ps - self.diversity_gamma * cb
            if self.experimental_softplus_entropy_loss:
                aux = F.softplus(aux + self.entropy_loss_offset)
        else:
            aux = ps = cb = self.zero
        if self.training and self.commitment_loss_weight > 0:
            commit = F.mse_loss(original, quantized.detach(), reduction="none")
            commit = (commit if mask is None else commit[mask]).mean()
        else:
            commit = self.zero
        if self.force_quantization_f32:
            x = x.to(orig_dtype)
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot.t()
        x = self.project_out(x.flatten(-2))
        if transpose:
            x, indices = _unpack_channel_first(x, indices, spatial)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        aux_loss = aux * self.entropy_loss_weight + commit * self.commitment_loss_weight
        ret = Return(x, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(ps, cb, commit)
