"""The distribution objects: ``DiagonalGaussianDistribution`` against the latent-diffusion /
diffusers formulas, ``DiagonalNormal`` against ``Independent(Normal)``, value and gradient, on
every backend and dtype.

The latent-diffusion oracle below is written from the class's published formulas (moments
chunked on dim 1, log-variance clamped to [-30, 20], plain ``exp``/``pow``/``sum``) and runs in
float64 on the test inputs rounded to their dtype, as the op tests' oracle does.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import assert_close, loss_dtype, to_oracle
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
    kl_divergence,
)

import fastvae as fv
from fastvae.ops import reference

# ---------------------------------------------------------------------------------------------
# DiagonalGaussianDistribution
# ---------------------------------------------------------------------------------------------


class LdmPosterior:
    """The latent-diffusion / diffusers formulas, in plain torch (the oracle)."""

    def __init__(self, parameters, deterministic=False):
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, eps):
        return self.mean + self.std * eps

    def kl(self, other=None):
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var
                               + self.var / other.var - 1.0 - self.logvar + other.logvar,
                               dim=[1, 2, 3])

    def nll(self, sample, dims=(1, 2, 3)):
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar
                               + (sample - self.mean).pow(2) / self.var, dim=list(dims))


def _moments(dtype, device, *, channels_last=False, seed=0, shape=(2, 6, 3, 4),
             lo=-3.0, hi=3.0):
    """Moments (B, 2C, H, W): means ~ N(0, 1), log-variances uniform in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    B, C2, H, W = shape
    mean = torch.randn(B, C2 // 2, H, W, generator=g, dtype=torch.float64)
    logvar = lo + (hi - lo) * torch.rand(B, C2 // 2, H, W, generator=g, dtype=torch.float64)
    m = torch.cat([mean, logvar], 1).to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m.to(device).requires_grad_()


def _grads(out, inputs, weight_dtype):
    """Gradients of sum(w * out), w fixed weights rounded to ``weight_dtype`` (the actual
    output's), so that the oracle's upstream gradient is the very same numbers."""
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).to(weight_dtype)
    w = w.to(device=out.device, dtype=out.dtype)
    return torch.autograd.grad((out * w.view(out.shape)).sum(), inputs, retain_graph=True)


def _check(name, actual, expected, inputs, oracle_inputs, dtype, *, out_dtype=None,
           noisy=False, grads=True):
    """Value (in ``out_dtype``) and gradients (in each input's dtype) against the oracle."""
    assert actual.dtype == (out_dtype or loss_dtype(dtype)), name
    assert_close(actual, expected, noisy=noisy, msg=name)
    if not grads:
        return
    for t, g_a, g_e in zip(inputs, _grads(actual, inputs, actual.dtype),
                           _grads(expected, oracle_inputs, actual.dtype),
                           strict=True):
        assert g_a.dtype == t.dtype, name
        assert_close(g_a, g_e, dtype=dtype, noisy=noisy, msg=f"gradient of {name}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ldm_posterior_matches_the_formulas(backend, device, dtype, layout):
    """kl(), kl(other), nll(x), sample(eps=), mode() and the attributes: values and
    gradients of the latent-diffusion formulas, to float rounding."""
    moments = _moments(dtype, device, channels_last=layout == "channels_last")
    prior_moments = _moments(dtype, device, seed=1, lo=-1.0, hi=1.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 3, 4, generator=g).to(dtype).to(device).requires_grad_()
    eps = torch.randn(2, 3, 3, 4, generator=g).to(dtype).to(device)
    m64, p64, x64 = to_oracle(moments), to_oracle(prior_moments), to_oracle(x)
    post = fv.DiagonalGaussianDistribution(moments)
    other = fv.DiagonalGaussianDistribution(prior_moments)
    ref, ref_other = LdmPosterior(m64), LdmPosterior(p64)
    _check("kl()", post.kl(), ref.kl(), (moments,), (m64,), dtype)
    _check("kl(other)", post.kl(other), ref.kl(ref_other), (moments, prior_moments),
           (m64, p64), dtype)
    _check("nll(x)", post.nll(x), ref.nll(x64), (moments, x), (m64, x64), dtype)
    _check("sample(eps=)", post.sample(eps=eps), ref.sample(eps.double().cpu()), (moments,),
           (m64,), dtype, out_dtype=dtype)
    assert post.mode() is post.mean
    for name in ("mean", "logvar", "std", "var"):
        actual = getattr(post, name)
        assert actual.shape == (2, 3, 3, 4), name
        assert actual.dtype == dtype, name
        assert_close(actual, getattr(ref, name), msg=name)


def test_ldm_posterior_nll_over_some_dims(backend, device, dtype):
    """dims that leave a non-batch dimension: the same formula, summed over those dims."""
    moments = _moments(dtype, device)
    x = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
    x = x.to(device).requires_grad_()
    m64, x64 = to_oracle(moments), to_oracle(x)
    post, ref = fv.DiagonalGaussianDistribution(moments), LdmPosterior(m64)
    for dims in ([1, 2], [2, 3], [-1], [1, 2, 3], [3, 2, 1]):
        actual = post.nll(x, dims=dims)
        _check(f"nll(dims={dims})", actual, ref.nll(x64, dims), (moments, x), (m64, x64), dtype)


def test_ldm_posterior_clamps_the_logvar_as_torch_clamp(backend, device):
    """Log-variances outside [-30, 20] are clamped: the values of the clamped ones, and a zero
    gradient there (torch.clamp's), in kl, nll and sample."""
    moments = _moments(torch.float64, device, lo=-40.0, hi=26.0, shape=(2, 8, 2, 2))
    x = torch.zeros(2, 4, 2, 2, dtype=torch.float64, device=device)
    post, ref = fv.DiagonalGaussianDistribution(moments), LdmPosterior(to_oracle(moments))
    outside = (moments.detach()[:, 4:] < -30) | (moments.detach()[:, 4:] > 20)
    assert outside.any()
    assert not outside.all()
    assert_close(post.logvar, ref.logvar)
    for name, out in (("kl", post.kl()), ("nll", post.nll(x)),
                      ("sample", post.sample(eps=torch.ones_like(x)))):
        (grad,) = torch.autograd.grad(out.sum(), moments, retain_graph=True)
        assert (grad[:, 4:][outside] == 0).all(), name
        assert (grad[:, 4:][~outside] != 0).all(), name


def test_ldm_posterior_deterministic(backend, device, dtype):
    moments = _moments(dtype, device)
    post = fv.DiagonalGaussianDistribution(moments, deterministic=True)
    assert post.deterministic
    assert (post.std == 0).all()
    assert (post.var == 0).all()
    assert post.std.dtype == dtype
    assert post.std.shape == post.mean.shape
    torch.testing.assert_close(post.sample(), post.mean, rtol=0, atol=0)
    for value in (post.kl(), post.kl(fv.DiagonalGaussianDistribution(moments)),
                  post.nll(post.mean)):
        assert value.shape == (2,)
        assert (value == 0).all()
        assert value.device == moments.device
    (grad,) = torch.autograd.grad(post.sample().sum(), moments)
    assert (grad[:, :3] == 1).all()
    assert (grad[:, 3:] == 0).all()
    with pytest.raises(ValueError, match="deterministic"):
        fv.DiagonalGaussianDistribution(moments).kl(post)


def test_ldm_posterior_sample_is_philox_noise_keyed_by_the_generator(backend, device):
    """sample(generator) = mean + std * Philox noise keyed by one draw of the generator:
    reproducible from the generator's seed, differentiable, noise not stored."""
    moments = _moments(torch.float32, device, channels_last=True)
    post = fv.DiagonalGaussianDistribution(moments)
    a = post.sample(generator=torch.Generator(device).manual_seed(7))
    b = post.sample(generator=torch.Generator(device).manual_seed(7))
    c = post.sample(generator=torch.Generator(device).manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64,
                         generator=torch.Generator(device).manual_seed(7), device=device)
    eps = reference.noise(seed, tuple(post.mean.shape), device)
    assert_close(a, (post.mean + post.std * eps).double(), noisy=True)
    torch.manual_seed(3)
    d = post.sample()
    torch.manual_seed(3)
    torch.testing.assert_close(post.sample(), d, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(a.sum(), moments)
    assert_close(grad[:, :3], torch.ones_like(grad[:, :3], dtype=torch.float64))
    with pytest.raises(ValueError, match="generator"):
        post.sample(torch.Generator(device), eps=eps)


def test_ldm_posterior_rejects_bad_moments():
    with pytest.raises(ValueError, match=r"\(2, 5, 3\)"):
        fv.DiagonalGaussianDistribution(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="moments"):
        fv.DiagonalGaussianDistribution(torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# DiagonalNormal: a torch.distributions.Distribution
# ---------------------------------------------------------------------------------------------


def _loc_logvar(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.empty(shape, dtype=torch.float64).uniform_(-2, 2, generator=g)
    return (loc.to(dtype).to(device).requires_grad_(),
            logvar.to(dtype).to(device).requires_grad_())


def _torch_twin(loc, logvar, k):
    """What the user had: Independent(Normal(mu, exp(logvar / 2)), k)."""
    return Independent(Normal(loc, torch.exp(0.5 * logvar)), k)


@pytest.mark.parametrize(("shape", "k"), [((4, 3), 1), ((2, 3, 2, 2), 3), ((2, 3, 4), 1),
                                          ((5,), 0), ((3, 2), 2)])
def test_diagonal_normal_is_independent_normal(backend, device, dtype, shape, k):
    """One line changes, DiagonalNormal(mu, logvar, k) for Independent(Normal(mu, std), k):
    shapes, moments, log_prob (of values with sample dimensions and broadcast ones), entropy
    and rsample with the same noise agree, value and gradient."""
    loc, logvar = _loc_logvar(shape, dtype, device)
    loc64, logvar64 = to_oracle(loc), to_oracle(logvar)
    d, t = fv.DiagonalNormal(loc, logvar, k), _torch_twin(loc64, logvar64, k)
    assert d.batch_shape == t.batch_shape
    assert d.event_shape == t.event_shape
    assert isinstance(d, Distribution)
    assert d.has_rsample
    for name in ("mean", "mode", "stddev", "variance"):
        assert_close(getattr(d, name), getattr(t, name), msg=name)
    event = shape[len(shape) - k:]
    g = torch.Generator().manual_seed(4)
    broadcast = (2, 1, *shape[1:]) if k < len(shape) else (2, *shape)
    for value_shape in (shape, (3, *shape), (1, *event), broadcast):
        value = torch.randn(value_shape, generator=g).to(dtype).to(device).requires_grad_()
        value64 = to_oracle(value)
        # Parameters broadcast over a sample dimension get the sum of one rounded gradient per
        # copy (autograd's sum of the op's half-precision terms, which may cancel): their
        # half-precision gradients are held to no per-element tolerance, float32/64 ones are.
        half_broadcast = dtype in (torch.float16, torch.bfloat16) and value_shape != shape
        _check(f"log_prob of {value_shape}", d.log_prob(value), t.log_prob(value64),
               (loc, logvar, value), (loc64, logvar64, value64), dtype,
               grads=not half_broadcast)
    _check("entropy", d.entropy(), t.entropy(), (logvar,), (logvar64,), dtype)
    # rsample: the same noise as torch's (torch.randn after the same seed) gives the same z
    torch.manual_seed(11)
    z_torch = t.rsample((2,))
    torch.manual_seed(11)
    eps = torch.randn((2, *shape), dtype=torch.float64)
    torch.testing.assert_close(z_torch, t.mean + t.stddev * eps, rtol=0, atol=0)
    eps = eps.to(dtype)  # what a user of this dtype passes: the noise rounded to it
    _check("rsample(eps=)", d.rsample((2,), eps=eps.to(device)),
           t.mean + t.stddev * eps.double(), (loc, logvar), (loc64, logvar64), dtype,
           out_dtype=dtype)


@pytest.mark.parametrize(("shape", "k"), [((4, 3), 1), ((2, 3, 2, 2), 3), ((6,), 0)])
def test_diagonal_normal_kl_divergence(backend, device, dtype, shape, k):
    """kl_divergence against DiagonalNormal, Independent(Normal) (the standard normal too)
    and, for a univariate event, Normal; a prior broadcast over the batch; torch's values and
    gradients, the torch-side distributions given by their own (loc, scale) leaves."""
    p_loc, p_lv = _loc_logvar(shape, dtype, device)
    q_loc, q_lv = _loc_logvar(shape[len(shape) - k:] if k else shape, dtype, device, seed=1)
    p_scale = torch.exp(0.5 * p_lv).detach().requires_grad_()
    q_scale = torch.exp(0.5 * q_lv).detach().requires_grad_()
    o = {id(x): to_oracle(x) for x in (p_loc, p_lv, q_loc, q_lv, p_scale, q_scale)}
    p, q = fv.DiagonalNormal(p_loc, p_lv, k), fv.DiagonalNormal(q_loc, q_lv, k)
    tp, tq = _torch_twin(o[id(p_loc)], o[id(p_lv)], k), _torch_twin(o[id(q_loc)], o[id(q_lv)], k)
    tp_scale = Independent(Normal(o[id(p_loc)], o[id(p_scale)]), k)
    tq_scale = Independent(Normal(o[id(q_loc)], o[id(q_scale)]), k)
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    standard = Independent(Normal(zeros, torch.ones_like(zeros)), k)
    standard64 = Independent(Normal(torch.zeros(shape, dtype=torch.float64), 1.0), k)
    pairs = [
        ("DiagonalNormal || DiagonalNormal", p, q, tp, tq, (p_loc, p_lv, q_loc, q_lv)),
        ("DiagonalNormal || Independent(Normal)", p, Independent(Normal(q_loc, q_scale), k),
         tp, tq_scale, (p_loc, p_lv, q_loc, q_scale)),
        ("Independent(Normal) || DiagonalNormal", Independent(Normal(p_loc, p_scale), k), q,
         tp_scale, tq, (p_loc, p_scale, q_loc, q_lv)),
        ("DiagonalNormal || standard normal", p, standard, tp, standard64, (p_loc, p_lv)),
        ("DiagonalNormal || Normal(0., 1.).expand", p,
         Independent(Normal(0.0, 1.0).expand(shape), k), tp, standard64, (p_loc, p_lv)),
    ]
    if k == 0:
        pairs.append(("DiagonalNormal || Normal", p, Normal(q_loc, q_scale), tp.base_dist,
                      tq_scale.base_dist, (p_loc, p_lv, q_loc, q_scale)))
    for name, a, b, ta, tb, ins in pairs:
        _check(name, kl_divergence(a, b), kl_divergence(ta, tb), ins, [o[id(x)] for x in ins],
               dtype)


def test_diagonal_normal_kl_needs_matching_events():
    p = fv.DiagonalNormal(torch.zeros(2, 3), torch.zeros(2, 3), 1)
    with pytest.raises(NotImplementedError):
        kl_divergence(p, Normal(torch.zeros(2, 3), 1.0))
    with pytest.raises(NotImplementedError):
        kl_divergence(p, Independent(Normal(torch.zeros(2, 3), 1.0), 2))
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(p, fv.DiagonalNormal(torch.zeros(3, 2), torch.zeros(3, 2), 2))


def test_diagonal_normal_validate_args_as_torch():
    """validate_args: parameters must be real (not NaN), samples real and of a broadcastable
    shape; off, nothing is checked; None follows torch's default."""
    nan = torch.tensor([[0.0, math.nan]])
    ok = torch.zeros(1, 2)
    for make in (lambda m, v, va: fv.DiagonalNormal(m, v, 1, validate_args=va),
                 lambda m, v, va: Independent(Normal(m, torch.exp(0.5 * v), validate_args=va), 1,
                                              validate_args=va)):
        with pytest.raises(ValueError, match="constraint"):
            make(nan, ok, True)
        with pytest.raises(ValueError, match="constraint"):
            make(ok, nan, True)
        make(nan, ok, False)  # not checked
        d = make(ok, ok, True)
        with pytest.raises(ValueError, match="event_shape"):
            d.log_prob(torch.zeros(3))  # shape not broadcastable to the event
        with pytest.raises(ValueError, match="support"):
            d.log_prob(torch.tensor([[0.0, math.nan]]))  # outside the support
    default = Distribution._validate_args
    try:
        Distribution.set_default_validate_args(False)
        fv.DiagonalNormal(nan, ok)
        Distribution.set_default_validate_args(True)
        with pytest.raises(ValueError, match="constraint"):
            fv.DiagonalNormal(nan, ok)
    finally:
        Distribution.set_default_validate_args(default)


def test_diagonal_normal_samples_expand_and_repr(backend, device):
    loc, logvar = _loc_logvar((4, 3), torch.float32, device)
    d = fv.DiagonalNormal(loc, logvar)
    s = d.sample((5, 2))
    assert s.shape == (5, 2, 4, 3)
    assert not s.requires_grad
    assert d.rsample().shape == (4, 3)
    assert d.rsample().requires_grad
    torch.manual_seed(0)
    a = d.rsample((3,))
    torch.manual_seed(0)
    torch.testing.assert_close(d.rsample((3,)), a, rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])  # each sample and batch element draws its own noise
    # broadcast parameters (one logvar for every batch element): independent draws per element
    shared = fv.DiagonalNormal(torch.zeros(3, device=device).expand(4, 3),
                               torch.zeros(3, device=device))
    z = shared.rsample()
    assert z.shape == (4, 3)
    assert not torch.equal(z[0], z[1])
    e = d.expand((2, 4))
    assert e.batch_shape == (2, 4)
    assert e.event_shape == (3,)
    assert e.log_prob(torch.zeros(2, 4, 3, device=device)).shape == (2, 4)
    assert "DiagonalNormal" in repr(d)


# ---------------------------------------------------------------------------------------------
# Memory layouts and shape errors
# ---------------------------------------------------------------------------------------------


def _layouts():
    """name -> moments (float32, values of one contiguous tensor) in that memory layout."""
    base = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(4))
    base5 = torch.randn(2, 6, 3, 4, 5, generator=torch.Generator().manual_seed(5))
    return {
        "contiguous": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "channels_last_3d": base5.to(memory_format=torch.channels_last_3d),
        "transposed": base.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0),
        "batch_inner": base.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2),
        "sliced": torch.cat([base, base], 3)[..., ::2],
    }


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dimension of more than one element."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
               if n > 1)


@pytest.mark.parametrize("layout", list(_layouts()))
def test_ldm_posterior_sample_keeps_the_layout(layout, backend, device):
    """Every way of sampling gives the layout of torch's formula mean + std * randn_like(mean)
    (channels-last moments: a channels-last sample), and the values of contiguous moments:
    noise i goes to element i of the logical order, whatever the layout."""
    moments = _layouts()[layout].to(device)
    post = fv.DiagonalGaussianDistribution(moments)
    flat = fv.DiagonalGaussianDistribution(moments.contiguous())
    torch_layout = post.mean + post.std * torch.randn_like(post.mean)
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(6)).to(device)
    samples = {
        "seed": (post.sample(torch.Generator(device).manual_seed(7)),
                 flat.sample(torch.Generator(device).manual_seed(7))),
        "eps": (post.sample(eps=eps), flat.sample(eps=eps)),
    }
    torch.manual_seed(8)
    z = post.sample()
    torch.manual_seed(8)
    samples["torch_generator"] = (z, flat.sample())
    for name, (got, want) in samples.items():
        assert _same_layout(got, torch_layout), (
            f"{name}: strides {got.stride()}, torch's formula gives {torch_layout.stride()}")
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    det = fv.DiagonalGaussianDistribution(moments, deterministic=True)
    assert _same_layout(det.sample(), torch_layout)
    assert det.mode() is det.mean
    # gradients reach the moments in their own layout
    leaf = moments.detach().requires_grad_()
    (grad,) = torch.autograd.grad(fv.DiagonalGaussianDistribution(leaf).sample(eps=eps).sum(),
                                  leaf)
    assert_close(grad[:, :3], torch.ones_like(grad[:, :3], dtype=torch.float64))


@pytest.mark.parametrize("validate_args", [True, False])
def test_diagonal_normal_shape_mismatch_is_a_value_error(validate_args):
    """Parameters, values and KL partners whose shapes do not broadcast: a ValueError naming
    both shapes (torch's own broadcast raises a bare RuntimeError), validated or not."""
    def make(loc_shape, lv_shape):
        return fv.DiagonalNormal(torch.zeros(loc_shape), torch.zeros(lv_shape), 1,
                                 validate_args=validate_args)

    for loc_shape, lv_shape in [((2, 3), (2, 4)), ((2, 3), (3, 3)), ((4, 2, 3), (5, 1, 3))]:
        with pytest.raises(ValueError, match=rf"{re.escape(str(loc_shape))}.*"
                                             rf"{re.escape(str(lv_shape))}"):
            make(loc_shape, lv_shape)
    make((2, 3), (1, 3))  # broadcastable: fine
    d = make((2, 3), (2, 3))
    for value_shape in [(4, 3), (2, 5), (3, 2, 4)]:
        # validated: torch's message (torch.Size([4, 3]) vs ...); else ours, (4, 3)
        with pytest.raises(ValueError, match=re.escape(str(
                torch.Size(value_shape) if validate_args else value_shape))):
            d.log_prob(torch.zeros(value_shape))
    assert d.log_prob(torch.zeros(5, 2, 3)).shape == (5, 2)  # sample_shape + batch_shape
    for other in (make((4, 3), (4, 3)), make((3, 3, 3), (3, 3, 3))):
        shape = re.escape(str(tuple(other.loc.shape)))
        with pytest.raises(ValueError, match=rf"\(2, 3\).*{shape}"):
            kl_divergence(d, other)
    assert kl_divergence(d, make((1, 3), (1, 3))).shape == (2,)
    # the methods without a second shape keep working
    assert d.rsample((2,)).shape == (2, 2, 3)
    assert d.mode.shape == (2, 3)
    with pytest.raises(ValueError, match="eps"):
        d.rsample(eps=torch.zeros(3, 3))


def test_ldm_posterior_shape_mismatch_is_a_value_error():
    """kl(other) and nll(sample) with shapes that do not broadcast: a ValueError naming both."""
    post = fv.DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 4))
    other = fv.DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 5))
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 5\).*\(2, 4, 3, 4\)"):
        post.kl(other)
    for dims in ((1, 2, 3), (1, 2)):
        with pytest.raises(ValueError, match=r"\(2, 4, 3, 5\).*\(2, 4, 3, 4\)"):
            post.nll(torch.zeros(2, 4, 3, 5), dims=dims)
