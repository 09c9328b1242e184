"""Vector-quantizer modules on ``fv.nearest_code`` / ``fv.vector_quantize``: the fastvae-native
``VectorQuantizer`` and ``VectorQuantize``, a drop-in for ``vector_quantize_pytorch``'s class of
that name (its constructor, its call, its state_dict).

The codebook statistics never build an N x K matrix (no one-hot): counts and sums are
``index_add_`` over the indices, k-means assigns with ``nearest_code``. A training step makes
no host synchronization (no ``.item()``, no branch on data): restarts and initialization are
``torch.where`` over masks. Under ``torch.distributed`` (initialized, world size > 1) every
statistic that decides the codebook is all-reduced every training step by every rank
(unconditionally: a collective that only some ranks reach hangs), and random choices are made
on rank 0 and broadcast, so every rank ends each step with the same codebook, the one a single
process gets on the concatenation of the ranks' batches (rank 0's random state). Every rank must
pass the same number of vectors per step (``DistributedSampler``'s default).
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import validation as check
from ..ops.quantize import _straight_through, nearest_code, vector_quantize

__all__ = ["QuantizerOutput", "VectorQuantize", "VectorQuantizer"]


# ---------------------------------------------------------------------------------------------
# the shared codebook algorithms (2-D views: codebook (K, D), cluster sizes (K,))
# ---------------------------------------------------------------------------------------------


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _batch_stats(x: Tensor, indices: Tensor, K: int, sync: bool) -> tuple[Tensor, Tensor]:
    """Per code: how many rows of ``x (N, D)`` chose it, and their sum (``(K,)``, ``(K, D)``),
    by index-add (no one-hot), all-reduced over ranks in one collective when ``sync``."""
    D = x.shape[1]
    packed = x.new_zeros(K, D + 1)
    packed[:, 0].index_add_(0, indices, x.new_ones(indices.shape[0]))
    packed[:, 1:].index_add_(0, indices, x)
    if sync:
        dist.all_reduce(packed)
    return packed[:, 0], packed[:, 1:]


def _shared_randperm(n: int, device: torch.device, sync: bool) -> Tensor:
    """``torch.randperm(n)`` drawn from the default generator, rank 0's on every rank."""
    perm = torch.randperm(n, device=device)
    if sync:
        dist.broadcast(perm, src=0)
    return perm


def _global_rows(x: Tensor, rows: Tensor, sync: bool) -> Tensor:
    """Rows ``rows`` (identical on every rank) of the concatenation over ranks of ``x (N, D)``
    (every rank holding N rows): each rank fills the rows it owns, zeros elsewhere, and an
    all-reduce sums them (exact: one term is nonzero). Communication O(len(rows) D)."""
    if not sync:
        return x[rows]
    N = x.shape[0]
    local = rows - dist.get_rank() * N
    mine = (local >= 0) & (local < N)
    out = torch.where(mine[:, None], x[local.clamp(0, max(N - 1, 0))], 0) if N else \
        x.new_zeros(rows.shape[0], x.shape[1])
    dist.all_reduce(out)
    return out


def _normalize(t: Tensor) -> Tensor:
    return F.normalize(t, dim=-1, eps=1e-6)


def _kmeans(x: Tensor, K: int, iters: int, metric: str, sync: bool) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on ``x (N, D)`` (the concatenation over ranks when ``sync``): ``K``
    initial means drawn from the rows (a random permutation's first K, or K draws with
    replacement when there are fewer rows), then ``iters`` rounds of assignment by
    ``nearest_code`` and means by index-add (counts and sums all-reduced before dividing); an
    empty cluster keeps its mean; cosine means are normalized. Returns ``(means, counts)``, the
    counts of the last assignment. Never N x K x D (nor N x K)."""
    n_total = x.shape[0] * (_world_size() if sync else 1)
    if n_total >= K:
        rows = _shared_randperm(n_total, x.device, sync)[:K]
    else:
        rows = torch.randint(0, n_total, (K,), device=x.device)
        if sync:
            dist.broadcast(rows, src=0)
    means = _global_rows(x, rows, sync)
    counts = x.new_zeros(K)
    for _ in range(iters):
        indices, _ = nearest_code(x, means, metric=metric)
        counts, sums = _batch_stats(x, indices, K, sync)
        new = sums / counts.clamp_min(1)[:, None]
        if metric == "cosine":
            new = _normalize(new)
        means = torch.where((counts == 0)[:, None], means, new)
    return means, counts


def _pack_channel_first(x: Tensor) -> tuple[Tensor, torch.Size]:
    """A drop-in's channel-first input ``(B, C, *spatial)`` -> rows ``(B, prod(spatial), C)``
    and ``spatial`` (the package's ``b d ... -> b (...) d``)."""
    x = x.movedim(1, -1)
    spatial = x.shape[1:-1]
    return x.reshape(x.shape[0], math.prod(spatial), x.shape[-1]), spatial


def _unpack_channel_first(out: Tensor, indices: Tensor,
                          spatial: torch.Size) -> tuple[Tensor, Tensor]:
    """The inverse of ``_pack_channel_first`` for the output ``(B, n, C)`` -> ``(B, C,
    *spatial)`` and the indices ``(B, n, c)`` -> ``(B, *spatial, c)``."""
    out = out.reshape(out.shape[0], *spatial, out.shape[-1]).movedim(-1, 1)
    return out, indices.reshape(indices.shape[0], *spatial, indices.shape[-1])


def _smoothed_codebook(cluster_size: Tensor, embed_avg: Tensor, eps: float,
                       metric: str) -> Tensor:
    """The EMA codebook: ``embed_avg / n_k`` with Laplace-smoothed cluster sizes
    ``n_k = (N_k + eps) / (sum N + K eps) * sum N`` (Oord et al. 2017, appendix; Sonnet)."""
    total = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total
    codebook = embed_avg / smoothed[..., None]
    return _normalize(codebook) if metric == "cosine" else codebook


def _restart_dead_codes_(x: Tensor, codebook: Tensor, cluster_size: Tensor,
                         embed_avg: Tensor | None, threshold: float, reset: float, metric: str,
                         sync: bool) -> Tensor:
    """Codes with ``cluster_size < threshold`` become rows of the batch (the concatenation over
    ranks), drawn without replacement by a random permutation (the i-th dead code, in index
    order, takes the permutation's i-th row); their cluster size becomes ``reset`` and their EMA
    sum ``reset`` times the row. When more codes are dead than rows exist, the lowest-index ones
    are restarted and the rest wait for a later step. Returns the number restarted (a tensor).
    In place, without host synchronization."""
    n_total = x.shape[0] * (_world_size() if sync else 1)
    dead = cluster_size < threshold
    if n_total == 0:
        return dead.new_zeros((), dtype=torch.int64)
    if metric == "cosine":
        x = _normalize(x)
    perm = _shared_randperm(n_total, x.device, sync)
    position = dead.cumsum(0) - 1
    take = dead & (position < n_total)
    rows = _global_rows(x, perm[position.clamp(0, n_total - 1)], sync).to(codebook.dtype)
    codebook.copy_(torch.where(take[:, None], rows, codebook))
    cluster_size.copy_(torch.where(take, reset, cluster_size))
    if embed_avg is not None:
        embed_avg.copy_(torch.where(take[:, None], rows * reset, embed_avg))
    return take.sum()


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _number(name: str, value: object, low: float = 0.0, high: float = math.inf,
            high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (low <= value and (value < high if high_open else value <= high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{name} must be >= {low} and {bound}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# VectorQuantizer: the fastvae-native module
# ---------------------------------------------------------------------------------------------


class QuantizerOutput(NamedTuple):
    """What ``VectorQuantizer`` returns: ``loss`` is what to add to the training loss
    (``commitment_loss`` with an EMA codebook, ``codebook_loss + commitment_loss`` with a
    learned one; ``commitment_loss`` is already weighted)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commitment_loss: Tensor
    codebook_loss: Tensor


class _QuantizerModule(nn.Module):
    """What the fastvae-native quantizer modules share (``VectorQuantizer``,
    ``ResidualVectorQuantizer``, ``FiniteScalarQuantizer``, ``LookupFreeQuantizer``): the check
    of ``x (..., dim)``, the ``sync`` decision, the ``steps`` / ``restarts`` counters and the
    codebook part of ``extra_repr``."""

    dim: int
    sync: bool | None = None

    def _codebook_options(self, straight_through: str, decay: float | None,
                          commitment_weight: float, kmeans_iters: int,
                          dead_code_threshold: float, eps: float) -> None:
        """Checks and sets the options of a k-means / EMA codebook (``VectorQuantizer``,
        ``ResidualVectorQuantizer``): ``straight_through``, ``decay`` (``ema`` when > 0),
        ``commitment_weight``, ``kmeans_iters``, ``dead_code_threshold``, ``eps``."""
        if straight_through not in ("ste", "rotation"):
            raise ValueError(f"straight_through must be 'ste' or 'rotation', "
                             f"got {straight_through!r}")
        self.straight_through = straight_through
        self.decay = 0.0 if decay is None else _number("decay", decay, 0.0, 1.0, high_open=True)
        self.ema = self.decay > 0
        self.commitment_weight = _number("commitment_weight", commitment_weight)
        self.kmeans_iters = _positive_int("kmeans_iters", kmeans_iters)
        self.dead_code_threshold = _number("dead_code_threshold", dead_code_threshold)
        self.eps = _number("eps", eps)

    def _register_codebook(self, name: str, shape: tuple[int, ...], kmeans_init: bool,
                           metric: str = "l2") -> None:
        """The codebook ``name`` of ``shape`` (..., K, D): zeros until k-means fills it, else
        uniform in ``[-1/K, 1/K]`` (unit rows for ``metric="cosine"``); a buffer with its EMA
        sums ``embed_avg`` (``ema``), else an ``nn.Parameter`` (``embed_avg`` None)."""
        K = shape[-2]
        if kmeans_init:
            init = torch.zeros(shape)
        else:
            init = torch.empty(shape).uniform_(-1.0 / K, 1.0 / K)
            if metric == "cosine":
                init = _normalize(init)
        if self.ema:
            self.register_buffer(name, init)
            self.register_buffer("embed_avg", init.clone())
        else:
            setattr(self, name, nn.Parameter(init))
            self.embed_avg = None

    def _track_kmeans(self, kmeans_init: bool) -> None:
        """The k-means flag as Python state (``_kmeans_pending``, read from the ``initted``
        buffer once at load, never in a step): no host sync."""
        self._kmeans_pending = bool(kmeans_init)
        self.register_load_state_dict_post_hook(_reload_initted)

    def _register_counters(self) -> None:
        """The 0-d int64 buffers ``steps`` (training steps) and ``restarts`` (cumulative
        dead-code restarts; stays 0 where there are none)."""
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))

    def _sync(self) -> bool:
        """All-reduce the statistics: ``sync``, or (None) when torch.distributed is initialized
        with world size > 1."""
        return _world_size() > 1 if self.sync is None else bool(self.sync)

    def _check(self, x: object) -> Tensor:
        """``x`` itself if it is a tensor of shape ``(..., dim)``, else ``ValueError``."""
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (..., {self.dim}), got {shape}")
        return x

    def _codebook_repr(self) -> str:
        """``decay=...`` (EMA) or ``learned``, the commitment weight and the straight-through
        estimator, for ``extra_repr``."""
        mode = f"decay={self.decay}" if self.ema else "learned"
        return (f"{mode}, commitment_weight={self.commitment_weight}, "
                f"straight_through={self.straight_through!r}")


class VectorQuantizer(_QuantizerModule):
    """A VQ-VAE quantizer (van den Oord et al. 2017) with an EMA or learned codebook.

    ``forward(x)``: ``x (..., dim)`` -> ``QuantizerOutput(quantized, indices, loss,
    commitment_loss, codebook_loss)``, from ``fv.vector_quantize`` (exact nearest code, the
    straight-through or rotation-trick gradient, losses as means over elements).

    Arguments:
        dim, codebook_size: D and K.
        metric: ``"l2"`` or ``"cosine"`` (unit-norm codes and inputs).
        decay: EMA decay of the codebook statistics (Razavi et al. 2019: ``N_k <- decay N_k +
            (1 - decay) n_k``, ``m_k <- decay m_k + (1 - decay) sum_{i: k} x_i``,
            ``e_k = m_k / N_k`` with Laplace-smoothed ``N_k``). ``None`` or ``0``: the codebook
            is an ``nn.Parameter`` learned by the codebook loss.
        commitment_weight: beta, on the commitment term.
        kmeans_init: initialize the codebook by k-means (``kmeans_iters`` rounds) on the first
            training batch (an empty cluster keeps its sampled row, with cluster size 1).
        dead_code_threshold: codes whose EMA cluster size falls below it are restarted from
            random rows of the batch (EMA state reset to cluster size ``dead_code_threshold``).
            With a learned codebook the cluster sizes are tracked with decay 0.99.
        eps: the Laplace smoothing.
        straight_through: ``"ste"`` or ``"rotation"`` (Fifty et al. 2024).
        usage_window: the number of training steps over which ``codebook_usage()`` and
            ``perplexity()`` count (a ring of per-step histograms, ``usage_window x K`` int64).
        sync: all-reduce the statistics over ``torch.distributed`` ranks; ``None`` (default):
            when it is initialized with world size > 1.

    Training steps (``module.train()``) update the statistics, the codebook, the usage
    histogram and the restart count (``restarts``, cumulative); evaluation changes nothing.
    Buffers: ``codebook`` (or the parameter), ``cluster_size``, ``embed_avg`` (EMA), ``initted``,
    ``usage_counts``, ``usage_total``, ``steps``, ``restarts``.
    """

    num_levels = 1  # one codebook (the quantizer protocol of fastvae.models.quantizers)

    def __init__(self, dim: int, codebook_size: int, *, metric: str = "l2",
                 decay: float | None = 0.99, commitment_weight: float = 0.25,
                 kmeans_init: bool = False, kmeans_iters: int = 10,
                 dead_code_threshold: float = 0.0, eps: float = 1e-5,
                 straight_through: str = "ste", usage_window: int = 100,
                 sync: bool | None = None) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.codebook_size = K = _positive_int("codebook_size", codebook_size)
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        self.metric = metric
        self._codebook_options(straight_through, decay, commitment_weight, kmeans_iters,
                               dead_code_threshold, eps)
        self.usage_window = _positive_int("usage_window", usage_window)
        self.sync = sync
        self._register_codebook("codebook", (K, self.dim), kmeans_init, metric)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("usage_counts", torch.zeros(self.usage_window, K, dtype=torch.int64))
        self.register_buffer("usage_total", torch.zeros(K, dtype=torch.int64))
        self._register_counters()
        self._track_kmeans(kmeans_init)

    def extra_repr(self) -> str:
        return (f"{self.dim}, {self.codebook_size}, metric={self.metric!r}, "
                f"{self._codebook_repr()}")

    def forward(self, x: Tensor) -> QuantizerOutput:
        self._check(x)
        sync = self._sync() if self.training else False
        flat = x.detach().reshape(-1, self.dim).to(self.codebook.dtype)
        if self.metric == "cosine":
            flat = _normalize(flat)
        if self.training and self._kmeans_pending:
            self._kmeans_init(flat, sync)
        out = vector_quantize(x, self.codebook, metric=self.metric, beta=self.commitment_weight,
                              straight_through=self.straight_through)
        if self.training:
            self._update(flat, out.indices.reshape(-1), sync)
        loss = out.commitment_loss if self.ema else out.loss
        return QuantizerOutput(out.quantized, out.indices, loss, out.commitment_loss,
                               out.codebook_loss)

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor, sync: bool) -> None:
        if flat.shape[0] == 0:
            return
        means, counts = _kmeans(flat, self.codebook_size, self.kmeans_iters, self.metric, sync)
        counts = counts.clamp_min(1)
        self.codebook.data.copy_(means)
        self.cluster_size.copy_(counts)
        if self.embed_avg is not None:
            self.embed_avg.copy_(means * counts[:, None])
        self.initted.fill_(True)
        self._kmeans_pending = False

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, sync: bool) -> None:
        counts, sums = _batch_stats(flat, indices, self.codebook_size, sync)
        # usage over the last usage_window steps: a ring of per-step histograms
        slot = (self.steps % self.usage_window).view(1)
        step_counts = counts.round().to(torch.int64)
        self.usage_total.add_(step_counts - self.usage_counts.index_select(0, slot)[0])
        self.usage_counts.index_copy_(0, slot, step_counts[None])
        self.steps.add_(1)
        if self.ema:
            self.cluster_size.lerp_(counts, 1.0 - self.decay)
            self.embed_avg.lerp_(sums, 1.0 - self.decay)
            self.codebook.copy_(_smoothed_codebook(self.cluster_size, self.embed_avg,
                                                   self.eps, self.metric))
        else:
            self.cluster_size.lerp_(counts, 1.0 - 0.99)
        if self.dead_code_threshold > 0:
            restarted = _restart_dead_codes_(flat, self.codebook.data, self.cluster_size,
                                             self.embed_avg, self.dead_code_threshold,
                                             self.dead_code_threshold, self.metric, sync)
            self.restarts.add_(restarted)

    def nearest(self, x: Tensor) -> Tensor:
        """The indices of the nearest codes of ``x (..., dim)`` (``fv.nearest_code``), without
        gradients or statistics: int64 of shape ``x.shape[:-1]``."""
        self._check(x)
        codebook = self.codebook.detach()
        return nearest_code(x.detach().to(codebook.dtype), codebook, metric=self.metric)[0]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The codebook rows of ``indices`` (any shape) -> ``indices.shape + (dim,)``."""
        check.indices_in_range("indices", indices, 0, self.codebook_size, "a code")
        codes = self.codebook[indices]
        return _normalize(codes) if self.metric == "cosine" else codes

    def codebook_usage(self) -> Tensor:
        """The fraction of codes chosen at least once in the last ``usage_window`` training
        steps (a 0-d float32 tensor; no host sync)."""
        return (self.usage_total > 0).float().mean()

    def perplexity(self) -> Tensor:
        """``exp(H(p))`` of the code histogram over the last ``usage_window`` training steps
        (between 1 and K; 0-d float32 tensor). Over a window, not per batch: a batch of B
        vectors bounds the per-batch perplexity by B."""
        counts = self.usage_total.double()
        p = counts / counts.sum().clamp_min(1)
        return torch.exp(-torch.special.xlogy(p, p).sum()).float()


def _reload_initted(module: nn.Module, incompatible: Any) -> None:
    if hasattr(module, "_kmeans_pending"):
        module._kmeans_pending = not bool(module.initted)


# ---------------------------------------------------------------------------------------------
# VectorQuantize: the drop-in for vector_quantize_pytorch.VectorQuantize (1.32.0)
# ---------------------------------------------------------------------------------------------

# vector-quantize-pytorch's constructor, in order, with its defaults. The names fastvae
# implements are in _SUPPORTED; the others are accepted only at their defaults.
_PACKAGE_ARGS: dict[str, Any] = {
    "codebook_dim": None, "heads": 1, "separate_codebook_per_head": False, "decay": 0.8,
    "eps": 1e-5, "freeze_codebook": False, "kmeans_init": False, "kmeans_iters": 10,
    "sync_kmeans": True, "use_cosine_sim": False, "layernorm_after_project_in": False,
    "threshold_ema_dead_code": 0, "channel_last": True, "accept_image_fmap": False,
    "accept_3d_fmap": False, "commitment_weight": 1.0, "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0, "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None, "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0, "stochastic_sample_codes": False,
    "sample_codebook_temp": 1.0, "straight_through": False, "rotation_trick": None,
    "directional_reparam": False, "directional_reparam_variance": 5e-3, "sync_codebook": None,
    "sync_affine_param": False, "ema_update": None, "vq_bridge": None,
    "manual_ema_update": False, "learnable_codebook": None, "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False, "affine_param": False,
    "affine_param_batch_decay": 0.99, "affine_param_codebook_decay": 0.9, "sync_update_v": 0.0,
    "return_zeros_for_masked_padding": True, "route_gradients_to_input": True,
}
_SUPPORTED = {
    "codebook_dim", "decay", "eps", "freeze_codebook", "kmeans_init", "kmeans_iters",
    "sync_kmeans", "use_cosine_sim", "layernorm_after_project_in", "threshold_ema_dead_code",
    "channel_last", "accept_image_fmap", "accept_3d_fmap", "commitment_weight",
    "rotation_trick", "sync_codebook", "ema_update", "learnable_codebook",
    "route_gradients_to_input",
    # only used by features that are off (stochastic sampling, masks, affine, reparam): any value
    "sample_codebook_temp", "return_zeros_for_masked_padding", "directional_reparam_variance",
    "affine_param_batch_decay", "affine_param_codebook_decay",
}
_FORWARD_ARGS: dict[str, Any] = {
    "indices": None, "mask": None, "lens": None, "topk": None, "sample_codebook_temp": None,
    "codebook_transform_fn": None, "ema_update_weight": None, "accum_ema_update": False,
}

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity",
                                             "orthogonal_reg", "inplace_optimize"])


class _Codebook(nn.Module):
    """The state of vector-quantize-pytorch's ``Codebook`` (one head): ``initted`` (0-d bool),
    ``cluster_size`` (1, K), ``embed_avg`` (1, K, D), ``embed`` (1, K, D) (a parameter when the
    codebook is learnable)."""

    def __init__(self, embed: Tensor, kmeans_init: bool, learnable: bool) -> None:
        super().__init__()
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(embed.shape[:2]))
        self.register_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)


class VectorQuantize(nn.Module):
    """A drop-in for ``vector_quantize_pytorch.VectorQuantize`` (version 1.32.0), on fastvae's
    exact, tiled nearest-code search (no N x K distance matrix, no one-hot).

    Same constructor (the arguments in the same order with the same defaults: ``decay=0.8``,
    ``commitment_weight=1.0``, the rotation trick on when ``dim > 1``, ...), same call
    ``vq(x) -> (quantized, indices, commit_loss)`` for ``x`` ``(B, N, D)``, ``(B, D)``,
    ``(B, D, N)`` with ``channel_last=False``, ``(B, C, H, W)`` with ``accept_image_fmap``,
    ``(B, C, D, H, W)`` with ``accept_3d_fmap``; same state_dict keys and shapes
    (``_codebook.initted``, ``_codebook.cluster_size`` (1, K), ``_codebook.embed_avg`` and
    ``_codebook.embed`` (1, K, D), ``project_in``/``project_out`` when ``codebook_dim != dim``),
    so checkpoints load both ways. Same EMA update: ``N <- lerp(N, n, 1 - decay)``,
    ``m <- lerp(m, sum x, 1 - decay)``, ``e = m / laplace(N)`` (normalized for cosine), then
    codes with ``N < threshold_ema_dead_code`` restarted from batch rows; same k-means
    initialization on the first call; ``commit_loss = commitment_weight * mse(sg(q), x)`` in
    training, 0 in evaluation.

    Supported: ``heads=1`` only, and not ``commitment_use_cross_entropy_loss``, orthogonal or
    diversity regularization, stochastic/gumbel sampling, ``directional_reparam``, affine
    parameters, ``vq_bridge``, in-place optimizers, ``manual_ema_update``, ``sync_update_v``;
    those raise ``TypeError`` naming them (at their defaults they are accepted). ``forward``
    takes ``x``, ``freeze_codebook``, ``ema_update`` and ``return_loss_breakdown``; ``mask``,
    ``lens``, ``indices``, ``topk`` and the rest raise ``TypeError``. Differences: see the
    README ("Vector quantization").
    """

    def __init__(self, dim: int, codebook_size: int, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        names = list(_PACKAGE_ARGS)
        if len(args) > len(names):
            raise TypeError(f"VectorQuantize takes at most {len(names) + 2} positional "
                            f"arguments, got {len(args) + 2}")
        given = dict(zip(names[:len(args)], args, strict=True))
        for name, value in kwargs.items():
            if name not in _PACKAGE_ARGS:
                raise TypeError(f"VectorQuantize got an unexpected keyword argument {name!r}")
            if name in given:
                raise TypeError(f"VectorQuantize got multiple values for argument {name!r}")
            given[name] = value
        unsupported = [f"{n}={v!r}" for n, v in given.items()
                       if n not in _SUPPORTED and not _is_default(v, _PACKAGE_ARGS[n])]
        if unsupported:
            raise TypeError("fastvae.VectorQuantize does not support "
                            f"{', '.join(unsupported)} (vector-quantize-pytorch arguments; "
                            "heads=1 only)")
        a = {**_PACKAGE_ARGS, **given}
        self.dim = _positive_int("dim", dim)
        self.codebook_size = K = _positive_int("codebook_size", codebook_size)
        codebook_dim = dim if a["codebook_dim"] is None else _positive_int(
            "codebook_dim", a["codebook_dim"])
        self.heads = 1
        self.separate_codebook_per_head = False
        self.decay = _number("decay", a["decay"], 0.0, 1.0)
        self.eps = _number("eps", a["eps"])
        self.kmeans_iters = _positive_int("kmeans_iters", a["kmeans_iters"])
        self.sync_kmeans = bool(a["sync_kmeans"])
        self.use_cosine_sim = bool(a["use_cosine_sim"])
        self.threshold_ema_dead_code = _number("threshold_ema_dead_code",
                                               a["threshold_ema_dead_code"])
        self.channel_last = bool(a["channel_last"])
        self.accept_image_fmap = bool(a["accept_image_fmap"])
        self.accept_3d_fmap = bool(a["accept_3d_fmap"])
        self.commitment_weight = _number("commitment_weight", a["commitment_weight"])
        self.freeze_codebook = bool(a["freeze_codebook"])
        self.route_gradients_to_input = bool(a["route_gradients_to_input"])
        self._ema_update = True if a["ema_update"] is None else bool(a["ema_update"])
        self.learnable_codebook = bool(a["learnable_codebook"])
        self.rotation_trick = dim > 1 if a["rotation_trick"] is None else bool(a["rotation_trick"])
        self.sync_codebook = a["sync_codebook"]
        if self.use_cosine_sim and self.learnable_codebook:
            raise ValueError("use_cosine_sim is not compatible with learnable_codebook (as in "
                             "vector-quantize-pytorch)")
        if self._ema_update and self.learnable_codebook:
            raise ValueError("learnable_codebook=True needs ema_update=False (as in "
                             "vector-quantize-pytorch)")
        if codebook_dim != dim:
            project_in: nn.Module = nn.Linear(dim, codebook_dim)
            if a["layernorm_after_project_in"]:
                project_in = nn.Sequential(project_in, nn.LayerNorm(codebook_dim))
            self.project_in = project_in
            self.project_out: nn.Module = nn.Linear(codebook_dim, dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.has_projections = codebook_dim != dim
        kmeans_init = bool(a["kmeans_init"])
        if kmeans_init:
            embed = torch.zeros(1, K, codebook_dim)
        else:  # the package's initialization (same draws from the default generator)
            embed = torch.empty(1, K, codebook_dim)
            nn.init.kaiming_uniform_(embed)
            if self.use_cosine_sim:
                embed = _normalize(embed)
        self._codebook = _Codebook(embed, kmeans_init, self.learnable_codebook)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self._kmeans_pending = kmeans_init
        self.register_load_state_dict_post_hook(_reload_dropin_initted)

    @property
    def metric(self) -> str:
        return "cosine" if self.use_cosine_sim else "l2"

    @property
    def ema_update(self) -> bool:
        return self._ema_update

    @property
    def codebook(self) -> Tensor:
        """The codebook, ``(K, codebook_dim)`` (a view of ``_codebook.embed``)."""
        return self._codebook.embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes.reshape(self._codebook.embed.shape))

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        check.indices_in_range("indices", indices, 0, self.codebook_size, "a code")
        codes = self.codebook[indices]
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.get_codes_from_indices(indices))

    def _sync(self) -> bool:
        if self.sync_codebook is None:
            return _world_size() > 1
        return bool(self.sync_codebook)

    def forward(self, x: Tensor, *, freeze_codebook: bool | None = None,
                ema_update: bool | None = None, return_loss_breakdown: bool = False,
                **kwargs: Any) -> tuple[Tensor, ...]:
        for name, value in kwargs.items():
            if name not in _FORWARD_ARGS:
                raise TypeError(f"VectorQuantize.forward got an unexpected keyword argument "
                                f"{name!r}")
            if not _is_default(value, _FORWARD_ARGS[name]):
                raise TypeError(f"fastvae.VectorQuantize.forward does not support {name}")
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        ema_update = self._ema_update if ema_update is None else bool(ema_update)
        input_requires_grad = x.requires_grad  # the input's, not the projection's (as the package)
        only_one = x.dim() == 2
        if only_one:
            x = x[:, None, :]
        dtype = x.dtype
        spatial = None
        if self.accept_image_fmap or self.accept_3d_fmap:
            want = 4 if self.accept_image_fmap else 5
            if x.dim() != want:
                raise ValueError(f"x must have {want} dimensions (B, C, ...), got "
                                 f"{tuple(x.shape)}")
            spatial = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
        need_transpose = not self.channel_last and spatial is None and not only_one
        if need_transpose:
            x = x.transpose(1, 2)
        x = self.project_in(x)
        if self.use_cosine_sim:
            x = _normalize(x)
        B, N, D = x.shape
        flat = x.detach().reshape(B * N, D).float()
        cb = self._codebook
        sync = self._sync()
        if self._kmeans_pending:
            self._kmeans_init(flat, sync and self.sync_kmeans)
        embed = cb.embed[0] if self.learnable_codebook else cb.embed[0].detach()
        indices, _ = nearest_code(flat, embed.detach().to(flat.dtype), metric=self.metric)
        quantize = embed.to(flat.dtype)[indices].view(B, N, D)
        if self.training and not freeze and (ema_update or self.threshold_ema_dead_code > 0):
            self._update(flat, indices, ema_update, sync)
        quantize = quantize.to(dtype)
        loss = self.zero
        if self.training:
            commit_quantize = quantize if self.learnable_codebook and not freeze \
                else quantize.detach()
            if input_requires_grad and self.route_gradients_to_input:
                mode = "rotation" if self.rotation_trick else "ste"
                quantize = _straight_through(x.float(), quantize.float(), mode).to(dtype)
            if self.commitment_weight > 0:
                commit_loss = F.mse_loss(commit_quantize, x)
                loss = loss + commit_loss * self.commitment_weight
        quantize = self.project_out(quantize)
        indices = indices.view(B, N)
        if need_transpose:
            quantize = quantize.transpose(1, 2)
        if spatial is not None:
            quantize = quantize.transpose(1, 2).unflatten(2, spatial)
            indices = indices.view(B, *spatial)
        if only_one:
            quantize, indices = quantize[:, 0], indices[:, 0]
        if return_loss_breakdown:
            commitment = loss / self.commitment_weight if self.commitment_weight > 0 else \
                self.zero
            return quantize, indices, loss, LossBreakdown(commitment, self.zero, self.zero,
                                                          self.zero)
        return quantize, indices, loss

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor, sync: bool) -> None:
        cb = self._codebook
        if flat.shape[0] == 0:
            return
        means, counts = _kmeans(flat, self.codebook_size, self.kmeans_iters, self.metric, sync)
        means, counts = means.to(cb.embed_avg.dtype), counts.to(cb.embed_avg.dtype)
        cb.embed_avg[0].copy_(means * counts[:, None])
        cb.cluster_size[0].copy_(counts)
        cb.embed.data[0].copy_(_smoothed_codebook(cb.cluster_size[0], cb.embed_avg[0], self.eps,
                                                  self.metric))
        cb.initted.fill_(True)
        self._kmeans_pending = False

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, ema_update: bool, sync: bool) -> None:
        cb = self._codebook
        counts, sums = _batch_stats(flat, indices, self.codebook_size, sync)
        cluster_size, embed_avg, embed = cb.cluster_size[0], cb.embed_avg[0], cb.embed.data[0]
        cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - self.decay)
        embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - self.decay)
        if ema_update:
            embed.copy_(_smoothed_codebook(cluster_size, embed_avg, self.eps, self.metric))
        if self.threshold_ema_dead_code > 0:
            _restart_dead_codes_(flat, embed, cluster_size, embed_avg,
                                 self.threshold_ema_dead_code, self.threshold_ema_dead_code,
                                 self.metric, sync)


def _is_default(value: Any, default: Any) -> bool:
    """``value`` is the package's default (``None`` only by identity; numbers by value)."""
    if value is default:
        return True
    numbers = (bool, int, float)
    return (isinstance(default, numbers) and isinstance(value, numbers)
            and value == default)


def _reload_dropin_initted(module: nn.Module, incompatible: Any) -> None:
    module._kmeans_pending = not bool(module._codebook.initted)
