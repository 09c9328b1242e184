"""Data sets for ``fastvae train``: images as float32 tensors ``(n, C, H, W)`` in [0, 1].

Sources: scikit-learn's 8x8 digits (shipped inside scikit-learn: no download), ``.npz`` files,
and MNIST IDX files (``*-idx3-ubyte``, optionally gzipped). A bad source raises ``DataError``
with a one-line message.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """The data could not be read or has an unusable shape."""


def load_digits() -> Tensor:
    """scikit-learn's 1797 8x8 digits, scaled from 0..16 to [0, 1]: ``(1797, 1, 8, 8)``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DataError("the default digits data needs scikit-learn "
                        "(pip install 'fastvae[train]')") from e
    images = sk_load_digits().images.astype(np.float32) / 16.0
    return torch.from_numpy(images).unsqueeze(1)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST format): magic ``0 0 dtype ndim``, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt gzip stream
        raise DataError(f"cannot read {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(shape)  # exact: np.prod wraps around in int64 for a forged header
    if len(raw) - header < count * dtype.itemsize:
        raise DataError(f"{path} is truncated: expected {count} values of shape {shape}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def _npz_images(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            for key in ("x", "images", "x_train", "X", "data"):
                if key in archive:
                    return archive[key]
            if not keys:
                raise DataError(f"{path} holds no arrays")
            return archive[keys[0]]
    except DataError:
        raise
    except Exception as e:  # numpy raises several types for a bad archive
        raise DataError(f"cannot read {path} as .npz: {e}") from e


def to_images(array: np.ndarray, source: str) -> Tensor:
    """(n, H, W), (n, C, H, W), (n, H, W, C) with C in {1, 3} or (n, D) -> float32 (n, C, H, W)
    in [0, 1]; integer data is divided by its type's maximum (255 for uint8)."""
    if array.dtype.kind not in "uif":
        raise DataError(f"{source}: expected numeric images, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, None, None, :]
    elif array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4:
        raise DataError(f"{source}: expected (n, H, W), (n, C, H, W) or (n, D) images, "
                        f"got shape {array.shape}")
    if array.shape[0] < 2:
        raise DataError(f"{source}: needs at least 2 images, got {array.shape[0]}")
    scale = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else 1.0
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / scale)
    if not torch.isfinite(data).all():
        raise DataError(f"{source}: the images have non-finite values")
    check_unit_range(data, source, " (or be integers)")
    return data


def check_unit_range(data: Tensor, source: str, note: str = "") -> None:
    """Pixel values in [0, 1] (what a Bernoulli likelihood models), else ``DataError`` (a
    ``ValueError``) naming ``source`` and the range found. The one check of ``fastvae train``
    (every image file) and ``fastvae.train`` (Bernoulli likelihood)."""
    if data.numel() == 0:
        return
    lo, hi = float(data.min()), float(data.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{source}: pixel values must lie in [0, 1]{note}, "
                        f"got range [{lo:g}, {hi:g}]")


def load(source: str | None) -> tuple[Tensor, str]:
    """Images from ``source`` (None or "digits": the embedded digits; a .npz file; an IDX
    file) and a short name for them."""
    if source is None or source == "digits":
        return load_digits(), "digits"
    path = Path(source)
    if not path.exists():
        raise DataError(f"no such data file: {source}")
    if path.is_dir():
        raise DataError(f"{source} is a directory; give a .npz or IDX file")
    if path.suffix == ".npz":
        return to_images(_npz_images(path), source), path.stem
    return to_images(read_idx(path), source), path.name.split(".")[0]


def split(data: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded shuffle split into (train, validation); validation keeps at least one image."""
    n = data.shape[0]
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data[order[n_val:]], data[order[:n_val]]
