"""Fixtures and hooks of the test suite (the shared helpers are in helpers.py).

Without a CUDA GPU the Triton kernels run under Triton's interpreter on CPU tensors; the
environment variable must be set before anything imports triton, hence at the top of this file
(pytest imports it before any test module).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# torch.compile tests: one compile worker, so that they do not take both cores of the CI machine.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
from helpers import BACKENDS, CUDA, DIGITS_CONFIG, DTYPES, device_for, dtype_id
from hypothesis import HealthCheck, settings

import fastvae as fv
from fastvae.ops import backends as _backend
from fastvae.ops import custom_ops as _ops
from fastvae.ops import validation as _validation

# Property tests (test_properties.py): derandomized, so that a run draws the same examples on
# every machine and a failure reproduces run after run (no example database to carry around);
# no deadline (a first kernel call compiles; Triton's interpreter is slow). The examples per test
# are set by each test. HYPOTHESIS_PROFILE=fastvae-explore draws new examples on every run.
_PROFILE = dict(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
settings.register_profile("fastvae", derandomize=True, **_PROFILE)
settings.register_profile("fastvae-explore", derandomize=False, **_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastvae"))


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each usable concrete backend, in effect for the whole test."""
    with fv.use_backend(request.param):
        yield request.param


@pytest.fixture
def device(backend) -> torch.device:
    return device_for(backend)


@pytest.fixture(params=DTYPES, ids=dtype_id)
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def spy(monkeypatch):
    """Records every backend implementation a call reaches (a kernel about to run): through the
    Python path, or through the dispatcher's C++ kernels (``custom_ops.NATIVE``, the backend name
    being the call's last argument)."""
    used = []
    implementation = _ops.implementation
    monkeypatch.setattr(_ops, "implementation", lambda name: used.append(name) or
                        implementation(name))
    native = _ops.native_overloads()

    def recorded(overload):
        return lambda *args: used.append(args[-1]) or overload(*args)

    monkeypatch.setattr(_ops, "NATIVE", {op: recorded(o) for op, o in native.items()})
    return used


@pytest.fixture(scope="session")
def digits():
    """The embedded 8x8 digits, split (train, validation)."""
    from fastvae.training import data

    return data.split(data.load_digits(), 0.1, seed=0)


@pytest.fixture(scope="session")
def trained(digits):
    """A TrainResult: DIGITS_CONFIG trained for 6 epochs (shared by the model and training
    tests; do not train it further)."""
    from fastvae.training.trainer import TrainConfig, train

    train_x, val_x = digits
    config = TrainConfig(epochs=6, batch_size=64, seed=0, iwae_samples=0)
    return train(DIGITS_CONFIG, train_x, val_x, config, progress=False)


@pytest.fixture(autouse=True)
def _isolate_global_state():
    """Each test starts and ends with the default backend, no validation, seeded torch RNG."""
    default, scopes, validate = _backend._default, list(_backend._scopes), _validation._validate
    torch.manual_seed(0)
    yield
    _backend._default = default
    _backend._scopes[:] = scopes
    _validation._validate = validate


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
