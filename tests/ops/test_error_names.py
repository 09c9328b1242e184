"""Errors name the argument the user passed, not the one a wrapper hands on:
``GaussianNLLLoss(var=...)`` says ``var``, not ``logvar`` (it passes ``log(var)`` on);
``DiagonalNormal.log_prob(value)`` says ``value``, not ``target``;
``DiagonalGaussianDistribution.nll(sample)`` / ``.kl(other)`` say ``sample`` / ``other``, not
``target`` / ``prior_mu``. One row per argument and kind of fault (dtype, shape, device, value;
the data checks with validation on), for every loss module and distribution method that hands
its arguments on under another name."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import missing_names, ramp

import fastvae as fv

t = ramp
a = t(3, 4)
i34 = torch.ones(3, 4, dtype=torch.int64)
meta4 = t(4, device="meta")
M = t(2, 4, 3, 3)  # moments: mean and logvar (2, 2, 3, 3)


class Other:
    """An ``other`` for DiagonalGaussianDistribution.kl: anything with mean and logvar."""

    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar


def nll_loss(**kw):
    return fv.GaussianNLLLoss()(a, a, **kw)


BAD = [
    # GaussianNLLLoss: the noise by var= (passed on as log(var)) and by logvar=
    ("var_shape", lambda: nll_loss(var=t(5)), ValueError, ["var"]),
    ("var_shape_min_var", lambda: fv.GaussianNLLLoss(min_var=0.1)(a, a, var=t(5)), ValueError,
     ["var"]),
    ("var_device", lambda: nll_loss(var=meta4), ValueError, ["var", "meta"]),
    ("var_int", lambda: nll_loss(var=i34), TypeError, ["var"]),
    ("var_str", lambda: nll_loss(var="1"), TypeError, ["var"]),
    ("var_negative", lambda: nll_loss(var=-1.0), ValueError, ["var"]),
    ("var_zero", lambda: nll_loss(var=0.0), ValueError, ["var"]),
    ("var_inf", lambda: nll_loss(var=math.inf), ValueError, ["var"]),
    ("var_and_logvar", lambda: nll_loss(var=1.0, logvar=0.0), ValueError, ["var", "logvar"]),
    ("logvar_shape", lambda: nll_loss(logvar=t(5)), ValueError, ["logvar"]),
    ("init_var_inf", lambda: fv.GaussianNLLLoss(var=math.inf), ValueError, ["var"]),
    ("init_var_tensor", lambda: fv.GaussianNLLLoss(var=torch.tensor(1.0)), TypeError, ["var"]),
    ("init_logvar_nan", lambda: fv.GaussianNLLLoss(logvar=math.nan), ValueError, ["logvar"]),
    ("init_min_var", lambda: fv.GaussianNLLLoss(min_var=-1.0), ValueError, ["min_var"]),
    # GaussianKLLoss, BernoulliNLLLoss: the function's own names
    ("kl_loss_prior", lambda: fv.GaussianKLLoss()(a, a, t(5)), ValueError, ["prior_mu"]),
    ("kl_loss_prior_logvar", lambda: fv.GaussianKLLoss()(a, a, None, i34), TypeError,
     ["prior_logvar"]),
    ("bernoulli_loss_target", lambda: fv.BernoulliNLLLoss()(a, i34), TypeError, ["target"]),
    # DiagonalNormal: loc, logvar, value
    ("normal_loc_int", lambda: fv.DiagonalNormal(i34, a), TypeError, ["loc"]),
    ("normal_logvar_int", lambda: fv.DiagonalNormal(a, i34), TypeError, ["logvar"]),
    ("normal_logvar_device", lambda: fv.DiagonalNormal(a, meta4), ValueError, ["logvar", "loc"]),
    ("normal_value_int", lambda: fv.DiagonalNormal(a, a).log_prob(i34), TypeError, ["value"]),
    ("normal_value_device", lambda: fv.DiagonalNormal(a, a).log_prob(t(3, 4, device="meta")),
     ValueError, ["value"]),
    ("normal_value_shape", lambda: fv.DiagonalNormal(a, a).log_prob(t(5)), ValueError,
     ["value"]),
    ("normal_eps_dtype", lambda: fv.DiagonalNormal(a, a).rsample(eps=i34), TypeError, ["eps"]),
    # DiagonalGaussianDistribution: sample, other
    ("posterior_sample_int", lambda: fv.DiagonalGaussianDistribution(M).nll(
        torch.ones(2, 2, 3, 3, dtype=torch.int64)), TypeError, ["sample"]),
    ("posterior_sample_device", lambda: fv.DiagonalGaussianDistribution(M).nll(
        t(2, 2, 3, 3, device="meta")), ValueError, ["sample"]),
    ("posterior_other_int", lambda: fv.DiagonalGaussianDistribution(M).kl(
        Other(torch.ones(2, 2, 3, 3, dtype=torch.int64), t(2, 2, 3, 3))), TypeError,
     ["other"]),
    ("posterior_other_shape", lambda: fv.DiagonalGaussianDistribution(M).kl(
        Other(t(2, 2, 3, 5), t(2, 2, 3, 5))), ValueError, ["other"]),
    ("posterior_other_logvar_device", lambda: fv.DiagonalGaussianDistribution(M).kl(
        Other(t(2, 2, 3, 3), t(3, 3, device="meta"))), ValueError, ["other"]),
    ("posterior_other_type", lambda: fv.DiagonalGaussianDistribution(M).kl(3.0), TypeError,
     ["other"]),
]

# with validation on: the data checks, in the caller's names
BAD_DATA = [
    ("var_nonpositive", lambda: nll_loss(var=torch.tensor([1.0, 0.0, 2.0, 1.0])), ["var"]),
    ("var_negative", lambda: nll_loss(var=torch.tensor(-1.0)), ["var"]),
    ("var_nan", lambda: nll_loss(var=torch.tensor(math.nan)), ["var"]),
    ("var_inf", lambda: nll_loss(var=torch.tensor(math.inf)), ["var"]),
    ("kl_loss_prior_nan", lambda: fv.GaussianKLLoss()(a, a, torch.tensor(math.nan)),
     ["prior_mu"]),
]


@pytest.mark.parametrize(("call", "exc", "words"), [r[1:] for r in BAD], ids=[r[0] for r in BAD])
def test_errors_name_the_argument_passed(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert not missing_names(str(info.value), words), str(info.value)


@pytest.mark.parametrize(("call", "words"), [r[1:] for r in BAD_DATA],
                         ids=[r[0] for r in BAD_DATA])
def test_data_errors_name_the_argument_passed(call, words):
    fv.set_validation(True)
    try:
        with pytest.raises(ValueError, match="validation is on") as info:
            call()
    finally:
        fv.set_validation(False)
    assert not missing_names(str(info.value), words), str(info.value)
    assert "logvar" not in str(info.value)
