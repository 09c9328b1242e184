"""Argument checks of the public functions.

Shape, dtype and device checks are always on and cost nothing on the device. Checks that read
the data (finite values, Bernoulli targets in [0, 1]) synchronize with the device, so they are
opt-in: ``fastvae.set_validation(True)`` or ``FASTVAE_VALIDATE=1``, as ``validate_args`` in
``torch.distributions``. They are skipped while torch.compile traces and while a CUDA graph is
captured (a host read would break the capture; the eager calls before it, e.g. the warm-up of
``TrainConfig(cuda_graphs=True)``, check).
"""

from __future__ import annotations

import operator
import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

_validate = os.environ.get("FASTVAE_VALIDATE", "0") not in ("", "0", "false", "False")


def set_validation(enabled: bool) -> None:
    """Turn the data-dependent checks (finite inputs, targets in [0, 1]) on or off."""
    global _validate
    _validate = bool(enabled)


def validation_enabled() -> bool:
    return _validate


def data_checks_on() -> bool:
    """Whether the opt-in checks that read the data run now."""
    return (_validate and not torch.compiler.is_compiling()
            and not (torch.backends.cuda.is_built() and torch.cuda.is_current_stream_capturing()))


def tensor(name: str, t: object) -> Tensor:
    """A floating-point tensor of a supported dtype, else TypeError naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, "
                        f"got {t.dtype}")
    return t


def batched(name: str, t: Tensor) -> None:
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-d tensor")


def same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "all tensors of a call must be on one device")


def same_dtype_and_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
                        "they must match")
    same_device(name, t, ref_name, ref)


def pair(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` pairs with ``ref``: same dtype, device and shape."""
    same_dtype_and_device(name, t, ref_name, ref)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape "
                         f"{tuple(ref.shape)}; they must be equal")


def observation(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` is an observation (a target) for the parameters ``ref``: same shape and device, any
    floating dtype. Paired parameters stay strict (``pair``); an observation of another dtype is
    promoted with them to their common dtype (``torch.promote_types``), as torch's losses do, so
    that a float32 target meets bfloat16 logits (autocast) without being rounded to bfloat16."""
    same_device(name, t, ref_name, ref)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape "
                         f"{tuple(ref.shape)}; they must be equal")


def broadcast_parameter(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` is a broadcast parameter (a log-variance or prior of ``ref``): it broadcasts to
    ``ref``'s shape, on ``ref``'s device, any floating dtype. Like an observation it is promoted
    with the other operands to their common dtype (a float32 learned log-variance next to a
    bfloat16 mean under autocast computes in float32), its gradient in its own dtype."""
    same_device(name, t, ref_name, ref)
    try:
        shape = torch.broadcast_shapes(t.shape, ref.shape)
    except RuntimeError:
        shape = None
    if shape != ref.shape:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to "
                         f"{ref_name}'s shape {tuple(ref.shape)}")


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def free_bits(value: object, reduction_: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"free_bits must be a float, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"free_bits must be >= 0, got {value}")
    if value > 0 and reduction_ == "none":
        raise ValueError("free_bits > 0 needs reduction 'mean' or 'sum' (it floors each "
                         "latent dimension's batch-mean KL), got reduction='none'")
    return float(value)


def integer(name: str, value: object, minimum: int | None = None) -> int:
    """An integer option as a Python ``int``: anything with ``__index__`` (``int``, numpy's
    ``np.int64``, a one-element integer tensor), read with ``operator.index``. ``bool`` (a flag
    passed by mistake), floats (``2.0`` included: no silent truncation) and other objects are a
    ``TypeError`` naming ``name``; a value below ``minimum`` a ``ValueError``."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got a bool ({value!r})")
    try:
        result = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})") \
            from None
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    return result


def number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def finite(**tensors: Tensor | None) -> None:
    """Opt-in: every tensor is finite."""
    if not data_checks_on():
        return
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has non-finite values (validation is on)")


def positive(name: str, t: Tensor) -> None:
    """Opt-in: every value of ``t`` is finite and > 0 (a variance)."""
    if data_checks_on() and not bool(((t > 0) & torch.isfinite(t)).all()):
        raise ValueError(f"{name} must be finite and > 0 (validation is on)")


def grid_offsets(t: Tensor, n_bins: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    """How far each value of ``t`` lies off the grid of ``n_bins`` levels of [low, high]
    (``low + k (high - low) / (n_bins - 1)``), in bins (0 on the grid, up to 0.5), less what
    rounding explains: 4 eps of ``t``'s dtype (of float32 at least: float64 data computed in
    float32 stays on the grid) times the interval's magnitude. A value of a level rounded to
    float32 (or to bfloat16, which cannot hold 256 levels) gives 0; values outside [low, high]
    count as off by their distance.
    Computed in float64 in chunks (no float64 copy of a large ``t``); returns ``t``'s shape,
    float64."""
    scale = (n_bins - 1) / (high - low)
    eps = max(torch.finfo(t.dtype).eps, torch.finfo(torch.float32).eps)
    slack = 4 * eps * max(abs(low), abs(high)) * scale
    flat, out = t.detach().reshape(-1), []
    for start in range(0, flat.numel(), 1 << 22):
        u = (flat[start:start + (1 << 22)].double() - low) * scale
        off = torch.maximum((u - u.round()).abs(),
                            torch.maximum(-u, u - (n_bins - 1)).clamp_min(0))
        out.append((off - slack).clamp_min(0))
    return (torch.cat(out) if out else flat.double()).reshape(t.shape)


def on_grid(name: str, t: Tensor, n_bins: int, n_bins_name: str = "n_bins") -> None:
    """Opt-in: every value of ``t`` lies on the grid of ``n_bins`` levels of [-1, 1] (the
    discretized likelihoods), to rounding (``grid_offsets``)."""
    if not data_checks_on() or t.numel() == 0:
        return
    off = grid_offsets(t, n_bins)
    bad = off > 0
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        value = float(t.reshape(-1)[first])
        raise ValueError(
            f"{name} must lie on the grid of {n_bins_name}={n_bins} levels of [-1, 1], "
            f"-1 + 2 k / {n_bins - 1} (validation is on): {int(bad.sum())} of {t.numel()} "
            f"values are off it, e.g. {value:.9g} at flat index {first}. Quantize {name} "
            f"(torch.round((x + 1) / 2 * {n_bins - 1}) * 2 / {n_bins - 1} - 1) or give the "
            f"{n_bins_name} of its grid")


def unit_interval(name: str, t: Tensor) -> None:
    """Opt-in: every value of ``t`` lies in [0, 1]."""
    if data_checks_on() and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1] (validation is on)")


def indices_in_range(name: str, t: Tensor, low: int, high: int, what: str) -> None:
    """With validation on: every element of the integer tensor ``t`` in ``[low, high)``, else
    ValueError naming ``name``, the first offending value and ``what`` the range is."""
    if not data_checks_on() or t.numel() == 0:
        return
    bad = (t < low) | (t >= high)
    if bool(bad.any()):
        raise ValueError(f"{name} must be in [{low}, {high - 1}] ({what}), got "
                         f"{t[bad].flatten()[0].item()}")
