"""fv.lfq_entropy and fv.lookup_free_quantize: LFQ's entropies without the N x 2**d matrix, on
every backend, against the dense float64 formula (the softmax over all 2**d codes, as
vector-quantize-pytorch computes it; built here only, at small d)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS

import fastvae as fv
from fastvae.ops import custom_ops as _ops

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _codes(d: int, scale: float, spherical: bool) -> torch.Tensor:
    """The implicit codebook {-s, s}^d (2**d, d), bit 0 the most significant, float64."""
    k = torch.arange(1 << d)
    bits = (k[:, None] >> torch.arange(d - 1, -1, -1)) & 1
    codes = (2 * bits - 1).double() * scale
    return torch.nn.functional.normalize(codes, dim=-1) * scale if spherical else codes


def dense(x: torch.Tensor, num_codebooks: int = 1, inv_temperature: float = 100.0,
          scale: float = 1.0, spherical: bool = False, eps: float = 0.0):
    """(per_sample_entropy, codebook_entropy, p (N, C, K)) by the dense formula in float64."""
    xs = x.double().reshape(-1, num_codebooks, x.shape[-1] // num_codebooks)
    codes = _codes(xs.shape[-1], scale, spherical)
    p = (2 * inv_temperature * xs @ codes.T).softmax(-1)

    def ent(q):
        lq = q.clamp_min(eps).log() if eps > 0 else torch.where(q > 0, q, 1.0).log()
        return -(q * lq).sum(-1)

    return ent(p).mean(), ent(p.mean(0)).mean(), p


def dense_op(logits: torch.Tensor, eps: float):
    """The op's outputs (sums (C, K), entropy (R, C)) from bit logits (R, C, d), float64."""
    lg = logits.double()
    codes = _codes(lg.shape[-1], 1.0, False)
    p = (lg / 2 @ codes.T).softmax(-1)
    lp = p.clamp_min(eps).log() if eps > 0 else torch.where(p > 0, p, 1.0).log()
    return p.sum(0), -(p * lp).sum(-1)


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


def _close(actual, expected, dtype, scale=None):
    """|actual - expected| <= rtol |expected| + atol max|expected| (or atol * scale)."""
    t = _tol(dtype)
    ref = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual.double(), expected.double(), rtol=t["rtol"],
                               atol=t["atol"] * max(ref, 1.0))


# ---------------------------------------------------------------------------------------------
# The op, every backend, against the dense formula
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize(("d", "C", "R"), [(1, 1, 5), (2, 3, 9), (3, 1, 40), (4, 2, 17), (5, 1, 33),
                                   (6, 3, 11), (7, 1, 21), (8, 2, 30)])
def test_op_matches_dense(backend, d, C, R, eps, dtype):
    g = torch.Generator().manual_seed(d * 100 + C)
    logits = (torch.randn(R, C, d, generator=g, dtype=torch.float64) * 4).to(dtype)
    logits[0, 0, 0] = 0.0  # a tie between the two codes of a bit
    leaf = logits.clone().requires_grad_(True)
    sums, entropy = _ops.call(_ops.lfq_entropy, leaf, eps, backend)
    assert sums.dtype == entropy.dtype == dtype
    assert sums.shape == (C, 1 << d)
    assert entropy.shape == (R, C)
    ref = logits.double().requires_grad_(True)
    S, H = dense_op(ref, eps)
    _close(sums, S.detach(), dtype)
    _close(entropy, H.detach(), dtype, scale=d * math.log(2))
    gs = torch.randn(S.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(H.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad((S * gs).sum() + (H * gh).sum(), ref)
    (grad,) = torch.autograd.grad((sums * gs.to(dtype)).sum() + (entropy * gh.to(dtype)).sum(),
                                  leaf)
    assert grad.dtype == dtype
    _close(grad, expected, dtype)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_op_d10_native_and_torch(eps):
    """The half split at d = 10 (32 x 32 codes) with tiles of rows, against the dense formula."""
    logits = torch.randn(70, 2, 10, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64) * 3
    S, H = dense_op(logits, eps)
    for backend in [b for b in BACKENDS if b != "triton"]:
        sums, entropy = _ops.call(_ops.lfq_entropy, logits.float(), eps, backend)
        _close(sums, S, torch.float32)
        _close(entropy, H, torch.float32, scale=10 * math.log(2))


def test_native_is_deterministic_across_threads():
    if "cpu" not in BACKENDS:
        pytest.skip("the native library is not built")
    logits = torch.randn(300, 2, 9, generator=torch.Generator().manual_seed(0)) * 2
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaf = logits.clone().requires_grad_(True)
            sums, entropy = _ops.call(_ops.lfq_entropy, leaf, 1e-5, "cpu")
            (grad,) = torch.autograd.grad(sums[:, ::3].sum() + entropy.sum(), leaf)
            results.append((sums, entropy, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_nan_stays_in_its_row_and_codebook(backend):
    logits = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(1))
    logits[2, 1, 0] = math.nan
    sums, entropy = _ops.call(_ops.lfq_entropy, logits, 1e-5, backend)
    assert torch.isnan(entropy[2, 1])
    assert torch.isnan(sums[1]).all()
    mask = torch.ones_like(entropy, dtype=torch.bool)
    mask[2, 1] = False
    assert torch.isfinite(entropy[mask]).all()
    assert torch.isfinite(sums[0]).all()
    _, H = fv.lfq_entropy(logits.flatten(-2), num_codebooks=2)
    assert torch.isnan(H)


def test_infinite_logits_are_hard_bits(backend):
    """+-inf logits (x * 4 inv_temperature overflowing) are certain bits: entropy 0, no NaN."""
    logits = torch.tensor([[[math.inf, -math.inf, 0.0]], [[-math.inf, -math.inf, math.inf]]])
    for eps in (0.0, 1e-5):
        leaf = logits.clone().requires_grad_(True)
        sums, entropy = _ops.call(_ops.lfq_entropy, leaf, eps, backend)
        # row 0: codes 100 and 101 with 1/2 each (the third bit is a tie); row 1: code 001
        expected = torch.zeros(8)
        expected[[4, 5]] = 0.5
        expected[1] += 1.0
        torch.testing.assert_close(sums[0], expected)
        torch.testing.assert_close(entropy[:, 0], torch.tensor([math.log(2), 0.0]))
        (grad,) = torch.autograd.grad(sums.square().sum() + entropy.sum(), leaf)
        assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# The public function against the package's dense formula
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize(("C", "d"), [(1, 4), (2, 3), (3, 6)])
def test_lfq_entropy_matches_dense(backend, C, d, eps, spherical):
    g = torch.Generator().manual_seed(C * 10 + d)
    x = torch.randn(4, 7, C * d, generator=g, dtype=torch.float64) * 0.05
    scale = 0.7
    leaf = x.clone().requires_grad_(True)
    ps, cb = fv.lfq_entropy(leaf, num_codebooks=C, inv_temperature=30.0, codebook_scale=scale,
                            spherical=spherical, eps=eps)
    ref = x.clone().requires_grad_(True)
    eps_, ecb, _ = dense(ref, C, 30.0, scale, spherical, eps)
    _close(ps, eps_.detach(), torch.float64, scale=d)
    _close(cb, ecb.detach(), torch.float64, scale=d)
    (grad,) = torch.autograd.grad(ps - 0.8 * cb, leaf)
    (expected,) = torch.autograd.grad(eps_ - 0.8 * ecb, ref)
    _close(grad, expected, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_computed_in_float32(backend, dtype):
    x = (torch.randn(50, 6, generator=torch.Generator().manual_seed(2)) * 0.02).to(dtype)
    leaf = x.clone().requires_grad_(True)
    ps, cb = fv.lfq_entropy(leaf, eps=1e-5)
    assert ps.dtype == cb.dtype == torch.float32
    ref = x.double().requires_grad_(True)  # the same rounded inputs
    eps_, ecb, _ = dense(ref, eps=1e-5)
    _close(ps, eps_.detach(), torch.float32, scale=6)
    _close(cb, ecb.detach(), torch.float32, scale=6)
    (grad,) = torch.autograd.grad(ps - cb, leaf)
    (expected,) = torch.autograd.grad(eps_ - ecb, ref)
    assert grad.dtype == dtype
    half_ulp = {torch.float32: 0.0, torch.float16: 4.9e-4, torch.bfloat16: 3.9e-3}[dtype]
    torch.testing.assert_close(grad.double(), expected, rtol=2e-5 + half_ulp,
                               atol=2e-6 * expected.abs().max().item())


@pytest.mark.parametrize("inv_temperature", [0.0, 1e-3, 1e4, 1e30])
def test_extreme_temperatures(backend, inv_temperature):
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ps, cb = fv.lfq_entropy(x, inv_temperature=inv_temperature)
    eps_, ecb, _ = dense(x, inv_temperature=inv_temperature)
    _close(ps, eps_, torch.float64, scale=5)
    _close(cb, ecb, torch.float64, scale=5)
    if inv_temperature == 0.0:  # uniform over the 32 codes
        torch.testing.assert_close(ps, torch.tensor(5 * math.log(2), dtype=torch.float64))
    if inv_temperature == 1e30:  # hard codes: the entropy of the index histogram
        counts = torch.bincount(fv.lookup_free_quantize(x).indices, minlength=32).double()
        a = counts / 40
        torch.testing.assert_close(cb, -torch.special.xlogy(a, a).sum())
        assert ps == 0


def test_zero_input_is_uniform(backend):
    x = torch.zeros(8, 6, requires_grad=True)
    ps, cb = fv.lfq_entropy(x)
    torch.testing.assert_close(ps, torch.tensor(6 * math.log(2)))
    torch.testing.assert_close(cb, torch.tensor(6 * math.log(2)))
    (grad,) = torch.autograd.grad(ps - cb, x)
    torch.testing.assert_close(grad, torch.zeros_like(x))  # a stationary point
    assert fv.lookup_free_quantize(x).indices.eq(0).all()  # 0 goes to -s: bit 0


def test_strides(backend):
    base = torch.randn(6, 20, generator=torch.Generator().manual_seed(7)) * 0.03
    x = base.t()[:, ::2]  # (20, 3), non-contiguous
    for num_codebooks, y in ((1, x), (3, x), (1, base[:1, :6].expand(5, 6))):
        got = fv.lfq_entropy(y, num_codebooks=num_codebooks, eps=1e-5)
        want = fv.lfq_entropy(y.contiguous(), num_codebooks=num_codebooks, eps=1e-5)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


def test_empty(backend):
    x = torch.zeros(0, 4, requires_grad=True)
    ps, cb = fv.lfq_entropy(x)
    assert torch.isnan(ps)
    assert torch.isnan(cb)
    out = fv.lookup_free_quantize(x, entropy=False)
    assert out.quantized.shape == (0, 4)
    assert out.indices.shape == (0,)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_opcheck(backend, eps):
    logits = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.library.opcheck(_ops.lfq_entropy, (logits.requires_grad_(True), eps, backend))
    gs, gh = torch.randn(2, 8, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    torch.library.opcheck(_ops.lfq_entropy_backward, (gs, gh, logits.detach(), eps, backend,
                                                      [True]))


def test_compile_fullgraph(backend):
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(1)) * 0.05

    def step(t):
        out = fv.lookup_free_quantize(t, num_codebooks=2, eps=1e-5)
        return out.loss + out.quantized.square().mean()

    leaf = x.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True)
    value = compiled(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    leaf2 = x.clone().requires_grad_(True)
    eager = step(leaf2)
    (grad2,) = torch.autograd.grad(eager, leaf2)
    torch.testing.assert_close(value, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad2, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# lookup_free_quantize
# ---------------------------------------------------------------------------------------------


def test_quantize_values_indices_and_straight_through():
    x = torch.tensor([[0.3, -0.2, 0.0, 1.5], [-1.0, 2.0, 3.0, -0.1]], requires_grad=True)
    out = fv.lookup_free_quantize(x, codebook_scale=0.5, commitment_weight=1.0,
                                  entropy_weight=0.0)
    torch.testing.assert_close(out.quantized, torch.tensor([[0.5, -0.5, -0.5, 0.5],
                                                            [-0.5, 0.5, 0.5, -0.5]]))
    assert out.indices.tolist() == [0b1001, 0b0110]
    assert out.indices.dtype == torch.int64
    q = out.quantized.detach()
    torch.testing.assert_close(out.commitment_loss, (x.detach() - q).square().mean())
    torch.testing.assert_close(out.loss, out.commitment_loss)
    (grad,) = torch.autograd.grad(out.quantized.sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x))
    two = fv.lookup_free_quantize(x.detach(), num_codebooks=2)
    assert two.indices.tolist() == [[0b10, 0b01], [0b01, 0b10]]
    sph = fv.lookup_free_quantize(x.detach(), spherical=True, codebook_scale=2.0)
    torch.testing.assert_close(sph.quantized.norm(dim=-1), torch.full((2,), 2.0))


def test_quantize_loss_formula(backend):
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(4)) * 0.1
    out = fv.lookup_free_quantize(x, num_codebooks=2, entropy_weight=0.3, diversity_gamma=0.7,
                                  commitment_weight=0.2, inv_temperature=50.0)
    ps, cb = fv.lfq_entropy(x, num_codebooks=2, inv_temperature=50.0)
    torch.testing.assert_close(out.per_sample_entropy, ps)
    torch.testing.assert_close(out.codebook_entropy, cb)
    torch.testing.assert_close(out.loss, 0.3 * (ps - 0.7 * cb) + 0.2 * out.commitment_loss)
    assert out.indices.shape == (3, 5, 2)
    assert out.quantized.shape == x.shape


@pytest.mark.parametrize(("kwargs", "error"), [
    (dict(x=torch.zeros(2, 4, dtype=torch.int64)), TypeError),
    (dict(x=torch.zeros(2, 5), num_codebooks=2), ValueError),
    (dict(x=torch.zeros(2, 4), num_codebooks=0), ValueError),
    (dict(x=torch.zeros(2, 4), num_codebooks=2.0), TypeError),
    (dict(x=torch.zeros(2, 31)), ValueError),
    (dict(x=torch.zeros(())), ValueError),
    (dict(x=torch.zeros(2, 4), inv_temperature=-1.0), ValueError),
    (dict(x=torch.zeros(2, 4), inv_temperature="1"), TypeError),
    (dict(x=torch.zeros(2, 4), codebook_scale=0.0), ValueError),
    (dict(x=torch.zeros(2, 4), eps=math.nan), ValueError),
    (dict(x=torch.zeros(2, 4), sync=1), TypeError),
    (dict(x=torch.zeros(2, 4), sync=True), ValueError),
])
def test_errors(kwargs, error):
    x = kwargs.pop("x")
    name = next(iter(kwargs), "x")
    with pytest.raises(error, match=name if name != "x" else None):
        fv.lfq_entropy(x, **kwargs)
    with pytest.raises(error):
        fv.lookup_free_quantize(x, **kwargs)
