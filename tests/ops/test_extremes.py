"""Extreme values (docs/numerics.md), table-driven, on every backend and dtype.

Each row of ``TABLE`` is a column of samples (shape ``(n, 1)``: one element per sample, so every
value is checked alone, through reduction ``"none"``). The float64 oracle runs on the very values
the test dtype holds, and every output and gradient is held to the rule of ``accuracy.check``:
finite and within ``rtol * (|true| + slack)`` wherever the true value is finite in the dtype the
result comes back in (float32 for the losses of half-precision inputs, the input's dtype for
samples and gradients: a float16 gradient may overflow, its float32 loss may not), infinite with
the true sign where it overflows that dtype.

``test_nonfinite_inputs_propagate``: a NaN in any input makes that sample's outputs NaN, an
infinity makes them non-finite (``-inf`` log-likelihoods of IWAE excepted: a zero-likelihood
sample is legitimate and only drops out of the sum), and no other sample changes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import accuracy
import pytest
import torch
from cases import SEED
from helpers import DTYPES, NOISE_TOL, TOL, Oracle, dtype_id, loss_dtype

import fastvae as fv
from fastvae.ops import reference

LOGVAR_RANGE = [-100.0, -87.0, -30.0, -1.0, -1e-4, -1e-8, 0.0, 1e-8, 1e-4, 0.3, 1.0, 11.0,
                12.0, 20.0, 60.0, 80.0, 88.0]
LOGITS = [-1e4, -1e3, -88.0, -80.0, -20.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 20.0, 80.0, 88.0, 1e3,
          1e4]
TARGETS = [0.0, 1.0, 0.3, 0.9999]
MU_RANGE = [-1e4, -1e2, -1.0, -1e-20, 0.0, 1e-20, 1.0, 1e2, 1e4, 1e15]


def _product(**columns: list[float]) -> dict[str, list[float]]:
    """Every combination of the given columns' values, as equal-length columns."""
    names = list(columns)
    rows = list(itertools.product(*columns.values()))
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# The ops: how each one is called, and the magnitude of what its formulas cancel
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    inputs: tuple[str, ...]
    call: Callable  # (api, leaves) -> tuple of outputs; api is fv or Oracle
    slack: Callable  # (float64 inputs, eps) -> {output index or input name: slack}
    samples: tuple[int, ...] = ()  # outputs in the input's dtype
    noisy: bool = False
    constants: tuple[str, ...] = ()  # inputs that get no gradient


def _loss_slack(fn):
    def slack(x, eps):
        out = fn(**x)
        return {0: out.pop("value"), **out}
    return slack


def _sample_slack(x, eps):
    out = accuracy.sample_slack(x["mu"], x["logvar"], eps, noisy=True)
    return {0: out["value"], "mu": torch.zeros_like(out["mu"]), "logvar": out["logvar"]}


def _sample_and_kl_slack(x, eps):
    z = accuracy.sample_slack(x["mu"], x["logvar"], eps, noisy=True)
    half_expm1 = 0.5 * torch.expm1(x["logvar"]).abs()
    # d/dmu = g_z + g_kl mu, d/dlv = 0.5 e^(lv/2) eps g_z + 0.5 expm1(lv) g_kl: two parts.
    return {0: z["value"], 1: torch.zeros_like(half_expm1), "mu": 1 + x["mu"].abs(),
            "logvar": z["logvar"] + half_expm1}


def _iwae_slack(x, eps):
    out = accuracy.iwae_slack(**x, grad=torch.ones(x["mu"].shape[0], dtype=torch.float64),
                              rtol=TOL[torch.float32]["rtol"])
    return {0: out.pop("value"), **out}


def _iwae_call(api, x):
    fn = fv.iwae_log_likelihood if api is fv else reference.iwae_log_likelihood
    return (fn(x["log_px"], x["z"], x["mu"], x["logvar"]),)


DMOL_PARAMS = ("logit0", "logit1", "mean0", "mean1", "log_scale0", "log_scale1")


def _dmol_slack(x, eps):
    pair = {k: torch.cat([x[f"{k}0"], x[f"{k}1"]], 1) for k in ("logit", "mean", "log_scale")}
    out = accuracy.dmol_slack(pair["logit"], pair["mean"], pair["log_scale"], x["x"][:, 0], 256,
                              TOL[torch.float32]["rtol"])
    slack = {0: out["value"]}
    for name, key in (("logit", "logits"), ("mean", "means"), ("log_scale", "log_scales")):
        for k in (0, 1):
            slack[f"{name}{k}"] = out[key][:, k:k + 1]
    return slack

OPS = {
    "kl": Op(("mu", "logvar"),
             lambda api, x: (api.gaussian_kl(x["mu"], x["logvar"], reduction="none"),),
             _loss_slack(accuracy.kl_slack)),
    "kl_prior": Op(("mu", "logvar", "prior_mu", "prior_logvar"),
                   lambda api, x: (api.gaussian_kl(x["mu"], x["logvar"], x["prior_mu"],
                                                   x["prior_logvar"], reduction="none"),),
                   _loss_slack(accuracy.kl_slack)),
    "bernoulli": Op(("logits", "target"),
                    lambda api, x: (api.bernoulli_nll(x["logits"], x["target"],
                                                      reduction="none"),),
                    _loss_slack(accuracy.bernoulli_slack)),
    "gaussian_nll": Op(("mean", "target", "logvar"),
                       lambda api, x: (api.gaussian_nll(x["mean"], x["target"], x["logvar"],
                                                        reduction="none"),),
                       _loss_slack(accuracy.gaussian_nll_slack)),
    "reparameterize": Op(("mu", "logvar"),
                         lambda api, x: (api.reparameterize(x["mu"], x["logvar"], seed=SEED),),
                         _sample_slack, samples=(0,), noisy=True),
    "sample_and_kl": Op(("mu", "logvar"),
                        lambda api, x: api.sample_and_kl(x["mu"], x["logvar"], seed=SEED,
                                                         reduction="none"),
                        _sample_and_kl_slack, samples=(0,), noisy=True),
    "iwae": Op(("log_px", "z", "mu", "logvar"), _iwae_call, _iwae_slack),
    "continuous_bernoulli": Op(("logits", "target"),
                               lambda api, x: (api.continuous_bernoulli_nll(
                                   x["logits"], x["target"], reduction="none"),),
                               _loss_slack(accuracy.continuous_bernoulli_slack)),
    # Grey, M = 2 components, 256 levels: each parameter a column of its own, stacked into
    # params (n, 6, 1); x (n, 1, 1). The slack model: accuracy.dmol_slack.
    "dmol": Op((*DMOL_PARAMS, "x"),
               lambda api, x: (api.discretized_mix_logistic_nll(
                   torch.stack([x[k] for k in DMOL_PARAMS], 1), x["x"][:, :, None],
                   n_mixtures=2, reduction="none"),),
               _dmol_slack, constants=("x",)),
}

# ---------------------------------------------------------------------------------------------
# The table: id -> (op, columns, dtypes). Columns hold one value per sample; IWAE's log_px and z
# hold K = 2 values per sample (columns log_px0, log_px1, z0, z1).
# ---------------------------------------------------------------------------------------------

ALL = DTYPES
HALF = (torch.float16, torch.bfloat16)

TABLE = {
    # KL: logvar from -100 to 88 (beyond the -100..80 of the property tests);
    # 0.5 * (expm1(lv) - lv) down to 2.5e-17 at lv = 1e-8; float16 gradients overflow from
    # lv = 12 on, float32 losses never.
    "kl_logvar": ("kl", _product(mu=[0.0, 1.5], logvar=LOGVAR_RANGE), ALL),
    "kl_logvar_fp64_wide": ("kl", _product(mu=[0.0, -2.0], logvar=[-700.0, -300.0, 300.0,
                                                                    700.0]),
                            (torch.float64,)),
    "kl_mu": ("kl", _product(mu=MU_RANGE, logvar=[0.0, -30.0, 30.0]), ALL),
    # A prior's log-variance scales (mu - pm)^2 by exp(-plv): up to e^100 = 2.7e43, beyond
    # float32 for a unit difference (inf is then right), fine for a difference of 1e-20.
    "kl_prior": ("kl_prior", _product(mu=[1e-20, 0.5, 3.0], logvar=[-100.0, 0.0, 80.0],
                                      prior_mu=[0.0, 0.5], prior_logvar=[-100.0, -30.0, 0.0,
                                                                         30.0, 80.0]), ALL),
    # Bernoulli: logits to +-1e4 against binary and continuous targets: -log sigmoid(-1e4) is
    # 1e4, its gradient exactly -1, and sigmoid(-80) = 1.8e-35 stays a gradient, not 0.
    "bernoulli": ("bernoulli", _product(logits=LOGITS, target=TARGETS), ALL),
    # Gaussian NLL: logvar from -100 to 80 with residuals from 0 to 1e4 (to 1e15 in float32
    # and float64); ((x - m) e^(-lv/2))^2 reaches e^100 (inf in float32: right) and e^-80.
    "gaussian_nll": ("gaussian_nll", _product(mean=[0.0, 3.0], target=[0.0, 1e-30, 1.0, 1e4],
                                              logvar=[-100.0, -30.0, -1.0, 0.0, 30.0, 80.0]),
                     ALL),
    "gaussian_nll_large_residual": ("gaussian_nll", _product(mean=[-1e15, 0.0],
                                                             target=[1e15],
                                                             logvar=[0.0, 60.0, 80.0]),
                                    (torch.float32, torch.float64, torch.bfloat16)),
    # Samples: std = e^(lv/2) from e^-50 to e^44 (a float16 sample overflows from lv ~ 22: inf
    # is right there).
    "reparameterize": ("reparameterize", _product(mu=[-1e4, 0.0, 2.0], logvar=LOGVAR_RANGE),
                       ALL),
    "sample_and_kl": ("sample_and_kl", _product(mu=[-1e4, 0.0, 2.0], logvar=LOGVAR_RANGE),
                      ALL),
    # IWAE: log-weights 1e4 apart (one sample carries all the weight), log-likelihoods of -1e30,
    # posterior log-variances from -100 to 80 with z at the matching scale.
    "iwae_log_px": ("iwae", _product(log_px0=[-1e4, 0.0, -1e30], log_px1=[0.0, -1e4, 50.0],
                                     z0=[0.5], z1=[-1.0], mu=[0.0], logvar=[0.0]),
                    (torch.float32, torch.float64)),
    "iwae_logvar": ("iwae", _product(log_px0=[-3.0], log_px1=[-1.0], z0=[0.5], z1=[-1.0],
                                     mu=[0.0, 2.0], logvar=[-100.0, -30.0, 0.0, 30.0, 80.0]),
                    ALL),
    # Continuous Bernoulli: logits to +-1e4 through 0 (1e-30 ... 1e-3: the series' own
    # scale), on both sides of the switch of forms at |l| = 8, against hard, soft and
    # near-1/2 targets.
    "continuous_bernoulli": ("continuous_bernoulli",
                             _product(logits=[*LOGITS, -1e-30, 1e-30, -7.99, 7.99, -8.0, 8.0,
                                              8.01, -30.0, 3.0],
                                      target=[*TARGETS, 0.5, 0.5009765625]), ALL),
    # Mixture of logistics: a component far from every pixel value, e^-s (x - mu) beyond
    # float32 (|mu| > ~3e35 at s = -7), has zero responsibility: its gradients are 0 (they were
    # 0 * inf = NaN), the other component's and the value unchanged.
    "dmol_far_component": ("dmol", _product(
        logit0=[0.0], logit1=[0.0, 5.0], mean0=[0.1], mean1=[3e35, -3e35, 1e37, 1e38, -3e38],
        log_scale0=[-2.0], log_scale1=[-7.0, -3.0, 0.0], x=[-1.0, 0.0, 0.5, 1.0]), ALL),
    # Scales from below the -7 floor to e^10, means inside and beyond [-1, 1], the edge bins
    # and inner ones, logits 1e4 apart (one component carries everything) or equal.
    "dmol_scales": ("dmol", _product(
        logit0=[0.0], logit1=[-1e4, 0.0], mean0=[-0.3, 0.999], mean1=[-1.5, 0.0, 30.0],
        log_scale0=[-10.0, -7.0, -3.0], log_scale1=[-7.0, 0.0, 10.0],
        x=[-1.0, -0.5, 0.0, 1.0]), ALL),
}


def _columns_to_inputs(op: str, columns: dict[str, list[float]],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float64 tensors of the op's input shapes holding the values ``dtype`` holds; samples with
    a value that ``dtype`` cannot hold (overflow) are left out."""
    cols = {k: _round(torch.tensor(v, dtype=torch.float64), dtype) for k, v in columns.items()}
    if op == "iwae":
        std = torch.exp(0.5 * cols["logvar"])
        for k in ("z0", "z1"):
            cols[k] = _round(cols["mu"] + std * cols[k], dtype)
    keep = torch.stack([torch.isfinite(c) for c in cols.values()]).all(0)
    cols = {k: c[keep] for k, c in cols.items()}
    if op == "iwae":
        return {"log_px": torch.stack([cols["log_px0"], cols["log_px1"]]),
                "z": torch.stack([cols["z0"], cols["z1"]])[..., None],
                "mu": cols["mu"][:, None], "logvar": cols["logvar"][:, None]}
    return {k: c[:, None] for k, c in cols.items()}


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).double()


def _sample_dim(name: str) -> int:
    """The batch dimension of an input or gradient: 1 for IWAE's (K, B, ...) ones."""
    return 1 if name in ("log_px", "z") else 0


def _describe(x64: dict[str, torch.Tensor], b: int) -> str:
    return ", ".join(f"{k}={v.select(_sample_dim(k), b).flatten().tolist()}"
                     for k, v in x64.items())


def _rtol(dtype: torch.dtype, noisy: bool) -> float:
    rtol = TOL[dtype]["rtol"]
    return max(rtol, NOISE_TOL["rtol"]) if noisy else rtol


def _run(op: Op, api, x64: dict[str, torch.Tensor], dtype: torch.dtype, device):
    """Outputs and gradients (upstream ones) of ``op`` on leaves holding ``x64``'s values."""
    leaves = {k: v.to(dtype).to(device).requires_grad_(k not in op.constants)
              for k, v in x64.items()}
    outs = op.call(api, leaves)
    wanted = [k for k in leaves if k not in op.constants]
    grads = torch.autograd.grad(outs, [leaves[k] for k in wanted],
                                [torch.ones_like(o) for o in outs])
    return outs, dict(zip(wanted, grads, strict=True))


@pytest.mark.parametrize(("row", "dtype"), [
    pytest.param(row, dtype, id=f"{row}-{dtype_id(dtype)}")
    for row, (_, _, dtypes) in TABLE.items() for dtype in dtypes])
def test_extreme_values(row, dtype, backend, device):
    op_name, columns, _ = TABLE[row]
    op = OPS[op_name]
    x64 = _columns_to_inputs(op_name, columns, dtype)
    outs, grads = _run(op, fv, x64, dtype, device)
    expected, o_grads = _run(op, Oracle, x64, torch.float64, "cpu")
    eps = (reference.noise(SEED, tuple(x64["mu"].shape), "cpu").double() if op.noisy
           else None)
    slack = op.slack(x64, eps)
    for i, (out, want) in enumerate(zip(outs, expected, strict=True)):
        out_dtype = dtype if i in op.samples else loss_dtype(dtype)
        accuracy.check(f"{row} output {i}", out, want, slack[i], out_dtype,
                       _rtol(out_dtype, op.noisy and i in op.samples),
                       lambda i: _describe(x64, i[0]))
    for name, g in grads.items():
        dim = _sample_dim(name)
        accuracy.check(f"{row} d/d{name}", g, o_grads[name], slack[name], dtype,
                       _rtol(dtype, op.noisy), lambda i, dim=dim: _describe(x64, i[dim]))


# ---------------------------------------------------------------------------------------------
# NaN and infinities propagate, sample by sample
# ---------------------------------------------------------------------------------------------

# Finite inputs of each op, three samples; sample 1 gets the NaN or infinity.
CLEAN = {
    "kl": {"mu": [0.5, -1.0, 2.0], "logvar": [0.3, -2.0, 1.0]},
    "kl_prior": {"mu": [0.5, -1.0, 2.0], "logvar": [0.3, -2.0, 1.0],
                 "prior_mu": [0.0, 1.0, -1.0], "prior_logvar": [0.5, 0.25, -0.5]},
    "bernoulli": {"logits": [0.5, -3.0, 2.0], "target": [0.0, 1.0, 0.25]},
    "gaussian_nll": {"mean": [0.5, -1.0, 2.0], "target": [0.0, 1.0, 0.25],
                     "logvar": [0.3, -2.0, 1.0]},
    "reparameterize": {"mu": [0.5, -1.0, 2.0], "logvar": [0.3, -2.0, 1.0]},
    "sample_and_kl": {"mu": [0.5, -1.0, 2.0], "logvar": [0.3, -2.0, 1.0]},
    "iwae": {"log_px0": [-3.0, -1.0, -2.0], "log_px1": [-1.0, -2.0, -4.0], "z0": [0.5, 0.1, 1.0],
             "z1": [-1.0, 0.2, 0.0], "mu": [0.5, -1.0, 2.0], "logvar": [0.3, -2.0, 1.0]},
    "continuous_bernoulli": {"logits": [0.5, -3.0, 12.0], "target": [0.0, 1.0, 0.25]},
    "dmol": {"logit0": [0.5, -1.0, 2.0], "logit1": [0.0, 1.0, -0.5],
             "mean0": [0.1, -0.9, 0.95], "mean1": [-0.3, 0.4, 1.2],
             "log_scale0": [-2.0, -7.5, -4.0], "log_scale1": [0.5, -3.0, -6.0],
             "x": [1.0 / 255, -1.0, 1.0]},
}
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op_name", OPS)
def test_nonfinite_inputs_propagate(op_name, dtype, backend, device):
    """A NaN input makes its sample's outputs NaN. An infinite input makes them non-finite
    wherever the float64 oracle's are (a zero variance, logvar = -inf, gives the sample z = mu;
    a log-likelihood of -inf drops its sample out of the IWAE sum), finite and equal to the
    oracle's elsewhere. The other samples' outputs and gradients do not change, bit for bit."""
    op = OPS[op_name]
    clean64 = _columns_to_inputs(op_name, CLEAN[op_name], dtype)
    clean_outs, clean_grads = _run(op, fv, clean64, dtype, device)
    others = torch.tensor([0, 2])
    for name, (label, value) in itertools.product(op.inputs, NONFINITE.items()):
        dirty64 = {k: v.clone() for k, v in clean64.items()}
        dirty64[name].select(_sample_dim(name), 1).fill_(value)
        outs, grads = _run(op, fv, dirty64, dtype, device)
        oracle, _ = _run(op, Oracle, dirty64, torch.float64, "cpu")
        if op_name == "bernoulli" and name == "logits" and math.isinf(value):
            # Against a hard target an infinite logit is a limit (0 where the target agrees,
            # +inf where not), which binary_cross_entropy_with_logits misses (inf * 0 = NaN).
            oracle = (reference.bernoulli_nll(dirty64["logits"], dirty64["target"],
                                              reduction="none"),)
        where = f"{op_name}: {name} = {label} in sample 1"
        for i, (out, clean, want) in enumerate(zip(outs, clean_outs, oracle, strict=True)):
            hit, want = out[1].double().cpu(), want[1].detach()
            if math.isnan(value):
                assert hit.isnan().all(), f"{where}: output {i} is {hit}, not NaN"
            else:
                assert torch.equal(torch.isfinite(hit), torch.isfinite(want)), (
                    f"{where}: output {i} is {hit}; the oracle's is {want}")
                finite = torch.isfinite(want)
                torch.testing.assert_close(hit[finite], want[finite], rtol=1e-2, atol=1e-3)
            assert torch.equal(out[others], clean[others]), f"{where}: output {i} of others"
        for k, g in grads.items():
            dim = _sample_dim(k)
            assert torch.equal(g.index_select(dim, others.to(g.device)),
                               clean_grads[k].index_select(dim, others.to(g.device))), (
                f"{where}: d/d{k} of the other samples changed")
