"""The C ABI between the native library and fastvae/ops/native.py: op table and struct layout.

The library's op table (FV_OPS in csrc/fastvae.h, exported by fv_op_count/fv_op_name/...) is the
one source of the op metadata: the Python side reads the op codes from it, and refuses, with the
reason, a library whose ops or whose fv_call/fv_tensor layout differ from its own. The checks
every call goes through (required and optional operands, compute-dtype operands, groups, the
seed, K) are made from the table: each is tested here for every op, from the table's own lists.
"""

from __future__ import annotations

import ctypes
import inspect
import itertools
import re

import pytest
import torch

from fastvae.ops import native as _native
from fastvae.ops import reference

pytestmark = pytest.mark.skipif(_native.unusable_reason("cpu") is not None,
                                reason=f"native library: {_native.unusable_reason('cpu')}")

LIB = _native.load()[0]
FV_USES_K, FV_USES_REDUCE_DIM, FV_USES_SCALAR, FV_DRAWS_NOISE = 1, 2, 4, 8
FLOAT32, FLOAT64, FLOAT16, INT64 = 0, 1, 2, 4
INVALID = 1


def table() -> list[tuple[str, str, str, int]]:
    """(name, inputs, outputs, flags) of every op, in code order, as the library exports them."""
    return [(LIB.fv_op_name(i).decode(), LIB.fv_op_inputs(i).decode(),
             LIB.fv_op_outputs(i).decode(), LIB.fv_op_flags(i)) for i in range(LIB.fv_op_count())]


_TOKEN = re.compile(r"\(([^)]*)\)([?*#~!%]*)|(\S+)")
_MARKS = "?*#~!%"


def operands(spec: str) -> list[tuple[str, str]]:
    """(name, marks) of each slot of an operand list; the members of a ( ) group get the marks
    after it and "&"."""
    slots = []
    for members, group_marks, single in _TOKEN.findall(spec):
        for token in [single] if single else members.split():
            name = token.rstrip(_MARKS)
            slots.append((name, token[len(name):] + ("" if single else group_marks + "&")))
    return slots


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def test_python_uses_the_library_table():
    names = [name for name, *_ in table()]
    assert tuple(names) == _native.OPS
    assert len(set(names)) == len(names)
    backend = _native.implementation("cpu")
    assert backend._codes == {name: code for code, name in enumerate(names)}
    # every op the table lists is implemented here, and in the reference, and nothing else
    assert sorted(names) == sorted(_native._implemented_ops())
    assert sorted(names) == sorted(n for n in dir(reference) if n.endswith(("_fwd", "_bwd")))


def test_backend_methods_agree_with_the_table():
    """A method takes a seed exactly when its op may draw noise, a reduce_dim when the op reads
    call->reduce_dim, a logvar_value (or n_bins) when it reads call->scalar. residual_vq: the
    scalar is the codebooks' level count, and its backward's rotation flag is the reduce_dim."""
    for name, _, _, flags in table():
        params = inspect.signature(getattr(_native.NativeBackend, name)).parameters
        assert ("seed" in params) == bool(flags & FV_DRAWS_NOISE), name
        reduce_dim = "reduce_dim" in params or (name == "residual_vq_bwd" and "rotation" in params)
        assert reduce_dim == bool(flags & FV_USES_REDUCE_DIM), name
        scalar = any(p in params for p in ("logvar_value", "n_bins", "metric", "clamp",
                                           "codebooks", "mode"))
        assert scalar == bool(flags & FV_USES_SCALAR), name


def test_table_is_well_formed():
    assert LIB.fv_op_count() == len(table()) > 0
    for name, inputs, outputs, flags in table():
        ins, outs = operands(inputs), operands(outputs)
        assert 1 <= len(ins) <= _native.MAX_IN, name
        assert 1 <= len(outs) <= _native.MAX_OUT, name
        assert sum("*" in marks for _, marks in ins) == 1, name
        assert not any("*" in marks for _, marks in outs), name
        assert bool(flags & FV_DRAWS_NOISE) == ("!" in inputs + outputs), name
        assert flags & ~(FV_USES_K | FV_USES_REDUCE_DIM | FV_USES_SCALAR | FV_DRAWS_NOISE) == 0
        if name.endswith("_bwd"):  # a backward op computes only the gradients asked for
            assert all("?" in marks for _, marks in outs), name
        else:  # a forward op computes every output but a copy of the noise it draws (kept for
            # the backward when wanted: reparameterize_fwd's noise?!)
            assert all("!" in marks for _, marks in outs if "?" in marks), name
    # out of range
    for code in (-1, LIB.fv_op_count(), 1 << 30):
        assert LIB.fv_op_name(code) is None
        assert LIB.fv_op_inputs(code) is None
        assert LIB.fv_op_outputs(code) is None
        assert LIB.fv_op_flags(code) == -1


def test_operand_list_reader():
    assert operands("grad# mu* logvar (prior_mu prior_logvar)?") == [
        ("grad", "#"), ("mu", "*"), ("logvar", ""), ("prior_mu", "?&"), ("prior_logvar", "?&")]
    assert operands("d_log_px?~ d_z?") == [("d_log_px", "?~"), ("d_z", "?")]


def test_layout_matches_the_ctypes_structs():
    assert LIB.fv_layout(b"fv_call") == ctypes.sizeof(_native._Call)
    assert LIB.fv_layout(b"fv_tensor") == ctypes.sizeof(_native._Tensor)
    assert LIB.fv_layout(b"FV_MAX_IN") == _native.MAX_IN == len(_native._Call().inputs)
    assert LIB.fv_layout(b"FV_MAX_OUT") == _native.MAX_OUT == len(_native._Call().outputs)
    assert LIB.fv_layout(b"fv_call.seed") == _native._Call.seed.offset
    assert LIB.fv_layout(b"fv_call.in") == _native._Call.inputs.offset
    assert LIB.fv_layout(b"fv_tensor.dtype") == _native._Tensor.dtype.offset
    assert _native._layout_mismatch(LIB) is None
    for unknown in (b"", b"fv_call.nope", b"sizeof(fv_call)", None):
        assert LIB.fv_layout(unknown) == -1


# ---------------------------------------------------------------------------------------------
# A library that differs is refused
# ---------------------------------------------------------------------------------------------


class Doctored:
    """The real library, but for the functions given."""

    def __init__(self, lib, **functions):
        self._lib = lib
        self.__dict__.update(functions)

    def __getattr__(self, name):
        return getattr(self._lib, name)


@pytest.fixture
def load_doctored(monkeypatch):
    """load() with the real library doctored by `functions`: (library or None, reason)."""
    def load(**functions):
        monkeypatch.setattr(_native, "_open", lambda path: Doctored(ctypes.CDLL(str(path)),
                                                                     **functions))
        _native.load.cache_clear()
        return _native.load()

    yield load
    monkeypatch.undo()
    _native.load.cache_clear()


def _layout_but(**changed):
    real = LIB.fv_layout
    return lambda key: changed.get(key.decode(), real(key))


def test_the_real_library_passes(load_doctored):
    lib, reason = load_doctored()
    assert reason is None
    assert isinstance(lib, Doctored)


@pytest.mark.parametrize(("change", "says"), [
    ({"fv_call": 8 + ctypes.sizeof(_native._Call)}, "fv_call: "),
    ({"fv_tensor": 48}, "fv_tensor: 48 in the library, 40 here"),
    ({"FV_MAX_IN": 7}, "FV_MAX_IN: 7 in the library, 6 here"),
    ({"FV_MAX_OUT": 5}, "FV_MAX_OUT: 5 in the library"),
    ({"fv_call.seed": 0}, "fv_call.seed: 0 in the library"),  # fields in another order
    ({"fv_call.workspace_bytes": -1}, "fv_call.workspace_bytes: unknown in the library"),
])
def test_a_different_layout_is_refused(load_doctored, change, says):
    lib, reason = load_doctored(fv_layout=_layout_but(**change))
    assert lib is None
    assert "does not match this fastvae" in reason
    assert says in reason
    assert "rebuild" in reason


def test_a_different_op_table_is_refused(load_doctored):
    names = list(_native.OPS)
    count = len(names)

    def name_of(table):
        return lambda code: table[code].encode() if 0 <= code < len(table) else None

    # one op more
    lib, reason = load_doctored(fv_op_count=lambda: count + 1,
                                fv_op_name=name_of([*names, "student_t_nll_fwd"]))
    assert lib is None
    assert "ops unknown here: student_t_nll_fwd" in reason
    # one op less
    lib, reason = load_doctored(fv_op_count=lambda: count - 1, fv_op_name=name_of(names[:-1]))
    assert lib is None
    assert f"ops it lacks: {names[-1]}" in reason
    # an op renamed
    lib, reason = load_doctored(fv_op_name=name_of([*names[:-1], "iwae_backward"]))
    assert lib is None
    assert "unknown here: iwae_backward" in reason
    assert f"lacks: {names[-1]}" in reason
    # an op twice
    lib, reason = load_doctored(fv_op_count=lambda: count + 1,
                                fv_op_name=name_of([*names, names[0]]))
    assert lib is None
    assert "names an op twice" in reason


def test_the_same_ops_in_another_order_are_used_by_their_codes(load_doctored):
    """Codes come from the library: a table in another order maps names to its codes."""
    names = list(_native.OPS)
    shuffled = names[::-1]
    lib, reason = load_doctored(fv_op_name=lambda code: shuffled[code].encode())
    assert reason is None
    assert _native.NativeBackend(lib, "cpu")._codes == {n: c for c, n in enumerate(shuffled)}


def test_an_older_library_is_refused_by_its_version(load_doctored):
    lib, reason = load_doctored(fv_abi_version=lambda: _native.ABI_VERSION - 1)
    assert lib is None
    assert f"ABI version {_native.ABI_VERSION - 1}" in reason


def test_a_refused_library_leaves_the_backend_unusable(load_doctored):
    load_doctored(fv_layout=_layout_but(fv_call=1))
    reason = _native.unusable_reason("cpu")
    assert "does not match" in reason
    with pytest.raises(RuntimeError, match="does not match"):
        _native.implementation("cpu")
    assert _native.OPS == ()


# ---------------------------------------------------------------------------------------------
# Every call is checked by the table (CPU entry point; the CUDA one runs the same checks first)
# ---------------------------------------------------------------------------------------------

# One buffer for every operand: all strides 0, so any call reads and writes element 0 only.
_BUFFER = torch.zeros(4, dtype=torch.float64)
_INDICES = torch.zeros(4, dtype=torch.int64)  # index inputs (%): valid indices (code 0)
_SEED = torch.zeros(1, dtype=torch.int64)


def full_call(inputs: str, outputs: str, flags: int) -> _native._Call:
    """A call of B=2, N=3 with every slot of the lists given: float32 storage and compute."""
    call = _native._Call()
    call.B, call.N, call.K = 2, 3, 2 if flags & FV_USES_K else 1
    for slots, spec, is_input in ((call.inputs, inputs, True), (call.outputs, outputs, False)):
        for slot, (_, marks) in zip(slots, operands(spec), strict=False):
            given = _INDICES if "%" in marks and is_input else _BUFFER
            slot.data = given.data_ptr()
            slot.dtype = FLOAT16 if "~" in marks else INT64 if "%" in marks else FLOAT32
    call.seed = _SEED.data_ptr()
    call.reduce_dim = 1
    call.compute = FLOAT32
    call.n_threads = 1
    return call


def run(code: int, call: _native._Call) -> tuple[int, str]:
    status = LIB.fv_cpu_run(code, ctypes.byref(call))
    return status, LIB.fv_last_error().decode() if status else ""


@pytest.mark.parametrize("code", range(len(_native.OPS)))
def test_calls_are_checked_by_the_table(code):
    name, inputs, outputs, flags = table()[code]
    ins, outs = operands(inputs), operands(outputs)
    assert run(code, full_call(inputs, outputs, flags)) == (0, "")

    for kind, slots, specs in (("input", "inputs", ins), ("output", "outputs", outs)):
        for i, (operand, marks) in enumerate(specs):
            # absent: fine when optional (alone or with its group), else named as required
            call = full_call(inputs, outputs, flags)
            group = [j for j, (_, m) in enumerate(specs) if "&" in m] if "&" in marks else [i]
            for j in group:
                getattr(call, slots)[j].data = None
            status, message = run(code, call)
            if "?" in marks:
                assert status == 0, (name, operand, message)
            else:
                assert status == INVALID
                assert message == f"{name}: {kind} {i} ({operand}) is required"
            # in the wrong dtype: named when it must have the compute dtype
            call = full_call(inputs, outputs, flags)
            getattr(call, slots)[i].dtype = FLOAT64
            status, message = run(code, call)
            if "#" in marks:
                assert (status, message) == (INVALID, f"{name}: {kind} {i} ({operand}) has dtype "
                                                      "code 1, not the compute dtype 0")
            elif "%" in marks:  # an index is int64, nothing else
                assert (status, message) == (INVALID, f"{name}: {kind} {i} ({operand}) has dtype "
                                                      "code 1, not int64 (4)")
            else:  # the CPU kernels convert any float dtype
                assert status == 0, (name, operand, message)
            # int64 where a float is expected
            if "%" not in marks:
                getattr(call, slots)[i].dtype = INT64
                assert run(code, call) == (INVALID, f"{name}: {kind} {i} ({operand}) has dtype "
                                                    "code 4, not a float dtype")
            # an unknown dtype code
            getattr(call, slots)[i].dtype = 7
            assert run(code, call) == (INVALID, f"{name}: {kind} {i} ({operand}) has unknown "
                                                "dtype code 7")
        # one slot past the list
        call = full_call(inputs, outputs, flags)
        limit = _native.MAX_IN if kind == "input" else _native.MAX_OUT
        if len(specs) < limit:
            getattr(call, slots)[len(specs)].data = _BUFFER.data_ptr()
            assert run(code, call) == (INVALID, f"{name}: {kind} {len(specs)} is given, the op "
                                                f"has {len(specs)} {kind}s")

    # a ( ) group: one of it alone is refused
    group = [j for j, (_, m) in enumerate(ins) if "&" in m]
    if group:
        call = full_call(inputs, outputs, flags)
        call.inputs[group[0]].data = None
        status, message = run(code, call)
        assert status == INVALID
        together = " ".join(ins[j][0] for j in group)
        assert message == f"{name}: give the inputs {together} all or none"

    # samples: K > 1 only for the ops that take them
    call = full_call(inputs, outputs, flags)
    call.K = 3
    status, message = run(code, call)
    if flags & FV_USES_K:
        assert status == 0, message
    else:
        assert (status, message) == (INVALID, f"{name}: K must be 1 (the op takes no samples), "
                                              "got 3")
    # reduce_dim: checked for the ops that read it
    call = full_call(inputs, outputs, flags)
    call.reduce_dim = 5
    status, message = run(code, call)
    assert status == (INVALID if flags & FV_USES_REDUCE_DIM else 0), message


@pytest.mark.parametrize("code", range(len(_native.OPS)))
def test_the_seed_is_required_exactly_when_noise_is_drawn(code):
    """Noise is drawn when a wanted output is made from it (!) and the noise input (!) is not
    given; only then is the seed required."""
    name, inputs, outputs, flags = table()[code]
    ins, outs = operands(inputs), operands(outputs)
    noise_in = [i for i, (_, marks) in enumerate(ins) if "!" in marks]
    optional = [i for i, (_, marks) in enumerate(outs) if "?" in marks]
    for noise_given in (True, False) if noise_in else (False,):
        for dropped in itertools.product((False, True), repeat=len(optional)):
            call = full_call(inputs, outputs, flags)
            call.seed = None
            if noise_in and not noise_given:
                call.inputs[noise_in[0]].data = None
            for i, drop in zip(optional, dropped, strict=True):
                if drop:
                    call.outputs[i].data = None
            wanted = [i for i in range(len(outs)) if call.outputs[i].data]
            draws = not noise_given and any("!" in outs[i][1] for i in wanted)
            status, message = run(code, call)
            if draws:
                assert (status, message) == (INVALID, f"{name}: the seed is required to draw "
                                                      "noise")
            else:
                assert status == 0, (name, noise_given, wanted, message)
