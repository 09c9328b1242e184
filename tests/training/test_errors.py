"""Bad input to the training, data and checkpoint APIs: the right exception, with a message
naming the culprit. (The model API's table is models/test_errors.py, the functional ops'
ops/test_errors.py, the command line's cli/test_errors.py.)"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fastvae.models.vae import build_vae
from fastvae.training import checkpoint, data
from fastvae.training.checkpoint import CheckpointError
from fastvae.training.data import DataError
from fastvae.training.trainer import TrainConfig, train

CONFIG = {"input_shape": [4], "latent_dim": 2, "hidden": [8]}
X = torch.rand(3, 4)


def _save_other(path):
    other = {**CONFIG, "latent_dim": 3}
    checkpoint.save(path, checkpoint.Checkpoint(other, build_vae(**other).state_dict()))
    return path


# (id, call(tmp_path), exception type, words the message must contain)
BAD_CALLS = [
    # --- training configuration
    ("config_epochs", lambda d: TrainConfig(epochs=0), ValueError, ["epochs"]),
    ("config_batch_size", lambda d: TrainConfig(batch_size=0), ValueError, ["batch_size"]),
    ("config_lr_zero", lambda d: TrainConfig(lr=0.0), ValueError, ["lr"]),
    ("config_lr_nan", lambda d: TrainConfig(lr=float("nan")), ValueError, ["lr"]),
    ("config_beta", lambda d: TrainConfig(beta=-1.0), ValueError, ["beta"]),
    ("config_beta_inf", lambda d: TrainConfig(beta=float("inf")), ValueError, ["beta"]),
    ("config_warmup", lambda d: TrainConfig(warmup_epochs=float("nan")), ValueError,
     ["warmup_epochs"]),
    ("config_cycles", lambda d: TrainConfig(cycles=-1), ValueError, ["cycles"]),
    ("config_free_bits", lambda d: TrainConfig(free_bits=-0.1), ValueError, ["free_bits"]),
    ("config_grad_clip", lambda d: TrainConfig(grad_clip=0.0), ValueError, ["grad_clip"]),
    ("config_on_nonfinite", lambda d: TrainConfig(on_nonfinite="ignore"), ValueError,
     ["on_nonfinite", "'ignore'"]),
    ("config_iwae_samples", lambda d: TrainConfig(iwae_samples=-1), ValueError,
     ["iwae_samples"]),
    ("train_resume_missing", lambda d: train(CONFIG, X, X, TrainConfig(epochs=1),
                                             resume=d / "missing.safetensors", progress=False),
     CheckpointError, ["missing.safetensors"]),
    ("train_resume_other_model", lambda d: train(
        CONFIG, X, X, TrainConfig(epochs=1), resume=_save_other(d / "other.safetensors"),
        progress=False), CheckpointError, ["other.safetensors", "another configuration"]),
    # --- checkpoints
    ("checkpoint_missing", lambda d: checkpoint.load(d / "none.safetensors"), CheckpointError,
     ["none.safetensors"]),
    ("checkpoint_directory", lambda d: checkpoint.load(d), CheckpointError, ["cannot read"]),
    ("checkpoint_junk", lambda d: checkpoint.load(_write(d / "junk.st", b"junk")),
     CheckpointError, ["junk.st"]),
    ("checkpoint_version", lambda d: checkpoint.load(_foreign_version(d / "v9.safetensors")),
     CheckpointError, ["v9.safetensors", "version 9"]),
    ("load_vae_missing", lambda d: checkpoint.load_vae(d / "none.safetensors"),
     CheckpointError, ["none.safetensors"]),
    # --- data
    ("data_missing", lambda d: data.load(str(d / "x.npz")), DataError, ["x.npz"]),
    ("data_empty_directory", lambda d: data.load(str(d)), DataError, ["no image files"]),
    ("data_images_1d", lambda d: data.to_images(np.zeros(5), "src"), DataError, ["src", "(5,)"]),
    ("data_images_range", lambda d: data.to_images(np.full((3, 2, 2), 2.0), "src"), DataError,
     ["src", "[0, 1]"]),
    ("data_images_int64", lambda d: data.to_images(np.zeros((3, 2, 2), np.int64), "src"),
     DataError, ["src", "int64", "pixel_max"]),
    ("data_idx_truncated", lambda d: data.read_idx(_write(d / "t-idx", bytes([0, 0, 8, 1, 0]))),
     DataError, ["t-idx", "truncated"]),
]


def _write(path, payload: bytes):
    path.write_bytes(payload)
    return path


def _foreign_version(path):
    from safetensors.torch import save_file

    save_file({"model.w": torch.zeros(1)}, path, metadata={"format": checkpoint.FORMAT,
                                                           "version": "9", "meta": "{}"})
    return path


@pytest.mark.parametrize(("call", "error", "words"),
                         [pytest.param(c, e, w, id=i) for i, c, e, w in BAD_CALLS])
def test_bad_api_input(call, error, words, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value)
    missing = [w for w in words if not re.search(re.escape(w), message)]
    assert not missing, f"{message!r} does not name {missing}"
