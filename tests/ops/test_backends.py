"""The backend API (docs/backends.md) and the validation switch: fv.backends, set_backend,
use_backend, FASTVAE_BACKEND, "auto", set_validation / FASTVAE_VALIDATE."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import BACKENDS, CUDA, device_for, ramp

import fastvae as fv
from fastvae.ops import backends as _backend

# torch.compile and opcheck go through torch.jit internals that warn about their own deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _call(device="cpu"):
    x = torch.rand(3, 4, device=device)
    return fv.gaussian_kl(x, x)


def test_backends_lists_the_usable_concrete_backends():
    names = fv.backends()
    assert "torch" in names  # always there: the package works with torch alone
    assert set(names) <= {"triton", "cuda", "cpu", "torch"}
    assert "auto" not in names
    assert ("triton" in names) == (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
    assert ("cuda" in names) <= CUDA


def test_default_backend():
    assert fv.get_backend() == (os.environ.get("FASTVAE_BACKEND") or "auto")


@pytest.mark.parametrize("name", BACKENDS)
def test_set_backend(name, spy):
    fv.set_backend(name)
    assert fv.get_backend() == name
    _call(device_for(name))
    assert spy == [name]
    fv.set_backend("auto")
    assert fv.get_backend() == "auto"


def test_use_backend_nests_and_restores(spy):
    outer, inner = BACKENDS[0], BACKENDS[-1]
    fv.set_backend("torch")
    with fv.use_backend(outer):
        assert fv.get_backend() == outer
        with fv.use_backend(inner):
            assert fv.get_backend() == inner
            _call(device_for(inner))
        assert fv.get_backend() == outer
        fv.set_backend("auto")  # the enclosing block still wins while it runs
        assert fv.get_backend() == outer
        _call(device_for(outer))
    assert fv.get_backend() == "auto"
    assert spy == [inner, outer]


def test_use_backend_restores_on_error():
    def fail_inside():
        with fv.use_backend("torch"):
            assert fv.get_backend() == "torch"
            raise KeyError

    before = fv.get_backend()
    with pytest.raises(KeyError):
        fail_inside()
    assert fv.get_backend() == before


def test_auto_picks_per_device(spy):
    """"auto": the compiled CPU library for CPU tensors when it is built, else the reference;
    a GPU backend for CUDA tensors."""
    fv.set_backend("auto")
    _call("cpu")
    assert spy == ["cpu" if "cpu" in BACKENDS else "torch"]
    assert _backend.resolve(torch.device("cpu")) == spy[0]
    if CUDA:
        assert _backend.resolve(torch.device("cuda")) in ("triton", "cuda")


def test_backends_agree(spy):
    """One call, every backend: the same value to float32 rounding."""
    x = torch.linspace(-2, 2, 12).reshape(3, 4)
    values = {}
    for name in BACKENDS:
        with fv.use_backend(name):
            device = device_for(name)
            values[name] = fv.vae_loss(x.to(device), x.sigmoid().to(device), x.to(device),
                                       x.to(device), reduction="none").cpu()
    assert spy == [n for n in BACKENDS for _ in range(2)]
    for value in values.values():
        torch.testing.assert_close(value, values["torch"], rtol=1e-6, atol=1e-6)


def test_set_validation():
    fv.set_validation(True)
    assert fv.validation_enabled()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mu"):
        fv.gaussian_kl(x + float("nan"), x)
    fv.set_validation(False)
    assert not fv.validation_enabled()
    assert fv.gaussian_kl(x + float("nan"), x).isnan()


def test_validation_is_skipped_while_compiling():
    """The data checks would need a host sync: under torch.compile they are skipped."""
    fv.set_validation(True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda m, v: fv.gaussian_kl(m, v), fullgraph=True)
    x = torch.zeros(2, 3)
    assert compiled(x + float("nan"), x).isnan()


# ---------------------------------------------------------------------------------------------
# Environment variables, read at import: fresh interpreters, run side by side
# ---------------------------------------------------------------------------------------------

ENV_SCRIPT = """
import importlib, os, torch
import fastvae as fv
from fastvae.ops import backends as _backend
from fastvae.ops import validation as _validation

# As imported with FASTVAE_BACKEND=torch FASTVAE_VALIDATE=1:
assert fv.get_backend() == "torch", fv.get_backend()
assert fv.validation_enabled()
try:
    fv.bernoulli_nll(torch.zeros(2, 3), torch.full((2, 3), 2.0))
except ValueError as e:
    assert "target" in str(e), e
else:
    raise AssertionError("FASTVAE_VALIDATE=1 did not validate")

# Other values, each as a fresh import of the two modules would see it.
def reimport(**env):
    os.environ.update(env)
    importlib.reload(_backend)
    importlib.reload(_validation)

reimport(FASTVAE_BACKEND="", FASTVAE_VALIDATE="0")
assert fv.get_backend() == "auto"
assert not fv.validation_enabled()
reimport(FASTVAE_BACKEND="cuda")  # accepted at import; a call says why it cannot run
if not torch.cuda.is_available():
    try:
        fv.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3))
    except RuntimeError as e:
        assert "cuda" in str(e), e
    else:
        raise AssertionError("no error from an unusable FASTVAE_BACKEND")
try:
    reimport(FASTVAE_BACKEND="bogus")
except ValueError as e:
    assert "bogus" in str(e), e
else:
    raise AssertionError("FASTVAE_BACKEND=bogus was accepted")
print("ok")
"""


def test_environment_variables():
    """FASTVAE_BACKEND and FASTVAE_VALIDATE, read when fastvae is imported (in a fresh
    interpreter)."""
    env = {**os.environ, "FASTVAE_BACKEND": "torch", "FASTVAE_VALIDATE": "1"}
    proc = subprocess.run([sys.executable, "-c", ENV_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Backends that cannot serve
# ---------------------------------------------------------------------------------------------

UNUSABLE = [n for n in _backend.CONCRETE if n not in BACKENDS]


@pytest.mark.parametrize("name", UNUSABLE or [pytest.param(None, marks=pytest.mark.skip(
    reason="every backend is usable here"))])
def test_unusable_backend(name):
    before = fv.get_backend()
    for enter in (fv.set_backend, lambda n: fv.use_backend(n).__enter__()):
        with pytest.raises(RuntimeError, match=rf"'{name}'.*not usable here: \w+"):
            enter(name)
    assert fv.get_backend() == before


@pytest.mark.skipif(CUDA, reason="the interpreter only matters without a GPU")
def test_triton_without_interpreter(monkeypatch):
    """Without a GPU, the Triton backend needs the interpreter, and says so."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fv.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fv.set_backend("triton")  # the choice is made, then the environment changes
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fv.gaussian_kl(ramp(3, 4), ramp(3, 4))


@pytest.mark.gpu
def test_backend_cannot_serve_device():
    cuda = ramp(3, 4, device="cuda")
    if "cpu" in BACKENDS:
        with fv.use_backend("cpu"), pytest.raises(RuntimeError, match="cpu"):
            fv.gaussian_kl(cuda, cuda)
    with pytest.raises(ValueError, match="cuda"):
        fv.gaussian_kl(ramp(3, 4), cuda)
    with pytest.raises(ValueError, match="generator"):
        fv.reparameterize(cuda, cuda, generator=torch.Generator("cpu"))


def test_resolution_is_cached_until_the_choice_changes():
    """``resolve`` answers from a cache, which ``set_backend`` and ``use_backend`` (entered and
    left) clear; a choice that cannot serve the call is never cached, so it raises every time."""
    cpu = torch.device("cpu")
    before = fv.get_backend()
    try:
        fv.set_backend("torch")
        assert _backend.resolve(cpu) == "torch"
        assert _backend._RESOLVED == {("torch", "cpu"): "torch"}
        fv.set_backend("auto")
        assert not _backend._RESOLVED
        expected = _backend._resolve_uncached("auto", "cpu")
        assert _backend.resolve(cpu) == expected
        with fv.use_backend("torch"):
            assert not _backend._RESOLVED
            assert _backend.resolve(cpu) == "torch"
        assert not _backend._RESOLVED
        assert _backend.resolve(cpu) == expected
    finally:
        fv.set_backend(before)
