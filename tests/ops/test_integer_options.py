"""Integer options of the op layer: every one accepts any ``__index__``
integer (``int``, numpy's ``np.int64`` / ``np.uint8``, a one-element integer tensor, a class of
one's own) with the result of the equal ``int``, and refuses ``bool`` and floats (``2.0``
included) with a ``TypeError`` naming the option. One helper, ``validation.integer``, serves
them all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ramp

import fastvae as fv
from fastvae.ops import validation


class Index:
    """An integer type of one's own: only ``__index__``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


INTEGERS = {"np.int64": np.int64, "np.uint8": np.uint8, "np.int32": np.int32,
            "tensor": lambda v: torch.tensor(v), "Index": Index}
NOT_INTEGERS = {"bool": True, "np.bool_": np.bool_(True), "float": 2.0,
                "np.float64": np.float64(2.0), "float tensor": torch.tensor(2.0),
                "bool tensor": torch.tensor(True), "str": "2"}

MU, LV = ramp(2, 3), ramp(2, 3) - 0.5
GREY_X = (torch.arange(2 * 1 * 2 * 2).reshape(2, 1, 2, 2) % 4) * (2.0 / 3) - 1  # 4-level grid
GREY_P = ramp(2, 6, 2, 2) - 0.5  # M = 2


# (option, value, call): call(value) runs the op with the option set to value
OPTIONS = {
    "reparameterize.n_samples": ("n_samples", 3, lambda v: fv.reparameterize(
        MU, LV, n_samples=v, seed=5)),
    "reparameterize.seed": ("seed", 7, lambda v: fv.reparameterize(MU, LV, seed=v)),
    "sample_and_kl.seed": ("seed", 7, lambda v: fv.sample_and_kl(MU, LV, seed=v)[0]),
    "dmol_nll.n_mixtures": ("n_mixtures", 2, lambda v: fv.discretized_mix_logistic_nll(
        GREY_P, GREY_X, n_mixtures=v, n_bins=4)),
    "dmol_nll.n_bins": ("n_bins", 4, lambda v: fv.discretized_mix_logistic_nll(
        GREY_P, GREY_X, n_mixtures=2, n_bins=v)),
    "dmol_sample.n_mixtures": ("n_mixtures", 2, lambda v: fv.discretized_mix_logistic_sample(
        GREY_P, n_mixtures=v, n_bins=4, most_likely=True)),
    "dmol_sample.n_bins": ("n_bins", 4, lambda v: fv.discretized_mix_logistic_sample(
        GREY_P, n_mixtures=2, n_bins=v, most_likely=True)),
    "DiagonalNormal.event_dims": ("event_dims", 1, lambda v: fv.DiagonalNormal(
        MU, LV, event_dims=v).log_prob(MU)),
}


@pytest.mark.parametrize("kind", INTEGERS)
@pytest.mark.parametrize("option", OPTIONS)
def test_index_integers_are_accepted(option, kind):
    _, value, call = OPTIONS[option]
    expected = call(value)
    got = call(INTEGERS[kind](value))
    assert torch.equal(got, expected), f"{option} = {kind}({value})"


@pytest.mark.parametrize("kind", NOT_INTEGERS)
@pytest.mark.parametrize("option", OPTIONS)
def test_bool_and_float_are_refused(option, kind):
    name, _, call = OPTIONS[option]
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        call(NOT_INTEGERS[kind])


def test_the_helper():
    assert validation.integer("k", np.int64(5), 1) == 5
    assert type(validation.integer("k", np.int64(5))) is int
    with pytest.raises(ValueError, match=r"k must be >= 1, got 0"):
        validation.integer("k", np.int64(0), 1)
    with pytest.raises(TypeError, match=r"k must be an int, got a bool"):
        validation.integer("k", False)
