"""Residual vector-quantizer modules on ``fv.residual_vector_quantize``: the fastvae-native
``ResidualVectorQuantizer`` and ``ResidualVQ``, a drop-in for ``vector_quantize_pytorch``'s class
of that name (its constructor, its call, its state_dict).

Each level keeps the statistics of ``VectorQuantizer`` (the shared helpers of
``fastvae.models.quantizer``: counts and sums by index-add, k-means by ``nearest_code``,
dead-code restarts by ``torch.where``), fed with that level's residual, which the update
recomputes level by level from the indices (O(N D) at a time, never L x N x D). No host
synchronization in a training step, nothing N x K. Under ``torch.distributed`` every level's
statistics are all-reduced every training step by every rank (see ``quantizer.py``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import validation as check
from ..ops.quantize import nearest_code
from ..ops.residual_quantize import residual_vector_quantize
from .quantizer import (
    _PACKAGE_ARGS,
    QuantizerOutput,
    VectorQuantize,
    _batch_stats,
    _is_default,
    _kmeans,
    _positive_int,
    _QuantizerModule,
    _restart_dead_codes_,
    _smoothed_codebook,
)

__all__ = ["ResidualVQ", "ResidualVectorQuantizer"]


def _level_stats(r: Tensor, index: Tensor, K: int, sync: bool) -> tuple[Tensor, Tensor]:
    """Counts and sums per code of the rows of ``r`` whose ``index`` is >= 0 (the inactive rows,
    index -1, go to an extra bin that is dropped): ``_batch_stats`` with K + 1 bins."""
    counts, sums = _batch_stats(r, torch.where(index >= 0, index, K), K + 1, sync)
    return counts[:K], sums[:K]


# ---------------------------------------------------------------------------------------------
# ResidualVectorQuantizer: the fastvae-native module
# ---------------------------------------------------------------------------------------------


class ResidualVectorQuantizer(_QuantizerModule):
    """Residual VQ (SoundStream, Zeghidour et al. 2021; Encodec, Défossez et al. 2022): L
    codebooks, each quantizing what the previous levels left, with EMA (or learned) codebooks.

    ``forward(x (..., dim))`` -> ``QuantizerOutput(quantized (..., dim), indices (..., L) int64,
    loss, commitment_loss (L,), codebook_loss (L,))`` from ``fv.residual_vector_quantize``
    (exact nearest codes, one fused op each way; losses per level, means over the elements of
    ``x``). ``loss`` is what to add to the training loss: the summed commitment terms (EMA), plus
    the codebook terms with a learned codebook.

    Arguments:
        dim, codebook_size, num_quantizers: D, K (per level) and L.
        decay: EMA decay of every level's statistics (``VectorQuantizer``'s update, on that
            level's residual); ``None`` or 0: learned codebooks (an ``nn.Parameter`` (L, K, D)).
        commitment_weight: beta, on each level's commitment term.
        kmeans_init: k-means initialization of each level on its residual of the first training
            batch (level by level: level l's residual uses the initialized levels before it).
        kmeans_iters, eps, straight_through (``"ste"`` or ``"rotation"``): as
            ``VectorQuantizer``.
        dead_code_threshold: per level, codes whose EMA cluster size falls below it restart
            from random residual rows of that level (counted in ``restarts``).
        quantize_dropout: in training, each sample (index 0 of ``x``) keeps a random number of
            levels ``n`` uniform in ``[quantize_dropout_cutoff_index + 1, L]`` (SoundStream
            section 3.3), drawn with ``torch.randint`` from torch's generator on ``x``'s device
            (Philox on CUDA): repeatable with ``torch.manual_seed``, no host sync. Dropped levels
            have index -1 and neither losses nor statistics from that sample.
        usage_window: the number of training steps over which ``codebook_usage()`` (codes
            chosen in the window) and ``perplexity()`` (of counts decayed by
            ``1 - 1/usage_window`` per step) count; O(K) memory per level.
        sync: all-reduce the statistics over ``torch.distributed`` ranks (None: when
            initialized with world size > 1).

    Buffers: ``codebooks`` (L, K, D) (or the parameter), ``cluster_size`` (L, K), ``embed_avg``
    (L, K, D) (EMA), ``initted``, ``last_used`` (L, K), ``usage_counts`` (L, K), ``steps``,
    ``restarts`` (0-d, cumulative over levels).
    """

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int, *,
                 decay: float | None = 0.99, commitment_weight: float = 0.25,
                 kmeans_init: bool = False, kmeans_iters: int = 10,
                 dead_code_threshold: float = 0.0, eps: float = 1e-5,
                 straight_through: str = "ste", quantize_dropout: bool = False,
                 quantize_dropout_cutoff_index: int = 0, usage_window: int = 100,
                 sync: bool | None = None) -> None:
        super().__init__()
        self.dim = D = _positive_int("dim", dim)
        self.codebook_size = K = _positive_int("codebook_size", codebook_size)
        self.num_levels = L = _positive_int("num_quantizers", num_quantizers)
        self._codebook_options(straight_through, decay, commitment_weight, kmeans_iters,
                               dead_code_threshold, eps)
        self.quantize_dropout = bool(quantize_dropout)
        if isinstance(quantize_dropout_cutoff_index, bool) or \
                not isinstance(quantize_dropout_cutoff_index, int):
            raise TypeError("quantize_dropout_cutoff_index must be an int, got "
                            f"{type(quantize_dropout_cutoff_index).__name__}")
        if not 0 <= quantize_dropout_cutoff_index < L:
            raise ValueError(f"quantize_dropout_cutoff_index must be in [0, {L - 1}], got "
                             f"{quantize_dropout_cutoff_index}")
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.usage_window = _positive_int("usage_window", usage_window)
        self.sync = sync
        self._register_codebook("codebooks", (L, K, D), kmeans_init)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(L, K))
        self.register_buffer("last_used", torch.full((L, K), -(2**62), dtype=torch.int64))
        self.register_buffer("usage_counts", torch.zeros(L, K))
        self._register_counters()
        self._track_kmeans(kmeans_init)

    def extra_repr(self) -> str:
        return (f"{self.dim}, {self.codebook_size}, num_quantizers={self.num_levels}, "
                f"{self._codebook_repr()}, quantize_dropout={self.quantize_dropout}")

    def _dropout_levels(self, x: Tensor) -> Tensor | None:
        if not (self.training and self.quantize_dropout and x.dim() >= 2):
            return None
        n = torch.randint(self.quantize_dropout_cutoff_index + 1, self.num_levels + 1,
                          (x.shape[0],), device=x.device)
        return n.view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])

    def forward(self, x: Tensor) -> QuantizerOutput:
        self._check(x)
        sync = self._sync() if self.training else False
        flat = x.detach().reshape(-1, self.dim).to(self.codebooks.dtype)
        if self.training and self._kmeans_pending:
            self._kmeans_init(flat, sync)
        n_levels = self._dropout_levels(x)
        codebooks = self.codebooks
        if self.training and (self.ema or self.dead_code_threshold > 0):
            # the update below writes into the codebooks, which the op saved for its backward
            # (it recomputes the residuals from them): a snapshot of this step's codebooks
            # (differentiable: a learned codebook still gets its gradient)
            codebooks = codebooks.clone()
        out = residual_vector_quantize(x, codebooks, n_levels=n_levels,
                                       beta=self.commitment_weight,
                                       straight_through=self.straight_through)
        if self.training:
            self._update(flat, out.indices.reshape(-1, self.num_levels), sync)
        loss = out.commitment_loss.sum() if self.ema else out.loss
        return QuantizerOutput(out.quantized, out.indices, loss, out.commitment_loss,
                               out.codebook_loss)

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor, sync: bool) -> None:
        if flat.shape[0] == 0:
            return
        r = flat
        for level in range(self.num_levels):
            means, counts = _kmeans(r, self.codebook_size, self.kmeans_iters, "l2", sync)
            counts = counts.clamp_min(1)
            self.codebooks.data[level].copy_(means)
            self.cluster_size[level].copy_(counts)
            if self.embed_avg is not None:
                self.embed_avg[level].copy_(means * counts[:, None])
            index, _ = nearest_code(r, self.codebooks.data[level])
            r = r - self.codebooks.data[level].index_select(0, index)
        self.initted.fill_(True)
        self._kmeans_pending = False

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, sync: bool) -> None:
        """Every level's statistics on its residual ``r_l`` (recomputed: ``r_0 = x``,
        ``r_{l+1} = r_l - c_l`` with the codes of the forward, before this update)."""
        K = self.codebook_size
        decay = 1.0 - 1.0 / self.usage_window
        r = flat
        for level in range(self.num_levels):
            index = indices[:, level]
            active = index >= 0
            codebook = self.codebooks.data[level]
            code = codebook.index_select(0, index.clamp_min(0))
            counts, sums = _level_stats(r, index, K, sync)
            self.last_used[level].copy_(torch.where(counts > 0, self.steps, self.last_used[level]))
            self.usage_counts[level].mul_(decay).add_(counts)
            if self.ema:
                self.cluster_size[level].lerp_(counts, 1.0 - self.decay)
                self.embed_avg[level].lerp_(sums, 1.0 - self.decay)
                codebook.copy_(_smoothed_codebook(self.cluster_size[level],
                                                  self.embed_avg[level], self.eps, "l2"))
            else:
                self.cluster_size[level].lerp_(counts, 1.0 - 0.99)
            if self.dead_code_threshold > 0:
                restarted = _restart_dead_codes_(
                    r, codebook, self.cluster_size[level],
                    None if self.embed_avg is None else self.embed_avg[level],
                    self.dead_code_threshold, self.dead_code_threshold, "l2", sync)
                self.restarts.add_(restarted)
            r = torch.where(active[:, None], r - code, r)
        self.steps.add_(1)

    def nearest(self, x: Tensor) -> Tensor:
        """The indices ``(..., L)`` of ``x (..., dim)``, every level, without gradients or
        statistics."""
        self._check(x)
        with torch.no_grad():
            return residual_vector_quantize(x.detach(), self.codebooks.detach()).indices

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The quantized value ``(..., dim)`` of ``indices (..., L')`` (L' <= L levels, -1 for a
        dropped level): the sum of the codes over the levels, in level order."""
        if indices.dim() < 1 or indices.shape[-1] > self.num_levels:
            raise ValueError(f"indices must have shape (..., L') with L' <= {self.num_levels}, "
                             f"got {tuple(indices.shape)}")
        check.indices_in_range("indices", indices, -1, self.codebook_size,
                               "-1 for a dropped level, or a code")
        out = self.codebooks.new_zeros((*indices.shape[:-1], self.dim))
        for level in range(indices.shape[-1]):
            index = indices[..., level]
            code = self.codebooks[level][index.clamp_min(0)]
            out = torch.where((index >= 0)[..., None], out + code, out)
        return out

    def codebook_usage(self) -> Tensor:
        """Per level, the fraction of codes chosen in the last ``usage_window`` training steps:
        ``(L,)`` float32, no host sync."""
        recent = self.last_used > self.steps - self.usage_window
        return recent.float().mean(-1)

    def perplexity(self) -> Tensor:
        """Per level, ``exp(H(p))`` of the code counts decayed by ``1 - 1/usage_window`` per
        training step: ``(L,)`` float32, between 1 and K (0 counts: 1)."""
        counts = self.usage_counts.double()
        p = counts / counts.sum(-1, keepdim=True).clamp_min(1e-300)
        return torch.exp(-torch.special.xlogy(p, p).sum(-1)).float()


def _reshare_codebooks(module: nn.Module, incompatible: Any) -> None:
    if isinstance(module, ResidualVQ):
        module._share_codebooks()


# ---------------------------------------------------------------------------------------------
# ResidualVQ: the drop-in for vector_quantize_pytorch.ResidualVQ (1.32.0)
# ---------------------------------------------------------------------------------------------

# ResidualVQ's own keyword arguments with their defaults (all keyword-only in the package); the
# rest go to each level's VectorQuantize (fv.VectorQuantize checks them).
_RVQ_ARGS: dict[str, Any] = {
    "num_quantizers": None, "codebook_dim": None, "shared_codebook": False, "diveq": False,
    "heads": 1, "quantize_dropout": False, "quantize_dropout_cutoff_index": 0,
    "quantize_dropout_multiple_of": 1, "accept_image_fmap": False,
    "implicit_neural_codebook": False, "mlp_kwargs": None, "beam_size": None,
    "eval_beam_size": None, "beam_score_quantizer_weights": None, "quant_grad_frac": 0.0,
    "return_zeros_for_masked_padding": True,
}
_RVQ_SUPPORTED = {"num_quantizers", "codebook_dim", "quantize_dropout", "shared_codebook",
                  "quantize_dropout_cutoff_index", "quantize_dropout_multiple_of",
                  "accept_image_fmap", "return_zeros_for_masked_padding"}
# VectorQuantize arguments the residual levels do not support (beyond what fv.VectorQuantize
# refuses itself): cosine levels, a learned codebook, per-level projections.
_LEVEL_UNSUPPORTED = {"use_cosine_sim", "learnable_codebook", "ema_update",
                      "layernorm_after_project_in", "channel_last", "route_gradients_to_input"}
_FORWARD_ARGS: dict[str, Any] = {"mask": None, "indices": None, "sample_codebook_temp": None,
                                 "beam_size": None}


class ResidualVQ(nn.Module):
    """A drop-in for ``vector_quantize_pytorch.ResidualVQ`` (version 1.32.0) on fastvae's fused
    residual quantizer (``fv.residual_vector_quantize``: exact nearest codes, no N x K distance
    matrix per level, one op each way).

    Same constructor (keyword arguments: ``dim``, ``num_quantizers``, ``codebook_size``,
    ``codebook_dim`` (projections in and out), ``quantize_dropout``,
    ``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``, ``accept_image_fmap``,
    and the levels' ``VectorQuantize`` arguments: ``decay``, ``eps``, ``commitment_weight``,
    ``kmeans_init``, ``kmeans_iters``, ``threshold_ema_dead_code``, ``rotation_trick``,
    ``channel_last``, ``sync_codebook``, ``freeze_codebook``, ...), the same initial codebooks
    from the same draws, the same state_dict keys and shapes (``layers.{i}._codebook.initted``,
    ``.cluster_size`` (1, K), ``.embed_avg`` and ``.embed`` (1, K, D), ``project_in`` /
    ``project_out``), so checkpoints load both ways. The same call
    ``rvq(x) -> (quantized, indices (..., L), losses (L,))`` (``return_all_codes=True`` adds
    the codes per level, ``(L, ..., D)``); the same per-level update (level l's EMA on its
    residual, with the codes before the update; k-means on the first batch level by level; dead
    codes restarted from the level's residual rows), the same gradients (straight-through or
    rotation trick per level, the codes subtracted stopped, per-level commitment
    ``commitment_weight * mse(r_l, sg(c_l))`` in training, zeros in evaluation).

    Quantize dropout: one number of levels per call, as the package: with
    ``rand_quantize_dropout_fixed_seed=s`` the same one (``random.Random(s)``); without it
    drawn on the device with ``torch.randint`` (the package draws a seed and reads it on the
    host: the same distribution, not the same draw, and no host sync here).

    ``shared_codebook=True``: one codebook (the first level's module) for every level, the
    package's manual EMA (each level's statistics in turn, one codebook update after the last);
    with dead-code restarts it is refused (the package restarts codes between levels of one
    call).

    Unsupported (``TypeError`` naming them, at non-default values): ``shared_codebook`` with
    ``threshold_ema_dead_code``, ``diveq``, ``heads``, ``implicit_neural_codebook``, beam
    search, ``quant_grad_frac``, ``use_cosine_sim``, ``learnable_codebook`` /
    ``ema_update=False``, ``channel_last=False``, ``route_gradients_to_input``, and what
    ``fv.VectorQuantize`` refuses; in ``forward``, ``mask``, ``indices`` (the cross-entropy over
    all codes is N x K by definition), ``beam_size``, ``sample_codebook_temp``.
    """

    def __init__(self, *, dim: int, codebook_size: int, **kwargs: Any) -> None:
        super().__init__()
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _RVQ_ARGS}
        for name in kwargs:
            if name not in _PACKAGE_ARGS:
                raise TypeError(f"ResidualVQ got an unexpected keyword argument {name!r}")
        unsupported = [f"{n}={v!r}" for n, v in own.items()
                       if n not in _RVQ_SUPPORTED and not _is_default(v, _RVQ_ARGS[n])
                       and not (n == "mlp_kwargs" and v == {})]
        unsupported += [f"{n}={v!r}" for n, v in kwargs.items()
                        if n in _LEVEL_UNSUPPORTED and not _is_default(v, _PACKAGE_ARGS[n])
                        and not (n == "ema_update" and v is True)]
        if own.get("shared_codebook") and not _is_default(
                kwargs.get("threshold_ema_dead_code", 0), 0):
            unsupported.append("shared_codebook=True with threshold_ema_dead_code > 0")
        if unsupported:
            raise TypeError("fastvae.ResidualVQ does not support "
                            f"{', '.join(unsupported)} (vector-quantize-pytorch arguments)")
        a = {**_RVQ_ARGS, **own}
        if a["num_quantizers"] is None or isinstance(codebook_size, tuple):
            raise TypeError("fastvae.ResidualVQ needs num_quantizers and one int codebook_size "
                            "(per-level codebook sizes are not supported)")
        self.dim = _positive_int("dim", dim)
        self.num_quantizers = L = _positive_int("num_quantizers", a["num_quantizers"])
        K = _positive_int("codebook_size", codebook_size)
        codebook_dim = dim if a["codebook_dim"] is None else _positive_int(
            "codebook_dim", a["codebook_dim"])
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in: nn.Module = (nn.Linear(dim, codebook_dim) if self.has_projections
                                      else nn.Identity())
        self.project_out: nn.Module = (nn.Linear(codebook_dim, dim) if self.has_projections
                                       else nn.Identity())
        self.accept_image_fmap = bool(a["accept_image_fmap"])
        self.layers = nn.ModuleList(
            VectorQuantize(codebook_dim, K, codebook_dim=codebook_dim,
                           accept_image_fmap=self.accept_image_fmap, **kwargs)
            for _ in range(L))
        self.quantize_dropout = bool(a["quantize_dropout"]) and L > 1
        cutoff = a["quantize_dropout_cutoff_index"]
        if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 0:
            raise ValueError(f"quantize_dropout_cutoff_index must be an int >= 0, got {cutoff!r}")
        if self.quantize_dropout and cutoff >= L:
            raise ValueError(f"quantize_dropout_cutoff_index must be < num_quantizers = {L} "
                             f"(the first level kept), got {cutoff}")
        self.quantize_dropout_cutoff_index = cutoff
        self.quantize_dropout_multiple_of = _positive_int("quantize_dropout_multiple_of",
                                                          a["quantize_dropout_multiple_of"])
        self.shared_codebook = bool(a["shared_codebook"])
        if self.shared_codebook:  # every level holds the first level's codebook (same module)
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook
        self.uniform_codebook_size = True
        self.codebook_sizes = (K,) * L
        self._codebook_stack: Tensor | None = None
        self._share_codebooks()
        self.register_load_state_dict_post_hook(_reshare_codebooks)

    def _share_codebooks(self) -> None:
        """Makes the levels' ``_codebook.embed`` buffers (1, K, D) the views ``[l:l+1]`` of one
        (L, K, D) tensor, ``codebooks`` without a copy (state_dict keys and shapes unchanged;
        ``load_state_dict`` copies into the views). With a shared codebook, ``codebooks`` is the
        one codebook expanded (stride 0 over the levels), nothing to do here."""
        if self.shared_codebook or self._shared_stack() is not None:
            return
        embeds = [layer._codebook.embed for layer in self.layers]
        if any(isinstance(e, nn.Parameter) for e in embeds):
            self._codebook_stack = None
            return
        stack = torch.cat([e.detach() for e in embeds])
        for level, layer in enumerate(self.layers):
            layer._codebook.embed = stack[level:level + 1]
        self._codebook_stack = stack

    def _shared_stack(self) -> Tensor | None:
        """The (L, K, D) tensor whose views the levels' ``embed`` buffers are, or None if that
        sharing was broken (a buffer replaced, not copied into: ``load_state_dict(assign=True)``,
        a level moved alone): a host-side check of the data pointers, no sync."""
        stack = self._codebook_stack
        if stack is None:
            return None
        step = stack.stride(0) * stack.element_size()
        for level, layer in enumerate(self.layers):
            embed = layer._codebook.embed
            if (embed.data_ptr() != stack.data_ptr() + level * step
                    or embed.dtype != stack.dtype or embed.device != stack.device
                    or embed.shape != (1, *stack.shape[1:]) or embed.stride() != stack.stride()):
                return None
        return stack

    def _apply(self, fn: Any, recurse: bool = True) -> ResidualVQ:
        # .to() / .cuda() / .half() convert each buffer alone: the views become separate
        # tensors; share them again
        super()._apply(fn, recurse)
        if self._codebook_stack is not None and self._shared_stack() is None:
            self._codebook_stack = None
            self._share_codebooks()
        return self

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self) -> Tensor:
        """The codebooks, ``(L, K, codebook_dim)``: the tensor the levels' ``embed`` buffers
        are views of (no copy; the EMA update writes into it), the one codebook expanded over
        the levels with ``shared_codebook``, or (if that sharing was broken) a new stack."""
        if self.shared_codebook:
            embed = self.layers[0]._codebook.embed
            return embed.expand(self.num_quantizers, *embed.shape[1:])
        stack = self._shared_stack()
        if stack is not None:
            return stack
        return torch.stack([layer._codebook.embed[0] for layer in self.layers])

    def _sync(self) -> bool:
        return self.layers[0]._sync()

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices (B, ..., L')`` -> the codes per level ``(L, B, ..., codebook_dim)``: zero at
        -1 (dropped) indices; L' < L is padded with -1 (with quantize dropout, as the
        package)."""
        q = indices.shape[-1]
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("indices has fewer levels than num_quantizers: only with "
                                 "quantize_dropout (as vector-quantize-pytorch)")
            indices = torch.nn.functional.pad(indices, (0, self.num_quantizers - q), value=-1)
        check.indices_in_range("indices", indices, -1, self.codebook_size,
                               "-1 for a dropped level, or a code")
        codebooks = self.codebooks
        codes = codebooks[torch.arange(self.num_quantizers, device=indices.device)
                          .view(-1, *(1,) * (indices.dim() - 1)),
                          indices.movedim(-1, 0).clamp_min(0)]
        return codes.masked_fill((indices.movedim(-1, 0) == -1)[..., None], 0.0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The sum over levels of ``get_codes_from_indices``, projected out ``(B, ..., dim)``."""
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def _dropout_levels(self, x: Tensor, seed: int | None) -> Tensor | None:
        """The number of active levels of this call (a 0-d int64 tensor), or None."""
        L, m = self.num_quantizers, self.quantize_dropout_multiple_of
        if seed is not None:
            index = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, L)
            if m != 1:
                index = math.ceil((index + 1) / m) * m - 1
            return torch.tensor(min(index + 1, L), device=x.device)
        index = torch.randint(self.quantize_dropout_cutoff_index, L, (), device=x.device)
        if m != 1:
            index = (index + m) // m * m - 1
        return (index + 1).clamp_max(L)

    def forward(self, x: Tensor, mask: Tensor | None = None, indices: Tensor | None = None,
                return_all_codes: bool = False, sample_codebook_temp: float | None = None,
                freeze_codebook: bool = False, beam_size: int | None = None,
                rand_quantize_dropout_fixed_seed: int | None = None) -> tuple[Tensor, ...]:
        for name, value in (("mask", mask), ("indices", indices),
                            ("sample_codebook_temp", sample_codebook_temp),
                            ("beam_size", beam_size)):
            if value is not None:
                raise TypeError(f"fastvae.ResidualVQ.forward does not support {name}")
        first = self.layers[0]
        dtype = x.dtype
        only_one = x.dim() == 2 and not self.accept_image_fmap
        spatial = None
        if self.accept_image_fmap:
            if x.dim() != 4:
                raise ValueError(f"x must have 4 dimensions (B, C, H, W), got {tuple(x.shape)}")
            spatial = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
        elif only_one:
            x = x[:, None, :]
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}) (or (B, C, H, W) "
                             f"with accept_image_fmap), got {tuple(x.shape)}")
        x = self.project_in(x)
        input_requires_grad = x.requires_grad  # the levels' input, as the package's layers see it
        B, N, D = x.shape
        L = self.num_quantizers
        flat = x.detach().reshape(B * N, D).float()
        sync = self._sync()
        if any(layer._kmeans_pending for layer in self.layers):
            self._kmeans_init(flat, sync)
        n_levels = None
        if self.training and self.quantize_dropout:
            n_levels = self._dropout_levels(x, rand_quantize_dropout_fixed_seed)
        training = self.training
        update = training and not freeze_codebook and (first.ema_update
                                                       or first.threshold_ema_dead_code > 0)
        codebooks = self.codebooks.detach()
        if update:
            # the update below writes into the codebooks, which the op saved for its backward
            # (it recomputes the residuals from them): a snapshot of this step's codebooks
            codebooks = codebooks.clone()
        rotation = training and input_requires_grad and first.rotation_trick
        out = residual_vector_quantize(x if training else x.detach(), codebooks, n_levels=n_levels,
                                       beta=first.commitment_weight,
                                       straight_through="rotation" if rotation else "ste")
        idx = out.indices.reshape(B * N, L)
        if update:
            self._update(flat, idx, codebooks, n_levels, sync)
        quantized = out.quantized.to(dtype)
        if training and first.commitment_weight > 0:
            losses = out.commitment_loss.float()
        else:
            losses = torch.zeros(L, device=x.device)
        quantized = self.project_out(quantized)
        all_indices = out.indices.view(B, N, L)
        if spatial is not None:
            quantized = quantized.transpose(1, 2).unflatten(2, spatial)
            all_indices = all_indices.view(B, *spatial, L)
        elif only_one:
            quantized, all_indices = quantized[:, 0], all_indices[:, 0]
        if not return_all_codes:
            return quantized, all_indices, losses
        return quantized, all_indices, losses, self.get_codes_from_indices(all_indices)

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor, sync: bool) -> None:
        """Level by level, as the package's first call: level l on its residual, which the
        initialized levels before it made."""
        r = flat
        for layer in self.layers:
            if layer._kmeans_pending:
                layer._kmeans_init(r, sync and layer.sync_kmeans)
                if self.shared_codebook:  # initialized once, by the first level
                    for other in self.layers:
                        other._kmeans_pending = False
            embed = layer._codebook.embed[0].detach().float()
            index, _ = nearest_code(r, embed)
            r = r - embed.index_select(0, index)

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, codebooks: Tensor, n_levels: Tensor | None,
                sync: bool) -> None:
        """Level l's update (``fv.VectorQuantize``'s) on its residual ``r_l``, recomputed from
        the indices with the codes of the forward; a level that quantize dropout skipped keeps
        its state (``torch.where`` over the level's flag: no host sync). A shared codebook (the
        package's manual EMA) takes every level's statistics in turn, then one codebook update
        (restarts are refused with it)."""
        if self.shared_codebook:
            self._update_shared(flat, indices, codebooks, n_levels, sync)
            return
        r = flat
        for level, layer in enumerate(self.layers):
            index = indices[:, level]
            code = codebooks[level].float().index_select(0, index.clamp_min(0))
            if n_levels is None:
                layer._update(r, index, layer.ema_update, sync)
            else:
                cb = layer._codebook
                state = [cb.cluster_size, cb.embed_avg, cb.embed.data]
                before = [t.clone() for t in state]
                layer._update(r, index.clamp_min(0), layer.ema_update, sync)
                active = n_levels > level
                for t, old in zip(state, before, strict=True):
                    t.copy_(torch.where(active, t, old))
            r = r - code

    @torch.no_grad()
    def _update_shared(self, flat: Tensor, indices: Tensor, codebooks: Tensor,
                       n_levels: Tensor | None, sync: bool) -> None:
        first = self.layers[0]
        cb = first._codebook
        cluster_size, embed_avg = cb.cluster_size[0], cb.embed_avg[0]
        r = flat
        for level in range(self.num_quantizers):
            index = indices[:, level]
            code = codebooks[level].float().index_select(0, index.clamp_min(0))
            counts, sums = _batch_stats(r, index.clamp_min(0), first.codebook_size, sync)
            new_size = cluster_size.lerp(counts.to(cluster_size.dtype), 1.0 - first.decay)
            new_avg = embed_avg.lerp(sums.to(embed_avg.dtype), 1.0 - first.decay)
            if n_levels is not None:
                active = n_levels > level
                new_size = torch.where(active, new_size, cluster_size)
                new_avg = torch.where(active, new_avg, embed_avg)
            cluster_size.copy_(new_size)
            embed_avg.copy_(new_avg)
            r = r - code
        if first.ema_update:
            cb.embed.data[0].copy_(_smoothed_codebook(cluster_size, embed_avg, first.eps,
                                                      first.metric))
