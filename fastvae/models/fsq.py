"""Finite scalar quantization modules (Mentzer et al. 2023, arXiv:2309.15505), built on
``fv.finite_scalar_quantize`` (one fused op; the implicit codebook never exists):

- ``FiniteScalarQuantizer``: fastvae's module, the quantizer protocol of the VQ-VAE (see
  ``fastvae.models.quantizer``): ``QuantizerOutput`` with zero losses, ``nearest``,
  ``get_codes_from_indices``, ``codebook_usage``, ``perplexity``, ``restarts``;
- ``FSQ``: the drop-in for ``vector_quantize_pytorch.FSQ`` (1.32.0): its constructor, its
  ``(out, indices)``, its ``indices_to_codes`` / ``codes_to_indices``, its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.fsq import (
    finite_scalar_quantize,
    fsq_codes_to_indices,
    fsq_indices_to_codes,
    fsq_plan,
    index_dtype_for,
)
from .quantizer import (
    QuantizerOutput,
    _pack_channel_first,
    _QuantizerModule,
    _unpack_channel_first,
)

__all__ = ["FSQ", "FiniteScalarQuantizer"]

# The largest implicit codebook ``FSQ.implicit_codebook`` builds (2**20 codes x D float32).
IMPLICIT_CODEBOOK_LIMIT = 2**20


class FiniteScalarQuantizer(_QuantizerModule):
    """Finite scalar quantization (FSQ; Mentzer et al. 2023) as a fastvae quantizer.

    ``forward(x)``: ``x (..., dim)`` -> ``QuantizerOutput(quantized, indices, loss,
    commitment_loss, codebook_loss)``: ``quantized`` in ``x``'s dtype with the straight-through
    gradient of ``fv.finite_scalar_quantize``, ``indices`` int64 ``x.shape[:-1]`` (the
    mixed-radix code, exact), the three losses 0-d zeros (FSQ has no codebook to learn and no
    commitment term). With ``dim != len(levels)`` a linear projection maps ``x`` to the levels'
    dimensions and back (``project_in``, ``project_out``), as in the paper's models.

    Arguments:
        dim: the size of the last dimension of ``x``.
        levels: the level count of every quantized dimension (>= 2; 2 only with
            ``preserve_symmetry``); ``codebook_size = prod(levels)`` (at most 2**63 - 1).
        preserve_symmetry, hard_clamp: as in ``fv.finite_scalar_quantize``.
        usage_decay: the EMA decay of the code histogram behind ``perplexity()``.
        usage_window: ``codebook_usage()`` counts the codes used in the last ``usage_window``
            training steps.
        max_tracked_codes: codebooks up to this size are tracked code by code (two ``(K,)``
            buffers); larger ones (``[4] * 16`` has 2**32 codes) per dimension (``sum(levels)``
            entries): then ``codebook_usage()`` is the product over dimensions of the fraction
            of levels used and ``perplexity()`` the product of the per-dimension perplexities,
            upper bounds of the joint figures.

    Training steps update the usage statistics (per rank: they decide nothing, so nothing is
    all-reduced); evaluation changes nothing. ``restarts`` stays 0 (FSQ has no dead codes to
    restart). No host synchronization in a step.
    """

    num_levels = 1

    def __init__(self, dim: int, levels: Sequence[int], *, preserve_symmetry: bool = False,
                 hard_clamp: bool = False, usage_decay: float = 0.99, usage_window: int = 100,
                 max_tracked_codes: int = 2**20) -> None:
        super().__init__()
        plan = fsq_plan(levels, preserve_symmetry, hard_clamp)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not (isinstance(usage_decay, (int, float)) and 0.0 <= usage_decay < 1.0):
            raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay!r}")
        if isinstance(usage_window, bool) or not isinstance(usage_window, int) \
                or usage_window < 1:
            raise ValueError(f"usage_window must be a positive int, got {usage_window!r}")
        self.dim = dim
        self.levels = plan.levels
        self.codebook_size = plan.size
        self.preserve_symmetry = preserve_symmetry
        self.hard_clamp = hard_clamp
        self.usage_decay = float(usage_decay)
        self.usage_window = usage_window
        D = len(plan.levels)
        self.project_in = nn.Linear(dim, D) if dim != D else nn.Identity()
        self.project_out = nn.Linear(D, dim) if dim != D else nn.Identity()
        self.joint_usage = plan.size <= max_tracked_codes
        sizes = [plan.size] if self.joint_usage else list(plan.levels)
        self._sizes = sizes
        self.register_buffer("_offsets", torch.tensor([0, *sizes[:-1]]).cumsum(0),
                             persistent=False)
        self.register_buffer("_basis64", torch.tensor(plan.basis), persistent=False)
        self.register_buffer("_levels64", torch.tensor(plan.levels), persistent=False)
        self.register_buffer("usage_ema", torch.zeros(sum(sizes)))
        # the step (from 1) each code was last used in; never: far below any window
        self.register_buffer("last_used", torch.full((sum(sizes),), -(2**62), dtype=torch.int64))
        self._register_counters()
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return (f"{self.dim}, levels={list(self.levels)}, codebook_size={self.codebook_size}, "
                f"preserve_symmetry={self.preserve_symmetry}, hard_clamp={self.hard_clamp}")

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        z = self.project_in(x)
        codes, indices = finite_scalar_quantize(z, self.levels,
                                                preserve_symmetry=self.preserve_symmetry,
                                                hard_clamp=self.hard_clamp,
                                                index_dtype=torch.int64)
        return self.project_out(codes).to(x.dtype), indices

    def forward(self, x: Tensor) -> QuantizerOutput:
        quantized, indices = self._quantize(x)
        if self.training:
            self._update(indices.detach().reshape(-1))
        zero = self._zero.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return QuantizerOutput(quantized, indices, zero, zero, zero)

    @torch.no_grad()
    def _update(self, indices: Tensor) -> None:
        valid = indices >= 0  # -1: a row with a NaN, counted nowhere
        index = indices.clamp_min(0)[:, None]
        if not self.joint_usage:  # the digits, each in its dimension's block
            index = torch.div(index, self._basis64, rounding_mode="floor") % self._levels64
        slots = (index + self._offsets).reshape(-1)
        weights = valid.repeat_interleave(len(self._sizes)).to(self.usage_ema.dtype)
        counts = torch.zeros_like(self.usage_ema).index_add_(0, slots, weights)
        self.usage_ema.lerp_(counts, 1.0 - self.usage_decay)
        self.last_used.copy_(torch.where(counts > 0, self.steps + 1, self.last_used))
        self.steps.add_(1)

    def nearest(self, x: Tensor) -> Tensor:
        """The indices (int64, ``x.shape[:-1]``) of ``x (..., dim)``, without gradients or
        statistics."""
        with torch.no_grad():
            return self._quantize(x.detach())[1]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The quantized vectors ``indices.shape + (dim,)`` of ``indices`` (after
        ``project_out``)."""
        codes = fsq_indices_to_codes(indices, self.levels,
                                     preserve_symmetry=self.preserve_symmetry)
        weight = getattr(self.project_out, "weight", None)
        return self.project_out(codes.to(weight.dtype if weight is not None else codes.dtype))

    def _blocks(self, values: Tensor) -> list[Tensor]:
        return list(torch.split(values, self._sizes))

    def codebook_usage(self) -> Tensor:
        """The fraction of codes used in the last ``usage_window`` training steps (0-d float32;
        per-dimension product above ``max_tracked_codes``, see the class)."""
        used = (self.last_used > self.steps - self.usage_window).float()
        return torch.stack([u.mean() for u in self._blocks(used)]).prod()

    def perplexity(self) -> Tensor:
        """``exp(H(p))`` of the EMA code histogram (0-d float32; per-dimension product above
        ``max_tracked_codes``)."""
        total = torch.zeros((), dtype=torch.float64, device=self.usage_ema.device)
        for counts in self._blocks(self.usage_ema.double()):
            p = counts / counts.sum().clamp_min(1e-30)
            total = total - torch.special.xlogy(p, p).sum()
        return torch.exp(total).float()


# ---------------------------------------------------------------------------------------------
# FSQ: the drop-in for vector_quantize_pytorch.FSQ (1.32.0)
# ---------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


class FSQ(nn.Module):
    """Drop-in for ``vector_quantize_pytorch.FSQ`` (1.32.0): the same constructor, call, methods
    and ``state_dict``, on ``fv.finite_scalar_quantize`` (fused, exact indices, no implicit
    codebook in memory: ``FSQ(levels=[4] * 16)`` constructs at once).

    ``forward(z)`` -> ``(out, indices)``: ``z (b, n, dim)``, or channel-first ``(b, dim, ...)``
    for images and videos (``z.ndim >= 4``) or with ``channel_first=True``; ``out`` has ``z``'s
    shape and dtype; ``indices`` ``(b, n)`` (``(b, n, num_codebooks)`` when
    ``keep_num_codebooks_dim``; ``(b, ...)`` for channel-first inputs), or ``None`` with
    ``return_indices=False``.

    Where it differs from vector-quantize-pytorch (docs/conventions.md): the indices are int32
    only while ``codebook_size <= 2**31 - 1`` and int64 beyond, computed in integers (the
    package sums them as floats: wrong beyond 2**24, and int32 overflows); a NaN input gives
    index -1; ``implicit_codebook`` is a property built on demand (refused above
    ``IMPLICIT_CODEBOOK_LIMIT`` codes); the ``orthogonal_rotation`` message about asymmetric
    levels is not printed; a level of 2 without ``preserve_symmetry`` and ``noise_dropout``
    without it raise ``ValueError`` (the package asserts). Quantization always runs in float32
    at least: ``force_quantization_f32=False`` and half-precision ``allowed_dtypes`` raise
    ``TypeError``. Gradients agree with the package's to float rounding (the derivative of the
    bound is computed in closed form).
    """

    def __init__(self, levels: list[int] | tuple[int, ...], dim: int | None = None,
                 num_codebooks: int = 1, keep_num_codebooks_dim: bool | None = None,
                 scale: float | None = None,
                 allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
                 channel_first: bool = False, projection_has_bias: bool = True,
                 return_indices: bool = True, force_quantization_f32: bool = True,
                 preserve_symmetry: bool = False, noise_dropout: float = 0.0,
                 bound_hard_clamp: bool = False, orthogonal_rotation: bool = False) -> None:
        super().__init__()
        if not force_quantization_f32:
            raise TypeError("FSQ(force_quantization_f32=False) is not supported: fastvae "
                            "quantizes in float32 at least (float64 for float64 inputs)")
        if not isinstance(allowed_dtypes, (tuple, list)) or any(
                not isinstance(d, torch.dtype) or not d.is_floating_point or d in _HALF
                for d in allowed_dtypes):
            raise TypeError(f"FSQ(allowed_dtypes={allowed_dtypes!r}) is not supported: only "
                            f"float32 and float64 (fastvae never quantizes in half precision)")
        plan = fsq_plan(levels, preserve_symmetry, bound_hard_clamp)
        if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) \
                or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        if noise_dropout and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True (as in "
                             "vector-quantize-pytorch)")
        if not (isinstance(noise_dropout, (int, float)) and 0.0 <= noise_dropout <= 1.0):
            raise ValueError(f"noise_dropout must be in [0, 1], got {noise_dropout!r}")
        self.levels_list = list(plan.levels)
        self._plan = plan
        self.register_buffer("_levels", torch.tensor(plan.levels, dtype=torch.int32)
                             if plan.size <= 2**31 - 1 else torch.tensor(plan.levels),
                             persistent=False)
        self.register_buffer("_basis", torch.tensor(plan.basis, dtype=index_dtype_for(plan.size)),
                             persistent=False)
        self.scale = scale
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.codebook_dim = codebook_dim = len(plan.levels)
        self.effective_codebook_dim = effective = codebook_dim * num_codebooks
        self.num_codebooks = num_codebooks
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True")
        self.keep_num_codebooks_dim = keep
        self.dim = effective if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != effective
        self.project_in: nn.Module = (nn.Linear(self.dim, effective, bias=projection_has_bias)
                                      if self.has_projections else nn.Identity())
        self.project_out: nn.Module = (nn.Linear(effective, self.dim, bias=projection_has_bias)
                                       if self.has_projections else nn.Identity())
        self.return_indices = return_indices
        self.codebook_size = plan.size
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.force_quantization_f32 = force_quantization_f32
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rot = torch.empty(codebook_dim, codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)

    @property
    def implicit_codebook(self) -> Tensor:
        """All ``codebook_size`` codes ``(codebook_size, codebook_dim)``, float32, built on
        demand (vector-quantize-pytorch keeps it as a buffer); refused above
        ``IMPLICIT_CODEBOOK_LIMIT`` codes."""
        if self.codebook_size > IMPLICIT_CODEBOOK_LIMIT:
            raise ValueError(f"implicit_codebook would hold {self.codebook_size} x "
                             f"{self.codebook_dim} values (limit {IMPLICIT_CODEBOOK_LIMIT} "
                             f"codes); use indices_to_codes on the indices you need")
        return self._indices_to_codes(torch.arange(self.codebook_size,
                                                   device=self._levels.device))

    def _indices_to_codes(self, indices: Tensor) -> Tensor:
        return fsq_indices_to_codes(indices, self.levels_list,
                                    preserve_symmetry=self.preserve_symmetry)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """The digit of every dimension: ``(indices // basis) % levels``, shape
        ``indices.shape + (codebook_dim,)``."""
        basis = self._basis.to(torch.int64)
        return torch.div(indices.to(torch.int64).unsqueeze(-1), basis,
                         rounding_mode="floor").remainder(self._levels.to(torch.int64)).to(
                             self._basis.dtype)

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """The index of each code vector ``zhat (..., codebook_dim)`` (exact integer sum)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must have shape (..., {self.codebook_dim}), got "
                             f"{tuple(zhat.shape)}")
        return fsq_codes_to_indices(zhat, self.levels_list,
                                    preserve_symmetry=self.preserve_symmetry)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Inverse of the forward's indices: the projected codes, channel-first for image or
        video indices (``indices.ndim >= 3``, or 4 with ``keep_num_codebooks_dim``) or with
        ``channel_first``."""
        is_img_or_video = indices.ndim >= (3 + int(self.keep_num_codebooks_dim))
        codes = self._indices_to_codes(indices)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        codes = self.project_out(codes)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def _maybe_apply_noise(self, codes: Tensor) -> Tensor:
        if not self.training or self.noise_dropout == 0.0:
            return codes
        mask = torch.full_like(codes, self.noise_dropout).bernoulli_().bool()
        offset = torch.rand_like(codes) - 0.5
        return torch.where(mask, codes + offset, codes).clamp(-1.0, 1.0)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        move = z.ndim >= 4 or self.channel_first
        if move:
            z, spatial = _pack_channel_first(z)
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"expected dimension of {self.dim} but found dimension of "
                             f"{z.shape[-1] if z.dim() else None}")
        z = self.project_in(z)
        z = z.reshape(*z.shape[:-1], self.num_codebooks, self.codebook_dim)
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot
        context: Any = (torch.autocast("cuda", enabled=False) if self.force_quantization_f32
                        else nullcontext())
        with context:
            orig_dtype = z.dtype
            if orig_dtype not in self.allowed_dtypes:
                z = z.float()
            codes, indices = finite_scalar_quantize(
                z, self.levels_list, preserve_symmetry=self.preserve_symmetry,
                hard_clamp=self.bound_hard_clamp)
            codes = self._maybe_apply_noise(codes)
            if self.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.t()
            codes = codes.flatten(-2).to(orig_dtype)
        out = self.project_out(codes)
        if move:
            out, indices = _unpack_channel_first(out, indices, spatial)
        if not self.return_indices:
            return out, None
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices

    def extra_repr(self) -> str:
        return (f"levels={self.levels_list}, dim={self.dim}, num_codebooks={self.num_codebooks}"
                f", codebook_size={self.codebook_size}")

