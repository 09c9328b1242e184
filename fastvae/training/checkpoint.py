"""Checkpoints: model, its config, and the trainer's state in one ``.safetensors`` file.

Tensors only (no pickle, so loading never runs code): the model's state dict under
``model.``, the optimizer's tensors under ``optim.``; everything
else (configs, optimizer hyper-parameters, epoch, history) is JSON in the header's metadata.
Files are written atomically (a temporary file in the same directory, fsync, rename), so a
crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "fastvae-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is missing, truncated, or not a fastvae checkpoint."""


@dataclass
class Checkpoint:
    model_config: dict[str, Any]
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    trainer_state: dict[str, Any] = field(default_factory=dict)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically."""
    from safetensors.torch import save as st_save

    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ckpt.model_state.items()}
    meta: dict[str, Any] = {"model_config": ckpt.model_config,
                            "trainer_state": ckpt.trainer_state}
    if ckpt.optimizer_state is not None:
        optim_tensors, optim_meta = _flatten_optimizer(ckpt.optimizer_state)
        tensors.update(optim_tensors)
        meta["optimizer"] = optim_meta
    payload = st_save(tensors, metadata={"format": FORMAT, "version": str(VERSION),
                                         "meta": json.dumps(meta)})
    return atomic_write(path, payload)


def atomic_write(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` so that ``path`` holds either its old content or all of
    the new, whenever the process dies: a temporary file in the same directory (hidden: a dot
    name), flushed to disk, renamed over ``path``, and the rename flushed too. A process killed
    mid-write leaves that temporary file behind, never a partial ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power cut after it keeps it); a no-op where
    directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by ``save``; ``CheckpointError`` for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        metadata = header.get("__metadata__") or {}
    except (SafetensorError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not "
                              f"safetensors): {e}") from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a fastvae checkpoint")
    if metadata.get("version") != str(VERSION):
        raise CheckpointError(f"{path} has checkpoint version {metadata.get('version')}; "
                              f"this fastvae reads version {VERSION}")
    meta = json.loads(metadata["meta"])
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer = (_unflatten_optimizer(optim_tensors, meta["optimizer"])
                 if "optimizer" in meta else None)
    return Checkpoint(meta["model_config"], model_state, optimizer,
                      meta.get("trainer_state", {}))


def save_vae(model, path: str | os.PathLike) -> Path:
    """Write a VAE's (or a VQ-VAE's) weights to ``path`` (atomically, safetensors, no pickle),
    with the ``build_vae`` (``build_vqvae``) arguments of a model built by it
    (``model.build_config``) and its kind (``"kind": "vqvae"`` for a VQ-VAE), so that
    ``load_vae(path)`` rebuilds it; a model built by the caller is stored under an empty config
    and loads with ``load_vae(path, model=the_same_architecture)``. Returns the path."""
    from ..models.vqvae import VQVAE

    config = dict(getattr(model, "build_config", None) or {})
    if config and isinstance(model, VQVAE):
        config["kind"] = "vqvae"
    return save(path, Checkpoint(config, model.state_dict()))


def load_vae(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
             model=None):
    """The VAE (or VQ-VAE: ``fastvae.VQVAE``, by the kind the checkpoint records) stored in a
    checkpoint (of ``save_vae`` or ``fastvae train``), with its weights, on ``map_location``,
    in eval mode. ``model`` given: the weights are loaded into it (a model built by the caller,
    of the saved architecture); else the checkpoint's ``build_vae`` (``build_vqvae``)
    arguments rebuild it. Raises ``CheckpointError`` (a ``ValueError``) for a missing or bad
    file, a model built by the caller without ``model``, or weights of another model."""
    return vae_from_checkpoint(load(path), path, map_location, model=model)


def vae_from_checkpoint(ckpt: Checkpoint, path: str | os.PathLike,
                        map_location: str | torch.device = "cpu", *, model=None):
    """``load_vae`` of a checkpoint already read (``path``: its file, for the messages)."""
    from ..models.vae import build_vae
    from ..models.vqvae import build_vqvae

    if model is None:
        if not ckpt.model_config:
            raise CheckpointError(f"{path} holds a VAE built by the caller, not by build_vae: "
                                  "build the same model and pass it, load_vae(path, "
                                  "model=...)")
        config = dict(ckpt.model_config)
        kind = config.pop("kind", "vae")
        builders = {"vae": build_vae, "vqvae": build_vqvae}
        if kind not in builders:
            raise CheckpointError(f"{path} holds a model of kind {kind!r}; this fastvae builds "
                                  f"{', '.join(map(repr, builders))}")
        try:
            model = builders[kind](**config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path} records a model that cannot be built: {e}") from e
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} holds weights of another model: "
                              f"{str(e).splitlines()[0]}") from e
    return model.to(map_location).eval()
