"""Training: the loop, KL schedules, evaluation, diagnostics, checkpoints and resume.

``train(...)`` fits a VAE (or a VQ-VAE: ``fastvae.VQVAE``, ``build_vqvae`` arguments with
``"kind": "vqvae"``) with Adam, evaluates after every epoch, and, given ``out_dir``, writes
``checkpoint.safetensors`` (every epoch, atomically), ``metrics.csv`` and ``metrics.json``.
Under ``torch.distributed`` (launched by ``torchrun``) every rank trains on its shard of each
epoch's permutation through DistributedDataParallel and rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models.build import build_vae as build_any
from ..models.vae import VAE, active_units, build_vae
from ..models.vqvae import VQVAE, build_vqvae
from ..ops import validation as check
from . import checkpoint as ckpt_io
from . import data as data_io
from . import graphs, schedules

CHECKPOINT_NAME = "checkpoint.safetensors"


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term became NaN or infinite."""


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``.

    The objective of a step is ``nll + beta_t * kl``, or with ``capacity`` (C_max, nats) the
    capacity objective of Burgess et al. (2018), ``nll + beta_t * |kl - C_t|``, C_t rising
    linearly from 0 to ``capacity`` over ``capacity_steps`` optimizer steps. ``beta_t`` is
    ``beta`` times one schedule (the functions of ``fastvae.training.schedules``, of the
    step t counted from 0), at most one of:

    - ``warmup_epochs`` > 0: a monotonic rise from 0 over that many epochs, of ``beta_shape``
      ``"linear"`` or ``"logistic"``;
    - ``cycles`` > 0: the cyclical schedule of Fu et al. (2019), that many cycles over the
      run, beta rising (``beta_shape``) over the first ``cycle_ratio`` of each;
    - ``beta_schedule``: a callable ``step -> beta`` (finite, >= 0), used as it is (``beta``
      is then ignored; a callable is recorded by name in metrics and checkpoints).

    ``amp``: bfloat16 autocast (on the GPU and on the CPU). ``compile``: the model's forward
    (encoder, fused loss ops, decoder) under ``torch.compile``, for steps whose host overhead
    dominates (small batches): the first step compiles (seconds). ``on_nonfinite``: when a loss term
    or a gradient becomes NaN or infinite, ``"skip"`` the step (every rank skips it) or
    ``"stop"`` with a ``NonFiniteLossError`` naming the step and the term.

    ``cuda_graphs``: on a CUDA device, the VAE step (forward, objective, backward, gradient
    clipping and the finiteness flags) is captured once as a CUDA graph at the first full batch
    and replayed for every batch of ``batch_size`` rows (``fastvae.training.graphs``), for
    models whose step is host-bound (small batches, small networks). The batch is copied into a
    static input, beta_t and C_t enter as device tensors filled before each replay, and the
    noise is a fresh draw per replay, the same as the eager step's; after a replay one host read
    gives the loss terms and the gradient flags, and the checks, ``on_nonfinite``, and Adam's
    step run eagerly as without graphs. A last batch of fewer rows runs the eager step. Same
    semantics as the eager step (the CPU tests run the plumbing with an emulated replay and get
    bitwise the same weights and metrics; the warm-up and the capture draw none of the run's
    noise and leave the model's buffers as they were); ``free_bits`` is a constant of the
    capture. Not with ``compile``, a VQ-VAE (its quantizer's codebook updates and restarts run
    host-side logic), ``torch.distributed`` or a CPU device: ``ValueError`` naming
    ``cuda_graphs``.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    beta: float = 1.0
    warmup_epochs: float = 0.0
    cycles: int = 0
    cycle_ratio: float = 0.5
    beta_shape: str = "linear"
    beta_schedule: Callable[[int], float] | None = None
    capacity: float | None = None
    capacity_steps: int = 0
    free_bits: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    amp: bool = False
    compile: bool = False
    on_nonfinite: str = "stop"
    iwae_samples: int = 1000
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        # integer options: any __index__ integer (numpy's too), kept as Python ints (they go
        # to JSON); bool and float are a TypeError
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("cycles", None),
                              ("capacity_steps", None), ("seed", None), ("iwae_samples", None)):
            setattr(self, name, check.integer(name, getattr(self, name), minimum))
        # "not x > 0" rather than "x <= 0": NaN fails it too.
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        for name in ("beta", "warmup_epochs", "free_bits"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.cycles < 0:
            raise ValueError(f"cycles must be >= 0, got {self.cycles}")
        if not 0 < self.cycle_ratio <= 1:
            raise ValueError(f"cycle_ratio must be in (0, 1], got {self.cycle_ratio}")
        if self.beta_shape not in schedules.SHAPES:
            raise ValueError(f"beta_shape must be one of {', '.join(schedules.SHAPES)}, got "
                             f"{self.beta_shape!r}")
        chosen = [name for name, on in (("warmup_epochs", self.warmup_epochs > 0),
                                        ("cycles", self.cycles > 0),
                                        ("beta_schedule", self.beta_schedule is not None)) if on]
        if len(chosen) > 1:
            raise ValueError(f"choose one KL-weight schedule, got {' and '.join(chosen)}")
        if self.beta_schedule is not None and not callable(self.beta_schedule):
            raise ValueError(f"beta_schedule must be a callable step -> beta, got "
                             f"{type(self.beta_schedule).__name__}")
        if self.capacity is not None and not 0 <= self.capacity < math.inf:
            raise ValueError(f"capacity must be finite and >= 0, got {self.capacity}")
        if self.capacity_steps < 0:
            raise ValueError(f"capacity_steps must be >= 0, got {self.capacity_steps}")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be finite and > 0, got {self.grad_clip}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}")
        if self.iwae_samples < 0:
            raise ValueError("iwae_samples must be >= 0")
        if self.cuda_graphs and self.compile:
            raise ValueError("cuda_graphs and compile cannot be combined: choose one (both cut "
                             "the host overhead of a step)")


def beta_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The KL weight of optimizer step ``step`` (counted from 0), with ``steps_per_epoch``
    steps in an epoch (of one rank)."""
    if config.beta_schedule is not None:
        value = float(config.beta_schedule(step))
        if not 0 <= value < math.inf:
            raise ValueError(f"beta_schedule({step}) must be finite and >= 0, got {value}")
        return value
    if config.cycles > 0:
        return config.beta * schedules.cyclical(step, config.epochs * steps_per_epoch,
                                                config.cycles, config.cycle_ratio,
                                                config.beta_shape)
    return config.beta * schedules.monotonic(step, config.warmup_epochs * steps_per_epoch,
                                             config.beta_shape)


def capacity_at(config: TrainConfig, step: int) -> float | None:
    """The capacity objective's KL target C (nats) at step ``step``; None without it."""
    if config.capacity is None:
        return None
    return schedules.capacity(step, config.capacity, config.capacity_steps)


def objective(out, beta: float, capacity: float | None) -> Tensor:
    """The loss of a step from the model's output: ``out.loss`` (``nll + beta * kl``), or
    with a capacity C, ``nll + beta * |kl - C|``."""
    return out.loss if capacity is None else out.nll + beta * (out.kl - capacity).abs()


def config_record(config: TrainConfig) -> dict[str, Any]:
    """``config`` as JSON values (a callable schedule by its name), as metrics and checkpoints
    record it."""
    record = {f.name: getattr(config, f.name) for f in fields(config)}
    fn = record["beta_schedule"]
    if fn is not None:
        record["beta_schedule"] = (f"callable {getattr(fn, '__module__', '?')}."
                                   f"{getattr(fn, '__qualname__', type(fn).__qualname__)}")
    return record


@dataclass
class EpochMetrics:
    epoch: int
    step: int
    beta: float
    train_loss: float
    train_nll: float
    train_kl: float
    val_elbo: float
    val_nll: float
    val_kl: float
    active_units: int
    skipped_steps: int
    seconds: float
    lr: float = math.nan
    capacity: float = math.nan


@dataclass
class VQEpochMetrics:
    """One epoch of a VQ-VAE: the training means (loss = nll + vq_loss, nats per example and
    the quantizer's loss, a mean over elements), the validation metrics of ``evaluate_vq``, and
    the codebook over the epoch's training batches (all ranks): ``usage`` the fraction of the
    K codes chosen at least once, ``perplexity`` exp of the entropy of their histogram,
    ``restarts`` the dead codes restarted in the epoch. With a residual VQ of L levels,
    ``usage``, ``perplexity``, ``val_usage`` and ``val_perplexity`` are lists, one value per
    level (``metrics.csv`` spreads them over the columns ``usage_l0`` ... ``usage_l{L-1}``)."""

    epoch: int
    step: int
    train_loss: float
    train_nll: float
    train_vq_loss: float
    val_loss: float
    val_nll: float
    val_commitment_loss: float
    val_codebook_loss: float
    val_usage: float | list[float]
    val_perplexity: float | list[float]
    usage: float | list[float]
    perplexity: float | list[float]
    restarts: int
    skipped_steps: int
    seconds: float
    lr: float = math.nan


@dataclass
class TrainResult:
    model: VAE | VQVAE
    history: list[EpochMetrics] | list[VQEpochMetrics] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    resumed: dict[str, Any] | None = None  # checkpoint, epoch and the settings that changed


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model: VAE, data: Tensor, batch_size: int = 512, *, iwae_samples: int = 0,
             seed: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Mean negative ELBO (beta = 1, one posterior sample per example), reconstruction NLL and
    KL per example; active units (Burda et al. 2016: Var_x E_q[z_d] > 0.01) and
    per-dimension KL; with ``iwae_samples`` K > 0 the IWAE bound of Burda et al. (2016),
    ``log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]``, the mean over ``data`` of
    ``model.log_likelihood(x, K)`` (streamed over K in chunks: K = 5000 fits in memory).

    ``data``: ``(n, *input_shape)`` on any device, evaluated in batches of ``batch_size`` on
    the model's. ``seed``: the noise comes from torch's generator seeded with it (and the
    caller's generator state is left as it was), so that the same model, data, seed,
    ``batch_size`` and device give the same numbers: ``fastvae train``'s final metrics use the
    training seed, and ``fastvae eval`` reproduces them. ``progress``: a tqdm bar over the
    importance samples (or the images, without IWAE)."""
    batch_size = check.integer("batch_size", batch_size, 1)
    iwae_samples = check.integer("iwae_samples", iwae_samples, 0)
    model.eval()
    device = next(model.parameters()).device
    n = data.shape[0]
    forked = (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
              if seed is not None else contextlib.nullcontext())
    with forked, _eval_bar(n, iwae_samples, progress) as bar:
        if seed is not None:
            torch.manual_seed(seed)
        totals = {"nll": 0.0, "kl": 0.0}
        mus, kl_dims, ll = [], [], []
        for start in range(0, n, batch_size):
            x = data[start:start + batch_size].to(device)
            out = model(x, beta=1.0, free_bits=0.0, reduction="sum")
            totals["nll"] += float(out.nll)
            totals["kl"] += float(out.kl)
            mus.append(out.mu.float().cpu())
            kl_dims.append(model.kl_per_dimension(x).double().cpu() * x.shape[0])
            if iwae_samples > 0:
                rows = x.shape[0]
                ll.append(model.log_likelihood(
                    x, iwae_samples, on_chunk=lambda k, rows=rows: bar.update(k * rows)
                ).double().cpu())
            else:
                bar.update(x.shape[0])
    n_active, _ = active_units(torch.cat(mus))
    result: dict[str, Any] = {
        "elbo": -(totals["nll"] + totals["kl"]) / n,
        "nll": totals["nll"] / n,
        "kl": totals["kl"] / n,
        "active_units": n_active,
        "kl_per_dim": (torch.stack(kl_dims).sum(0) / n).flatten().tolist(),
    }
    if ll:
        result["iwae_log_likelihood"] = float(torch.cat(ll).mean())
        result["iwae_samples"] = iwae_samples
    return result


def _eval_bar(n: int, iwae_samples: int, progress: bool):
    from tqdm.auto import tqdm

    if iwae_samples > 0:
        return tqdm(total=n * iwae_samples, unit="sample", unit_scale=True,
                    desc=f"IWAE K={iwae_samples}", disable=not progress)
    return tqdm(total=n, unit="image", desc="eval", disable=not progress)


def code_usage(counts: Tensor, codebook_size: int | None = None) -> tuple[float, float]:
    """``(usage, perplexity)`` of a code histogram ``counts (K,)``: the fraction of the K codes
    counted at least once, and ``exp(H(p))`` of ``p = counts / sum`` (between 1 and K; 0 for an
    empty histogram). ``codebook_size``: K when ``counts`` holds only some of the codes' counts
    (the used ones, of an implicit codebook too large to count densely)."""
    counts = counts.double().cpu()
    total = float(counts.sum())
    if total <= 0:
        return 0.0, 0.0
    K = counts.numel() if codebook_size is None else codebook_size
    p = counts / total
    return (float((counts > 0).sum()) / K,
            float(torch.exp(-torch.special.xlogy(p, p).sum())))


# Above this many counters (levels x codes), CodeCounter keeps the indices of the used codes
# instead of a dense histogram (FSQ's and LFQ's implicit codebooks reach 2^32 codes and more).
DENSE_COUNTS = 1 << 22


class CodeCounter:
    """The code histogram of each level of a quantizer, over the indices ``add``-ed: ``(...)``
    or, with ``levels`` L > 1, ``(..., L)``. Dense ``(L, K)`` counts on the indices' device
    (a ``bincount`` per call, no host sync) while ``L * K <= DENSE_COUNTS``; else the indices
    are kept and counted by ``torch.unique`` when read (memory O(positions), not O(K))."""

    def __init__(self, levels: int, codebook_size: int, device: torch.device | str) -> None:
        self.levels, self.codebook_size = levels, codebook_size
        self.dense = levels * codebook_size <= DENSE_COUNTS
        self._counts = (torch.zeros(levels * codebook_size, dtype=torch.int64, device=device)
                        if self.dense else None)
        self._kept: list[Tensor] = []
        self._offsets = torch.arange(levels, device=device) * codebook_size

    def add(self, indices: Tensor) -> None:
        rows = indices.reshape(-1, self.levels)
        if self._counts is not None:
            self._counts += torch.bincount((rows + self._offsets).flatten(),
                                           minlength=self._counts.numel())
        else:
            self._kept.append(rows.detach())

    def all_reduce(self) -> None:
        """Sum the histograms of every rank (each rank must call it)."""
        if self._counts is not None:
            dist.all_reduce(self._counts)
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._rows().cpu())
        self._kept = [torch.cat(gathered)]

    def _rows(self) -> Tensor:
        device = self._offsets.device
        return (torch.cat(self._kept) if self._kept else
                torch.zeros(0, self.levels, dtype=torch.int64, device=device))

    def counts(self) -> list[Tensor]:
        """Per level, on the CPU: the dense ``(K,)`` histogram, or (past ``DENSE_COUNTS``) the
        counts of the codes used, in code order."""
        if self._counts is not None:
            return list(self._counts.cpu().view(self.levels, self.codebook_size))
        rows = self._rows().cpu()
        return [torch.unique(rows[:, level], return_counts=True)[1]
                for level in range(self.levels)]

    def dense_counts(self) -> Tensor | None:
        """The ``(L, K)`` histogram on the CPU, None past ``DENSE_COUNTS``."""
        return None if self._counts is None else \
            self._counts.cpu().view(self.levels, self.codebook_size)

    def stats(self) -> dict[str, Any]:
        """``usage``, ``perplexity`` and ``codes_used``: numbers, or lists of one per level
        for more than one level."""
        per_level = [(*code_usage(c, self.codebook_size), int((c > 0).sum()))
                     for c in self.counts()]
        names = ("usage", "perplexity", "codes_used")
        if self.levels == 1:
            return dict(zip(names, per_level[0], strict=True))
        return {name: [level[i] for level in per_level] for i, name in enumerate(names)}


@torch.no_grad()
def code_counts(model: VQVAE, data: Tensor, batch_size: int = 512) -> CodeCounter:
    """How often each code (of each level) is the nearest code of a position of ``data``'s
    encodings (evaluation mode: the codebook is not updated)."""
    batch_size = check.integer("batch_size", batch_size, 1)
    model.eval()
    device = next(model.parameters()).device
    counter = CodeCounter(model.num_levels, model.codebook_size, device)
    for start in range(0, data.shape[0], batch_size):
        counter.add(model.encode_indices(data[start:start + batch_size].to(device)))
    return counter


@torch.no_grad()
def evaluate_vq(model: VQVAE, data: Tensor, batch_size: int = 512, *,
                progress: bool = False) -> dict[str, Any]:
    """A VQ-VAE's held-out metrics (deterministic: no noise): per example the reconstruction
    NLL (nats) and ``loss = nll + vq_loss`` (the training objective: the quantizer's ``loss``,
    e.g. the commitment loss with an EMA codebook, plus the codebook loss with a learned one,
    plus LFQ's entropy loss); the commitment loss ``beta ||z_e - sg(q)||^2`` and the codebook
    loss ``||sg(z_e) - q||^2`` (means over elements, van den Oord et al. 2017; summed over the
    levels of a residual VQ); and the
    codebook usage on ``data``: ``usage`` (the fraction of the K codes that are some
    position's nearest code), ``codes_used``, ``perplexity`` (``exp H`` of the code
    histogram), lists of one value per level for a residual VQ."""
    from tqdm.auto import tqdm

    batch_size = check.integer("batch_size", batch_size, 1)
    model.eval()
    device = next(model.parameters()).device
    n = data.shape[0]
    nll = vq_loss = commitment = codebook = 0.0
    counter = CodeCounter(model.num_levels, model.codebook_size, device)
    with tqdm(total=n, unit="image", desc="eval", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            x = data[start:start + batch_size].to(device)
            q = model.quantize(model.encode(x))
            nll += float(model.nll(model.decode(q.quantized), x, "sum"))
            vq_loss += float(q.loss) * x.shape[0]
            # a residual VQ's are per level (L,): their sum is the quantizer's
            commitment += float(q.commitment_loss.sum()) * x.shape[0]
            codebook += float(q.codebook_loss.sum()) * x.shape[0]
            counter.add(q.indices)
            bar.update(x.shape[0])
    stats = counter.stats()
    return {"loss": (nll + vq_loss) / n, "nll": nll / n, "vq_loss": vq_loss / n,
            "commitment_loss": commitment / n, "codebook_loss": codebook / n,
            "usage": stats["usage"], "codes_used": stats["codes_used"],
            "codebook_size": model.codebook_size, "num_levels": model.num_levels,
            "perplexity": stats["perplexity"]}


_TERMS = ("loss", "reconstruction NLL", "KL")
_VQ_TERMS = ("loss", "reconstruction NLL", "VQ loss")


def _nonfinite_terms(values: Tensor, world: int, device: torch.device,
                     terms: tuple[str, ...] = _TERMS) -> str | None:
    """None when the step's loss terms (loss, NLL, KL or VQ loss: ``terms``) are finite on
    every rank, else what went non-finite. Ranks agree (one all-reduce) so that they skip or
    stop together: a rank that skipped its backward while the others ran theirs would hang
    DistributedDataParallel."""
    finite = torch.isfinite(values)
    if world > 1:
        flags = finite.to(device=device, dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        everywhere = flags.cpu().bool().tolist()
        if all(everywhere):
            return None
        if bool(finite.all()):
            names = [n for n, ok in zip(terms[1:], everywhere[1:], strict=True) if not ok]
            return f"the {' and the '.join(names or ['loss'])} became non-finite on another rank"
    elif bool(finite.all()):
        return None
    # The loss is nll + beta * kl (or nll + vq_loss): name the parts that broke, with values.
    parts = [f"the {name} ({value:g})" for name, value, ok in
             zip(terms[1:], values[1:].tolist(), finite[1:].tolist(), strict=True) if not ok]
    return (" and ".join(parts) or f"the loss ({values[0].item():g})") + " became non-finite"


def _nonfinite_gradient(model: nn.Module, clip: float | None) -> str | None:
    """Clip the gradients to norm ``clip`` when given; None when every gradient is finite, else
    which parameter's is not."""
    names, finite = _gradient_flags(model, clip)
    return _gradient_verdict(names, finite.cpu())


def _gradient_flags(model: nn.Module, clip: float | None) -> tuple[list[str], Tensor]:
    """The device half of ``_nonfinite_gradient`` (no host sync: it can be captured in a CUDA
    graph): clip the gradients to norm ``clip`` when given; the names of the parameters that
    have a gradient and a bool tensor ``(P,)`` on their device, True where it is finite."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return [], torch.ones(0, dtype=torch.bool)
    if clip is not None:
        nn.utils.clip_grad_norm_([p for _, p in named], clip)
    return [n for n, _ in named], torch.stack([torch.isfinite(p.grad).all() for _, p in named])


def _gradient_verdict(names: list[str], finite: Tensor) -> str | None:
    """The host half of ``_nonfinite_gradient``: None when every flag of ``finite`` (a CPU
    bool tensor, one per name) is set, else which parameter's gradient is not finite."""
    if bool(finite.all()):
        return None
    first = names[int((~finite).nonzero()[0])]
    more = int((~finite).sum()) - 1
    return (f"the gradient of {first}" + (f" (and of {more} more parameters)" if more else "")
            + " became non-finite, the loss terms did not")


def _epoch_seed(config: TrainConfig, epoch: int) -> int:
    """Every epoch reseeds from (seed, epoch): a resumed run draws what an uninterrupted one
    would, with no RNG state in the checkpoint."""
    return config.seed * 1_000_003 + epoch


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row for ``metrics.csv``: a list value (one per level of a residual VQ) spread
    over the columns ``<name>_l0``, ``<name>_l1``, ..."""
    flat: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, list):
            flat.update((f"{name}_l{i}", v) for i, v in enumerate(value))
        else:
            flat[name] = value
    return flat


def _write_metrics(out_dir: Path, history: list[EpochMetrics], extra: dict[str, Any]) -> None:
    """metrics.csv and metrics.json, each written atomically (as the checkpoint)."""
    rows = [asdict(m) for m in history]
    table = io.StringIO(newline="")
    flat = [csv_row(r) for r in rows]
    writer = csv.DictWriter(table, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    ckpt_io.atomic_write(out_dir / "metrics.csv", table.getvalue().encode())
    ckpt_io.atomic_write(out_dir / "metrics.json",
                         json.dumps({**extra, "history": rows}, indent=2).encode())


def train(model: dict[str, Any] | VAE | VQVAE, train_data: Tensor, val_data: Tensor,
          config: TrainConfig, *, device: str | torch.device = "cpu",
          out_dir: str | Path | None = None, resume: str | Path | None = None,
          progress: bool = True, data_record: dict[str, Any] | None = None) -> TrainResult:
    """Train a VAE on ``train_data`` (``(n, *input_shape)`` images in [0, 1]).

    ``model``: keyword arguments of ``build_vae`` (built here, initial weights from
    ``config.seed``; its checkpoint rebuilds it with ``checkpoint.load_vae``), or of
    ``build_vqvae`` with ``"kind": "vqvae"`` (a VQ-VAE: recorded with its kind), or a ``VAE`` or
    ``VQVAE`` built by the caller, trained in place (its checkpoint holds the weights under an
    empty config).

    A VQ-VAE minimizes ``nll + vq_loss`` (``VQVAE.forward``; the KL settings of ``config``,
    ``beta`` to ``free_bits``, and ``iwae_samples`` do not apply to it); its history is
    ``VQEpochMetrics`` (codebook usage, perplexity and restarts per epoch) and its final
    metrics are ``evaluate_vq``.

    ``resume``: a checkpoint written by an earlier run with the same model and configs;
    training goes on from its epoch to the same result as an uninterrupted run. The settings
    passed now are the ones used and recorded (a new ``config.lr`` replaces the checkpoint's in
    the restored optimizer; ``metrics.json`` lists what changed under ``"resumed"``); only a
    checkpoint of another model (its shape, architecture, latent size or likelihood) is
    refused, with a ``CheckpointError`` naming the fields that differ.

    ``train_data`` and ``val_data``: tensors or arrays ``(n, *input_shape)``; floating point
    data are used as they are, bool and uint8 images are scaled to [0, 1] (by 1 and 255),
    other integer types are refused (scale them with ``fastvae.training.data.to_images(x,
    pixel_max=...)``). With ``build_vae`` arguments, the images' shape must be
    ``input_shape``.

    ``data_record``: JSON values that say where the data came from (``fastvae train`` records
    the source, its options, the validation fraction and the split's seed), kept in the
    checkpoint and ``metrics.json`` under ``"data"``: ``fastvae eval`` rebuilds the validation
    set from it. The final metrics (``result.final``) are ``evaluate`` with
    ``seed=config.seed``.
    """
    rank, world = _distributed()
    device = torch.device(device)
    model, model_config = _build(model, config.seed)
    shape = model_config.get("input_shape")
    train_data = data_io.as_training_data(train_data, "train_data", shape)
    val_data = data_io.as_training_data(val_data, "val_data", shape or train_data.shape[1:])
    if model.likelihood == "bernoulli":
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            data_io.check_unit_range(data, name, " for a Bernoulli likelihood (rescale them, "
                                     "or train with likelihood 'gaussian')")
    if model.likelihood == "dmol":
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            data_io.check_unit_range(data, name, " for the mixture of logistics")
            data_io.check_grid(data, model.n_bins, name)
    vq = isinstance(model, VQVAE)
    if config.cuda_graphs:
        _check_cuda_graphs(model, device, world, train_data.shape[0], config.batch_size)
    if rank == 0 and not vq:
        _warn_collapse(model, train_data)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(train_data.shape[0] / world / config.batch_size)
    start_epoch, history, step = 0, [], 0
    files: dict[str, Any] = {"model_config": model_config, "train_config": config_record(config)}
    if data_record is not None:
        files["data"] = json.loads(json.dumps(data_record))
    if resume is not None:
        start_epoch, history, files["resumed"] = _resume(resume, model, model_config,
                                                         optimizer, config)
        step = history[-1].step if history else start_epoch * steps_per_epoch
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)  # checkpoints keep saving `model`, the uncompiled module
    graphed = _GraphedVAEStep(net, model, config, device) if config.cuda_graphs else None
    out_path = Path(out_dir) if out_dir is not None and rank == 0 else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    try:
        bar = _progress_bar(config, start_epoch) if progress and rank == 0 else None
        t_start = time.perf_counter()
        for epoch in range(start_epoch, config.epochs):
            t_epoch = time.perf_counter()
            if vq:
                step, metrics = _train_vq_epoch(net, model, optimizer, train_data, val_data,
                                                config, epoch, step, device)
                metrics.seconds = time.perf_counter() - t_epoch
            else:
                step, train_means, beta, capacity, skipped = _train_epoch(
                    net, model, optimizer, train_data, config, epoch, step, steps_per_epoch,
                    device, graphed)
                val = evaluate(model, val_data) if rank == 0 else {}
                metrics = EpochMetrics(
                    epoch=epoch + 1, step=step, beta=beta, train_loss=train_means[0],
                    train_nll=train_means[1], train_kl=train_means[2],
                    val_elbo=val.get("elbo", math.nan), val_nll=val.get("nll", math.nan),
                    val_kl=val.get("kl", math.nan), active_units=val.get("active_units", 0),
                    skipped_steps=skipped, seconds=time.perf_counter() - t_epoch,
                    lr=optimizer.param_groups[0]["lr"],
                    capacity=math.nan if capacity is None else capacity)
            history.append(metrics)
            if bar is not None:
                (_show_vq if vq else _show)(bar, metrics)
            if out_path is not None:
                _save(out_path, model, optimizer, history, files)
                _write_metrics(out_path, history, files)
        if bar is not None:
            bar.close()
    finally:
        if world > 1:
            # DistributedDataParallel's reducer stays reachable through reference cycles. Left
            # to the interpreter's exit, after the caller's destroy_process_group, freeing it
            # aborts the process ("terminate called without an active exception"), now and
            # then: free it here, while the process group lives.
            del net
            gc.collect()

    result = TrainResult(model, history, resumed=files.get("resumed"))
    if rank == 0:
        result.final = (evaluate_vq(model, val_data, progress=progress) if vq else
                        evaluate(model, val_data, iwae_samples=config.iwae_samples,
                                 seed=config.seed, progress=progress))
        result.final["train_seconds"] = time.perf_counter() - t_start
        if out_path is not None:
            _write_metrics(out_path, history, {**files, "final": result.final})
    return result


def _warn_collapse(model: VAE, train_data: Tensor) -> None:
    """Warn when a fixed Gaussian likelihood's standard deviation is as large as the data's
    whole spread: its reconstruction term is then too weak against the KL and the posterior
    collapses (std 1 on digits in [0, 1]: 0 of 8 active units)."""
    if model.likelihood != "gaussian" or isinstance(model.obs_logvar, nn.Parameter):
        return
    obs_std = math.exp(model.obs_logvar / 2)
    data_std = float(train_data.float().std())
    if obs_std >= data_std:
        warnings.warn(f"the Gaussian likelihood's standard deviation {obs_std:.3g} "
                      f"(obs_logvar {model.obs_logvar:g}) is as large as the data's "
                      f"{data_std:.3g}: the posterior will likely collapse (no active units); "
                      f"use a smaller obs_logvar (e.g. {2 * math.log(data_std / 3):.1f}, a "
                      "third of the data's std; -4 for pixels in [0, 1]) or likelihood "
                      "'gaussian_learned'", UserWarning, stacklevel=3)


def _build(model: dict[str, Any] | VAE | VQVAE, seed: int
           ) -> tuple[VAE | VQVAE, dict[str, Any]]:
    """The model and the build_vae (or, with ``"kind": "vqvae"``, build_vqvae) arguments its
    checkpoint records (empty for a model built by the caller)."""
    torch.manual_seed(seed)  # the initial weights, equal on every rank
    if isinstance(model, (VAE, VQVAE)):
        return model, {}
    if isinstance(model, dict):
        kind = model.get("kind", "vae")
        if kind == "vqvae":
            return build_vqvae(**{k: v for k, v in model.items() if k != "kind"}), model
        if kind != "vae":
            raise ValueError(f"model['kind'] must be 'vae' or 'vqvae', got {kind!r}")
        rest = {k: v for k, v in model.items() if k != "kind"}
        if rest.get("quantizer") is not None:
            # fv.build_vae(..., quantizer="vq"): a VQ-VAE, recorded as one
            built = build_any(**rest)
            return built, {"kind": "vqvae", **built.build_config}
        return build_vae(**rest), model
    raise TypeError(f"model must be a fastvae.VAE, a fastvae.VQVAE or a dict of build_vae "
                    f"arguments, got {type(model).__name__}")


# build_vae arguments that make another network: a checkpoint that differs in one of them is
# another model. The others (obs_logvar, logvar_limit, beta, free_bits) are settings: the
# caller's are used.
MODEL_FIELDS = ("input_shape", "latent_dim", "arch", "hidden", "likelihood")
# the same for a VQ-VAE (build_vqvae arguments; "kind" tells a VAE from a VQ-VAE)
VQ_MODEL_FIELDS = ("kind", "input_shape", "quantizer", "codebook_size", "codebook_dim",
                   "num_tokens", "arch", "hidden", "likelihood", "levels", "num_quantizers")


def _resolved(model_config: dict[str, Any]) -> dict[str, Any]:
    """The build_vae arguments with their defaults, as JSON values (a tuple and a list of the
    same numbers are equal)."""
    import inspect

    kind = model_config.get("kind", "vae")
    build = build_vqvae if kind == "vqvae" else build_vae
    defaults = {name: p.default for name, p in inspect.signature(build).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return json.loads(json.dumps({**defaults, "kind": kind, **model_config}))


def _changes(old: dict[str, Any], new: dict[str, Any], names) -> dict[str, dict[str, Any]]:
    return {name: {"checkpoint": old.get(name), "now": new.get(name)} for name in names
            if old.get(name) != new.get(name)}


def _resume(path: str | Path, model: VAE | VQVAE, model_config: dict[str, Any],
            optimizer: torch.optim.Optimizer,
            config: TrainConfig) -> tuple[int, list[Any], dict[str, Any]]:
    """Load a checkpoint into the model and the optimizer, the caller's learning rate set in
    the optimizer: the epochs done, their metrics, and a record of the resume (the settings
    that changed). A checkpoint of another model is a CheckpointError naming the fields."""
    saved = ckpt_io.load(path)
    if bool(saved.model_config) != bool(model_config):
        raise ckpt_io.CheckpointError(
            f"{path} holds a model with another configuration: "
            f"{saved.model_config or 'a model built by the caller'}, not "
            f"{model_config or 'a model built by the caller'}")
    model_changes: dict[str, dict[str, Any]] = {}
    if model_config:
        old, new = _resolved(saved.model_config), _resolved(model_config)
        fields_of = VQ_MODEL_FIELDS if "vqvae" in (old["kind"], new["kind"]) else MODEL_FIELDS
        mismatch = _changes(old, new, fields_of)
        if mismatch:
            fields_ = "; ".join(f"{k}: {v['checkpoint']} in the checkpoint, {v['now']} now"
                                for k, v in mismatch.items())
            raise ckpt_io.CheckpointError(f"{path} holds a model with another configuration "
                                          f"({fields_})")
        model_changes = _changes(old, new, sorted(set(old) | set(new)))
    try:
        model.load_state_dict(saved.model_state)
    except RuntimeError as e:
        raise ckpt_io.CheckpointError(f"{path} holds weights of another model: "
                                      f"{str(e).splitlines()[0]}") from e
    if saved.optimizer_state is not None:
        optimizer.load_state_dict(saved.optimizer_state)
        for group in optimizer.param_groups:  # the restored state carries the old rate
            group["lr"] = config.lr
    metrics_class = VQEpochMetrics if isinstance(model, VQVAE) else EpochMetrics
    try:
        history = [metrics_class(**m) for m in saved.trainer_state.get("history", [])]
    except TypeError as e:
        raise ckpt_io.CheckpointError(f"{path} holds the history of another kind of model: "
                                      f"{e}") from e
    epoch = int(saved.trainer_state.get("epoch", 0))
    old_config = saved.trainer_state.get("train_config") or {}
    new_config = json.loads(json.dumps(config_record(config)))
    changed = {**model_changes,
               **_changes(old_config, new_config, [k for k in new_config if k in old_config])}
    return epoch, history, {"checkpoint": str(path), "epoch": epoch, "changed": changed}


def _progress_bar(config: TrainConfig, start_epoch: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.epochs, initial=start_epoch, unit="epoch", desc="train")


def _show(bar, metrics: EpochMetrics) -> None:
    bar.set_postfix(loss=f"{metrics.train_loss:.3f}", val_elbo=f"{metrics.val_elbo:.3f}",
                    kl=f"{metrics.val_kl:.2f}", au=metrics.active_units)
    bar.update(1)


def _train_epoch(net: nn.Module, model: VAE, optimizer: torch.optim.Optimizer,
                 train_data: Tensor, config: TrainConfig, epoch: int, step: int,
                 steps_per_epoch: int, device: torch.device,
                 graphed: _GraphedVAEStep | None = None
                 ) -> tuple[int, list[float], float, float | None, int]:
    """One pass over this rank's shard of the epoch's permutation. Returns the step count
    after it, the mean (loss, NLL, KL) per example of the steps taken (NaN when every step was
    skipped), the last beta and capacity, and the number of steps skipped for non-finite
    values. ``graphed``: the CUDA-graph step that runs every batch of ``batch_size`` rows
    (``cuda_graphs``); the checks, the skip or stop and the optimizer step are the same."""
    rank, world = _distributed()
    model.train()
    seed = _epoch_seed(config, epoch)
    shuffle = torch.Generator().manual_seed(seed)  # the same permutation on every rank
    torch.manual_seed(seed + 7919 * rank)  # each rank its own noise
    order = torch.randperm(train_data.shape[0], generator=shuffle)[rank::world]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.amp
                else contextlib.nullcontext())
    sums = torch.zeros(3, dtype=torch.float64)
    seen = skipped = 0
    beta, capacity = config.beta, None
    for i in range(0, order.numel(), config.batch_size):
        rows = order[i:i + config.batch_size]
        beta = beta_at(config, step, steps_per_epoch)
        capacity = capacity_at(config, step)
        step += 1
        if graphed is not None and rows.numel() == config.batch_size:
            values, bad = graphed(train_data[rows], beta, capacity)
        else:  # without graphs, and the last batch of fewer rows with them
            x = train_data[rows].to(device, non_blocking=True)
            with autocast:
                out = net(x, beta=beta, free_bits=config.free_bits)
            loss = objective(out, beta, capacity)
            values = torch.stack([loss, out.nll, out.kl]).detach().double().cpu()
            bad = _nonfinite_terms(values, world, device)
            if bad is None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # Gradients (all-reduced across ranks by now) can overflow where the loss does
                # not; a step with them would make every weight NaN.
                bad = _nonfinite_gradient(model, config.grad_clip)
        if bad is not None:
            if config.on_nonfinite == "stop":
                raise NonFiniteLossError(f"step {step} (epoch {epoch + 1}): {bad}; lower the "
                                         "learning rate, clip gradients, soft-clamp the "
                                         "log-variance (logvar_limit), or skip such steps "
                                         "(on_nonfinite='skip')")
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        optimizer.step()
        sums += values * rows.numel()
        seen += rows.numel()
    means = (sums / seen).tolist() if seen else [math.nan] * 3
    return step, means, beta, capacity, skipped


# Tests set it to run ``cuda_graphs`` on the CPU with an emulated replay (GraphedStep's
# ``emulate``): the plumbing runs as on a GPU, the replay is an eager re-run.
EMULATE_GRAPHS = False


def _check_cuda_graphs(model: VAE | VQVAE, device: torch.device, world: int,
                       train_rows: int | None = None, batch_size: int | None = None) -> None:
    """``cuda_graphs``: a ValueError naming it for what it cannot serve."""
    if isinstance(model, VQVAE):
        raise ValueError("cuda_graphs applies to a VAE, not a VQ-VAE: its quantizer updates the "
                         "codebook (EMA, k-means initialisation, dead-code restarts) with "
                         "host-side logic in the forward, which a CUDA graph cannot replay")
    if world > 1:
        raise ValueError("cuda_graphs is not supported under torch.distributed "
                         "(DistributedDataParallel's gradient all-reduce and the ranks' "
                         "agreement to skip a step are not captured): train without it")
    if device.type != "cuda" and not EMULATE_GRAPHS:
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    if train_rows is not None and batch_size is not None and train_rows < batch_size:
        # the graph serves full batches only (the last partial one runs eagerly): with none,
        # every step would run eagerly while the run says it is graphed
        raise ValueError(f"cuda_graphs: the training set has {train_rows} rows, fewer than "
                         f"one batch of {batch_size}, so no step would be captured: lower "
                         "the batch size or train without it")


class _GraphedVAEStep:
    """The VAE step of ``_train_epoch`` as a ``GraphedStep``: forward, objective, backward,
    gradient clipping and finiteness flags, on static buffers. ``__call__(batch, beta,
    capacity)`` copies the batch (``batch_size`` rows) into the static input and fills the 0-d
    beta and capacity tensors (in the model's floating dtype, at least float32: what a Python
    float becomes in the eager step's arithmetic), replays, and reads the report
    ``(loss, nll, kl, finite flag of each gradient)`` in one host read; it returns the float64
    (loss, NLL, KL) on the CPU and what went non-finite (None when nothing did), as the eager
    step's checks would."""

    def __init__(self, net: nn.Module, model: VAE, config: TrainConfig,
                 device: torch.device) -> None:
        self.net, self.model, self.config, self.device = net, model, config, device
        dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        self.beta = torch.zeros((), dtype=dtype, device=device)
        self.capacity = (torch.zeros((), dtype=dtype, device=device)
                         if config.capacity is not None else None)
        self.x: Tensor | None = None  # made at the first batch, in its shape and dtype
        self.names: list[str] = []
        self.step = graphs.GraphedStep(self._forward_backward, list(model.parameters()), device,
                                       buffers=list(model.buffers()),
                                       emulate=device.type != "cuda")

    def _forward_backward(self) -> Tensor:
        # autocast's cast cache must be off in a capture (torch.cuda.make_graphed_callables)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
                    if self.config.amp else contextlib.nullcontext())
        with autocast:
            out = self.net(self.x, beta=self.beta, free_bits=self.config.free_bits)
        loss = objective(out, self.beta, self.capacity)
        values = torch.stack([loss, out.nll, out.kl]).detach().double()
        loss.backward()
        self.names, finite = _gradient_flags(self.model, self.config.grad_clip)
        return torch.cat([values, finite.double()]) if self.names else values

    def __call__(self, batch: Tensor, beta: float, capacity: float | None
                 ) -> tuple[Tensor, str | None]:
        if self.x is None:
            self.x = torch.empty_like(batch, device=self.device)
        self.x.copy_(batch, non_blocking=True)
        self.beta.fill_(beta)
        if self.capacity is not None:
            self.capacity.fill_(capacity)
        report = self.step.replay().cpu()
        values = report[:3]
        bad = _nonfinite_terms(values, 1, self.device)
        if bad is None:
            bad = _gradient_verdict(self.names, report[3:].bool())
        return values, bad


def _per_level(value: float | list[float], spec: str) -> str:
    values = value if isinstance(value, list) else [value]
    return "/".join(format(v, spec) for v in values)


def _show_vq(bar, metrics: VQEpochMetrics) -> None:
    bar.set_postfix(loss=f"{metrics.train_loss:.3f}", val_nll=f"{metrics.val_nll:.3f}",
                    usage=_per_level(metrics.usage, ".2f"),
                    ppl=_per_level(metrics.perplexity, ".1f"))
    bar.update(1)


def _train_vq_epoch(net: nn.Module, model: VQVAE, optimizer: torch.optim.Optimizer,
                    train_data: Tensor, val_data: Tensor, config: TrainConfig, epoch: int,
                    step: int, device: torch.device) -> tuple[int, VQEpochMetrics]:
    """One pass of a VQ-VAE over this rank's shard of the epoch's permutation (the loop of
    ``_train_epoch``, on ``nll + vq_loss``), then its metrics: the code histogram of the
    epoch's steps (all ranks: one all-reduce, reached by every rank), the restarts and, on rank
    0, ``evaluate_vq`` on ``val_data``. ``seconds`` is left for the caller."""
    rank, world = _distributed()
    model.train()
    seed = _epoch_seed(config, epoch)
    shuffle = torch.Generator().manual_seed(seed)  # the same permutation on every rank
    torch.manual_seed(seed)  # restarts draw rank 0's randomness (broadcast by the quantizer)
    order = torch.randperm(train_data.shape[0], generator=shuffle)
    if world > 1:
        # The quantizer's collectives (k-means, restarts) need batches of one size on every
        # rank: pad the permutation with its first indices to a multiple of the world size,
        # as DistributedSampler does.
        order = torch.cat([order, order[:-order.numel() % world]])
    order = order[rank::world]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.amp
                else contextlib.nullcontext())
    counter = CodeCounter(model.num_levels, model.codebook_size, device)
    restarts_before = int(model.quantizer.restarts)
    sums = torch.zeros(3, dtype=torch.float64)
    seen = skipped = 0
    for i in range(0, order.numel(), config.batch_size):
        x = train_data[order[i:i + config.batch_size]].to(device, non_blocking=True)
        # The quantizer updates its codebook in the forward: a step to be skipped must not
        # leave it changed (non-finite encodings would poison the EMA for good).
        before = ({k: v.clone() for k, v in model.quantizer.state_dict().items()}
                  if config.on_nonfinite == "skip" else None)
        with autocast:
            out = net(x)
        step += 1
        values = torch.stack([out.loss, out.nll, out.vq_loss]).detach().double().cpu()
        bad = _nonfinite_terms(values, world, device, _VQ_TERMS)
        if bad is None:
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            bad = _nonfinite_gradient(model, config.grad_clip)
        if bad is not None:
            if config.on_nonfinite == "stop":
                raise NonFiniteLossError(f"step {step} (epoch {epoch + 1}): {bad}; lower the "
                                         "learning rate, clip gradients, or skip such steps "
                                         "(on_nonfinite='skip')")
            optimizer.zero_grad(set_to_none=True)
            if before is not None:
                with torch.no_grad():
                    model.quantizer.load_state_dict(before)
            skipped += 1
            continue
        optimizer.step()
        counter.add(out.indices)
        sums += values * x.shape[0]
        seen += x.shape[0]
    if world > 1:
        counter.all_reduce()
    codes = counter.stats()
    means = (sums / seen).tolist() if seen else [math.nan] * 3
    val = evaluate_vq(model, val_data) if rank == 0 else {}
    nan = math.nan
    return step, VQEpochMetrics(
        epoch=epoch + 1, step=step, train_loss=means[0], train_nll=means[1],
        train_vq_loss=means[2], val_loss=val.get("loss", nan), val_nll=val.get("nll", nan),
        val_commitment_loss=val.get("commitment_loss", nan),
        val_codebook_loss=val.get("codebook_loss", nan), val_usage=val.get("usage", nan),
        val_perplexity=val.get("perplexity", nan), usage=codes["usage"],
        perplexity=codes["perplexity"],
        restarts=int(model.quantizer.restarts) - restarts_before, skipped_steps=skipped,
        seconds=nan, lr=optimizer.param_groups[0]["lr"])


def _save(out_dir: Path, model: VAE | VQVAE, optimizer: torch.optim.Optimizer,
          history: list[Any], files: dict[str, Any]) -> None:
    """The checkpoint after an epoch (written atomically): weights, optimizer, epochs done, the
    settings used (and the resume record, if any)."""
    state = {"epoch": history[-1].epoch, "history": [asdict(m) for m in history],
             **{k: v for k, v in files.items() if k != "model_config"}}
    ckpt_io.save(out_dir / CHECKPOINT_NAME,
                 ckpt_io.Checkpoint(files["model_config"], model.state_dict(),
                                    optimizer.state_dict(), state))
