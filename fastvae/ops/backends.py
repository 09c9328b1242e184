"""Backend selection: which implementation serves a call.

Names: ``"auto"`` (default), ``"triton"``, ``"cuda"``, ``"cpu"`` (the compiled C++ library),
``"torch"`` (the plain-PyTorch reference). The choice is global (``set_backend``,
``FASTVAE_BACKEND``) or scoped (``use_backend``, per thread / task). ``resolve(device)`` turns it
into the concrete backend for one call's tensors; the public functions pass that name to the
custom ops, so the choice is explicit in every traced graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch

NAMES = ("auto", "triton", "cuda", "cpu", "torch")
CONCRETE = ("triton", "cuda", "cpu", "torch")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)}")
    return name


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unusable_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device`` (any device if None), or None."""
    if name == "torch":
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed"
        gpu = torch.cuda.is_available()
        if device is None:
            if gpu or _triton_interpreting():
                return None
            return "no CUDA GPU, and Triton's interpreter is off (set TRITON_INTERPRET=1)"
        if device.type == "cuda":
            return None if gpu else "no CUDA GPU"
        if device.type == "cpu":
            if _triton_interpreting():
                return None
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before import)"
        return f"triton cannot run on {device.type} tensors"
    if name in ("cpu", "cuda"):
        from . import native as _native

        reason = _native.unusable_reason(name)
        if reason is not None:
            return reason
        if device is not None and device.type != name:
            return f"the {name!r} backend cannot serve {device.type} tensors"
        return None
    raise ValueError(f"unknown backend {name!r}")


def backends() -> list[str]:
    """The concrete backends usable on this machine (``"auto"`` is always accepted too)."""
    return [name for name in CONCRETE if unusable_reason(name) is None]


_default = _check_name(os.environ.get("FASTVAE_BACKEND", "auto") or "auto")
# Names of the enclosing ``use_backend`` blocks, innermost last. Plain module state (not a
# ContextVar) so that torch.compile reads it, and guards on it, without a graph break.
_scopes: list[str] = []


def _require_usable(name: str) -> None:
    if name != "auto":
        reason = unusable_reason(name)
        if reason is not None:
            raise RuntimeError(f"fastvae backend {name!r} is not usable here: {reason}")


def set_backend(name: str) -> None:
    """Choose the backend for every later call (``"auto"`` picks per call)."""
    global _default
    _require_usable(_check_name(name))
    _default = name
    _RESOLVED.clear()


def get_backend() -> str:
    """The backend name in effect (may be ``"auto"``)."""
    return _scopes[-1] if _scopes else _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with fv.use_backend("torch"): ...`` -- the backend for the calls inside the block
    (process-wide while the block runs, like ``torch.set_grad_enabled`` is per thread)."""
    _require_usable(_check_name(name))
    _RESOLVED.clear()
    _scopes.append(name)
    try:
        yield
    finally:
        _scopes.pop()
        _RESOLVED.clear()


def resolve(device: torch.device) -> str:
    """The concrete backend for one call whose tensors live on ``device``."""
    return _resolve(get_backend(), device.type)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its import of ``torch._dynamo``.

    That decorator imports the whole compiler (~1.5 s and ~100 MB, with sympy) only to set one
    attribute, ``_dynamo_marked_constant``, which Dynamo reads when it traces a call of ``fn``
    and then calls ``fn`` once and puts its result in the graph as a constant. Setting the
    attribute here keeps ``import fastvae`` cheap; tests/test_package.py checks that it is what
    the decorator sets, and the fullgraph compile tests that Dynamo folds the call.
    """
    fn._dynamo_marked_constant = True
    return fn


# (backend name, device type) -> the concrete backend: the answers of `_resolve` since the last
# `set_backend` / `use_backend` (entered or left), which clear it. A lookup costs ~0.1 us where
# the checks cost ~5 us a call; an unusable choice is never stored, so it raises every time.
_RESOLVED: dict[tuple[str, str], str] = {}


@_assume_constant_result
def _resolve(name: str, device_type: str) -> str:
    # A pure function of its arguments and of facts fixed at start-up (what is installed and
    # built): torch.compile evaluates it once while tracing. Cached (`_RESOLVED`), the cache
    # cleared whenever the choice of backend changes.
    hit = _RESOLVED.get((name, device_type))
    if hit is not None:
        return hit
    _RESOLVED[name, device_type] = concrete = _resolve_uncached(name, device_type)
    return concrete


def _resolve_uncached(name: str, device_type: str) -> str:
    device = torch.device(device_type)
    if name == "auto":
        if device_type == "cuda":
            preference = ("triton", "cuda")
        elif device_type == "cpu":
            preference = ("cpu",)
        else:
            preference = ()
        return next((n for n in preference if unusable_reason(n, device) is None), "torch")
    reason = unusable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"fastvae backend {name!r} cannot serve this call: {reason}")
    return name


@functools.cache
def implementation(name: str) -> ModuleType:
    """The module (or object) implementing the backend interface for ``name``."""
    if name == "torch":
        from . import reference

        return reference
    if name == "triton":
        from .. import kernels

        return kernels
    if name in ("cpu", "cuda"):
        from . import native as _native

        return _native.implementation(name)
    raise ValueError(f"unknown backend {name!r}")
