"""The Triton IWAE kernels split K into chunks (row tiles x chunks on the GPU) and merge the
chunks' (max, sum-exp) pairs, and their partial d/dmu, d/dlv, in a fixed order. Under the
interpreter the launchers use one chunk; here the chunking is forced (``k_chunk``) and checked
against the one-chunk result, the float64 reference and itself run to run, and the infinite and
NaN log-weights are placed on either side of a chunk boundary."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOL, dtype_id

from fastvae.ops import backends as _backend
from fastvae.ops import reference

pytestmark = pytest.mark.skipif(_backend.unusable_reason("triton", torch.device("cpu")) is not None
                                and not torch.cuda.is_available(),
                                reason="triton cannot run here")

iwae = pytest.importorskip("fastvae.kernels.iwae")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL = [True, True, True, True]


def _inputs(K, B, N, dtype, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(dtype).to(DEVICE)

    if layout == "strided":  # every other column, z transposed in (B, K)
        mu, lv = rand(B, 2 * N, scale=0.5)[:, ::2], rand(B, 2 * N, scale=0.5, shift=-0.3)[:, ::2]
        z = rand(B, K, N).transpose(0, 1)
    elif layout == "broadcast":  # mu, logvar broadcast over B; log_px over K
        mu, lv = rand(1, N, scale=0.5).expand(B, N), rand(1, N, scale=0.5).expand(B, N)
        z = rand(K, B, N)
    else:
        mu, lv, z = rand(B, N, scale=0.5), rand(B, N, scale=0.5, shift=-0.3), rand(K, B, N)
    log_px = rand(K, B, scale=3.0, shift=-20.0)
    if layout == "broadcast":
        log_px = rand(1, B, scale=3.0, shift=-20.0).expand(K, B)
    grad = rand(B).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return log_px, z, mu, lv, grad


def _compute_tol(dtype):
    return TOL[torch.float64 if dtype == torch.float64 else torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "broadcast"])
@pytest.mark.parametrize("k_chunk", [1, 2, 3, 5])
def test_chunks_match_one_chunk_and_reference(k_chunk, layout, dtype):
    """K = 7 in chunks of 1, 2, 3, 5 (the last chunk shorter): the log-weights are bitwise the
    one-chunk ones (each is computed by one program, alike), ll and the gradients agree with
    the one-chunk result and with the float64 reference to the compute dtype's tolerance."""
    K, B, N = 7, 5, 6
    log_px, z, mu, lv, grad = _inputs(K, B, N, dtype, seed=k_chunk, layout=layout)
    ll1, lw1 = iwae.iwae_fwd(log_px, z, mu, lv, k_chunk=K)
    ll, lw = iwae.iwae_fwd(log_px, z, mu, lv, k_chunk=k_chunk)
    assert torch.equal(lw, lw1)
    tol = _compute_tol(dtype)
    torch.testing.assert_close(ll, ll1, **tol)
    up = [t.detach().cpu().double() for t in (log_px, z, mu, lv, grad)]
    want_ll, want_lw = reference.iwae_fwd(*up[:4])
    scale = max(1.0, want_ll.abs().max().item())
    torch.testing.assert_close(ll.cpu().double(), want_ll, rtol=tol["rtol"],
                               atol=tol["atol"] * scale)
    torch.testing.assert_close(lw.cpu().double(), want_lw, rtol=tol["rtol"],
                               atol=tol["atol"] * max(1.0, want_lw.abs().max().item()))

    got = iwae.iwae_bwd(grad, ll, lw, log_px, z, mu, lv, ALL, k_chunk=k_chunk)
    one = iwae.iwae_bwd(grad, ll, lw, log_px, z, mu, lv, ALL, k_chunk=K)
    want = reference.iwae_bwd(up[4], ll.cpu().double(), lw.cpu().double(), *up[:4], ALL)
    for name, a, b, w in zip(("log_px", "z", "mu", "logvar"), got, one, want, strict=True):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        if name in ("log_px", "z"):  # per (k, b[, j]): computed alike whatever the chunks
            assert torch.equal(a, b), name
        t = TOL[a.dtype]
        s = max(1.0, w.abs().max().item())
        torch.testing.assert_close(a.cpu().double(), b.cpu().double(), rtol=t["rtol"],
                                   atol=t["atol"] * s, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(a.cpu().double(), w.to(a.dtype).double(), rtol=t["rtol"],
                                   atol=t["atol"] * s, msg=lambda m, n=name: f"{n}: {m}")


def test_chunks_bitwise_run_to_run():
    K, B, N = 9, 4, 5
    log_px, z, mu, lv, grad = _inputs(K, B, N, torch.float32, seed=11)
    first = iwae.iwae_fwd(log_px, z, mu, lv, k_chunk=2)
    again = iwae.iwae_fwd(log_px, z, mu, lv, k_chunk=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    g1 = iwae.iwae_bwd(grad, *first, log_px, z, mu, lv, ALL, k_chunk=2)
    g2 = iwae.iwae_bwd(grad, *first, log_px, z, mu, lv, ALL, k_chunk=2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


INF = math.inf
# Per row b, the log_px of samples k = 0..5; chunks of 2 are {0, 1}, {2, 3}, {4, 5}.
GUARD_ROWS = {
    "all -inf": [-INF] * 6,
    "-inf chunks then finite": [-INF, -INF, -INF, -INF, -3.0, -1.0],
    "finite then -inf chunks": [-2.0, -1.0, -INF, -INF, -INF, -INF],
    "+inf in last chunk": [-2.0, -1.0, -5.0, -1.0, -INF, INF],
    "+inf in two chunks": [INF, -1.0, -5.0, INF, -3.0, -3.0],
    "nan in middle chunk": [-2.0, -1.0, math.nan, -1.0, -3.0, -3.0],
    "nan after +inf": [INF, -1.0, -2.0, -1.0, math.nan, -3.0],
    "huge spread": [-1e30, -1e4, 0.0, -1e30, 50.0, -1e4],
}


@pytest.mark.parametrize("k_chunk", [1, 2, 4])
def test_guards_across_chunk_boundaries(k_chunk):
    """Infinite and NaN log-weights in one chunk and finite ones in another merge as
    logsumexp does: all -inf gives -inf, any +inf gives +inf (never inf - inf = NaN), a NaN
    propagates, finite chunks beside -inf ones are unaffected."""
    K, B, N = 6, len(GUARD_ROWS), 3
    _, z, mu, lv, _ = _inputs(K, B, N, torch.float32, seed=5)
    log_px = torch.tensor(list(GUARD_ROWS.values()), dtype=torch.float32).t().contiguous()
    log_px = log_px.to(DEVICE)
    ll, lw = iwae.iwae_fwd(log_px, z, mu, lv, k_chunk=k_chunk)
    want = torch.logsumexp(lw.cpu().double(), 0) - math.log(K)
    for b, name in enumerate(GUARD_ROWS):
        got, expect = ll[b].item(), want[b].item()
        if math.isnan(expect):
            assert math.isnan(got), name
        elif math.isinf(expect):
            assert got == expect, name
        else:
            assert got == pytest.approx(expect, rel=1e-6, abs=1e-6), name


def test_default_chunking_fills_the_gpu(monkeypatch):
    """On a 132-SM GPU, B = 1000, N = 32 (8 row tiles) with K = 5000 is spread over K chunks
    too: at least 4 programs per SM, every chunk non-empty; one chunk under the interpreter."""
    from fastvae.kernels import _common

    monkeypatch.setattr(_common, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    t = _common.tiling(1000, 32, cuda)
    n_chunks, per = iwae._chunks(t.n_row_tiles, 5000, cuda, None)
    assert t.n_row_tiles * n_chunks >= 4 * 132
    assert (n_chunks - 1) * per < 5000 <= n_chunks * per
    assert iwae._chunks(t.n_row_tiles, 5000, torch.device("cpu"), None) == (1, 5000)
    assert iwae._chunks(16384, 50, cuda, None) == (1, 50)  # already thousands of programs


def test_bad_chunk_is_an_error():
    log_px, z, mu, lv, _ = _inputs(3, 2, 2, torch.float32, seed=1)
    with pytest.raises(ValueError, match="k_chunk"):
        iwae.iwae_fwd(log_px, z, mu, lv, k_chunk=0)
