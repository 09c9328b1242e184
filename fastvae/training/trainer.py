"""Training: the loop, KL schedules, evaluation, diagnostics, checkpoints and resume.

``train(...)`` fits a VAE with Adam, evaluates after every epoch, and, given ``out_dir``, writes
``checkpoint.safetensors`` (every epoch, atomically), ``metrics.csv`` and ``metrics.json``.
Under ``torch.distributed`` (launched by ``torchrun``) every rank trains on its shard of each
epoch's permutation through DistributedDataParallel and rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models.vae import VAE, active_units, build_vae
from . import checkpoint as ckpt_io
from .data import check_unit_range

CHECKPOINT_NAME = "checkpoint.safetensors"


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term became NaN or infinite."""


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``.

    ``warmup_epochs``: linear KL warm-up of beta from 0 over that many epochs. ``cycles``:
    cyclical annealing (Fu et al. 2019) with that many cycles over the run, beta rising linearly
    over the first half of each cycle (overrides warm-up when > 0). ``on_nonfinite``: when a
    loss term or a gradient becomes NaN or infinite, ``"skip"`` the step (every rank skips it)
    or ``"stop"`` with a ``NonFiniteLossError`` naming the step and the term.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    beta: float = 1.0
    warmup_epochs: float = 0.0
    cycles: int = 0
    free_bits: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    amp: bool = False
    on_nonfinite: str = "stop"
    iwae_samples: int = 1000

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        # "not x > 0" rather than "x <= 0": NaN fails it too.
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        for name in ("beta", "warmup_epochs", "free_bits"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.cycles < 0:
            raise ValueError(f"cycles must be >= 0, got {self.cycles}")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be finite and > 0, got {self.grad_clip}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}")
        if self.iwae_samples < 0:
            raise ValueError("iwae_samples must be >= 0")


def beta_at(config: TrainConfig, progress: float) -> float:
    """The KL weight at ``progress`` (epochs done, fractional) into the run."""
    if config.cycles > 0:
        period = config.epochs / config.cycles
        phase = (progress % period) / period
        return config.beta * min(1.0, 2.0 * phase)
    if config.warmup_epochs > 0:
        return config.beta * min(1.0, progress / config.warmup_epochs)
    return config.beta


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


@dataclass
class TrainResult:
    model: VAE
    history: list[EpochMetrics] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model: VAE, data: Tensor, batch_size: int = 512, *,
             iwae_samples: int = 0) -> dict[str, Any]:
    """Mean negative ELBO (beta = 1), reconstruction NLL and KL per example; active units and
    per-dimension KL; the IWAE log-likelihood with ``iwae_samples`` > 0."""
    model.eval()
    device = next(model.parameters()).device
    totals = {"nll": 0.0, "kl": 0.0}
    mus, kl_dims, ll = [], [], []
    for start in range(0, data.shape[0], batch_size):
        x = data[start:start + batch_size].to(device)
        out = model(x, beta=1.0, free_bits=0.0, reduction="sum")
        totals["nll"] += float(out.nll)
        totals["kl"] += float(out.kl)
        mus.append(out.mu.float().cpu())
        kl_dims.append(model.kl_per_dimension(x).double().cpu() * x.shape[0])
        if iwae_samples > 0:
            ll.append(model.log_likelihood(x, iwae_samples).double().cpu())
    n = data.shape[0]
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


_TERMS = ("loss", "reconstruction NLL", "KL")


def _nonfinite_terms(values: Tensor, world: int, device: torch.device) -> str | None:
    """None when the step's loss terms (loss, NLL, KL) are finite on every rank, else what went
    non-finite. Ranks agree (one all-reduce) so that they skip or stop together: a rank that
    skipped its backward while the others ran theirs would hang DistributedDataParallel."""
    finite = torch.isfinite(values)
    if world > 1:
        flags = finite.to(device=device, dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        everywhere = flags.cpu().bool().tolist()
        if all(everywhere):
            return None
        if bool(finite.all()):
            names = [n for n, ok in zip(_TERMS[1:], everywhere[1:], strict=True) if not ok]
            return f"the {' and the '.join(names or ['loss'])} became non-finite on another rank"
    elif bool(finite.all()):
        return None
    # The loss is nll + beta * kl: name the parts that broke, with their values.
    parts = [f"the {name} ({value:g})" for name, value, ok in
             zip(_TERMS[1:], values[1:].tolist(), finite[1:].tolist(), strict=True) if not ok]
    return (" and ".join(parts) or f"the loss ({values[0].item():g})") + " became non-finite"


def _nonfinite_gradient(model: nn.Module, clip: float | None) -> str | None:
    """Clip the gradients to norm ``clip`` when given; None when every gradient is finite, else
    which parameter's is not."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    if clip is not None:
        nn.utils.clip_grad_norm_([p for _, p in named], clip)
    finite = torch.stack([torch.isfinite(p.grad).all() for _, p in named]).cpu()
    if bool(finite.all()):
        return None
    first = named[int((~finite).nonzero()[0])][0]
    more = int((~finite).sum()) - 1
    return (f"the gradient of {first}" + (f" (and of {more} more parameters)" if more else "")
            + " became non-finite, the loss terms did not")


def _epoch_seed(config: TrainConfig, epoch: int) -> int:
    """Every epoch reseeds from (seed, epoch): a resumed run draws what an uninterrupted one
    would, with no RNG state in the checkpoint."""
    return config.seed * 1_000_003 + epoch


def _write_metrics(out_dir: Path, history: list[EpochMetrics], extra: dict[str, Any]) -> None:
    """metrics.csv and metrics.json, each written atomically (as the checkpoint)."""
    rows = [asdict(m) for m in history]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    ckpt_io.atomic_write(out_dir / "metrics.csv", table.getvalue().encode())
    ckpt_io.atomic_write(out_dir / "metrics.json",
                         json.dumps({**extra, "history": rows}, indent=2).encode())


def train(model: dict[str, Any] | VAE, train_data: Tensor, val_data: Tensor,
          config: TrainConfig, *, device: str | torch.device = "cpu",
          out_dir: str | Path | None = None, resume: str | Path | None = None,
          progress: bool = True) -> TrainResult:
    """Train a VAE on ``train_data`` (``(n, *input_shape)`` images in [0, 1]).

    ``model``: keyword arguments of ``build_vae`` (built here, initial weights from
    ``config.seed``; its checkpoint rebuilds it with ``checkpoint.load_vae``), or a ``VAE``
    built by the caller, trained in place (its checkpoint holds the weights under an empty
    config). ``resume``: a checkpoint written by an earlier run with the same model and configs;
    training goes on from its epoch to the same result as an uninterrupted run.
    """
    rank, world = _distributed()
    device = torch.device(device)
    model, model_config = _build(model, config.seed)
    if model.likelihood == "bernoulli":
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            check_unit_range(data, name, " for a Bernoulli likelihood (rescale them, or train "
                             "with likelihood 'gaussian')")
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_epoch, history = 0, []
    if resume is not None:
        start_epoch, history = _resume(resume, model, model_config, optimizer)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    out_path = Path(out_dir) if out_dir is not None and rank == 0 else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    files = {"model_config": model_config, "train_config": asdict(config)}

    step = start_epoch * math.ceil(train_data.shape[0] / world / config.batch_size)
    bar = _progress_bar(config, start_epoch) if progress and rank == 0 else None
    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        t_epoch = time.perf_counter()
        step, train_means, beta, skipped = _train_epoch(net, model, optimizer, train_data,
                                                        config, epoch, step, device)
        val = evaluate(model, val_data) if rank == 0 else {}
        metrics = EpochMetrics(
            epoch=epoch + 1, step=step, beta=beta, train_loss=train_means[0],
            train_nll=train_means[1], train_kl=train_means[2],
            val_elbo=val.get("elbo", math.nan), val_nll=val.get("nll", math.nan),
            val_kl=val.get("kl", math.nan), active_units=val.get("active_units", 0),
            skipped_steps=skipped, seconds=time.perf_counter() - t_epoch)
        history.append(metrics)
        if bar is not None:
            _show(bar, metrics)
        if out_path is not None:
            _save(out_path, model, optimizer, history, config, model_config)
            _write_metrics(out_path, history, files)
    if bar is not None:
        bar.close()

    result = TrainResult(model, history)
    if rank == 0:
        result.final = evaluate(model, val_data, iwae_samples=config.iwae_samples)
        result.final["train_seconds"] = time.perf_counter() - t_start
        if out_path is not None:
            _write_metrics(out_path, history, {**files, "final": result.final})
    return result


def _build(model: dict[str, Any] | VAE, seed: int) -> tuple[VAE, dict[str, Any]]:
    """The model and the build_vae arguments its checkpoint records (empty for a VAE built by
    the caller)."""
    torch.manual_seed(seed)  # the initial weights, equal on every rank
    if isinstance(model, VAE):
        return model, {}
    if isinstance(model, dict):
        return build_vae(**model), model
    raise TypeError(f"model must be a fastvae.VAE or a dict of build_vae arguments, got "
                    f"{type(model).__name__}")


def _resume(path: str | Path, model: VAE, model_config: dict[str, Any],
            optimizer: torch.optim.Optimizer) -> tuple[int, list[EpochMetrics]]:
    """Load a checkpoint into the model and the optimizer: the epochs done and their metrics.
    A checkpoint of another model is a CheckpointError naming the difference."""
    saved = ckpt_io.load(path)
    if saved.model_config != model_config:
        raise ckpt_io.CheckpointError(f"{path} holds a model with another configuration: "
                                      f"{saved.model_config or 'a model built by the caller'}")
    try:
        model.load_state_dict(saved.model_state)
    except RuntimeError as e:
        raise ckpt_io.CheckpointError(f"{path} holds weights of another model: "
                                      f"{str(e).splitlines()[0]}") from e
    if saved.optimizer_state is not None:
        optimizer.load_state_dict(saved.optimizer_state)
    history = [EpochMetrics(**m) for m in saved.trainer_state.get("history", [])]
    return int(saved.trainer_state.get("epoch", 0)), history


def _progress_bar(config: TrainConfig, start_epoch: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.epochs, initial=start_epoch, unit="epoch", desc="train")


def _show(bar, metrics: EpochMetrics) -> None:
    bar.set_postfix(loss=f"{metrics.train_loss:.3f}", val_elbo=f"{metrics.val_elbo:.3f}",
                    kl=f"{metrics.val_kl:.2f}", au=metrics.active_units)
    bar.update(1)


def _train_epoch(net: nn.Module, model: VAE, optimizer: torch.optim.Optimizer,
                 train_data: Tensor, config: TrainConfig, epoch: int, step: int,
                 device: torch.device) -> tuple[int, list[float], float, int]:
    """One pass over this rank's shard of the epoch's permutation. Returns the step count
    after it, the mean (loss, NLL, KL) per example of the steps taken, the last beta and the
    number of steps skipped for non-finite values."""
    rank, world = _distributed()
    model.train()
    seed = _epoch_seed(config, epoch)
    shuffle = torch.Generator().manual_seed(seed)  # the same permutation on every rank
    torch.manual_seed(seed + 7919 * rank)  # each rank its own noise
    order = torch.randperm(train_data.shape[0], generator=shuffle)[rank::world]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if config.amp and device.type == "cuda" else contextlib.nullcontext())
    sums = torch.zeros(3, dtype=torch.float64)
    seen = skipped = 0
    beta = config.beta
    for i in range(0, order.numel(), config.batch_size):
        x = train_data[order[i:i + config.batch_size]].to(device, non_blocking=True)
        beta = beta_at(config, epoch + i / max(1, order.numel()))
        with autocast:
            out = net(x, beta=beta, free_bits=config.free_bits)
        step += 1
        values = torch.stack([out.loss, out.nll, out.kl]).detach().double().cpu()
        bad = _nonfinite_terms(values, world, device)
        if bad is None:
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
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
        sums += values * x.shape[0]
        seen += x.shape[0]
    return step, (sums / max(seen, 1)).tolist(), beta, skipped


def _save(out_dir: Path, model: VAE, optimizer: torch.optim.Optimizer,
          history: list[EpochMetrics], config: TrainConfig, model_config: dict[str, Any]) -> None:
    """The checkpoint after an epoch (written atomically): weights, optimizer, epochs done."""
    state = {"epoch": history[-1].epoch, "history": [asdict(m) for m in history],
             "train_config": asdict(config)}
    ckpt_io.save(out_dir / CHECKPOINT_NAME,
                 ckpt_io.Checkpoint(model_config, model.state_dict(), optimizer.state_dict(),
                                    state))
