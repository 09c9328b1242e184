"""Data sets for ``fastvae train``: images as float32 tensors ``(n, C, H, W)`` in [0, 1].

Sources: scikit-learn's 8x8 digits (shipped inside scikit-learn: no download), ``.npz`` files,
MNIST IDX files (``*-idx3-ubyte``, optionally gzipped) and folders of image files (PNG, JPEG,
...: ``load_image_folder``). Nothing is guessed: an ``.npz`` of several arrays needs ``key``,
flat ``(n, D)`` arrays need ``shape``, integer types other than uint8 need ``pixel_max`` (see
``to_images``), images of several sizes need ``image_size``. A bad source raises ``DataError``
with a one-line message that names the choices.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

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
        # the file opened here, so that it is closed whatever numpy makes of it (np.load of a
        # path leaves the file open when the archive is broken)
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as archive:
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


# The files ``load_image_folder`` reads: the still-image formats of Pillow that photos and data
# sets come in. Files with other suffixes (labels, READMEs, .DS_Store) are not images: they are
# listed in ``ImageFolder.ignored``, not read.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi")


class ImageFolder(NamedTuple):
    """What ``load_image_folder`` read.

    ``images``: uint8 ``(n, C, H, W)``, image i read from ``files[i]`` (paths relative to the
    folder, ``/``-separated, in sorted order); ``skipped``: ``(file, reason)`` of every image
    file that could not be read (empty, truncated, not an image); ``ignored``: the files that
    are not images by their suffix (``IMAGE_EXTENSIONS``)."""

    images: np.ndarray
    files: list[str]
    skipped: list[tuple[str, str]]
    ignored: list[str]


class _Unreadable(Exception):
    """An image file that cannot be read, with the reason in words."""


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def describe_skipped(skipped: Sequence[tuple[str, str]], limit: int = 10) -> str:
    """``"a.png (empty file), b.jpg (truncated ...)"``: the first ``limit`` skipped files and
    their reasons, and how many more."""
    shown = ", ".join(f"{name} ({reason})" for name, reason in skipped[:limit])
    more = len(skipped) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _open(path: Path):
    """The Pillow image of ``path``, or ``_Unreadable``. Pillow raises many types for a bad file
    (OSError, SyntaxError, ValueError, struct.error, DecompressionBombError, ...): each is a
    reason to skip the file, named in the message."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            raise _Unreadable("empty file (0 bytes)")
        return Image.open(path)
    except _Unreadable:
        raise
    except UnidentifiedImageError:
        raise _Unreadable("not an image Pillow can read") from None
    except Exception as e:
        raise _Unreadable(f"cannot open: {e}") from None


def _decode(path: Path, channels: int, image_size: int | None) -> np.ndarray:
    """One image file as uint8 ``(channels, H, W)``: grey (``L``) or RGB (alpha dropped; 16-bit
    grey scaled by 1/257), resized so that its short side is ``image_size`` (bicubic, with
    Pillow's antialiasing when shrinking) and centre-cropped to a square; ``_Unreadable``."""
    from PIL import Image

    with _open(path) as image:
        try:
            image.load()  # decode now: a truncated file fails here, not later
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                grey = np.asarray(image, dtype=np.float64) / 257.0
                image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
            elif image.mode == "F":
                raise _Unreadable("floating-point pixels (mode F): no 8-bit range")
            elif image.mode == "P":
                image = image.convert("RGBA")  # a palette with transparency converts cleanly
            image = image.convert("L" if channels == 1 else "RGB")
            if image_size is not None and image.size != (image_size, image_size):
                w, h = image.size
                scale = image_size / min(w, h)
                size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
                if size != (w, h):
                    image = image.resize(size, Image.Resampling.BICUBIC)
                left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(image, dtype=np.uint8)
        except _Unreadable:
            raise
        except Exception as e:  # see _open
            reason = str(e) or type(e).__name__
            raise _Unreadable(f"truncated: {reason}" if "truncated" in reason.lower()
                              else f"cannot decode: {reason}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header (nothing decoded), or ``_Unreadable``."""
    with _open(path) as image:
        return image.size


def load_image_folder(path: str | os.PathLike, *, channels: int = 3,
                      image_size: int | None = None, strict: bool = False,
                      workers: int | None = None, progress: bool = False) -> ImageFolder:
    """Every image file below ``path`` (recursively, in sorted order of the relative paths),
    read with Pillow into one uint8 array ``(n, channels, H, W)``.

    ``channels``: 1 (grey, ``L``) or 3 (RGB); alpha is dropped, palettes are expanded.
    ``image_size`` S: each image is resized so that its short side is S (bicubic) and its
    centre S x S cropped; without it every image must have the same size, else a
    ``DataError`` lists the sizes found (with a file of each). Image files are those whose
    suffix is in ``IMAGE_EXTENSIONS`` (case-insensitive); other files are listed in
    ``ignored``. An image file that cannot be read (empty, truncated, not an image) is skipped
    and listed with its reason in ``skipped`` (``strict``: a ``DataError`` naming them
    instead). Files are decoded in parallel by ``workers`` threads (default: Python's
    ``ThreadPoolExecutor`` default), with a tqdm progress bar when ``progress``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{path} is not a directory")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if image_size is not None and (isinstance(image_size, bool)
                                   or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be an integer >= 1, got {image_size!r}")
    every = sorted((p for p in root.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(root).parts)
    candidates = [p for p in every if p.suffix.lower() in IMAGE_EXTENSIONS]
    ignored = [_relative(p, root) for p in every if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not candidates:
        raise DataError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                        + (f"; it holds {len(ignored)} other files, e.g. {ignored[0]}"
                           if ignored else ""))
    skipped: dict[int, str] = {}

    def run(task, indices: list[int], desc: str) -> dict[int, object]:
        """task(i) for each index, in parallel, with a progress bar; the results by index,
        the unreadable files' reasons into ``skipped``."""
        from tqdm.auto import tqdm

        results: dict[int, object] = {}
        with (ThreadPoolExecutor(max_workers=workers) as pool,
              tqdm(total=len(indices), unit="image", desc=desc, disable=not progress) as bar):
            futures = {i: pool.submit(task, i) for i in indices}
            for i, future in futures.items():
                try:
                    results[i] = future.result()
                except _Unreadable as e:
                    skipped[i] = str(e)
                bar.update(1)
        return results

    indices = list(range(len(candidates)))
    if image_size is None:
        sizes = run(lambda i: _header_size(candidates[i]), indices, "sizes")
        found: dict[tuple[int, int], list[int]] = {}
        for i, size in sizes.items():
            found.setdefault(size, []).append(i)  # type: ignore[arg-type]
        if len(found) > 1:
            listing = ", ".join(f"{w}x{h} ({len(files)} file{'s' if len(files) > 1 else ''}, e.g. "
                                f"{_relative(candidates[files[0]], root)})"
                                for (w, h), files in sorted(found.items(),
                                                            key=lambda kv: -len(kv[1])))
            raise DataError(f"{path}: the images have {len(found)} sizes (width x height): "
                            f"{listing}; give --image-size S (Python: image_size=S) to resize "
                            "the short side to S and crop the centre S x S")
        indices = sorted(sizes)
        width, height = next(iter(found)) if found else (1, 1)
    else:
        width = height = image_size
    images = np.empty((len(candidates), channels, height, width), dtype=np.uint8)

    def read(i: int) -> None:
        array = _decode(candidates[i], channels, image_size)
        if array.shape[1:] != (height, width):  # e.g. a header that lies about the size
            raise _Unreadable(f"decoded {array.shape[2]}x{array.shape[1]}, not the "
                              f"{width}x{height} of the other images")
        images[i] = array

    run(read, indices, f"read {root.name or path}")
    keep = [i for i in range(len(candidates)) if i not in skipped]
    for j, i in enumerate(keep):  # close the gaps of skipped files, in place
        if i != j:
            images[j] = images[i]
    listed = [(_relative(candidates[i], root), skipped[i]) for i in sorted(skipped)]
    if not keep:
        raise DataError(f"{path}: none of its {len(listed)} image files can be read: "
                        f"{describe_skipped(listed)}")
    if strict and listed:
        raise DataError(f"{path}: {len(listed)} image files cannot be read: "
                        f"{describe_skipped(listed)}")
    return ImageFolder(images[:len(keep)], [_relative(candidates[i], root) for i in keep],
                       listed, ignored)


def load(source: str | None, *, key: str | None = None, pixel_max: float | None = None,
         shape: tuple[int, int, int] | None = None, channels: int | None = None,
         image_size: int | None = None, strict: bool = False,
         progress: bool = False) -> tuple[Tensor, str]:
    """Images from ``source`` (None or "digits": the embedded digits; a .npz file, its array
    chosen by ``key``; an IDX file; a directory: its image files, read by
    ``load_image_folder``) read by ``to_images``'s rules, and a short name for them.
    ``key``, ``pixel_max`` and ``shape`` are for files: the digits are 8x8 values 0..16;
    ``channels`` (default 3), ``image_size``, ``strict`` and ``progress`` for folders, whose
    unreadable files are skipped with a ``UserWarning`` that lists them (``strict``: a
    ``DataError``)."""
    folder_options = [n for n, v in (("channels", channels), ("image_size", image_size),
                                     ("strict", strict or None)) if v is not None]
    if source is None or source == "digits":
        given = [n for n, v in (("key", key), ("pixel_max", pixel_max), ("shape", shape))
                 if v is not None] + folder_options
        if given:
            raise DataError(f"the digits data set is read as it is (1x8x8, 0..16 scaled to "
                            f"[0, 1]): {', '.join(given)} apply to data files only")
        return load_digits(), "digits"
    path = Path(source)
    if not path.exists():
        raise DataError(f"no such data file or directory: {source}")
    if path.is_dir():
        given = [n for n, v in (("key", key), ("pixel_max", pixel_max), ("shape", shape))
                 if v is not None]
        if given:
            raise DataError(f"{source} is a folder of image files (8-bit pixels, each image's "
                            f"own shape): {', '.join(given)} apply to array files only")
        folder = load_image_folder(path, channels=3 if channels is None else channels,
                                   image_size=image_size, strict=strict, progress=progress)
        if folder.skipped:
            warnings.warn(f"{source}: skipped {len(folder.skipped)} image files that cannot "
                          f"be read: {describe_skipped(folder.skipped)}", UserWarning,
                          stacklevel=2)
        return (to_images(folder.images, source, shape=folder.images.shape[1:]),
                path.resolve().name)
    if folder_options:
        raise DataError(f"{source} is a file: {', '.join(folder_options)} apply to folders "
                        "of image files only")
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
