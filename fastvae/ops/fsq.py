"""Finite scalar quantization (FSQ; Mentzer, Minnen, Agustsson & Tschannen, *Finite Scalar
Quantization: VQ-VAE Made Simple*, ICLR 2024, arXiv:2309.15505): every dimension of a vector is
bounded and rounded to one of ``L_j`` levels; the code's index is the mixed-radix number of its
digits. The implicit codebook (``prod(L)`` codes) never exists: the op is elementwise plus one
integer sum per vector.

As vector-quantize-pytorch 1.32.0's ``FSQ`` computes it (docs/conventions.md says where we
differ): per dimension with ``L`` levels, ``hw = L // 2``,

    half_l = (L - 1)(1 + 1e-3) / 2,  offset = 1/2 (L even) or 0,  shift = atanh(offset / half_l)
    code   = round(tanh(z + shift) half_l - offset) / hw          (round half to even)
    index  = sum_j (code_j hw_j + hw_j) basis_j,  basis = cumprod([1] + levels[:-1])

with the straight-through gradient through the rounding: ``d code / d z = half_l sech^2(z +
shift) / hw``. ``preserve_symmetry`` is the symmetric quantizer of Zhao et al. 2024
(arXiv:2411.19842, section 3.2), ``code = 2 floor((L - 1)(tanh z + 1)/2 + 1/2) / (L - 1) - 1``;
``hard_clamp`` replaces ``tanh`` by ``clamp(., -1, 1)`` (and ``atanh`` by the identity).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import custom_ops as _ops
from . import reference
from . import validation as check
from .backends import resolve

__all__ = ["FSQOutput", "finite_scalar_quantize", "fsq_codes_to_indices",
           "fsq_indices_to_codes"]

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_LEVEL = 2**24  # levels per dimension: every level index exact in float32


class FSQOutput(NamedTuple):
    """What ``finite_scalar_quantize`` returns."""

    codes: Tensor
    indices: Tensor


class _Plan(NamedTuple):
    levels: tuple[int, ...]
    basis: tuple[int, ...]
    size: int  # prod(levels), the implicit codebook's size
    a: tuple[float, ...]  # the bound's float32 constants (reference.fsq_bound_constants)
    b: tuple[float, ...]


def _levels_tuple(levels: object) -> tuple:
    if not isinstance(levels, (Tensor, Sequence)) and hasattr(levels, "__array__"):
        levels = torch.as_tensor(levels)  # a NumPy array (config loaders give them)
    if isinstance(levels, Tensor):
        if levels.dim() != 1 or levels.dtype.is_floating_point or levels.dtype == torch.bool:
            raise TypeError(f"levels must be a sequence of ints or a 1-D integer array, got a "
                            f"{levels.dtype} tensor of shape {tuple(levels.shape)}")
        return tuple(levels.tolist())
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"levels must be a sequence of ints, got {type(levels).__name__}")
    return tuple(check.integer(f"levels[{i}]", v) for i, v in enumerate(levels))


@functools.lru_cache(maxsize=256)
def _plan(levels: tuple, preserve_symmetry: bool, hard_clamp: bool) -> _Plan:
    if len(levels) == 0:
        raise ValueError("levels must not be empty")
    for i, level in enumerate(levels):
        if level < 2:
            raise ValueError(f"levels[{i}] must be >= 2, got {level}")
        if level > MAX_LEVEL:
            raise ValueError(f"levels[{i}] = {level} exceeds 2**24, the most levels whose codes "
                             f"float32 represents exactly")
        if level == 2 and not preserve_symmetry:
            raise ValueError(f"levels[{i}] = 2 needs preserve_symmetry=True (the tanh bound's "
                             f"two levels are not symmetric about 0; vector-quantize-pytorch "
                             f"asserts the same)")
    basis, size = [], 1
    for level in levels:
        basis.append(size)
        size *= level
    if size > INT64_MAX:
        raise ValueError(f"levels: the codebook size prod(levels) = {size} exceeds 2**63 - 1, "
                         f"the largest int64 index")
    mode = _mode(preserve_symmetry, hard_clamp)
    a, b = reference.fsq_bound_constants(list(levels), mode)
    return _Plan(levels, tuple(basis), size, tuple(a.tolist()), tuple(b.tolist()))


def _mode(preserve_symmetry: bool, hard_clamp: bool) -> int:
    return ((reference.FSQ_SYMMETRIC if preserve_symmetry else 0)
            | (reference.FSQ_HARD_CLAMP if hard_clamp else 0))


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def fsq_plan(levels: object, preserve_symmetry: bool = False, hard_clamp: bool = False) -> _Plan:
    """The validated levels, their basis, the codebook size and the bound's constants (cached;
    a constant for torch.compile, which runs it while tracing). Raises as
    ``finite_scalar_quantize`` does."""
    return _plan(_levels_tuple(levels), _flag("preserve_symmetry", preserve_symmetry),
                 _flag("hard_clamp", hard_clamp))


# What torch.compiler.assume_constant_result does (set here without importing torch._dynamo,
# which `import fastvae` does not load): the compiler runs fsq_plan while tracing and keeps its
# result as a constant (it computes the bound's constants with torch ops on the CPU).
fsq_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]


def index_dtype_for(size: int) -> torch.dtype:
    """int32 for a codebook of at most 2**31 - 1 codes, int64 beyond."""
    return torch.int32 if size <= INT32_MAX else torch.int64


# The op's constant operands per (plan, mode, device, compute dtype): made once (a host-to-device
# copy is a synchronization on CUDA), never per call.
_CONSTANTS: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _constants(plan: _Plan, device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    key = (plan, device, dtype)
    found = None if torch.compiler.is_compiling() else _CONSTANTS.get(key)
    if found is not None:
        return found
    made = (torch.tensor(plan.levels, dtype=torch.int64, device=device),
            torch.tensor(plan.basis, dtype=torch.int64, device=device),
            torch.tensor(plan.a, dtype=dtype, device=device),
            torch.tensor(plan.b, dtype=dtype, device=device))
    if not torch.compiler.is_compiling():
        if len(_CONSTANTS) >= 1024:
            _CONSTANTS.clear()
        _CONSTANTS[key] = made
    return made


def finite_scalar_quantize(z: Tensor, levels: Sequence[int] | Tensor, *,
                           preserve_symmetry: bool = False, hard_clamp: bool = False,
                           index_dtype: torch.dtype | None = None) -> FSQOutput:
    """Finite scalar quantization of ``z`` (Mentzer et al. 2023, arXiv:2309.15505), fused: one
    pass computes the codes and the indices; the implicit codebook is never built.

    Per dimension ``j`` with ``L = levels[j]`` levels and ``hw = L // 2``:

    - default (the paper's bound, as vector-quantize-pytorch 1.32.0's ``FSQ.bound``):
      ``code = round(tanh(z + shift) half_l - offset) / hw`` with ``half_l = (L - 1)(1 + 1e-3)/2``,
      ``offset = 1/2`` for even ``L`` (0 for odd), ``shift = atanh(offset / half_l)``; rounding
      half to even (``torch.round``); the codes lie on ``{-hw, ..., L - 1 - hw} / hw``;
    - ``preserve_symmetry=True`` (Zhao et al. 2024, arXiv:2411.19842, section 3.2):
      ``code = 2 floor((L - 1)(tanh(z) + 1)/2 + 1/2) / (L - 1) - 1``, symmetric about 0 (allows
      ``L = 2``);
    - ``hard_clamp=True``: ``clamp(., -1, 1)`` instead of ``tanh`` (and ``offset / half_l`` as
      the shift), for inputs already bounded.

    The index is the mixed-radix number of the digits ``level_j = code_j hw + hw`` (symmetric:
    ``(code_j + 1)(L - 1)/2``): ``sum_j level_j basis_j``, ``basis = cumprod([1] + levels[:-1])``,
    computed in integers: exact for every level configuration (vector-quantize-pytorch sums
    floats, inexact beyond 2**24). The gradient is straight-through the rounding times the
    bound's derivative, in closed form: ``half_l sech^2(z + shift) / hw`` (symmetric:
    ``(L - 1) sech^2(z) / (L - 1)``, rounded as vector-quantize-pytorch's autograd orders it;
    hard clamp: 1 inside [-1, 1], 0 outside).

    Computed in float32 (float64 for float64 inputs; half precision is upcast), with the bound's
    constants in float32 as vector-quantize-pytorch computes them. A NaN in ``z`` gives NaN codes
    (that element) and index -1 (that vector); ``±inf`` saturate to the end levels.

    Args:
        z: ``(..., D)`` floating tensor (float16, bfloat16, float32, float64), any strides.
        levels: ``D`` integers in [2, 2**24] (2 only with ``preserve_symmetry``) whose product
            (the codebook size) is at most 2**63 - 1; a sequence or a 1-D integer tensor.
        preserve_symmetry: the symmetric quantizer above.
        hard_clamp: clamp instead of tanh.
        index_dtype: ``torch.int32`` or ``torch.int64``; default int32 when the codebook has at
            most 2**31 - 1 codes, else int64.

    Returns:
        ``FSQOutput(codes, indices)``: ``codes`` of ``z``'s shape and dtype (carrying the
        gradient); ``indices`` of shape ``z.shape[:-1]``.

    Raises:
        TypeError: ``z`` is not a floating tensor; ``levels`` not integers; the flags not bools;
            ``index_dtype`` not int32/int64.
        ValueError: ``z.shape[-1] != len(levels)``; ``z`` 0-d; empty levels, a level < 2 (or 2
            without ``preserve_symmetry``) or > 2**24; a codebook beyond 2**63 - 1 codes, or beyond
            2**31 - 1 with ``index_dtype=torch.int32``.
    """
    check.tensor("z", z)
    check.finite(z=z)
    plan = fsq_plan(levels, preserve_symmetry, hard_clamp)
    out_index = _index_dtype(index_dtype, plan.size)
    D = len(plan.levels)
    if z.dim() < 1 or z.shape[-1] != D:
        raise ValueError(f"z must have shape (..., {D}) for {D} levels, got {tuple(z.shape)}")
    compute = torch.float64 if z.dtype == torch.float64 else torch.float32
    lv, basis, a, b = _constants(plan, z.device, compute)
    N = math.prod(z.shape[:-1])
    codes, index = _ops.call(_ops.finite_scalar_quantize, z.reshape(N, D), lv, basis, a, b,
                             _mode(preserve_symmetry, hard_clamp), resolve(z.device))
    if out_index != torch.int64:
        index = index.to(out_index)
    return FSQOutput(codes.view(z.shape), index.view(z.shape[:-1]))


def _index_dtype(index_dtype: object, size: int) -> torch.dtype:
    if index_dtype is None:
        return index_dtype_for(size)
    if index_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype!r}")
    if index_dtype == torch.int32 and size > INT32_MAX:
        raise ValueError(f"index_dtype=torch.int32 cannot hold the indices of {size} codes "
                         f"(prod(levels) > 2**31 - 1)")
    return index_dtype  # type: ignore[return-value]


def fsq_codes_to_indices(codes: Tensor, levels: Sequence[int] | Tensor, *,
                         preserve_symmetry: bool = False,
                         index_dtype: torch.dtype | None = None) -> Tensor:
    """The index of each code vector: ``sum_j level_j basis_j`` with ``level_j = round(code_j hw
    + hw)`` (``round((code_j + 1)(L - 1)/2)`` with ``preserve_symmetry``), the digits computed in
    float64 and summed in int64: exact for every level configuration (no float sum).

    Args:
        codes: ``(..., D)`` floating tensor of codes (as ``finite_scalar_quantize`` returns).
        levels, preserve_symmetry: as for ``finite_scalar_quantize``.
        index_dtype: as for ``finite_scalar_quantize``.

    Returns:
        indices of shape ``codes.shape[:-1]``. A digit off the grid goes to the nearest level
        (values beyond the end levels to the end level); a NaN gives -1.

    Raises:
        TypeError, ValueError: as ``finite_scalar_quantize``.
    """
    check.tensor("codes", codes)
    plan = fsq_plan(levels, preserve_symmetry)
    out_index = _index_dtype(index_dtype, plan.size)
    D = len(plan.levels)
    if codes.dim() < 1 or codes.shape[-1] != D:
        raise ValueError(f"codes must have shape (..., {D}) for {D} levels, got "
                         f"{tuple(codes.shape)}")
    lv, basis, _, _ = _constants(plan, codes.device, torch.float64)
    c = codes.to(torch.float64)
    if preserve_symmetry:
        digit = torch.round((c + 1) * (lv - 1).to(torch.float64) / 2)
    else:
        hw = (lv // 2).to(torch.float64)
        digit = torch.round(c * hw + hw)
    top = (lv - 1).to(torch.float64)
    digit = torch.where(digit < 0, 0.0, torch.where(digit > top, top, digit))  # NaN passes
    return reference.fsq_index(digit, basis).to(out_index)


def fsq_indices_to_codes(indices: Tensor, levels: Sequence[int] | Tensor, *,
                         preserve_symmetry: bool = False,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """The code vectors of indices: digits ``level_j = (index // basis_j) % L_j`` in int64
    (exact), ``code_j = (level_j - hw) / hw`` (``level_j b - 1`` with ``b = 2/(L - 1)`` in float32
    with ``preserve_symmetry``, as vector-quantize-pytorch computes it), in ``dtype``: the codes
    ``finite_scalar_quantize`` gives for those indices, bitwise.

    Args:
        indices: integer tensor of any shape (int32 or int64; other integer dtypes are read as
            int64). -1 (the index ``finite_scalar_quantize`` gives a NaN input) gives NaN codes.
            Other indices outside ``[0, prod(levels))`` wrap around digit by digit, as in
            vector-quantize-pytorch; with ``fastvae.set_validation(True)`` they are refused.
        levels, preserve_symmetry: as for ``finite_scalar_quantize``.
        dtype: the floating dtype of the codes (default float32); they are computed in it
            (float32 for half precision, then rounded).

    Returns:
        codes of shape ``indices.shape + (D,)``.

    Raises:
        TypeError: ``indices`` not an integer tensor, ``dtype`` not floating.
        ValueError: bad ``levels``; with validation on, indices outside ``[-1, prod(levels) - 1]``.
    """
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    plan = fsq_plan(levels, preserve_symmetry)
    check.indices_in_range("indices", indices, -1, plan.size, "-1 or a code of the "
                           f"{plan.size} codes of levels {list(plan.levels)}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    lv, basis, _, b = _constants(plan, indices.device, compute)
    digit = torch.div(indices.to(torch.int64).unsqueeze(-1), basis,
                      rounding_mode="floor").remainder(lv)
    if preserve_symmetry:
        codes = digit.to(compute) * b - 1
    else:
        hw = lv // 2
        codes = (digit - hw).to(compute) / hw.to(compute)
    codes = torch.where(indices.unsqueeze(-1) == -1, torch.nan, codes)
    return codes.to(dtype)
