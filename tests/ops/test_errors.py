"""Bad input (issue 2, item 6; SPEC §2): a clear error naming the argument and nothing else
happens; empty inputs and NaN/inf as SPEC §2 says; the opt-in data validation."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import BACKENDS, CUDA

import fastvae as fv
from fastvae.ops import backends as _backend

# ---------------------------------------------------------------------------------------------
# The table: (id, call, exception type, words the message must contain)
# ---------------------------------------------------------------------------------------------


def t(*shape, dtype=torch.float32, device="cpu"):
    """Values in (0, 1), without drawing from torch's generator (the tests check it is not)."""
    n = 1
    for size in shape:
        n *= size
    return torch.linspace(0.1, 0.9, n, dtype=dtype).reshape(shape).to(device)


a, b = t(3, 4), t(3, 4)
i34 = torch.ones(3, 4, dtype=torch.int64)
meta = t(3, 4, device="meta")
scalar = torch.tensor(0.5)

BAD_INPUTS = [
    # --- shapes -> ValueError naming the arguments
    ("kl_logvar_shape", lambda: fv.gaussian_kl(a, t(3, 5)), ValueError, ["logvar", "mu"]),
    ("kl_logvar_transposed", lambda: fv.gaussian_kl(a, t(4, 3)), ValueError, ["logvar"]),
    ("kl_prior_mu_shape", lambda: fv.gaussian_kl(a, b, t(5)), ValueError, ["prior_mu"]),
    ("kl_prior_logvar_shape", lambda: fv.gaussian_kl(a, b, None, t(2, 3, 4)), ValueError,
     ["prior_logvar"]),
    ("kl_0d", lambda: fv.gaussian_kl(scalar, scalar), ValueError, ["mu"]),
    ("bernoulli_target_shape", lambda: fv.bernoulli_nll(a, t(3, 5)), ValueError,
     ["target", "logits"]),
    ("bernoulli_target_broadcast", lambda: fv.bernoulli_nll(a, t(4)), ValueError, ["target"]),
    ("bernoulli_0d", lambda: fv.bernoulli_nll(scalar, scalar), ValueError, ["logits"]),
    ("gaussian_nll_target_shape", lambda: fv.gaussian_nll(a, t(3, 1)), ValueError, ["target"]),
    ("gaussian_nll_logvar_shape", lambda: fv.gaussian_nll(a, b, t(5)), ValueError, ["logvar"]),
    ("gaussian_nll_logvar_bigger", lambda: fv.gaussian_nll(a, b, t(2, 3, 4)), ValueError,
     ["logvar"]),
    ("gaussian_nll_0d", lambda: fv.gaussian_nll(scalar, scalar), ValueError, ["mean"]),
    ("reparameterize_shape", lambda: fv.reparameterize(a, t(3, 5)), ValueError, ["logvar"]),
    ("reparameterize_eps_shape", lambda: fv.reparameterize(a, b, eps=t(3, 5)), ValueError,
     ["eps"]),
    ("reparameterize_eps_samples_shape", lambda: fv.reparameterize(a, b, eps=t(3, 4),
                                                                   n_samples=2),
     ValueError, ["eps"]),
    ("sample_and_kl_shape", lambda: fv.sample_and_kl(a, t(4, 3)), ValueError, ["logvar"]),
    ("sample_and_kl_0d", lambda: fv.sample_and_kl(scalar, scalar), ValueError, ["mu"]),
    ("vae_batch", lambda: fv.vae_loss(a, b, t(2, 2), t(2, 2)), ValueError, ["recon", "mu"]),
    ("vae_x_shape", lambda: fv.vae_loss(a, t(3, 5), t(3, 2), t(3, 2)), ValueError,
     ["x", "recon"]),
    ("vae_logvar_shape", lambda: fv.vae_loss(a, b, t(3, 2), t(3, 3)), ValueError,
     ["logvar", "mu"]),
    ("vae_obs_logvar_shape", lambda: fv.vae_loss(a, b, t(3, 2), t(3, 2), likelihood="gaussian",
                                                 obs_logvar=t(5)), ValueError, ["obs_logvar"]),
    # --- dtypes -> TypeError
    ("kl_int_mu", lambda: fv.gaussian_kl(i34, b), TypeError, ["mu"]),
    ("kl_bool_logvar", lambda: fv.gaussian_kl(a, b > 0.5), TypeError, ["logvar"]),
    ("kl_complex_mu", lambda: fv.gaussian_kl(a.to(torch.complex64), b), TypeError, ["mu"]),
    ("kl_mixed", lambda: fv.gaussian_kl(a, b.double()), TypeError, ["logvar", "mu"]),
    ("kl_prior_dtype", lambda: fv.gaussian_kl(a, b, t(4, dtype=torch.float64)), TypeError,
     ["prior_mu"]),
    ("kl_prior_int", lambda: fv.gaussian_kl(a, b, None, i34), TypeError, ["prior_logvar"]),
    ("kl_prior_string", lambda: fv.gaussian_kl(a, b, "0"), TypeError, ["prior_mu"]),
    ("kl_list", lambda: fv.gaussian_kl([[0.0]], [[0.0]]), TypeError, ["mu"]),
    ("bernoulli_int_target", lambda: fv.bernoulli_nll(a, i34), TypeError, ["target"]),
    ("bernoulli_bool_target", lambda: fv.bernoulli_nll(a, b > 0.5), TypeError, ["target"]),
    ("bernoulli_int_logits", lambda: fv.bernoulli_nll(i34, b), TypeError, ["logits"]),
    ("gaussian_nll_int_logvar", lambda: fv.gaussian_nll(a, b, i34), TypeError, ["logvar"]),
    ("gaussian_nll_logvar_dtype", lambda: fv.gaussian_nll(a, b, t(4).bfloat16()), TypeError,
     ["logvar"]),
    ("gaussian_nll_logvar_string", lambda: fv.gaussian_nll(a, b, "1"), TypeError, ["logvar"]),
    ("gaussian_nll_logvar_bool", lambda: fv.gaussian_nll(a, b, True), TypeError, ["logvar"]),
    ("gaussian_nll_int_target", lambda: fv.gaussian_nll(a, i34), TypeError, ["target"]),
    ("reparameterize_int_mu", lambda: fv.reparameterize(i34, b), TypeError, ["mu"]),
    ("reparameterize_int_eps", lambda: fv.reparameterize(a, b, eps=i34), TypeError, ["eps"]),
    ("reparameterize_eps_dtype", lambda: fv.reparameterize(a, b, eps=b.double()), TypeError,
     ["eps"]),
    ("reparameterize_n_samples_float", lambda: fv.reparameterize(a, b, n_samples=2.0),
     TypeError, ["n_samples"]),
    ("reparameterize_n_samples_bool", lambda: fv.reparameterize(a, b, n_samples=True),
     TypeError, ["n_samples"]),
    ("reparameterize_seed_float", lambda: fv.reparameterize(a, b, seed=1.5), TypeError,
     ["seed"]),
    ("reparameterize_seed_tensor_dtype", lambda: fv.reparameterize(a, b, seed=torch.tensor(1.0)),
     TypeError, ["seed"]),
    ("reparameterize_seed_tensor_size", lambda: fv.reparameterize(a, b,
                                                                  seed=torch.tensor([1, 2])),
     TypeError, ["seed"]),
    ("reparameterize_generator_type", lambda: fv.reparameterize(a, b, generator=3), TypeError,
     ["generator"]),
    ("sample_and_kl_int", lambda: fv.sample_and_kl(a, i34), TypeError, ["logvar"]),
    ("sample_and_kl_seed_str", lambda: fv.sample_and_kl(a, b, seed="1"), TypeError, ["seed"]),
    ("kl_free_bits_str", lambda: fv.gaussian_kl(a, b, free_bits="1"), TypeError, ["free_bits"]),
    ("vae_beta_str", lambda: fv.vae_loss(a, b, a, b, beta="1"), TypeError, ["beta"]),
    ("vae_int_x", lambda: fv.vae_loss(a, i34, a, b), TypeError, ["x"]),
    ("vae_obs_logvar_str", lambda: fv.vae_loss(a, b, a, b, likelihood="gaussian",
                                               obs_logvar="0"), TypeError, ["obs_logvar"]),
    # --- devices -> ValueError (meta stands for a second device)
    ("kl_device", lambda: fv.gaussian_kl(a, meta), ValueError, ["logvar", "mu", "meta"]),
    ("kl_prior_device", lambda: fv.gaussian_kl(a, b, t(4, device="meta")), ValueError,
     ["prior_mu"]),
    ("bernoulli_device", lambda: fv.bernoulli_nll(a, meta), ValueError, ["target"]),
    ("gaussian_nll_logvar_device", lambda: fv.gaussian_nll(a, b, t(4, device="meta")),
     ValueError, ["logvar"]),
    ("reparameterize_eps_device", lambda: fv.reparameterize(a, b, eps=meta), ValueError,
     ["eps"]),
    ("reparameterize_seed_device", lambda: fv.reparameterize(
        a, b, seed=torch.tensor(1, device="meta")), ValueError, ["seed"]),
    ("vae_device", lambda: fv.vae_loss(a, b, a, meta), ValueError, ["logvar"]),
    ("vae_latent_device", lambda: fv.vae_loss(a, b, meta, meta), ValueError, ["mu", "recon"]),
    # --- values and names -> ValueError
    ("kl_reduction", lambda: fv.gaussian_kl(a, b, reduction="avg"), ValueError, ["reduction"]),
    ("kl_reduction_none_object", lambda: fv.gaussian_kl(a, b, reduction=None), ValueError,
     ["reduction"]),
    ("bernoulli_reduction", lambda: fv.bernoulli_nll(a, b, reduction="elementwise"), ValueError,
     ["reduction"]),
    ("gaussian_nll_reduction", lambda: fv.gaussian_nll(a, b, reduction="Mean"), ValueError,
     ["reduction"]),
    ("sample_and_kl_reduction", lambda: fv.sample_and_kl(a, b, reduction="max"), ValueError,
     ["reduction"]),
    ("vae_reduction", lambda: fv.vae_loss(a, b, a, b, reduction="batchmean"), ValueError,
     ["reduction"]),
    ("vae_likelihood", lambda: fv.vae_loss(a, b, a, b, likelihood="poisson"), ValueError,
     ["likelihood"]),
    ("kl_free_bits_negative", lambda: fv.gaussian_kl(a, b, free_bits=-0.1), ValueError,
     ["free_bits"]),
    ("kl_free_bits_nan", lambda: fv.gaussian_kl(a, b, free_bits=float("nan")), ValueError,
     ["free_bits"]),
    ("kl_free_bits_none_reduction", lambda: fv.gaussian_kl(a, b, free_bits=0.5,
                                                           reduction="none"),
     ValueError, ["free_bits", "reduction"]),
    ("sample_and_kl_free_bits_none", lambda: fv.sample_and_kl(a, b, free_bits=0.5,
                                                              reduction="none"),
     ValueError, ["free_bits"]),
    ("vae_free_bits_none", lambda: fv.vae_loss(a, b, a, b, free_bits=0.5, reduction="none"),
     ValueError, ["free_bits"]),
    ("reparameterize_n_samples_zero", lambda: fv.reparameterize(a, b, n_samples=0), ValueError,
     ["n_samples"]),
    ("reparameterize_seed_negative", lambda: fv.reparameterize(a, b, seed=-1), ValueError,
     ["seed"]),
    ("reparameterize_seed_too_big", lambda: fv.reparameterize(a, b, seed=2**63), ValueError,
     ["seed"]),
    ("reparameterize_seed_and_generator", lambda: fv.reparameterize(
        a, b, seed=1, generator=torch.Generator()), ValueError, ["seed", "generator"]),
    ("reparameterize_eps_and_seed", lambda: fv.reparameterize(a, b, eps=a, seed=1), ValueError,
     ["eps", "seed"]),
    ("reparameterize_eps_and_generator", lambda: fv.reparameterize(
        a, b, eps=a, generator=torch.Generator()), ValueError, ["eps", "generator"]),
    ("sample_and_kl_seed_and_generator", lambda: fv.sample_and_kl(
        a, b, seed=1, generator=torch.Generator()), ValueError, ["seed", "generator"]),
    ("set_backend_unknown", lambda: fv.set_backend("tpu"), ValueError, ["backend", "tpu"]),
    ("set_backend_case", lambda: fv.set_backend("Triton"), ValueError, ["backend"]),
    ("set_backend_none", lambda: fv.set_backend(None), ValueError, ["backend"]),
    ("use_backend_unknown", lambda: fv.use_backend("jax").__enter__(), ValueError,
     ["backend", "jax"]),
    # --- iwae_log_likelihood(log_px (K, B), z (K, B, *event), mu, logvar)
    ("iwae_z_no_samples", lambda: fv.iwae_log_likelihood(t(2, 3), t(0, 3, 4), a, b), ValueError,
     ["z", "K"]),
    ("iwae_z_event", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 5), a, b), ValueError,
     ["z", "mu"]),
    ("iwae_log_px_shape", lambda: fv.iwae_log_likelihood(t(3, 2), t(2, 3, 4), a, b), ValueError,
     ["log_px_given_z"]),
    ("iwae_logvar_shape", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 4), a, t(2, 4)),
     ValueError, ["logvar", "mu"]),
    ("iwae_0d", lambda: fv.iwae_log_likelihood(t(2, 1), t(2, 1), scalar, scalar), ValueError,
     ["mu"]),
    ("iwae_log_px_device", lambda: fv.iwae_log_likelihood(t(2, 3, device="meta"), t(2, 3, 4),
                                                          a, b), ValueError, ["log_px_given_z"]),
    ("iwae_logvar_device", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 4), a, meta),
     ValueError, ["logvar"]),
    ("iwae_z_dtype", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 4, dtype=torch.float64),
                                                    a, b), TypeError, ["z", "mu"]),
    ("iwae_int_log_px", lambda: fv.iwae_log_likelihood(torch.ones(2, 3, dtype=torch.int64),
                                                       t(2, 3, 4), a, b), TypeError,
     ["log_px_given_z"]),
    ("iwae_list_z", lambda: fv.iwae_log_likelihood(t(2, 3), [[0.0]], a, b), TypeError, ["z"]),
    # --- the loss modules check at construction
    ("module_reduction", lambda: fv.BernoulliNLLLoss(reduction="avg"), ValueError,
     ["reduction"]),
    ("module_kl_free_bits_none", lambda: fv.GaussianKLLoss(reduction="none", free_bits=1.0),
     ValueError, ["free_bits"]),
    ("module_nll_logvar", lambda: fv.GaussianNLLLoss(logvar="x"), TypeError, ["logvar"]),
    ("module_forward_shape", lambda: fv.GaussianNLLLoss()(a, t(3, 5)), ValueError, ["target"]),
    ("module_kl_forward_dtype", lambda: fv.GaussianKLLoss()(a, i34), TypeError, ["logvar"]),
    ("module_bernoulli_forward_device", lambda: fv.BernoulliNLLLoss()(a, meta), ValueError,
     ["target"]),
    ("module_kl_free_bits_type", lambda: fv.GaussianKLLoss(free_bits="1"), TypeError,
     ["free_bits"]),
]


def _names_in(message: str, words: list[str]) -> list[str]:
    return [w for w in words if not re.search(rf"\b{re.escape(w)}\b", message)]


@pytest.mark.parametrize(("call", "error", "words"),
                         [pytest.param(c, e, w, id=i) for i, c, e, w in BAD_INPUTS])
def test_bad_input(call, error, words, spy):
    """The right exception, a message naming the argument, and nothing else: no kernel ran,
    torch's generator was not consumed, the backend choice did not change."""
    rng, backend, scopes = torch.get_rng_state(), fv.get_backend(), list(_backend._scopes)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = _names_in(message, words)
    assert not missing, f"the message {message!r} does not name {missing}"
    assert spy == [], f"a kernel ran before the error: {spy}"
    assert torch.equal(torch.get_rng_state(), rng), "torch's generator was consumed"
    assert fv.get_backend() == backend
    assert _backend._scopes == scopes


def test_bad_input_table_is_complete():
    """Every public function appears in the table with each kind of error it can raise."""
    ids = [i for i, *_ in BAD_INPUTS]
    assert len(ids) == len(set(ids))
    for op in ("kl", "bernoulli", "gaussian_nll", "reparameterize", "sample_and_kl", "vae",
               "iwae"):
        kinds = {e for i, _, e, _ in BAD_INPUTS if i.startswith(op)}
        assert kinds == {ValueError, TypeError}, f"{op}: {kinds}"


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
        fv.gaussian_kl(a, b)


@pytest.mark.gpu
def test_backend_cannot_serve_device():
    cuda = t(3, 4, device="cuda")
    if "cpu" in BACKENDS:
        with fv.use_backend("cpu"), pytest.raises(RuntimeError, match="cpu"):
            fv.gaussian_kl(cuda, cuda)
    with pytest.raises(ValueError, match="cuda"):
        fv.gaussian_kl(a, cuda)
    with pytest.raises(ValueError, match="generator"):
        fv.reparameterize(cuda, cuda, generator=torch.Generator("cpu"))


# ---------------------------------------------------------------------------------------------
# Opt-in data validation
# ---------------------------------------------------------------------------------------------


def _with(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = value
    return x


NAN, INF = float("nan"), float("inf")
target01 = (b > 0.5).float()

INVALID_DATA = [
    ("kl_mu_nan", lambda: fv.gaussian_kl(_with(a, NAN), b), ["mu"]),
    ("kl_logvar_inf", lambda: fv.gaussian_kl(a, _with(b, INF)), ["logvar"]),
    ("kl_prior_mu_nan", lambda: fv.gaussian_kl(a, b, _with(a, NAN)), ["prior_mu"]),
    ("kl_prior_logvar_inf", lambda: fv.gaussian_kl(a, b, None, _with(b, -INF)),
     ["prior_logvar"]),
    ("bernoulli_logits_nan", lambda: fv.bernoulli_nll(_with(a, NAN), target01), ["logits"]),
    ("bernoulli_target_above_1", lambda: fv.bernoulli_nll(a, _with(target01, 1.5)), ["target"]),
    ("bernoulli_target_below_0", lambda: fv.bernoulli_nll(a, _with(target01, -0.1)),
     ["target"]),
    ("bernoulli_target_nan", lambda: fv.bernoulli_nll(a, _with(target01, NAN)), ["target"]),
    ("gaussian_nll_mean_inf", lambda: fv.gaussian_nll(_with(a, INF), b), ["mean"]),
    ("gaussian_nll_target_nan", lambda: fv.gaussian_nll(a, _with(b, NAN)), ["target"]),
    ("gaussian_nll_logvar_nan", lambda: fv.gaussian_nll(a, b, _with(b, NAN)), ["logvar"]),
    ("reparameterize_mu_nan", lambda: fv.reparameterize(_with(a, NAN), b), ["mu"]),
    ("reparameterize_logvar_inf", lambda: fv.reparameterize(a, _with(b, INF), n_samples=2),
     ["logvar"]),
    ("reparameterize_eps_nan", lambda: fv.reparameterize(a, b, eps=_with(a, NAN)), ["eps"]),
    ("sample_and_kl_logvar_nan", lambda: fv.sample_and_kl(a, _with(b, NAN)), ["logvar"]),
    ("vae_x_above_1", lambda: fv.vae_loss(a, _with(target01, 2.0), a, b), ["x"]),
    ("vae_recon_nan", lambda: fv.vae_loss(_with(a, NAN), target01, a, b), ["recon"]),
    ("vae_logvar_nan", lambda: fv.vae_loss(a, target01, a, _with(b, NAN)), ["logvar"]),
]


@pytest.mark.parametrize(("call", "words"), [pytest.param(c, w, id=i) for i, c, w in
                                             INVALID_DATA])
def test_validation_on(call, words, spy):
    fv.set_validation(True)
    assert fv.validation_enabled()
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="validation") as info:
        call()
    missing = _names_in(str(info.value), words)
    assert not missing, f"the message {str(info.value)!r} does not name {missing}"
    assert spy == []
    assert torch.equal(torch.get_rng_state(), rng), "torch's generator was consumed"


@pytest.mark.parametrize(("call", "words"), [pytest.param(c, w, id=i) for i, c, w in
                                             INVALID_DATA])
def test_validation_off(call, words):
    """Off by default: the same inputs compute, and a NaN or inf input shows in the output."""
    assert not fv.validation_enabled()
    out = call()
    out = out if isinstance(out, tuple) else (out,)
    assert all(isinstance(o, torch.Tensor) for o in out)


def test_validation_accepts_valid_data():
    fv.set_validation(True)
    fv.bernoulli_nll(a, target01)
    fv.bernoulli_nll(a, b)  # continuous targets in [0, 1]
    fv.vae_loss(a, b, a, b)
    fv.reparameterize(a, b)
    fv.set_validation(False)
    assert not fv.validation_enabled()
    fv.bernoulli_nll(a, _with(target01, 1.5))


# ---------------------------------------------------------------------------------------------
# Empty inputs (SPEC §2): the right value, never a crash
# ---------------------------------------------------------------------------------------------

EMPTY_LOSSES = {
    "gaussian_kl": lambda x, **kw: fv.gaussian_kl(x, x, **kw),
    "gaussian_kl_prior": lambda x, **kw: fv.gaussian_kl(x, x, x[:1], 0.5, **kw),
    "bernoulli_nll": lambda x, **kw: fv.bernoulli_nll(x, x, **kw),
    "gaussian_nll": lambda x, **kw: fv.gaussian_nll(x, x, **kw),
    "gaussian_nll_logvar": lambda x, **kw: fv.gaussian_nll(x, x, x, **kw),
    "sample_and_kl": lambda x, **kw: fv.sample_and_kl(x, x, **kw)[1],
    "vae_loss": lambda x, **kw: fv.vae_loss(x, x, x, x, **kw),
}


@pytest.mark.parametrize("op", EMPTY_LOSSES)
@pytest.mark.parametrize("shape", [(0, 5), (0,), (0, 2, 3), (4, 0), (4, 0, 3)],
                         ids=["empty_batch", "empty_1d", "empty_batch_3d", "empty_event",
                              "empty_event_3d"])
def test_empty(op, shape, backend, device):
    f = EMPTY_LOSSES[op]
    B = shape[0]
    x = torch.zeros(shape, device=device, requires_grad=True)
    none = f(x, reduction="none")
    assert none.shape == (B,)
    assert (none == 0).all()
    total = f(x, reduction="sum")
    assert total.shape == ()
    assert total.item() == 0
    mean = f(x, reduction="mean")
    assert mean.shape == ()
    assert (mean.isnan() if B == 0 else mean == 0).item()  # a mean over no samples is nan
    (grad,) = torch.autograd.grad(total, x)
    assert grad.shape == x.shape
    if op in ("gaussian_kl", "sample_and_kl", "vae_loss"):
        for reduction, expected in (("sum", 0.0), ("mean", float("nan") if B == 0 else 0.0)):
            out = f(x, reduction=reduction, free_bits=0.5)
            torch.testing.assert_close(out.cpu(), torch.tensor(expected), equal_nan=True)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,)])
def test_empty_samples(shape, backend, device):
    x = torch.zeros(shape, device=device, requires_grad=True)
    assert fv.reparameterize(x, x).shape == shape
    assert fv.reparameterize(x, x, eps=x).shape == shape
    z = fv.reparameterize(x, x, n_samples=3)
    assert z.shape == (3, *shape)
    z, kl = fv.sample_and_kl(x, x, reduction="none")
    assert z.shape == shape
    assert kl.shape == (shape[0],)
    (grad,) = torch.autograd.grad(z.sum() + kl.sum(), x)
    assert grad.shape == shape


# ---------------------------------------------------------------------------------------------
# NaN and inf propagate (SPEC §2), sample by sample
# ---------------------------------------------------------------------------------------------

PROPAGATION = {
    "kl_mu_nan": (lambda m, lv, x: fv.gaussian_kl(m, lv, reduction="none"), "m", NAN),
    "kl_logvar_inf": (lambda m, lv, x: fv.gaussian_kl(m, lv, reduction="none"), "lv", INF),
    "kl_logvar_minus_inf": (lambda m, lv, x: fv.gaussian_kl(m, lv, reduction="none"), "lv",
                            -INF),
    "kl_prior_nan": (lambda m, lv, x: fv.gaussian_kl(m, lv, x, reduction="none"), "x", NAN),
    "bernoulli_logits_nan": (lambda m, lv, x: fv.bernoulli_nll(m, x, reduction="none"), "m",
                             NAN),
    "bernoulli_target_nan": (lambda m, lv, x: fv.bernoulli_nll(m, x, reduction="none"), "x",
                             NAN),
    "gaussian_nll_mean_inf": (lambda m, lv, x: fv.gaussian_nll(m, x, lv, reduction="none"), "m",
                              INF),
    "gaussian_nll_logvar_nan": (lambda m, lv, x: fv.gaussian_nll(m, x, lv, reduction="none"),
                                "lv", NAN),
    "sample_and_kl_mu_nan": (lambda m, lv, x: fv.sample_and_kl(m, lv, seed=1,
                                                               reduction="none")[1], "m", NAN),
    "vae_recon_nan": (lambda m, lv, x: fv.vae_loss(m, x, m, lv, reduction="none"), "m", NAN),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under Triton's interpreter
@pytest.mark.parametrize("case", PROPAGATION)
def test_nan_inf_propagate(case, backend, device):
    """A NaN/inf in sample 1 makes sample 1's loss and gradient non-finite and leaves the
    others as they were."""
    f, which, value = PROPAGATION[case]
    g = torch.Generator().manual_seed(2)
    clean = {k: torch.rand(4, 6, generator=g).to(device) for k in ("m", "lv", "x")}
    dirty = {k: (_with(v, value) if k == which else v).requires_grad_() for k, v in
             clean.items()}
    clean = {k: v.requires_grad_() for k, v in clean.items()}
    out_clean, out_dirty = f(**clean), f(**dirty)
    assert not torch.isfinite(out_dirty[1])
    others = [0, 2, 3]
    torch.testing.assert_close(out_dirty[others], out_clean[others])
    (grad,) = torch.autograd.grad(out_dirty.sum(), dirty[which])
    if not (case.startswith("kl_logvar") or case == "bernoulli_target_nan"):
        # (d/dlogvar of the KL is +-inf or finite there; d/dtarget of the NLL is -logits.)
        assert not torch.isfinite(grad[1, 2])
    assert torch.isfinite(grad[others]).all()


def test_nan_in_sample_propagates(backend, device):
    mu = _with(torch.zeros(3, 4), NAN).to(device)
    logvar = _with(torch.zeros(3, 4), INF).to(device)
    for z in (fv.reparameterize(mu, torch.zeros_like(mu), seed=3),
              fv.reparameterize(torch.zeros_like(mu), logvar, seed=3),
              fv.sample_and_kl(mu, torch.zeros_like(mu), seed=3)[0]):
        assert not torch.isfinite(z[1, 2])
        finite = torch.ones_like(z, dtype=torch.bool)
        finite[1, 2] = False
        assert torch.isfinite(z[finite]).all()
