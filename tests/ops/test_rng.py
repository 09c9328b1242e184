"""Random numbers (docs/random-numbers.md): Philox4x32-10 exactly as Triton computes it, the
statistics of the noise, reproducibility under torch.manual_seed and explicit seeds, the same
noise on every backend, and a backward that regenerates the forward's noise instead of storing
it."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import BACKENDS, CUDA, NOISE_TOL, assert_close, device_for

import fastvae as fv
from fastvae.ops import functional, reference

SEEDS = [0, 1, 12345, 2**31, 2**32 - 1, 2**32, 2**32 + 12345, 2**61 + 17, 2**62 - 1, 2**63 - 1]
OFFSETS = [*range(200), 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 5]

# ---------------------------------------------------------------------------------------------
# Philox: fastvae.reference against Triton's tl.randint4x / tl.rand / tl.randn
# ---------------------------------------------------------------------------------------------


@triton.jit
def _triton_random_kernel(seed_ptr, offset_ptr, bits_ptr, uniform_ptr, normal_ptr, n,
                          BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    offset = tl.load(offset_ptr + i, mask=mask, other=0)
    seed = tl.load(seed_ptr)
    r0, r1, r2, r3 = tl.randint4x(seed, offset)
    tl.store(bits_ptr + 0 * n + i, r0.to(tl.int64), mask=mask)
    tl.store(bits_ptr + 1 * n + i, r1.to(tl.int64), mask=mask)
    tl.store(bits_ptr + 2 * n + i, r2.to(tl.int64), mask=mask)
    tl.store(bits_ptr + 3 * n + i, r3.to(tl.int64), mask=mask)
    tl.store(uniform_ptr + i, tl.rand(seed, offset), mask=mask)
    tl.store(normal_ptr + i, tl.randn(seed, offset), mask=mask)


def _triton_random(seed: int, offsets: torch.Tensor):
    n = offsets.numel()
    bits = torch.empty((4, n), dtype=torch.int64, device=offsets.device)
    uniform = torch.empty(n, dtype=torch.float32, device=offsets.device)
    normal = torch.empty(n, dtype=torch.float32, device=offsets.device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=offsets.device)
    _triton_random_kernel[(1,)](seed_t, offsets, bits, uniform, normal, n,
                                BLOCK=triton.next_power_of_2(n))
    return bits, uniform, normal


@pytest.fixture(scope="module")
def triton_device():
    return torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_bits_match_triton(seed, triton_device):
    offsets = torch.tensor(OFFSETS, dtype=torch.int64, device=triton_device)
    bits, uniform, normal = _triton_random(seed, offsets)
    bits = bits.cpu() & 0xFFFFFFFF  # uint32 as Triton widened it
    expected = reference.philox4x32(torch.tensor(seed), offsets.cpu())
    for k in range(4):
        assert torch.equal(bits[k], expected[k]), f"Philox output {k} differs"
    # tl.rand reads output 0 as an int32: the same float32 bits.
    assert torch.equal(uniform.cpu(), reference.uint32_to_uniform(expected[0]))
    # Box-Muller: float32 log/cos/sqrt of the two backends agree to rounding.
    torch.testing.assert_close(normal.cpu(), reference.philox_randn(seed, offsets.cpu()),
                               rtol=1e-6, atol=2e-6)


def test_philox_known_answer():
    """Philox4x32-10 known-answer vectors (Salmon et al., Random123 kat_vectors): counter
    (c0, c1, 0, 0) and key (k0, k1), with c1 and k1 the high words of offset and seed."""
    # Random123: ctr = {0, 0, 0, 0}, key = {0, 0} -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
    out = reference.philox4x32(torch.tensor(0), torch.tensor([0]))
    assert [int(o) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# ---------------------------------------------------------------------------------------------
# Statistics of the noise
# ---------------------------------------------------------------------------------------------


def _noise(shape, seed, device, n_samples=None):
    zeros = torch.zeros(shape, device=device)
    return fv.reparameterize(zeros, zeros, seed=seed, n_samples=n_samples).cpu().double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_noise_statistics(backend, device):
    """Standard normal: mean, variance, D'Agostino-Pearson and Kolmogorov-Smirnov tests, and no
    correlation between neighbours, rows, samples or seeds."""
    stats = pytest.importorskip("scipy.stats")
    shape, n = (64, 96), 64 * 96
    eps = _noise(shape, 2024, device, n_samples=2)
    x = eps[0].flatten()
    sigma = 1 / n**0.5
    assert abs(x.mean().item()) < 4 * sigma
    assert abs(x.var().item() - 1) < 4 * 2**0.5 * sigma
    assert stats.normaltest(x.numpy()).pvalue > 1e-3
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-3
    assert abs(stats.skew(x.numpy())) < 4 * (6 / n) ** 0.5
    # Tails: the fraction beyond 3 sigma is 0.27%.
    assert abs((x.abs() > 3).double().mean().item() - 0.0027) < 4 * (0.0027 / n) ** 0.5
    assert abs(_corr(x[1:], x[:-1])) < 4 * sigma  # neighbours
    assert abs(_corr(eps[0, 1:], eps[0, :-1])) < 4 * sigma  # rows
    assert abs(_corr(eps[0], eps[1])) < 4 * sigma  # samples
    assert abs(_corr(eps[0], _noise(shape, 2025, device))) < 4 * sigma  # neighbouring seeds


# ---------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------

DRAWS = {
    "reparameterize": lambda mu, lv, **kw: fv.reparameterize(mu, lv, **kw),
    "reparameterize_samples": lambda mu, lv, **kw: fv.reparameterize(mu, lv, n_samples=3, **kw),
    "sample_and_kl": lambda mu, lv, **kw: fv.sample_and_kl(mu, lv, **kw)[0],
}


def _mu_logvar(device, shape=(4, 6), grad=False):
    g = torch.Generator().manual_seed(9)
    mu = torch.randn(shape, generator=g).to(device).requires_grad_(grad)
    logvar = (0.5 * torch.randn(shape, generator=g)).to(device).requires_grad_(grad)
    return mu, logvar


@pytest.mark.parametrize("draw", DRAWS)
def test_manual_seed_reproducibility(draw, backend, device):
    mu, logvar = _mu_logvar(device)
    f = DRAWS[draw]
    torch.manual_seed(123)
    a = f(mu, logvar)
    torch.manual_seed(123)
    b = f(mu, logvar)
    c = f(mu, logvar)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # each call draws a new seed from torch's generator
    torch.manual_seed(124)
    assert not torch.equal(a, f(mu, logvar))


@pytest.mark.parametrize("draw", DRAWS)
def test_generator_argument(draw, backend, device):
    """A torch.Generator governs the noise and leaves the global generator alone."""
    mu, logvar = _mu_logvar(device)
    f = DRAWS[draw]
    get_state = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state
    state = get_state()
    a = f(mu, logvar, generator=torch.Generator(device).manual_seed(5))
    b = f(mu, logvar, generator=torch.Generator(device).manual_seed(5))
    c = f(mu, logvar, generator=torch.Generator(device).manual_seed(6))
    assert torch.equal(get_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    f(mu, logvar)  # without one, the device's default generator is consumed
    assert not torch.equal(get_state(), state)


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**62 + 11, 2**63 - 1])
def test_explicit_seed_same_noise_on_every_backend(seed, backend, device):
    """``eps[i] = tl.randn(seed, i)`` with ``i`` the flat index of the output, on every
    backend, to float32 rounding."""
    mu, logvar = _mu_logvar(device, shape=(3, 2, 5))
    std = torch.exp(0.5 * logvar)
    expected = reference.noise(seed, (4, 3, 2, 5), "cpu")
    for z, eps in [
        (fv.reparameterize(mu, logvar, seed=seed), expected[0]),
        (fv.reparameterize(mu, logvar, seed=torch.tensor(seed, device=device)), expected[0]),
        (fv.reparameterize(mu, logvar, seed=seed, n_samples=4), expected),
        (fv.sample_and_kl(mu, logvar, seed=seed)[0], expected[0]),
    ]:
        torch.testing.assert_close(((z - mu) / std).cpu(), eps, **NOISE_TOL)
    # float64 inputs get the same (float32) noise.
    z64 = fv.reparameterize(mu.double(), logvar.double(), seed=seed)
    assert_close((z64 - mu.double()) / std.double(), expected[0].double(), noisy=True)


def test_noise_is_a_function_of_seed_and_flat_index(backend, device):
    """A smaller call sees a prefix of a larger one's noise; the layout of the inputs does not
    matter; half-precision inputs get the same noise."""
    zeros = torch.zeros(4, 5, device=device)
    big = fv.reparameterize(zeros, zeros, seed=77)
    assert torch.equal(fv.reparameterize(zeros[:2], zeros[:2], seed=77), big[:2])
    strided = torch.zeros(4, 10, device=device)[:, ::2]
    assert torch.equal(fv.reparameterize(strided, strided, seed=77), big)
    expanded = torch.zeros(1, 5, device=device).expand(4, 5)
    assert torch.equal(fv.reparameterize(expanded, expanded, seed=77), big)
    half = fv.reparameterize(zeros.half(), zeros.half(), seed=77)
    assert torch.equal(half, big.half())


# ---------------------------------------------------------------------------------------------
# Backward regenerates the forward's noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("draw", DRAWS)
def test_backward_uses_forward_noise(draw, dtype, backend, device):
    """d z / d logvar = 0.5 * exp(logvar / 2) * eps = 0.5 * (z - mu), with the forward's z, even
    when torch's generator has moved on (or been reseeded) before backward."""
    mu, logvar = _mu_logvar(device, grad=True)
    mu, logvar = (t.detach().to(dtype).requires_grad_() for t in (mu, logvar))
    z = DRAWS[draw](mu, logvar)
    torch.manual_seed(999)
    torch.randn(100)
    upstream = torch.randn(z.shape, dtype=dtype).to(device)
    d_mu, d_lv = torch.autograd.grad(z, (mu, logvar), upstream)
    expected = 0.5 * upstream * (z - mu).detach()
    if expected.dim() > mu.dim():  # n_samples: sum over the samples
        expected = expected.sum(0)
    torch.testing.assert_close(d_lv, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_mu, upstream.sum(0) if z.dim() > mu.dim() else upstream)


def test_sample_and_kl_backward_with_both_outputs(backend, device):
    """Both gradients at once: the noise part and the KL part (0.5 * expm1(logvar) / B)."""
    mu, logvar = _mu_logvar(device, grad=True)
    z, kl = fv.sample_and_kl(mu, logvar)
    torch.manual_seed(31)
    g = torch.randn(z.shape).to(device)
    d_mu, d_lv = torch.autograd.grad((z * g).sum() + 3.0 * kl, (mu, logvar))
    B = mu.shape[0]
    torch.testing.assert_close(d_mu, g + 3.0 * mu.detach() / B)
    torch.testing.assert_close(d_lv, 0.5 * g * (z - mu).detach()
                               + 3.0 * 0.5 * torch.expm1(logvar.detach()) / B,
                               rtol=1e-5, atol=1e-6)


def _saved_for_backward(draw, device):
    mu, logvar = _mu_logvar(device, grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = DRAWS[draw](mu, logvar)
    assert len(saved) >= 2
    inputs = {mu.data_ptr(), logvar.data_ptr()}
    return z, [t for t in saved if t.numel() > 1 and t.data_ptr() not in inputs]


@pytest.mark.parametrize("draw", DRAWS)
def test_noise_is_not_stored_above_the_limit(draw, backend, device, monkeypatch):
    """What autograd saves for backward above ``KEEP_NOISE_MAX``: the inputs and the seed, never
    a tensor of the noise's size (the backward regenerates it)."""
    monkeypatch.setattr(functional, "KEEP_NOISE_MAX", 0)
    z, others = _saved_for_backward(draw, device)
    assert not others, (f"saved {[tuple(t.shape) for t in others]}, not inputs "
                        f"(z is {tuple(z.shape)})")


@pytest.mark.parametrize("draw", DRAWS)
def test_small_noise_is_kept(draw, backend, device):
    """Up to ``KEEP_NOISE_MAX`` elements, reparameterize keeps the noise it drew (one tensor of
    z's shape besides the inputs); sample_and_kl always regenerates it."""
    z, others = _saved_for_backward(draw, device)
    if draw.startswith("reparameterize"):
        assert [t.numel() for t in others] == [z.numel()]
    else:
        assert not others


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", [b for b in BACKENDS if device_for(b).type == "cuda"] or
                         ["triton"])
def test_same_seed_same_noise_on_cpu_and_gpu(name):
    mu, logvar = _mu_logvar("cpu", shape=(8, 33))
    with fv.use_backend("torch"):
        expected = fv.reparameterize(mu, logvar, seed=4242, n_samples=2)
    with fv.use_backend(name):
        z = fv.reparameterize(mu.cuda(), logvar.cuda(), seed=4242, n_samples=2)
    torch.testing.assert_close(z.cpu(), expected, **NOISE_TOL)
