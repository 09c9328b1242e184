"""Every op on the whole finite domain, against a high-precision (mpmath) oracle.

``DOMAIN`` is the one table of grids and bounds: each row is an op, a dense grid of its inputs
(log-spaced over the whole range of each input, through 0, out to values whose results overflow)
and the dtypes it runs in; ``BUDGET`` gives each op's error budget. Every backend of
``fv.backends()`` runs every row in every dtype (on a GPU machine: triton and cuda on the GPU,
whose fast exp and division differ from the CPU's by a few ulps: the bounds hold there too).

Inputs are a column of samples (shape ``(n, 1)``, reduction ``"none"``, upstream gradient 1), so
every value and gradient is checked alone. The oracle (60 significant digits) runs on the values
the test dtype holds. A result must be

* ``+-inf`` with the true sign where the true value overflows the output's dtype;
* else finite and within ``N_OUT * u_out * |true| + BUDGET * u_c * slack + tiny_out`` of the
  truth: ``u_out`` the unit roundoff of the output's dtype (2 of them: one rounding to it, or one
  truncation as Triton's interpreter converts to bfloat16), ``u_c`` that of the compute dtype
  (float32, float64 for float64 inputs), ``tiny_out`` the output dtype's smallest normal (the
  absolute accuracy where the true value is subnormal), and ``slack`` the size of the terms the
  result is formed from (``slack == |true|`` where nothing cancels: a few ulps then). A term
  ``e^x`` counts ``(1 + |x|)`` times: the relative error of exp grows with its argument where
  the argument rounds (x = lv - plv) or the hardware exponentiates in base 2 (``ex2.approx`` on
  a GPU: about |x| * 2^-24). Terms are those of formulas that cancel only where the result is
  ill-conditioned (see docs/numerics.md).
* Within the error bound of the overflow threshold, either.

The oracle values are computed once per (row, dtype) and shared by the backends.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import accuracy
import mpmath
import pytest
import torch
from helpers import DTYPES, dtype_id, loss_dtype

import fastvae as fv
from fastvae.ops import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

mp = mpmath.mp
DPS = 60
SEED = 1234

# (backend, row) pairs known to fail, with why (empty: every backend meets the bounds).
PENDING: dict[tuple[str, str], str] = {}

# Error budget per op, in units of the compute dtype's unit roundoff times the slack.
BUDGET = {"kl": 8, "kl_prior": 16, "bernoulli": 8, "gaussian_nll": 16, "reparameterize": 8,
          "sample_and_kl": 8, "iwae": 16, "continuous_bernoulli": 8}
N_OUT = 2
# Generated noise agrees across backends to float32 rounding of Box-Muller, absolutely.
NOISE_ABS = 4e-6

# ---------------------------------------------------------------------------------------------
# Grids (float64 values; each dtype runs the values it can hold, finite ones only)
# ---------------------------------------------------------------------------------------------


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    return [10.0 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def _signed(mags: list[float]) -> list[float]:
    return sorted({0.0, *mags, *(-m for m in mags)})


# log-variances: dense from 1e-8 to 200 both ways, the float32 overflow edges of e^lv / 2
# (88.72 .. 89.42) and of e^(lv / 2) (177.4), and far out (results overflow, or are linear).
LOGVAR = sorted({*_signed(_logspace(-8, math.log10(200.0), 33)),
                 88.0, 88.72, 88.73, 89.0, 89.4, 89.41, 89.5, 90.0, 177.0, 178.0, 353.0, 356.0,
                 -1e3, 1e3, -1e10, 1e10, -3e38, 3e38})
# float64 reaches further: e^lv / 2 overflows at lv = 710.5.
LOGVAR_WIDE = sorted({*LOGVAR, *_signed(_logspace(2.4, 3.2, 9)), 709.0, 709.78, 710.4, 710.6,
                      1419.0, 1421.0, -1e300, 1e300})
LOGVAR_COARSE = [-3e38, -1e3, -200.0, -180.0, -88.0, -30.0, -1.0, -0.3, -1e-6, 0.0, 1e-6, 0.3,
                 1.0, 30.0, 88.0, 89.0, 89.4, 200.0, 1e3, 3e38]
LOGVAR_COARSE_WIDE = sorted({*LOGVAR_COARSE, -1e300, -1500.0, -710.0, 709.0, 710.4, 1500.0,
                             1e300})
# logits from -1e4 to 1e4 through 0, and the float32 / float64 tails
LOGITS = sorted({*_signed(_logspace(-8, 4, 61)), 16.0, 17.0, -17.0, 88.7, -88.7, 103.9,
                 -103.9, 745.0, -745.0, 1e30, -1e30})
TARGETS = [0.0, 1e-4, 0.3, 0.5, 0.9999, 1.0]
MU = _signed([1e-30, 1e-10, 1e-3, 0.5, 1.0, 3.0, 1e3, 1e10, 1e19, 2.5e19, 3e19, 1e30])
RESIDUALS = [0.0, *_logspace(-30, 30, 13), 2.6e19, -1e-3, -1.0, -1e19]


def _product(**columns: list[float]) -> dict[str, list[float]]:
    names = list(columns)
    rows = list(itertools.product(*columns.values()))
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


def _logvar_for(dtype: torch.dtype, coarse: bool = False) -> list[float]:
    if dtype == torch.float64:
        return LOGVAR_COARSE_WIDE if coarse else LOGVAR_WIDE
    return LOGVAR_COARSE if coarse else LOGVAR


@dataclass(frozen=True)
class Row:
    op: str
    columns: Callable[[torch.dtype], dict[str, list[float]]]  # float64 values per input
    dtypes: tuple[torch.dtype, ...] = DTYPES


def _gaussian_nll_columns(dtype):
    cols = _product(mean=[0.0, 3.0, -1e4], residual=RESIDUALS, logvar=_logvar_for(dtype))
    cols["target"] = [m + r for m, r in zip(cols["mean"], cols.pop("residual"), strict=True)]
    return cols


def _kl_prior_columns(dtype):
    cols = _product(prior_mu=[0.0, -2.5], diff=[0.0, 1e-30, -1e-3, 1.0, 1e3, 1e19],
                    logvar=_logvar_for(dtype, coarse=True),
                    prior_logvar=_logvar_for(dtype, coarse=True))
    cols["mu"] = [p + d for p, d in zip(cols["prior_mu"], cols.pop("diff"), strict=True)]
    return cols


def _iwae_columns(dtype):
    # K = 2: z0 == mu exactly (the zero residual at any variance), z1 = mu + 1.3 e^(lv/2);
    # log-likelihoods equal, 1e5 apart either way, or close.
    cols = _product(lpx=[(0.0, 0.0), (0.0, -1e5), (-1e5, 0.0), (3.0, -2.0)],
                    mu=[0.0, 1.5, -1e3], logvar=_logvar_for(dtype, coarse=True))
    lpx = cols.pop("lpx")
    cols["log_px0"] = [p[0] for p in lpx]
    cols["log_px1"] = [p[1] for p in lpx]
    return cols


# The continuous Bernoulli: 0, +-10^e for e from -30 to 4 (six per decade), +-(8 - ulp, 8,
# 8 + ulp) in the dtype (the switch of forms), 1e30 and the largest finite value where the dtype
# holds them, against hard, soft and near-1/2 targets.
CB_TARGETS = [0.0, 1e-3, 0.3, 0.5, 0.5 + 2.0**-10, 0.7, 1.0 - 1e-3, 1.0]


def cb_logits(dtype: torch.dtype) -> list[float]:
    mags = [10.0 ** (e / 6.0) for e in range(-180, 25)]
    eight = torch.tensor(8.0, dtype=dtype)
    mags += [torch.nextafter(eight, eight - 1).item(), 8.0,
             torch.nextafter(eight, eight + 1).item(), 1e-6, 0.999e-6, 1.0, 1e30,
             torch.finfo(dtype).max]
    held = torch.tensor(mags, dtype=torch.float64).to(dtype).double()
    mags = sorted({m for m in held.tolist() if math.isfinite(m)})
    return [0.0] + [s * m for m in mags for s in (1.0, -1.0) if m > 0]


DOMAIN = {
    "kl": Row("kl", lambda dt: _product(mu=MU, logvar=_logvar_for(dt))),
    "kl_prior": Row("kl_prior", _kl_prior_columns),
    "bernoulli": Row("bernoulli", lambda dt: _product(logits=LOGITS, target=TARGETS)),
    "gaussian_nll": Row("gaussian_nll", _gaussian_nll_columns),
    "reparameterize": Row("reparameterize", lambda dt: _product(
        mu=[0.0, 1.0, -1e4, 1e30], eps=[0.0, 1e-3, 0.5, -1.7, 3.0], logvar=_logvar_for(dt))),
    "sample_and_kl": Row("sample_and_kl", lambda dt: _product(mu=[0.0, -1.0, 1e3, 1e19],
                                                              logvar=_logvar_for(dt))),
    "iwae": Row("iwae", _iwae_columns),
    "continuous_bernoulli": Row("continuous_bernoulli", lambda dt: _product(
        logits=cb_logits(dt), target=CB_TARGETS)),
}

# ---------------------------------------------------------------------------------------------
# The oracle: per sample, each output's true value and slack (mpmath, DPS digits)
# ---------------------------------------------------------------------------------------------


def _e(x):
    return mp.exp(x)


def _half_expm1mx_slack(d, rho):
    """(expm1(d) - d) / 2 and the slack of its computation from d (rounded relatively rho u)."""
    v = (mp.expm1(d) - d) / 2
    if abs(d) < 1:
        return v, abs(v) * (1 + 2 * rho)
    return v, _e(d) / 2 * (1 + abs(d) * (1 + rho)) + abs(mp.mpf(0.5) + d / 2) * (1 + rho)


def _half_expm1_slack(d, rho):
    v = mp.expm1(d) / 2
    if abs(d) < 1:
        return v, abs(v) * (1 + rho)
    return v, _e(d) / 2 * (1 + abs(d) * (1 + rho)) + mp.mpf(0.5)


def _rho(a, b):
    """How much the rounding of a - b weighs relative to |a - b|."""
    d = abs(a - b)
    return (abs(a) + abs(b)) / d if d else mp.mpf(1)


def _oracle_kl(mu, logvar):
    hx, hx_s = _half_expm1mx_slack(logvar, 0)
    g, g_s = _half_expm1_slack(logvar, 0)
    return {0: (mu * mu / 2 + hx, mu * mu + hx_s), "mu": (mu, abs(mu)), "logvar": (g, g_s)}


def _oracle_kl_prior(mu, logvar, prior_mu, prior_logvar):
    diff = mu - prior_mu
    rho = _rho(mu, prior_mu)
    e = _e(-prior_logvar)
    u2 = diff * diff * e / 2
    u2_s = u2 * 2 * (rho + 2 + abs(prior_logvar))
    d = logvar - prior_logvar
    rho_d = _rho(logvar, prior_logvar)
    hx, hx_s = _half_expm1mx_slack(d, rho_d)
    g_lv, g_lv_s = _half_expm1_slack(d, rho_d)
    g_mu = diff * e
    g_mu_s = abs(g_mu) * (4 + rho + abs(prior_logvar))
    return {0: (u2 + hx, u2_s + hx_s), "mu": (g_mu, g_mu_s), "logvar": (g_lv, g_lv_s),
            "prior_mu": (-g_mu, g_mu_s), "prior_logvar": (-(g_lv + u2), g_lv_s + u2_s)}


def _oracle_bernoulli(logits, target):
    al = abs(logits)
    a = 1 - target if logits >= 0 else target
    t = _e(-al)
    v = al * a + mp.log1p(t)
    p = t / (1 + t)
    g = (1 - target) - p if logits >= 0 else p - target
    g_s = (1 - target if logits >= 0 else target) + p * (1 + al)
    return {0: (v, al * a + mp.log1p(t) * (1 + al)), "logits": (g, g_s),
            "target": (-logits, al)}


def _oracle_gaussian_nll(mean, target, logvar):
    r = target - mean
    rho = _rho(target, mean)
    u2 = r * r * _e(-logvar) / 2
    u2_s = u2 * 2 * (rho + 2 + abs(logvar))
    half_log_2pi = mp.log(2 * mp.pi) / 2
    g = r * _e(-logvar)
    g_s = abs(g) * (rho + 4 + abs(logvar))
    return {0: (logvar / 2 + half_log_2pi + u2, abs(logvar) / 2 + half_log_2pi + u2_s),
            "mean": (-g, g_s), "target": (g, g_s), "logvar": (mp.mpf(0.5) - u2, 0.5 + u2_s)}


def _oracle_reparameterize(mu, eps, logvar):
    std = _e(logvar / 2)
    se = std * eps
    w = 3 + abs(logvar) / 2
    return {0: (mu + se, abs(mu) + abs(se) * w), "mu": (mp.mpf(1), mp.mpf(1)),
            "logvar": (se / 2, abs(se) / 2 * w), "eps": (std, std * w)}


def _oracle_sample_and_kl(mu, logvar, eps):
    """The third entry: an absolute allowance for the backends' own Box-Muller (float32)."""
    std = _e(logvar / 2)
    se = std * eps
    w = 3 + abs(logvar) / 2
    noise = std * NOISE_ABS * (1 + abs(eps))
    kl = _oracle_kl(mu, logvar)
    g_lv, g_lv_s = kl["logvar"]
    return {0: (mu + se, abs(mu) + abs(se) * w, noise), 1: kl[0],
            "mu": (1 + mu, 1 + abs(mu)),
            "logvar": (se / 2 + g_lv, abs(se) / 2 * w + g_lv_s, noise / 2)}


def _oracle_iwae(log_px0, log_px1, mu, logvar, z0, z1, unit, big):
    """K = 2. The log-weights are known to delta = unit * (their terms' size); the normalized
    weights a_k = e^(w_k - lse) then to a factor e^(+-2 delta), absolutely (anything in [0, 1]
    once delta passes 10): the third entries. ``unit``: the budget times the unit roundoff.
    d/dz and d/dmu are a_k times (z - mu) e^-lv: where that partial overflows the compute dtype
    (|big|), the gradient may be inf (the fourth entry), as for any upstream gradient."""
    e = _e(-logvar)
    lpx, zs = (log_px0, log_px1), (z0, z1)
    w, w_s = [], []
    for lp, z in zip(lpx, zs, strict=True):
        u2 = (z - mu) ** 2 * e / 2
        w.append(lp + u2 + logvar / 2 - z * z / 2)
        w_s.append(abs(lp) + u2 * 2 * (_rho(z, mu) + 2 + abs(logvar)) + abs(logvar) / 2 + z * z)
    lse = mp.log(sum(_e(x) for x in w))
    t = max(w_s)
    delta = unit * (2 * t + 2)
    out = {0: (lse - mp.log(2), abs(lse) + 2 * t + 1)}
    d_mu = d_lv = d_mu_s = d_lv_s = d_mu_w = d_lv_w = mp.mpf(0)
    over = False
    for k, (wk, z) in enumerate(zip(w, zs, strict=True)):
        ak = _e(wk - lse)
        werr = mp.mpf(1) if delta > 10 else min(mp.mpf(1), ak * mp.expm1(2 * delta))
        r = z - mu
        re = r * e
        dz = re - z
        rho = _rho(z, mu)
        dz_terms = (abs(r * mp.expm1(-logvar)) + abs(mu)) if abs(logvar) < 1 else (
            abs(re) * (4 + rho + abs(logvar)) + abs(z))
        u2 = r * r * e / 2
        out[("log_px", k)] = (ak, ak, werr)
        over = over or abs(re) > big
        out[("z", k)] = (ak * dz, ak * dz_terms, werr * abs(dz), abs(re) > big)
        d_mu -= ak * re
        d_mu_s += ak * abs(re) * (4 + rho + abs(logvar))
        d_mu_w += werr * abs(re)
        d_lv += ak * (mp.mpf(0.5) - u2)
        d_lv_s += ak * (mp.mpf(0.5) + u2 * 2 * (rho + 2 + abs(logvar)))
        d_lv_w += werr * abs(mp.mpf(0.5) - u2)
    out["mu"] = (d_mu, d_mu_s, d_mu_w, over)
    out["logvar"] = (d_lv, d_lv_s, d_lv_w)
    return out


def _oracle_continuous_bernoulli(logits, target):
    """The textbook -log C(l) - x l + softplus(l), C(l) = l / tanh(l/2), and its derivative
    -(1/l - 1/sinh(l)) - x + sigmoid(l), with the digits the textbook form cancels (both ways)
    added; slack: the size of the terms of the two cancellation-free forms
    (accuracy.continuous_bernoulli_slack) on top of the result's own."""
    if logits == 0:
        value, grad = mp.mpf(0), mp.mpf(0.5) - target
    else:
        scale = int(mp.floor(mp.log10(abs(logits))))
        with mp.workdps(DPS + 2 * abs(scale) + 10):
            log_c = mp.log(logits / mp.tanh(logits / 2))
            softplus = (logits + mp.log1p(mp.exp(-logits)) if logits > 0
                        else mp.log1p(mp.exp(logits)))
            value = -log_c - target * logits + softplus
            grad = -(1 / logits - 1 / mp.sinh(logits)) - target + 1 / (1 + mp.exp(-logits))
    slack = accuracy.continuous_bernoulli_slack(torch.tensor(float(logits), dtype=torch.float64),
                                                torch.tensor(float(target), dtype=torch.float64))
    return {0: (value, abs(value) + slack["value"].item()),
            "logits": (grad, abs(grad) + slack["logits"].item()),
            "target": (-logits, abs(logits))}


ORACLES = {"kl": _oracle_kl, "kl_prior": _oracle_kl_prior, "bernoulli": _oracle_bernoulli,
           "gaussian_nll": _oracle_gaussian_nll, "reparameterize": _oracle_reparameterize,
           "sample_and_kl": _oracle_sample_and_kl, "iwae": _oracle_iwae,
           "continuous_bernoulli": _oracle_continuous_bernoulli}


def _unit(dtype: torch.dtype) -> float:
    """Unit roundoff."""
    return 2.0 ** -{torch.float64: 53, torch.float32: 24, torch.float16: 11,
                    torch.bfloat16: 8}[dtype]


# ---------------------------------------------------------------------------------------------
# Inputs, outputs, and the oracle per (row, dtype)
# ---------------------------------------------------------------------------------------------


def _inputs(name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float64 columns holding the values ``dtype`` holds (finite ones)."""
    row = DOMAIN[name]
    cols = {k: torch.tensor(v, dtype=torch.float64).to(dtype).double()
            for k, v in row.columns(dtype).items()}
    if row.op == "iwae":
        cols["z0"] = cols["mu"].clone()
        std = torch.exp(0.5 * cols["logvar"])
        cols["z1"] = (cols["mu"] + 1.3 * std).to(dtype).double()
    keep = torch.stack([torch.isfinite(c) for c in cols.values()]).all(0)
    return {k: c[keep] for k, c in cols.items()}


def _leaves(op: str, x64: dict[str, torch.Tensor], dtype, device) -> dict[str, torch.Tensor]:
    if op == "iwae":
        shaped = {"log_px": torch.stack([x64["log_px0"], x64["log_px1"]]),
                  "z": torch.stack([x64["z0"], x64["z1"]])[..., None],
                  "mu": x64["mu"][:, None], "logvar": x64["logvar"][:, None]}
    elif op == "reparameterize":
        shaped = {"mu": x64["mu"][:, None], "logvar": x64["logvar"][:, None],
                  "eps": x64["eps"][:, None]}
    else:
        shaped = {k: v[:, None] for k, v in x64.items()}
    return {k: v.to(dtype).to(device).requires_grad_() for k, v in shaped.items()}


def _call(op: str, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if op == "kl":
        return (fv.gaussian_kl(x["mu"], x["logvar"], reduction="none"),)
    if op == "kl_prior":
        return (fv.gaussian_kl(x["mu"], x["logvar"], x["prior_mu"], x["prior_logvar"],
                               reduction="none"),)
    if op == "bernoulli":
        return (fv.bernoulli_nll(x["logits"], x["target"], reduction="none"),)
    if op == "gaussian_nll":
        return (fv.gaussian_nll(x["mean"], x["target"], x["logvar"], reduction="none"),)
    if op == "reparameterize":
        return (fv.reparameterize(x["mu"], x["logvar"], eps=x["eps"]),)
    if op == "sample_and_kl":
        return fv.sample_and_kl(x["mu"], x["logvar"], seed=SEED, reduction="none")
    if op == "continuous_bernoulli":
        return (fv.continuous_bernoulli_nll(x["logits"], x["target"], reduction="none"),)
    return (fv.iwae_log_likelihood(x["log_px"], x["z"], x["mu"], x["logvar"]),)


def _flat(key) -> str:
    return key if isinstance(key, str) else key[0]


@functools.cache
def _oracle(name: str, dtype: torch.dtype) -> dict:
    """{output key: (true float64, allowed error float64, inf accepted)} per sample, for
    ``dtype``'s inputs. Output keys: output index, or input name (its gradient); IWAE's
    (K, B) gradients give a (name, k) key per sample k."""
    op = DOMAIN[name].op
    x64 = _inputs(name, dtype)
    n = len(next(iter(x64.values())))
    columns = {k: v.tolist() for k, v in x64.items()}
    if op == "sample_and_kl":
        columns["eps"] = reference.noise(SEED, (n, 1), "cpu").double().flatten().tolist()
    u_c = _unit(reference.compute_dtype(dtype))
    budget = mp.mpf(BUDGET[op]) * mp.mpf(u_c)
    results: dict = {}
    with mp.workdps(DPS):
        for i in range(n):
            args = {k: mp.mpf(v[i]) for k, v in columns.items()}
            if op == "iwae":
                args.update(unit=budget, big=torch.finfo(reference.compute_dtype(dtype)).max)
            for key, (true, slack, extra, inf_ok) in (
                    (k, (*v, 0, False)[:4]) for k, v in ORACLES[op](**args).items()):
                vals = results.setdefault(key, ([], [], []))
                vals[0].append(float(true) if abs(true) < mp.mpf(2) ** 1030 else
                               math.copysign(math.inf, float(mp.sign(true))))
                vals[1].append(float(budget * slack + extra))
                vals[2].append(bool(inf_ok))
    return {key: (torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64),
                  torch.tensor(i, dtype=torch.bool)) for key, (t, s, i) in results.items()}


def _check(label: str, got: torch.Tensor, true: torch.Tensor, allow: torch.Tensor,
           inf_ok: torch.Tensor, out_dtype: torch.dtype, x64: dict[str, torch.Tensor],
           skip: torch.Tensor) -> None:
    assert got.dtype == out_dtype, f"{label}: dtype {got.dtype}, expected {out_dtype}"
    a = got.detach().cpu().double().flatten()
    info = torch.finfo(out_dtype)
    bound = allow + N_OUT * _unit(out_dtype) * true.abs() + info.tiny
    bound = torch.where(torch.isfinite(true), bound, torch.zeros_like(bound))
    # values at least this large round to inf
    inf_at = info.max * (1 + _unit(out_dtype))
    overflow = (true.abs() - bound) >= inf_at
    finite = (true.abs() + bound) < info.max
    close = torch.isfinite(a) & ((a - true).abs() <= bound)
    right_inf = torch.isinf(a) & (a.sign() == true.sign())
    ok = torch.where(overflow, right_inf, torch.where(finite, close, close | right_inf))
    ok |= (inf_ok & right_inf) | skip
    if not ok.all():
        bad = (~ok).nonzero().flatten()[:8].tolist()
        lines = [f"  got {a[i].item():.9g}, true {true[i].item():.9g}, bound "
                 f"{bound[i].item():.3g} at " + ", ".join(f"{k}={v[i].item():.9g}"
                                                          for k, v in x64.items())
                 for i in bad]
        raise AssertionError(f"{label}: {int((~ok).sum())} of {ok.numel()} wrong\n"
                             + "\n".join(lines))


def _params():
    for name, row in DOMAIN.items():
        for dtype in row.dtypes:
            yield pytest.param(name, dtype, id=f"{name}-{dtype_id(dtype)}")


@pytest.mark.parametrize(("name", "dtype"), list(_params()))
def test_whole_domain(name, dtype, backend, device, request):
    if (backend, name) in PENDING:
        request.applymarker(pytest.mark.xfail(reason=PENDING[(backend, name)], strict=True))
    op = DOMAIN[name].op
    x64 = _inputs(name, dtype)
    oracle = _oracle(name, dtype)
    leaves = _leaves(op, x64, dtype, device)
    outs = _call(op, leaves)
    grads = torch.autograd.grad(outs, list(leaves.values()), [torch.ones_like(o) for o in outs])
    grads = dict(zip(leaves, grads, strict=True))
    samples = {"reparameterize": (0,), "sample_and_kl": (0,)}.get(op, ())
    where = f"{name} [{dtype_id(dtype)}, {backend}]"
    # Triton's interpreter converts bfloat16 subnormals to float32 wrongly (1e-40 -> 0,
    # 1.1e-39 -> 5.9e-39): such samples say nothing about the kernels there.
    skip = torch.zeros(len(next(iter(x64.values()))), dtype=torch.bool)
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        for v in x64.values():
            skip |= (v != 0) & (v.abs() < torch.finfo(torch.bfloat16).tiny)
    for i, out in enumerate(outs):
        out_dtype = dtype if i in samples else loss_dtype(dtype)
        _check(f"{where} output {i}", out.flatten(), *oracle[i], out_dtype, x64, skip)
    for key, (true, allow, inf_ok) in oracle.items():
        if isinstance(key, int):
            continue
        g = grads[_flat(key)]
        got = g[key[1]].flatten() if isinstance(key, tuple) else g.flatten()
        _check(f"{where} d/d{key}", got, true, allow, inf_ok, dtype, x64, skip)


# ---------------------------------------------------------------------------------------------
# Infinite logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bernoulli_infinite_logits(dtype, backend, device):
    """+-inf logits (a masked output) with a hard target give the limits: the loss is 0 where
    the target agrees and +inf where it does not, the gradient sigmoid(+-inf) - x (0 or +-1);
    a target strictly inside (0, 1) gives NaN, loss and gradient (an infinite logit is not a
    limit to take there)."""
    inf = math.inf
    logits = torch.tensor([inf, inf, -inf, -inf, inf, -inf, 2.0], dtype=dtype, device=device)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.25, 0.5, 1.0], dtype=dtype, device=device)
    leaf = logits[:, None].clone().requires_grad_()
    nll = fv.bernoulli_nll(leaf, target[:, None], reduction="none")
    (grad,) = torch.autograd.grad(nll.sum(), leaf)
    want = torch.tensor([0.0, inf, 0.0, inf, math.nan, math.nan,
                         math.log1p(math.exp(-2.0))], dtype=torch.float64)
    want_grad = torch.tensor([0.0, 1.0, 0.0, -1.0, math.nan, math.nan,
                              1 / (1 + math.exp(-2.0)) - 1], dtype=torch.float64)
    torch.testing.assert_close(nll.detach().cpu().double(), want, equal_nan=True,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.detach().cpu().double().flatten(), want_grad,
                               equal_nan=True, rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------------------------
# The reported rows (float32)
# ---------------------------------------------------------------------------------------------


def test_reported_rows(backend, device):
    f32 = dict(dtype=torch.float32, device=device)
    lv = torch.full((1, 1), 89.0, **f32, requires_grad=True)
    kl = fv.gaussian_kl(torch.zeros(1, 1, **f32), lv, reduction="sum")
    (d_lv,) = torch.autograd.grad(kl, lv)
    exact = 0.5 * (math.exp(89.0) - 1 - 89.0)
    assert kl.item() == pytest.approx(exact, rel=1e-5)
    assert d_lv.item() == pytest.approx(0.5 * math.expm1(89.0), rel=1e-5)

    x = torch.full((1, 1), 0.37, **f32)
    nll = fv.gaussian_nll(x.clone(), x, torch.full((1, 1), -180.0, **f32), reduction="sum")
    assert nll.item() == pytest.approx(0.5 * (-180.0 + math.log(2 * math.pi)), rel=1e-6)

    nll = fv.gaussian_nll(torch.zeros(1, 1, **f32), torch.full((1, 1), 1e-30, **f32),
                          torch.full((1, 1), -180.0, **f32), reduction="sum")
    r = float(torch.tensor(1e-30, dtype=torch.float32))
    assert nll.item() == pytest.approx(0.5 * (r * r * math.exp(180.0) - 180.0
                                              + math.log(2 * math.pi)), rel=1e-5)

    logits = torch.tensor([[17.0]], **f32, requires_grad=True)
    (g,) = torch.autograd.grad(fv.bernoulli_nll(logits, torch.ones(1, 1, **f32),
                                                reduction="sum"), logits)
    assert g.item() == pytest.approx(-1 / (1 + math.exp(17.0)), rel=1e-5)


def test_continuous_bernoulli_grid_covers_the_domain():
    """The row reaches +-1e4, 0, 1e-30, the series' scale (1e-6) and both sides of the switch of
    forms at |l| = 8, in every dtype."""
    for dtype in DTYPES:
        logits = _inputs("continuous_bernoulli", dtype)["logits"]
        assert logits.min() <= -1e4
        assert logits.max() >= 1e4
        assert (logits == 0).any()
        small = logits.abs()[logits != 0]
        if dtype != torch.float16:  # float16 holds nothing below 6e-8
            assert small.min() < 1e-29
        assert ((small > 1e-7) & (small < 1e-5)).any()
        eight = torch.tensor(8.0, dtype=dtype)
        for value in (torch.nextafter(eight, eight - 1), eight, torch.nextafter(eight, eight + 1)):
            assert (logits == value.item()).any()
