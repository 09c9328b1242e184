"""The Triton nearest-code launcher (``fastvae.kernels.nearest_code_fwd``), called directly.

The oracle is the definition of the result: every distance computed directly in the compute
dtype, in j order, each operation rounded (numpy arrays: IEEE single/double operations, no
fused multiply-add, correctly rounded sqrt and division), the argmin with the lowest index on
ties. The Triton result must equal it bit for bit (index and distance), whatever the tl.dot
screen computed; and the oracle's index is checked against a float64 brute force where the
float64 distances are well separated. Tiny sizes (Triton's interpreter on the CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvae.ops import backends as _backend

pytestmark = pytest.mark.skipif(_backend.unusable_reason("triton", torch.device("cpu")) is not None
                                and not torch.cuda.is_available(),
                                reason="triton cannot run here")

nc = pytest.importorskip("fastvae.kernels.nearest_code")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _normalized(v: np.ndarray) -> np.ndarray:
    n = np.zeros(v.shape[0], dtype=v.dtype)
    for j in range(v.shape[1]):
        n = n + v[:, j] * v[:, j]
    n = np.sqrt(n)
    n = np.where(n < v.dtype.type(1e-12), v.dtype.type(1e-12), n)
    return v / n[:, None]


def oracle(x: torch.Tensor, e: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, distances) by the definition, N x K (tiny sizes only)."""
    npdt = np.float64 if x.dtype == torch.float64 else np.float32
    xs = x.detach().cpu().to(torch.float64).numpy().astype(npdt)  # exact: fp16/bf16 in fp32
    es = e.detach().cpu().to(torch.float64).numpy().astype(npdt)
    if metric == "cosine":
        xs, es = _normalized(xs), _normalized(es)
    acc = np.zeros((xs.shape[0], es.shape[0]), dtype=npdt)
    for j in range(xs.shape[1]):
        if metric == "cosine":
            acc = acc + xs[:, j, None] * es[None, :, j]
        else:
            t = xs[:, j, None] - es[None, :, j]
            acc = acc + t * t
    if metric == "cosine":
        acc = npdt(1) - acc
    index = np.zeros(xs.shape[0], dtype=np.int64)
    dist = np.full(xs.shape[0], np.inf, dtype=npdt)
    for k in range(es.shape[0]):  # lowest index on ties; NaN never wins
        better = acc[:, k] < dist
        dist = np.where(better, acc[:, k], dist)
        index = np.where(better, k, index)
    none = ~(dist < np.inf)  # no distance below inf: code 0 and its distance
    if es.shape[0]:
        dist = np.where(none, acc[:, 0], dist)
    return torch.from_numpy(index), torch.from_numpy(dist)


def check(x: torch.Tensor, e: torch.Tensor, metric: str = "l2",
          tiles_per_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    with np.errstate(all="ignore"):  # the interpreter's numpy on inf/NaN inputs
        idx, dist = nc.nearest_code_fwd(x, e, metric, tiles_per_split)
        want_idx, want_dist = oracle(x, e, metric)
    assert idx.dtype == torch.int64
    assert dist.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(dist.cpu(), want_dist, rtol=0, atol=0, equal_nan=True)
    return idx.cpu(), dist.cpu()


def _randn(*shape, seed, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
    return t.to(dtype).to(DEVICE)


def _brute64(x, e, metric):
    x, e = x.double().cpu(), e.double().cpu()
    if metric == "cosine":
        d = 1 - torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(e, dim=1).T
    else:
        d = ((x[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    return d


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_random_matches_definition_and_float64(dtype, metric):
    """D = 20 (not a power of two), K = 150 (not a multiple of the code tile)."""
    x, e = _randn(37, 20, seed=1, dtype=dtype), _randn(150, 20, seed=2, dtype=dtype)
    idx, dist = check(x, e, metric)
    d64 = _brute64(x, e, metric)
    top2 = d64.topk(2, dim=1, largest=False).values
    separated = (top2[:, 1] - top2[:, 0]) > 1e-4 * top2[:, 1].abs().clamp_min(1)
    assert separated.sum() > 30
    assert torch.equal(idx[separated], d64.argmin(1)[separated])
    torch.testing.assert_close(dist.double(), d64.min(1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_near_ties_at_an_offset(metric):
    """Every vector near a common offset of 300 (spread 0.05, D = 16): the expanded form
    |x|^2 - 2 x.e + |e|^2 in float32 picks another code than the float64 argmin for most rows;
    the launcher matches the direct definition and float64 on every row."""
    K = 64 if metric == "l2" else 20  # cosine: all codes nearly parallel, the full rescoring
    x = _randn(64, 16, seed=3, scale=0.05, shift=300.0)
    e = _randn(K, 16, seed=4, scale=0.05, shift=300.0)
    idx, _ = check(x, e, metric)
    if metric == "l2":
        expanded = ((x * x).sum(1, keepdim=True) - 2 * x @ e.T + (e * e).sum(1)).argmin(1)
        truth = _brute64(x, e, metric).argmin(1)
        assert (expanded.cpu() != truth).sum() > 20  # the construction defeats the expanded form
        assert torch.equal(idx, truth)


def test_near_ties_centring_cannot_remove():
    """Codes in two clusters at +300 and -300 (their mean near 0, so centring leaves the
    cancellation), rows near the +300 one: the screen cannot order the near cluster, the margin
    must keep all of it (more than the 16 slots: the full rescoring)."""
    e = torch.cat([_randn(20, 8, seed=19, scale=0.05, shift=300.0),
                   _randn(20, 8, seed=20, scale=0.05, shift=-300.0)])
    x = _randn(24, 8, seed=21, scale=0.05, shift=300.0)
    idx, _ = check(x, e)
    assert torch.equal(idx, _brute64(x, e, "l2").argmin(1))


def test_one_ulp_apart():
    """Two codes whose direct float32 distances differ in the last place, in either order,
    far beyond the first tile; and exact duplicates of the winner."""
    x = _randn(6, 24, seed=5, shift=50.0)
    e = _randn(300, 24, seed=6, shift=50.0, scale=3.0)
    near = x[2] + 1e-3
    e[200] = near
    e[201] = near.clone()
    e[201][5] = torch.nextafter(near[5], torch.tensor(float("inf")))
    e[7] = e[201]  # a duplicate before, of the farther one
    e[250] = e[200]  # a duplicate after, of the nearer one
    idx, _ = check(x, e)
    assert idx[2] in (200, 201, 7)


def test_duplicates_lowest_index():
    e = _randn(40, 8, seed=7)
    e[31] = e[5]
    e[39] = e[5]
    x = torch.cat([e[5:6] + 0.01, e[31:32], _randn(3, 8, seed=8)])
    idx, dist = check(x, e)
    assert idx[0] == 5
    assert idx[1] == 5
    assert dist[1] == 0


def test_equal_codes_at_tile_edges():
    """Equal codes at the last positions of a 64-code tile (62, 63: bit 63 of a row's candidate
    mask) and across the next boundary (127, 128): the lowest, 62."""
    e = _randn(130, 7, seed=24)
    for k in (63, 127, 128, 62):
        e[k] = e[40] + 2.0
    x = torch.cat([e[62:63] + 1e-4, _randn(2, 7, seed=25)])
    idx, _ = check(x, e)
    assert idx[0] == 62


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_all_codes_equal(metric):
    """K = 20 equal codes (more candidates than a row keeps: the full rescoring): code 0."""
    e = _randn(1, 5, seed=9).expand(20, 5).contiguous()
    x = torch.cat([_randn(4, 5, seed=10), e[:1]])
    idx, _ = check(x, e, metric)
    assert (idx == 0).all()


def test_capacity_one_is_the_same(monkeypatch):
    """With one candidate slot most rows take the full-rescoring path: the same results."""
    x, e = _randn(30, 10, seed=11, shift=5.0), _randn(70, 10, seed=12, shift=5.0)
    e[60] = e[3]
    full = nc.nearest_code_fwd(x, e, "l2")
    monkeypatch.setattr(nc, "CAP", 1)
    one = check(x, e)
    assert torch.equal(full[0].cpu(), one[0])
    assert torch.equal(full[1].cpu(), one[1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_split_over_programs(metric):
    """The code tiles split over programs (one tile each: 3 splits of 128, 128, 44 codes, the
    GPU's layout for small N), each split with its own candidate list: the same results; a
    split with more candidates than slots (equal codes in the first two) is rescored whole."""
    e = _randn(300, 6, seed=22)
    e[5:140] = e[200]  # 135 equal codes across the first two splits, one equal in the third
    x = torch.cat([_randn(5, 6, seed=23), e[200:201] + 1e-3])
    one = check(x, e, metric)
    split = check(x, e, metric, tiles_per_split=1)
    assert torch.equal(one[0], split[0])
    assert one[0][-1] == 5


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_strided_views(metric):
    """x column-major, the codebook every other column of a wider tensor, fp16."""
    x = _randn(9, 30, seed=13, dtype=torch.float16).T  # (30, 9), strides (1, 30)
    e = _randn(25, 18, seed=14, dtype=torch.float16)[:, ::2]  # (25, 9), strides (18, 2)
    check(x, e, metric)


@pytest.mark.parametrize(("N", "K", "D"), [(5, 1, 1), (3, 17, 3), (2, 300, 70), (129, 20, 2)])
def test_shapes(N, K, D):
    """D = 1, 3, past one D chunk (70 > 64); K = 1, past one code tile (300 > 128); N past one
    row block (129 > 64)."""
    check(_randn(N, D, seed=15), _randn(K, D, seed=16))


def test_non_finite_and_empty():
    x = _randn(4, 6, seed=17)
    x[1, 2] = float("nan")
    e = _randn(9, 6, seed=18)
    e[4, 0] = float("inf")
    idx, dist = check(x, e)
    assert idx[1] == 0
    assert dist[1].isnan()
    big = torch.full((2, 6), 3e38)  # squares overflow: inf distances, code 0
    check(big, e)
    i, d = nc.nearest_code_fwd(torch.empty(0, 6), e, "l2")
    assert i.shape == (0,)
    assert d.shape == (0,)
    i, d = nc.nearest_code_fwd(x, torch.empty(0, 6), "l2")
    assert (i == 0).all()
    assert (d == float("inf")).all()
    i, d = nc.nearest_code_fwd(torch.empty(3, 0), torch.empty(5, 0), "cosine")
    assert (i == 0).all()
    assert (d == 1).all()


def test_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="metric"):
        nc.nearest_code_fwd(x, x, "l1")
    with pytest.raises(ValueError, match="codebook"):
        nc.nearest_code_fwd(x, torch.zeros(2, 4), "l2")
