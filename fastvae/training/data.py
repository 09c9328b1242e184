"""Data sets for ``fastvae train``: images as float32 tensors ``(n, C, H, W)`` in [0, 1].

Sources: scikit-learn's 8x8 digits (shipped inside scikit-learn: no download), ``.npz`` files,
and MNIST IDX files (``*-idx3-ubyte``, optionally gzipped). Nothing is guessed: an ``.npz`` of
several arrays needs ``key``, flat ``(n, D)`` arrays need ``shape``, integer types other than
uint8 need ``pixel_max`` (see ``to_images``). A bad source raises ``DataError`` with a one-line
message that names the choices.
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

from ..ops import validation


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


def npz_array(path: Path, key: str | None = None) -> np.ndarray:
    """The array of an ``.npz`` file: the one named ``key``, else the file's only array. A file
    of several arrays and no ``key`` is a ``DataError`` listing them with their shapes."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.keys())
            if key is not None and key in names:
                return archive[key]
            if key is None and len(names) == 1:
                return archive[names[0]]
            arrays = {name: archive[name] for name in names}
    except Exception as e:  # numpy raises several types for a bad archive
        raise DataError(f"cannot read {path} as .npz: {e}") from e
    listing = ", ".join(f"{name} {tuple(a.shape)} {a.dtype}" for name, a in arrays.items())
    if key is not None:
        raise DataError(f"{path} has no array {key!r}; it holds: {listing or 'nothing'}")
    if not arrays:
        raise DataError(f"{path} holds no arrays")
    raise DataError(f"{path} holds {len(arrays)} arrays: {listing}; choose one with --key NAME "
                    "(Python: key=NAME)")


def default_pixel_max(dtype: np.dtype) -> float | None:
    """The value that maps to 1 when none is given: 1 for bool ({0, 1}), 255 for uint8, 1.0
    for floats (taken as they are, already in [0, 1]); None for every other integer type,
    whose range the type does not tell (an int64 array may hold 0..255, 0..16 or 0..65535)."""
    if dtype.kind == "b":
        return 1.0
    if dtype == np.uint8:
        return 255.0
    if dtype.kind == "f":
        return 1.0
    return None


MAX_CHANNELS = 4  # grey, grey + alpha, RGB, RGBA


def _flat_shapes(d: int) -> list[tuple[int, int, int]]:
    """The (C, H, W) a row of ``d`` values could be: square images of 1 or 3 channels, and the
    vector 1x1xD."""
    shapes = []
    for c in (1, 3):
        side = math.isqrt(d // c)
        if d % c == 0 and side * side * c == d and side > 1:
            shapes.append((c, side, side))
    return [*shapes, (1, 1, d)]


def _as_chw(array: np.ndarray, source: str,
            shape: tuple[int, int, int] | None) -> np.ndarray:
    """(n, C, H, W) from the documented layouts, or from ``shape`` (row-major reshape)."""
    if shape is not None:
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"{source}: shape must be three positive sizes C,H,W, got "
                            f"{tuple(shape)}")
        per_image = math.prod(array.shape[1:]) if array.ndim >= 2 else 0
        if per_image != math.prod(shape):
            raise DataError(f"{source}: images of shape {tuple(array.shape[1:])} "
                            f"({per_image} values) cannot be read as C,H,W = "
                            f"{','.join(map(str, shape))} ({math.prod(shape)} values)")
        return array.reshape(array.shape[0], *shape)
    if array.ndim == 2:
        options = " or ".join(f"--shape {c},{h},{w}" for c, h, w in _flat_shapes(array.shape[1]))
        raise DataError(f"{source}: flat images of shape {tuple(array.shape)}: the layout of "
                        f"each row of {array.shape[1]} values is not known; give {options} "
                        "(Python: shape=(C, H, W)), or another C,H,W (each row is read in C,H,W "
                        "order)")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4:
        first, last = array.shape[1] <= MAX_CHANNELS, array.shape[-1] <= MAX_CHANNELS
        if first and not last:
            return array
        if last and not first:
            return array.transpose(0, 3, 1, 2)
        _, a, b, c = array.shape
        raise DataError(f"{source}: images of shape {tuple(array.shape)}: the channel axis is "
                        f"not known (channels-first with {a} channels, or channels-last with "
                        f"{c}); give --shape {a},{b},{c} (Python: shape=({a}, {b}, {c})) to "
                        "read them channels-first, or transpose them to (n, C, H, W)")
    raise DataError(f"{source}: expected (n, H, W), (n, C, H, W), (n, H, W, C) or (n, D) "
                    f"images, got shape {array.shape}")


def to_images(array: np.ndarray | Tensor, source: str = "data", *,
              pixel_max: float | None = None,
              shape: tuple[int, int, int] | None = None) -> Tensor:
    """Images as float32 ``(n, C, H, W)`` in [0, 1], each value divided by ``pixel_max``.

    Layouts: ``(n, H, W)`` is one channel; a 4-d array has its channels on the one axis
    (second or last) of at most ``MAX_CHANNELS`` (4) entries: ``(n, C, H, W)`` is taken as it
    is, ``(n, H, W, C)`` is channels-last; when both or neither axis is that small, or the
    array is flat ``(n, D)`` (a row of 784 values may be 1x28x28 or 1x1x784, one of 3072
    values 3x32x32 stored channels-first or -last), ``shape = (C, H, W)`` is needed, and
    reshapes every image row-major.

    ``pixel_max`` (the value that maps to 1): by default 1 for bool, 255 for uint8, 1.0 for
    floats; other integer types (int8..int64, uint16..uint64) need it: their width says
    nothing about the data's range. Values below 0 or above ``pixel_max``, and non-finite
    values, are a ``DataError``; so is any layout not listed here."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "buif":
        raise DataError(f"{source}: expected numeric images, got dtype {array.dtype}")
    if pixel_max is not None and not 0 < pixel_max < math.inf:
        raise DataError(f"{source}: pixel_max must be finite and > 0, got {pixel_max}")
    if array.ndim < 2 or (array.ndim > 4 and shape is None):
        raise DataError(f"{source}: expected (n, H, W), (n, C, H, W), (n, H, W, C) or (n, D) "
                        f"images, got shape {array.shape}")
    if array.shape[0] < 2:
        raise DataError(f"{source}: needs at least 2 images, got {array.shape[0]}")
    array = _as_chw(array, source, shape)
    # float32 holds every 8- and 16-bit integer exactly; wider ones go through float64.
    wide = array.dtype.kind in "iu" and array.dtype.itemsize > 2
    values = np.ascontiguousarray(array, dtype=np.float64 if wide else np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{source}: the images have non-finite values")
    lo, hi = float(values.min()), float(values.max())
    scale = pixel_max if pixel_max is not None else default_pixel_max(array.dtype)
    if scale is None:
        suggest = next((m for m in (1, 255, 65535) if hi <= m), None)
        raise DataError(f"{source}: {array.dtype} pixels (values {lo:g}..{hi:g}) have no "
                        "default range: give --pixel-max (Python: pixel_max=), the value "
                        "that is white"
                        + (f", e.g. {suggest} if the data are {suggest.bit_length()}-bit"
                           if suggest else ""))
    if lo < 0 or hi > scale:
        what = "[0, 1]" if scale == 1 else f"[0, {scale:g}] (pixel_max {scale:g})"
        hint = ("" if pixel_max is not None
                else "; give --pixel-max (Python: pixel_max=) for another range")
        raise DataError(f"{source}: {array.dtype} pixel values must lie in {what}, got range "
                        f"[{lo:g}, {hi:g}]{hint}")
    return torch.from_numpy((values / scale).astype(np.float32))


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


def check_grid(data: Tensor, n_bins: int, source: str, bins_name: str = "n_bins") -> None:
    """Pixel values on the grid of ``n_bins`` levels of [0, 1], ``k / (n_bins - 1)``, to
    rounding (``fastvae.ops.validation.grid_offsets``): what a discretized likelihood (the
    mixture of logistics, ``likelihood="dmol"``) models. Else ``DataError`` naming ``source``,
    how many values are off and ``bins_name`` (the option that sets the grid). Unquantized data
    would train without complaint to a likelihood that is not one of the data."""
    if data.numel() == 0:
        return
    bad = validation.grid_offsets(data, n_bins, 0.0, 1.0) > 0
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0])
        raise DataError(
            f"{source}: the discretized mixture of logistics models pixels on a grid of "
            f"{bins_name} {n_bins} levels (k / {n_bins - 1}), but {int(bad.sum())} of "
            f"{data.numel()} values are off it (e.g. {float(data.reshape(-1)[flat]):.9g}): "
            f"quantize the data (uint8 images are on the grid of 256), or set {bins_name} to "
            "the number of levels it has")


def as_training_data(x: Tensor | np.ndarray, name: str,
                     input_shape: tuple[int, ...] | list[int] | None = None) -> Tensor:
    """The trainer's data rule: a floating-point tensor or array is used as it is; bool and
    uint8 images are scaled by ``default_pixel_max`` (1 and 255); other integer types are a
    ``DataError`` (their range is not known: ``to_images(x, pixel_max=...)`` scales them).
    With ``input_shape``, ``x`` must be ``(n, *input_shape)``: no reshape is guessed."""
    if not isinstance(x, Tensor):
        x = np.asarray(x)
        if x.dtype.kind not in "buif":
            raise DataError(f"{name}: expected numeric images, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dim() < 2 or x.shape[0] < 1:
        raise DataError(f"{name}: expected images (n, *input_shape), got shape "
                        f"{tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{name}: images of shape {tuple(x.shape[1:])} do not match the "
                        f"model's input_shape {tuple(input_shape)}; reshape them (e.g. "
                        f"x.reshape(-1, {', '.join(map(str, input_shape))}) for row-major "
                        "data)")
    if x.is_floating_point():
        return x
    dtype = np.dtype(str(x.dtype).removeprefix("torch."))
    if dtype.kind not in "bui" or default_pixel_max(dtype) is None:
        raise DataError(f"{name}: {dtype} images have no default range: give float images, "
                        "or scale them with fastvae.training.data.to_images(x, "
                        "pixel_max=...)")
    scale = default_pixel_max(dtype)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > scale:
        raise DataError(f"{name}: {dtype} pixel values must lie in [0, {scale:g}], got range "
                        f"[{lo:g}, {hi:g}]")
    return x.float() / scale


def load(source: str | None, *, key: str | None = None, pixel_max: float | None = None,
         shape: tuple[int, int, int] | None = None) -> tuple[Tensor, str]:
    """Images from ``source`` (None or "digits": the embedded digits; a .npz file, its array
    chosen by ``key``; an IDX file) read by ``to_images``'s rules, and a short name for them.
    ``key``, ``pixel_max`` and ``shape`` are for files: the digits are 8x8 values 0..16."""
    if source is None or source == "digits":
        given = [n for n, v in (("key", key), ("pixel_max", pixel_max), ("shape", shape))
                 if v is not None]
        if given:
            raise DataError(f"the digits data set is read as it is (1x8x8, 0..16 scaled to "
                            f"[0, 1]): {', '.join(given)} apply to data files only")
        return load_digits(), "digits"
    path = Path(source)
    if not path.exists():
        raise DataError(f"no such data file: {source}")
    if path.is_dir():
        raise DataError(f"{source} is a directory; give a .npz or IDX file")
    if path.suffix == ".npz":
        return (to_images(npz_array(path, key), source, pixel_max=pixel_max, shape=shape),
                path.stem)
    if key is not None:
        raise DataError(f"{source}: key applies to .npz files only")
    return (to_images(read_idx(path), source, pixel_max=pixel_max, shape=shape),
            path.name.split(".")[0])


def split(data: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded shuffle split into (train, validation); validation keeps at least one image."""
    n = data.shape[0]
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data[order[n_val:]], data[order[:n_val]]
