"""The optional torch-ABI library ``libfastvae_torch`` (``csrc/torch_ops.cpp``): the ``"cpu"`` and
``"cuda"`` backends as C++ kernels of torch's dispatcher, autograd included.

An eager call through the Python custom ops costs ~110 us of Python per op (forward and
backward: ``autograd.Function``, the generic layer, ctypes) where an ATen op costs a few; this
library removes that layer. For each row of ``custom_ops.OPS`` that it serves, this module
defines two overloads with the Python ops' schemas, ``fastvae::<op>.native`` and
``fastvae::<op>_backward.native``, registers their fake kernels (the row's own), and asks the
library to register its generic CPU, CUDA and Autograd kernels for them (``fv_torch_register``
with the row's structure). ``custom_ops.call`` then sends eager calls of the native backends
there; tracing (torch.compile, make_fx, opcheck of the default overloads), tensor subclasses
and the other backends keep the Python path. Same kernels, same ``fv_call``s, bitwise the same
results (tests/ops/test_native_dispatch.py).

The library is built only when torch is importable at build time (it is compiled against that
torch's headers and C++ ABI; CMakeLists.txt): ``pip install --no-build-isolation .`` after torch
(``scripts/env.sh`` does so), whereas a plain ``pip install .`` builds in an isolated environment
without torch and installs only the C library, and every op keeps the Python path. A library
built against another torch fails to load (undefined symbols) and is ignored, with the reason in
``unusable_reason()``. ``FASTVAE_NATIVE_DISPATCH=0`` turns the library off (for comparisons);
``FASTVAE_TORCH_LIB`` names the file to load.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from . import native as _native

LIB_NAME = _native.library_file("fastvae_torch")

_I64 = ctypes.c_int64
_I64_P = ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {
    "fv_torch_abi_version": (ctypes.c_int32, ()),
    "fv_torch_serves": (ctypes.c_int32, (ctypes.c_char_p,)),
    "fv_torch_register": (ctypes.c_int32, (ctypes.c_char_p, ctypes.c_char_p, _I64, _I64, _I64,
                                           _I64, _I64, _I64, _I64_P, _I64, _I64_P, _I64,
                                           _I64_P, _I64)),
}


def library_paths() -> list[Path]:
    """Where the library is looked for, in order (as for the C library: ``native.py``;
    ``FASTVAE_TORCH_LIB`` overrides)."""
    return _native.library_paths("FASTVAE_TORCH_LIB", LIB_NAME)


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, why it is not used)``. Cached."""
    if os.environ.get("FASTVAE_NATIVE_DISPATCH", "1") == "0":
        return None, "turned off (FASTVAE_NATIVE_DISPATCH=0)"
    _, reason = _native.load()  # the kernels' library, which this one links to
    if reason is not None:
        return None, reason
    paths = library_paths()
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return None, (f"{LIB_NAME} is not built (looked in {', '.join(str(p) for p in paths)}): "
                      "it is built when torch is importable at build time, e.g. "
                      "pip install --no-build-isolation .")
    try:
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as e:  # e.g. built against another torch
        return None, (f"loading {path} failed ({e}); rebuild it against torch "
                      f"{torch.__version__} (pip install --no-build-isolation .)")
    version = lib.fv_torch_abi_version()
    if version != _native.ABI_VERSION:
        return None, (f"{path} has ABI version {version}, this fastvae expects "
                      f"{_native.ABI_VERSION}: rebuild it")
    return lib, None


def unusable_reason() -> str | None:
    """Why eager calls of the native backends keep the Python path, or None."""
    return load()[1]


# The overloads' definitions live as long as the process (torch.library.Library).
_LIBRARY: torch.library.Library | None = None


@functools.cache
def overloads(rows: tuple[tuple[object, object], ...]) -> dict[object, object]:
    """custom-op object -> its ``.native`` overload, for every row of ``rows`` (pairs of a custom
    op and its ``custom_ops.OpSpec``) that the library serves; ``{}`` when it is not used. The
    first call defines and registers them (``custom_ops.native_overloads`` makes it)."""
    global _LIBRARY
    lib, _ = load()
    if lib is None:
        return {}
    _LIBRARY = torch.library.Library("fastvae", "FRAGMENT")
    served = {}
    for op, spec in rows:
        # saved outputs: non-differentiable ones only (kept as plain tensors by the C++ node)
        if (not spec.grads or not set(spec.saved_outputs) <= set(spec.non_differentiable)
                or not lib.fv_torch_serves(spec.method.encode())):
            continue
        forward_fake, backward_fake = spec.fake_kernels()
        for name, schema, fake in ((spec.name, spec.forward_schema(), forward_fake),
                                   (f"{spec.name}_backward", spec.backward_schema(),
                                    backward_fake)):
            _LIBRARY.define(f"{name}.native{schema}")
            torch.library.register_fake(f"fastvae::{name}.native", fake, lib=_LIBRARY)

        def indices(values):
            return (ctypes.c_int64 * max(len(values), 1))(*values), len(values)

        backward_attrs, n_bw = indices(spec.backward_attrs)
        non_differentiable, n_nd = indices(spec.non_differentiable)
        saved_outputs, n_saved = indices(spec.saved_outputs)
        status = lib.fv_torch_register(
            spec.name.encode(), spec.method.encode(), spec.n_tensors,
            len(spec.attribute_names), spec.returns.count("Tensor"), spec.grads,
            -1 if spec.reduction_at is None else spec.reduction_at,
            -1 if spec.per_sample is None else spec.per_sample,
            backward_attrs, n_bw, non_differentiable, n_nd, saved_outputs, n_saved)
        if status != 0:
            raise RuntimeError(f"{LIB_NAME} refused to register fastvae::{spec.name}")
        served[op] = getattr(torch.ops.fastvae, spec.name).native
    return served
