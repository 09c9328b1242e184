"""The compiled C-ABI library ``libfastvae_native`` (``csrc/``): the ``"cpu"`` and ``"cuda"``
backends.

The library is found through the package's search path (``fastvae.__path__``: an editable
install keeps the ``.py`` files in the source tree but puts compiled files in site-packages),
or at ``$FASTVAE_NATIVE_LIB``; it is loaded lazily with ctypes, and its argument types are
declared once. A missing, stale or broken library leaves the torch and triton backends working:
``unusable_reason`` says what is wrong, and asking for ``"cpu"``/``"cuda"`` raises that.

The library is the one source of the op table (``FV_OPS`` in ``csrc/fastvae.h``): ``OPS``, the
op names in code order, is read from it. This side keeps only what ctypes needs, the layout of
``fv_call`` and ``fv_tensor`` (``_Call``, ``_Tensor``), and the ops it implements (the methods of
``NativeBackend``); on load both are checked against the library, which is refused, with the
reason, when they differ.

Each backend method (the interface of ``fastvae/ops/custom_ops.py``) allocates its outputs
with torch and fills one ``fv_call`` (see ``csrc/fastvae.h``): sizes, the operands as pointer +
element strides + dtype code, the seed's address, the thread count (``torch.get_num_threads()``)
or the CUDA device and torch's current stream on it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

ABI_VERSION = 4


def library_file(stem: str) -> str:
    """The file name of the shared library ``stem`` on this platform (``lib<stem>.so``,
    ``lib<stem>.dylib`` or ``<stem>.dll``)."""
    if sys.platform == "win32":
        return f"{stem}.dll"
    return f"lib{stem}.dylib" if sys.platform == "darwin" else f"lib{stem}.so"


LIB_NAME = library_file("fastvae_native")

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


class _Tensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("stride", ctypes.c_int64 * 3),
        ("dtype", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    )


MAX_IN, MAX_OUT = 6, 4  # FV_MAX_IN, FV_MAX_OUT


class _Call(ctypes.Structure):
    _fields_ = (
        ("B", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("inputs", _Tensor * MAX_IN),
        ("outputs", _Tensor * MAX_OUT),
        ("seed", ctypes.c_void_p),
        ("scalar", ctypes.c_double),
        ("reduce_dim", ctypes.c_int32),
        ("compute", ctypes.c_int32),
        ("n_threads", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("stream", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_int64),
    )


# The C names of the fields whose names differ here ("in" is a Python keyword).
_C_FIELD_NAMES = {"inputs": "in", "outputs": "out"}

# The call is passed by address: the packed bytes of ``_PACKED`` (the backend's path) or
# ``ctypes.byref`` of a ``_Call`` (tests).
_CALL_P = ctypes.c_void_p


def _struct_format(struct: type[ctypes.Structure]) -> str:
    """The ``struct`` module format of a ctypes structure of int64, int32, double, pointer and
    nested structure / array fields, with the same layout (no padding: every field is naturally
    aligned, which ``_PACKED.size == sizeof(_Call)`` confirms at import)."""
    codes = {ctypes.c_int64: "q", ctypes.c_int32: "i", ctypes.c_double: "d",
             ctypes.c_void_p: "Q"}
    out = []
    for _, kind in struct._fields_:
        if issubclass(kind, ctypes.Array):
            inner = kind._type_
            out.append((_struct_format(inner) if issubclass(inner, ctypes.Structure)
                        else codes[inner]) * kind._length_)
        elif issubclass(kind, ctypes.Structure):
            out.append(_struct_format(kind))
        else:
            out.append(codes[kind])
    return "".join(out)


_PACKED = struct.Struct("<" + _struct_format(_Call))
assert _PACKED.size == ctypes.sizeof(_Call), "fv_call has padding: pack it field by field"
_ABSENT = (0, 0, 0, 0, 0, 0)  # an fv_tensor slot with data == NULL
# name: (restype, argtypes) of every exported function.
_SIGNATURES = {
    "fv_abi_version": (ctypes.c_int32, ()),
    "fv_has_cuda": (ctypes.c_int32, ()),
    "fv_build_info": (ctypes.c_char_p, ()),
    "fv_last_error": (ctypes.c_char_p, ()),
    "fv_op_count": (ctypes.c_int32, ()),
    "fv_op_name": (ctypes.c_char_p, (ctypes.c_int32,)),
    "fv_op_inputs": (ctypes.c_char_p, (ctypes.c_int32,)),
    "fv_op_outputs": (ctypes.c_char_p, (ctypes.c_int32,)),
    "fv_op_flags": (ctypes.c_int32, (ctypes.c_int32,)),
    "fv_layout": (ctypes.c_int64, (ctypes.c_char_p,)),
    "fv_cpu_isa": (ctypes.c_char_p, ()),
    "fv_cpu_isas": (ctypes.c_char_p, ()),
    "fv_cpu_set_isa": (ctypes.c_int32, (ctypes.c_char_p,)),
    "fv_cpu_run": (ctypes.c_int32, (ctypes.c_int32, _CALL_P)),
    "fv_cuda_workspace_bytes": (ctypes.c_int64, (ctypes.c_int32, _CALL_P)),
    "fv_cuda_run": (ctypes.c_int32, (ctypes.c_int32, _CALL_P)),
    "fv_randn_host": (None, (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64,
                             ctypes.POINTER(ctypes.c_float))),
    "fv_philox_host": (None, (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64,
                              ctypes.POINTER(ctypes.c_uint32))),
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def library_paths(env_var: str = "FASTVAE_NATIVE_LIB", name: str = LIB_NAME) -> list[Path]:
    """Where the library ``name`` is looked for, in order: the path in the environment
    variable ``env_var`` if set, else the package's folders (also for the dispatcher library,
    ``native_dispatch``)."""
    override = os.environ.get(env_var)
    if override:
        return [Path(override)]
    # The root package's folders (its __path__; the package is imported already, this imports
    # nothing): CMake installs the library there, and an editable install lists both the
    # source tree and site-packages, where the compiled files go.
    package = importlib.util.find_spec("fastvae")
    return [Path(p) / name for p in package.submodule_search_locations or ()]


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, why it cannot be used)``. Cached; ``load.cache_clear()``
    makes the next call look again."""
    paths = library_paths()
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        where = ", ".join(str(p) for p in paths)
        return None, (f"the native library {LIB_NAME} is not built (looked in {where}); "
                      "reinstall fastvae (pip install .) with a C++ compiler and CMake")
    try:
        lib = _open(path)
        _declare(lib, "fv_abi_version")
        version = lib.fv_abi_version()
        if version != ABI_VERSION:
            return None, (f"the native library {path} has ABI version {version}, this fastvae "
                          f"expects {ABI_VERSION}: rebuild it (pip install .)")
        for name in _SIGNATURES:
            _declare(lib, name)
    except (OSError, AttributeError) as e:
        return None, f"loading the native library {path} failed: {e}"
    mismatch = _layout_mismatch(lib) or _ops_mismatch(lib)
    if mismatch is not None:
        return None, (f"the native library {path} does not match this fastvae ({mismatch}) "
                      f"although both say ABI version {ABI_VERSION}: rebuild it (pip install .)")
    return lib, None


def _open(path: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(path))


def _declare(lib: ctypes.CDLL, name: str) -> None:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = _SIGNATURES[name]


def _layout_mismatch(lib: ctypes.CDLL) -> str | None:
    """How the library's fv_call and fv_tensor (sizes, field offsets, FV_MAX_IN/OUT) differ from
    ``_Call`` and ``_Tensor``, or None."""
    expected = {"fv_call": ctypes.sizeof(_Call), "fv_tensor": ctypes.sizeof(_Tensor),
                "FV_MAX_IN": MAX_IN, "FV_MAX_OUT": MAX_OUT}
    for layout, c_name in ((_Call, "fv_call"), (_Tensor, "fv_tensor")):
        for field, _ in layout._fields_:
            expected[f"{c_name}.{_C_FIELD_NAMES.get(field, field)}"] = getattr(layout, field).offset
    diffs = []
    for key, want in expected.items():
        got = lib.fv_layout(key.encode())
        if got != want:
            diffs.append(f"{key}: {'unknown' if got < 0 else got} in the library, {want} here")
    return "; ".join(diffs) or None


def _library_ops(lib: ctypes.CDLL) -> tuple[str, ...]:
    """The library's op names, in code order."""
    return tuple(lib.fv_op_name(code).decode() for code in range(lib.fv_op_count()))


def _ops_mismatch(lib: ctypes.CDLL) -> str | None:
    """How the library's ops differ from those ``NativeBackend`` implements, or None."""
    theirs = _library_ops(lib)
    ours = _implemented_ops()
    diffs = []
    if len(set(theirs)) != len(theirs):
        diffs.append(f"its op table names an op twice: {', '.join(theirs)}")
    if extra := [op for op in theirs if op not in ours]:
        diffs.append(f"ops unknown here: {', '.join(extra)}")
    if missing := [op for op in ours if op not in theirs]:
        diffs.append(f"ops it lacks: {', '.join(missing)}")
    return "; ".join(diffs) or None


def _implemented_ops() -> tuple[str, ...]:
    """The ops this side implements: the ``*_fwd`` / ``*_bwd`` methods of ``NativeBackend``."""
    return tuple(name for name in vars(NativeBackend) if name.endswith(("_fwd", "_bwd")))


def __getattr__(name: str) -> tuple[str, ...]:
    # OPS: the library's op names in code order (() when it cannot be loaded), read on use.
    if name == "OPS":
        lib, _ = load()
        return () if lib is None else _library_ops(lib)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unusable_reason(kind: str) -> str | None:
    """Why backend ``kind`` (``"cpu"`` or ``"cuda"``) cannot run here, or None."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"not a native backend: {kind!r}")
    lib, reason = load()
    if lib is None:
        return reason
    if kind == "cuda":
        if not lib.fv_has_cuda():
            return ("the native library was built without CUDA (no nvcc at build time, or "
                    "FASTVAE_ENABLE_CUDA=OFF)")
        if not torch.cuda.is_available():
            return "no CUDA GPU available to torch"
    return None


def implementation(kind: str) -> NativeBackend:
    """The backend object (the interface of ``fastvae/ops/custom_ops.py``) for ``"cpu"`` or
    ``"cuda"``."""
    reason = unusable_reason(kind)
    if reason is not None:
        raise RuntimeError(f"fastvae backend {kind!r}: {reason}")
    return _backend(kind)


@functools.cache
def _backend(kind: str) -> NativeBackend:
    return NativeBackend(load()[0], kind)


def build_info() -> str | None:
    """Compiler, CPU kernel sets and CUDA architectures of the library; None if not loaded."""
    lib, _ = load()
    return None if lib is None else lib.fv_build_info().decode()


def cpu_isa() -> str | None:
    """The CPU kernel set in use (``"avx512"``, ``"avx2"`` or ``"baseline"``); None if not
    loaded."""
    lib, _ = load()
    return None if lib is None else lib.fv_cpu_isa().decode()


def cpu_isas() -> list[str]:
    """The CPU kernel sets this build has and this CPU runs, best first."""
    lib, _ = load()
    return [] if lib is None else lib.fv_cpu_isas().decode().split(",")


def set_cpu_isa(name: str) -> None:
    """Use CPU kernel set ``name``: ``"auto"`` (the best), or one of ``cpu_isas()`` (for tests
    and benchmarks; ``FASTVAE_CPU_ISA`` sets it when the library loads)."""
    lib = implementation("cpu")._lib
    if lib.fv_cpu_set_isa(name.encode()) != 0:
        raise ValueError(f"CPU kernel set {name!r} is not available on this machine")


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slot(t: Tensor | tuple[Tensor, tuple[int, ...]] | None) -> tuple:
    """The fields of one fv_tensor: pointer, element strides along (K, B, N) -- 1-D tensors
    along N -- and dtype code. ``(t, strides)``: a view of ``t`` with those strides, described
    without making it."""
    if t is None:
        return _ABSENT
    if type(t) is tuple:
        t, strides = t
    else:
        strides = t.stride()
    if len(strides) == 2:
        return (t.data_ptr(), 0, *strides, DTYPES[t.dtype], 0)
    if len(strides) == 1:
        return (t.data_ptr(), 0, 0, *strides, DTYPES[t.dtype], 0)
    return (t.data_ptr(), *strides, DTYPES[t.dtype], 0)


def _rows_view(grad: Tensor, reduce_dim: int, dtype: torch.dtype) -> tuple:
    """A (B,) or (N,) gradient of a sum as a broadcast (B, N) operand (``_slot``'s
    ``(tensor, strides)``), in the compute dtype."""
    if grad.dtype != dtype:
        grad = grad.to(dtype)
    (stride,) = grad.stride()
    return grad, ((0, stride, 0) if reduce_dim == 1 else (0, 0, stride))


def _samples_view(t: Tensor | None, N: int) -> Tensor | None:
    """A (K, B) tensor as a (K, B, N) view with stride 0 along N (IWAE's log_px, log_w)."""
    return None if t is None else t.unsqueeze(-1).expand(*t.shape, N)


def _per_row_view(t: Tensor, K: int, N: int, dtype: torch.dtype) -> Tensor:
    """A (B,) tensor as a (K, B, N) view with stride 0 along K and N, in ``dtype``."""
    return t.to(dtype)[None, :, None].expand(K, t.shape[0], N)


def _maybe_empty(need: bool, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    return torch.empty(shape, dtype=like.dtype, device=like.device) if need else None


def _present(outs: Sequence[Tensor | None]) -> list[Tensor]:
    return [o for o in outs if o is not None]


class NativeBackend:
    """The ``"cpu"`` or ``"cuda"`` backend: one method per op of the backend interface, each a
    call of the native library (no fallback: every op of the interface is native)."""

    def __init__(self, lib: ctypes.CDLL, kind: str):
        self._lib = lib
        self.kind = kind
        self._run = lib.fv_cpu_run if kind == "cpu" else lib.fv_cuda_run
        self._codes = {name: code for code, name in enumerate(_library_ops(lib))}

    def _call(self, op: str, like: Tensor, inputs: Sequence, outputs: Sequence, *, K: int = 1,
              seed: Tensor | None = None, scalar: float = 0.0, reduce_dim: int = 1) -> None:
        """Run ``op`` on (B, N) = ``like.shape``; operand slots as in csrc/fastvae.h, each a
        tensor, ``(tensor, strides)`` (see ``_slot``) or None."""
        fields = [*like.shape, K]
        for slots, count in ((inputs, MAX_IN), (outputs, MAX_OUT)):
            for t in slots:
                fields.extend(_slot(t))
            fields.extend(_ABSENT * (count - len(slots)))
        fields.append(0 if seed is None else seed.data_ptr())
        fields.append(scalar)
        fields.append(reduce_dim)
        fields.append(DTYPES[_compute_dtype(like.dtype)])
        code = self._codes[op]
        if self.kind == "cpu":
            fields.extend((torch.get_num_threads(), 0, 0, 0, 0))
            status = self._run(code, _PACKED.pack(*fields))
        else:
            device = like.device
            index = device.index if device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(device).cuda_stream
            fields.extend((0, index, stream, 0, 0))
            nbytes = self._lib.fv_cuda_workspace_bytes(code, _PACKED.pack(*fields))
            workspace = None
            if nbytes > 0:
                workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
                fields[-2:] = (workspace.data_ptr(), nbytes)
            status = self._run(code, _PACKED.pack(*fields))
        if status != 0:
            message = self._lib.fv_last_error().decode(errors="replace")
            raise RuntimeError(f"fastvae {self.kind} backend, {op}: {message}")

    def _sum_out(self, like: Tensor, reduce_dim: int) -> Tensor:
        size = like.shape[0] if reduce_dim == 1 else like.shape[1]
        return torch.empty(size, dtype=_compute_dtype(like.dtype), device=like.device)

    # -- reparameterize ---------------------------------------------------------------------

    def reparameterize_fwd(self, mu, logvar, eps, seed, n_samples, keep_noise=False):
        B, N = mu.shape
        z = torch.empty((n_samples, B, N), dtype=mu.dtype, device=mu.device)
        keep = keep_noise and eps is None
        noise = mu.new_empty((n_samples, B, N) if keep else (0,))
        self._call("reparameterize_fwd", mu, (mu, logvar, eps), (z, noise if keep else None),
                   K=n_samples, seed=seed if eps is None else None)
        return z, noise

    def reparameterize_bwd(self, grad_z, noise, mu, logvar, eps, seed, needs):
        if eps is None and noise.numel():  # the noise kept by the forward
            return self._reparameterize_backward(grad_z, mu, logvar, noise, None, needs, mu)
        return self._reparameterize_backward(grad_z, mu, logvar, eps, seed, needs, eps)

    def _reparameterize_backward(self, grad_z, mu, logvar, eps, seed, needs, given):
        K = grad_z.shape[0]
        B, N = mu.shape
        outs = (_maybe_empty(needs[0], (B, N), mu), _maybe_empty(needs[1], (B, N), logvar),
                _maybe_empty(needs[2], (K, B, N), mu if given is None else given))
        self._call("reparameterize_bwd", mu, (grad_z, logvar, eps), outs, K=K,
                   seed=seed if eps is None and needs[1] else None)
        return _present(outs)

    # -- gaussian_kl ------------------------------------------------------------------------

    def gaussian_kl_fwd(self, mu, logvar, prior_mu, prior_logvar, reduce_dim):
        kl = self._sum_out(mu, reduce_dim)
        self._call("gaussian_kl_fwd", mu, (mu, logvar, prior_mu, prior_logvar), (kl,),
                   reduce_dim=reduce_dim)
        return kl

    def gaussian_kl_bwd(self, grad, mu, logvar, prior_mu, prior_logvar, reduce_dim, needs):
        B, N = mu.shape
        g = _rows_view(grad, reduce_dim, _compute_dtype(mu.dtype))
        outs = tuple(_maybe_empty(need, (B, N), mu) for need in needs)
        self._call("gaussian_kl_bwd", mu, (g, mu, logvar, prior_mu, prior_logvar), outs,
                   reduce_dim=reduce_dim)
        return _present(outs)

    # -- bernoulli_nll, continuous_bernoulli_nll: one pair of methods serves both ------------

    def _logits_forward(self, op, logits, target):
        nll = self._sum_out(logits, 1)
        self._call(f"{op}_fwd", logits, (logits, target), (nll,))
        return nll

    def _logits_backward(self, op, grad, logits, target, needs):
        B, N = logits.shape
        g = _rows_view(grad, 1, _compute_dtype(logits.dtype))
        outs = tuple(_maybe_empty(need, (B, N), logits) for need in needs)
        self._call(f"{op}_bwd", logits, (g, logits, target), outs)
        return _present(outs)

    def bernoulli_nll_fwd(self, logits, target):
        return self._logits_forward("bernoulli_nll", logits, target)

    def bernoulli_nll_bwd(self, grad, logits, target, needs):
        return self._logits_backward("bernoulli_nll", grad, logits, target, needs)

    def continuous_bernoulli_nll_fwd(self, logits, target):
        return self._logits_forward("continuous_bernoulli_nll", logits, target)

    def continuous_bernoulli_nll_bwd(self, grad, logits, target, needs):
        return self._logits_backward("continuous_bernoulli_nll", grad, logits, target, needs)

    # -- gaussian_nll -----------------------------------------------------------------------

    def gaussian_nll_fwd(self, mean, target, logvar, logvar_value):
        nll = self._sum_out(mean, 1)
        self._call("gaussian_nll_fwd", mean, (mean, target, logvar), (nll,),
                   scalar=float(logvar_value))
        return nll

    def gaussian_nll_bwd(self, grad, mean, target, logvar, logvar_value, needs):
        B, N = mean.shape
        g = _rows_view(grad, 1, _compute_dtype(mean.dtype))
        outs = tuple(_maybe_empty(need, (B, N), mean) for need in needs)
        self._call("gaussian_nll_bwd", mean, (g, mean, target, logvar), outs,
                   scalar=float(logvar_value))
        return _present(outs)

    # -- sample_and_kl ----------------------------------------------------------------------

    def sample_and_kl_fwd(self, mu, logvar, seed, reduce_dim):
        z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
        kl = self._sum_out(mu, reduce_dim)
        self._call("sample_and_kl_fwd", mu, (mu, logvar), (z, kl), seed=seed,
                   reduce_dim=reduce_dim)
        return z, kl

    def sample_and_kl_bwd(self, grad_z, grad_kl, mu, logvar, seed, reduce_dim, needs):
        B, N = mu.shape
        gkl = _rows_view(grad_kl, reduce_dim, _compute_dtype(mu.dtype))
        outs = (_maybe_empty(needs[0], (B, N), mu), _maybe_empty(needs[1], (B, N), logvar))
        self._call("sample_and_kl_bwd", mu, (grad_z, gkl, mu, logvar), outs,
                   seed=seed if needs[1] else None, reduce_dim=reduce_dim)
        return _present(outs)

    # -- iwae_log_likelihood -----------------------------------------------------------------

    def iwae_fwd(self, log_px, z, mu, logvar):
        K, B, N = z.shape
        dtype = _compute_dtype(z.dtype)
        ll = torch.empty(B, dtype=dtype, device=z.device)
        log_w = torch.empty((K, B), dtype=dtype, device=z.device)
        self._call("iwae_fwd", mu, (_samples_view(log_px, N), z, mu, logvar),
                   (ll, _samples_view(log_w, N)), K=K)
        return ll, log_w

    def iwae_bwd(self, grad, ll, log_w, log_px, z, mu, logvar, needs):
        K, B, N = z.shape
        dtype = _compute_dtype(z.dtype)
        outs = (_maybe_empty(needs[0], (K, B), log_px), _maybe_empty(needs[1], (K, B, N), z),
                _maybe_empty(needs[2], (B, N), mu), _maybe_empty(needs[3], (B, N), logvar))
        inputs = (_per_row_view(grad, K, N, dtype), _per_row_view(ll, K, N, dtype),
                  _samples_view(log_w.to(dtype), N), z, mu, logvar)
        self._call("iwae_bwd", mu, inputs, (_samples_view(outs[0], N), *outs[1:]), K=K)
        return _present(outs)

    # -- discretized_mix_logistic_nll --------------------------------------------------------
    # params (B, P, S) goes as a (P, B, S) view (stride[0] along its rows), x as one (B, S)
    # view per channel in the compute dtype, K = the mixtures, scalar = the bin count.

    def _dmol_operands(self, params, x):
        dtype = _compute_dtype(params.dtype)
        x = x.to(dtype)
        channels = [x[:, c] for c in range(x.shape[1])]
        return (params.transpose(0, 1), *channels), params[:, 0]

    def discretized_mix_logistic_nll_fwd(self, params, x, n_mixtures, n_bins):
        operands, like = self._dmol_operands(params, x)
        nll = self._sum_out(like, 1)
        self._call("discretized_mix_logistic_nll_fwd", like, operands, (nll,), K=n_mixtures,
                   scalar=float(n_bins))
        return nll

    def discretized_mix_logistic_nll_bwd(self, grad, params, x, n_mixtures, n_bins):
        operands, like = self._dmol_operands(params, x)
        g = _rows_view(grad, 1, _compute_dtype(params.dtype))
        d_params = torch.empty(params.shape, dtype=params.dtype, device=params.device)
        self._call("discretized_mix_logistic_nll_bwd", like, (g, *operands),
                   (d_params.transpose(0, 1),), K=n_mixtures, scalar=float(n_bins))
        return d_params


# ---------------------------------------------------------------------------------------------
# nearest_code (vector quantization). Self-contained: the int64 index is the one operand of
# another dtype (FV_INT64, the mark % of FV_OPS).
# ---------------------------------------------------------------------------------------------

FV_INT64 = 4
DTYPES[torch.int64] = FV_INT64
NEAREST_CODE_METRIC_CODES = {"l2": 0.0, "cosine": 1.0}  # call->scalar


def _nearest_code_fwd(self: NativeBackend, x: Tensor, codebook: Tensor,
                      metric: str) -> tuple[Tensor, Tensor]:
    """``x (N, D)``, ``codebook (K, D)`` (one dtype, N, K, D >= 1) -> ``(index int64 (N,),
    dist (N,))`` in the compute dtype. The codebook goes as a (K, N, D) view with stride 0
    along N, the metric as the call's scalar."""
    N, _ = x.shape
    K = codebook.shape[0]
    index = torch.empty(N, dtype=torch.int64, device=x.device)
    dist = torch.empty(N, dtype=_compute_dtype(x.dtype), device=x.device)
    self._call("nearest_code_fwd", x, (x, codebook.unsqueeze(1).expand(K, *x.shape)),
               (index, dist), K=K, scalar=NEAREST_CODE_METRIC_CODES[metric])
    return index, dist


NativeBackend.nearest_code_fwd = _nearest_code_fwd


# ---------------------------------------------------------------------------------------------
# finite_scalar_quantize: the (D,) operands (levels, basis: int64, the % of FV_OPS; a, b: the
# compute dtype) go as (B, D) views with stride 0 along B; the mode as the call's scalar.
# ---------------------------------------------------------------------------------------------


def _per_dim(t: Tensor) -> tuple:
    return t, (0, t.stride(0))


def _fsq_fwd(self: NativeBackend, z: Tensor, levels: Tensor, basis: Tensor, a: Tensor, b: Tensor,
             mode: int) -> tuple[Tensor, Tensor]:
    """``z (N, D)`` -> ``(codes (N, D) in z's dtype, index int64 (N,))``."""
    codes = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    index = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    compute = _compute_dtype(z.dtype)
    self._call("finite_scalar_quantize_fwd", z,
               (z, _per_dim(levels), _per_dim(basis), _per_dim(a.to(compute)),
                _per_dim(b.to(compute))), (codes, index), scalar=float(mode))
    return codes, index


def _fsq_bwd(self: NativeBackend, grad: Tensor, z: Tensor, levels: Tensor, basis: Tensor,
             a: Tensor, b: Tensor, mode: int) -> Tensor:
    """d codes / d z times ``grad (N, D)``, in z's dtype."""
    d_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    compute = _compute_dtype(z.dtype)
    self._call("finite_scalar_quantize_bwd", z,
               (grad.to(z.dtype), z, _per_dim(levels), _per_dim(a.to(compute)),
                _per_dim(b.to(compute))), (d_z,), scalar=float(mode))
    return d_z


NativeBackend.finite_scalar_quantize_fwd = _fsq_fwd
NativeBackend.finite_scalar_quantize_bwd = _fsq_bwd


# ---------------------------------------------------------------------------------------------
# lfq_entropy (lookup-free quantization). A call: B = R rows, N = d bits, K = C codebooks; the
# logits (R, C, d) as a (C, R, d) view, the code sums (C, 2**d) as (C, -, 2**d), the per-row
# entropies (R, C) as (C, R, -); eps as the call's scalar.
# ---------------------------------------------------------------------------------------------


def _lfq_views(logits: Tensor) -> tuple:
    sr, sc, sj = logits.stride()
    return (logits, (sc, sr, sj)), logits[:, 0, :]


def _lfq_entropy_fwd(self: NativeBackend, logits: Tensor,
                     clamp: float) -> tuple[Tensor, Tensor]:
    """``logits (R, C, d)`` (R, C, d >= 1) -> ``(sums (C, 2**d), entropy (R, C))`` in the
    compute dtype; ``clamp``: the op's ``eps`` (the call's scalar)."""
    R, C, d = logits.shape
    dtype = _compute_dtype(logits.dtype)
    sums = torch.empty((C, 1 << d), dtype=dtype, device=logits.device)
    entropy = torch.empty((R, C), dtype=dtype, device=logits.device)
    operand, like = _lfq_views(logits)
    self._call("lfq_entropy_fwd", like, (operand,),
               ((sums, (sums.stride(0), 0, sums.stride(1))),
                (entropy, (entropy.stride(1), entropy.stride(0), 0))), K=C, scalar=float(clamp))
    return sums, entropy


def _lfq_entropy_bwd(self: NativeBackend, grad_sums: Tensor, grad_entropy: Tensor,
                     logits: Tensor, clamp: float, needs: Sequence[bool]) -> list[Tensor]:
    """The gradient of the logits from those of the code sums ``(C, 2**d)`` and of the per-row
    entropies ``(R, C)``."""
    if not needs[0]:
        return []
    R, C, d = logits.shape
    dtype = _compute_dtype(logits.dtype)
    gs = grad_sums.to(dtype)
    ge = grad_entropy.to(dtype)
    d_logits = torch.empty((R, C, d), dtype=logits.dtype, device=logits.device)
    operand, like = _lfq_views(logits)
    self._call("lfq_entropy_bwd", like,
               ((gs, (gs.stride(0), 0, gs.stride(1))), (ge, (ge.stride(1), ge.stride(0), 0)),
                operand),
               ((d_logits, (d_logits.stride(1), d_logits.stride(0), d_logits.stride(2))),),
               K=C, scalar=float(clamp))
    return [d_logits]


NativeBackend.lfq_entropy_fwd = _lfq_entropy_fwd
NativeBackend.lfq_entropy_bwd = _lfq_entropy_bwd


# ---------------------------------------------------------------------------------------------
# residual_vq (residual vector quantization; csrc/residual_vq.inc). x and the codebooks come in
# the compute dtype; K codes per level, the scalar L - 1, reduce_dim the rotation flag; (N, L)
# operands are 2-D slots (row, level).
# ---------------------------------------------------------------------------------------------


def _residual_vq_fwd(self: NativeBackend, x: Tensor, codebooks: Tensor,
                     n_levels: Tensor | None, rotation: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x (N, D)``, ``codebooks (L, K, D)`` (one compute dtype), ``n_levels`` int64 (N,) or
    None -> ``(quantized (N, D), indices (N, L), commit (N, L), dist (N, L))``."""
    N, D = x.shape
    L, K, _ = codebooks.shape
    index = torch.empty((N, L), dtype=torch.int64, device=x.device)
    q = torch.empty((N, D), dtype=x.dtype, device=x.device)
    commit = torch.empty((N, L), dtype=x.dtype, device=x.device)
    dist = torch.empty((N, L), dtype=x.dtype, device=x.device)
    cb = (codebooks, (codebooks.stride(1), codebooks.stride(0), codebooks.stride(2)))
    levels = None if n_levels is None else (n_levels, (0, n_levels.stride(0), 0))
    self._call("residual_vq_fwd", x, (x, cb, levels),
               (index, q, commit, dist),
               K=K, scalar=float(L - 1))
    return q, index, commit, dist


def _residual_vq_bwd(self: NativeBackend, grad_q: Tensor, grad_commit: Tensor,
                     grad_dist: Tensor, indices: Tensor, x: Tensor, codebooks: Tensor,
                     n_levels: Tensor | None, rotation: int, needs: list[bool]) -> list[Tensor]:
    """The gradients of ``x`` and ``codebooks`` asked for (the inactive levels are the -1
    indices: ``n_levels`` is not read)."""
    L, K, _ = codebooks.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None
    dcb = (torch.empty_like(codebooks, memory_format=torch.contiguous_format)
           if needs[1] else None)
    g = grad_q.to(x.dtype)
    cb = (codebooks, (codebooks.stride(1), codebooks.stride(0), codebooks.stride(2)))
    self._call("residual_vq_bwd", x,
               (g, grad_commit.to(x.dtype), grad_dist.to(x.dtype), indices, x, cb),
               (dx, None if dcb is None else (dcb, (dcb.stride(1), dcb.stride(0),
                                                    dcb.stride(2)))),
               K=K, scalar=float(L - 1), reduce_dim=int(rotation))
    return [t for t in (dx, dcb) if t is not None]


NativeBackend.residual_vq_fwd = _residual_vq_fwd
NativeBackend.residual_vq_bwd = _residual_vq_bwd
