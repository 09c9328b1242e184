"""fv.VectorQuantizer: the EMA step against a float64 one-hot reference, k-means initialization
against a dense Lloyd's k-means with the same draws, dead-code restarts, the learned codebook's
gradients, the usage window and perplexity, no host synchronization in a training step, and
state_dict round trips."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastvae as fv


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ema_reference(x, codebook, cluster_size, embed_avg, decay, eps, metric="l2"):
    """One EMA step in float64 with a dense N x K one-hot (the oracle, small sizes)."""
    x, codebook = x.double(), codebook.double()
    cluster_size, embed_avg = cluster_size.double(), embed_avg.double()
    if metric == "cosine":
        x = x / x.norm(dim=-1, keepdim=True)
        d = 1 - x @ (codebook / codebook.norm(dim=-1, keepdim=True)).T
    else:
        d = torch.cdist(x, codebook)
    onehot = torch.nn.functional.one_hot(d.argmin(1), codebook.shape[0]).double()
    cs = decay * cluster_size + (1 - decay) * onehot.sum(0)
    avg = decay * embed_avg + (1 - decay) * onehot.T @ x
    n = cs.sum()
    cb = avg / ((cs + eps) / (n + len(cs) * eps) * n)[:, None]
    if metric == "cosine":
        cb = cb / cb.norm(dim=-1, keepdim=True)
    return d.argmin(1), cs, avg, cb


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ema_steps_match_float64_one_hot_reference(metric):
    torch.manual_seed(0)
    vq = fv.VectorQuantizer(6, 12, metric=metric, decay=0.9, eps=1e-3)
    cs, avg, cb = vq.cluster_size.clone(), vq.embed_avg.clone(), vq.codebook.clone()
    for step in range(3):
        x = _x(4, 10, 6, seed=step) * 0.05
        out = vq(x)
        idx, cs, avg, cb = ema_reference(x.reshape(-1, 6), cb, cs, avg, 0.9, 1e-3, metric)
        assert torch.equal(out.indices.reshape(-1), idx)
        torch.testing.assert_close(vq.cluster_size.double(), cs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vq.embed_avg.double(), avg, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vq.codebook.double(), cb, rtol=1e-5, atol=1e-6)


def test_outputs_are_vector_quantize_with_the_codebook_before_the_step():
    vq = fv.VectorQuantizer(4, 8, commitment_weight=0.3, straight_through="rotation")
    x = _x(3, 5, 4).requires_grad_()
    before = vq.codebook.clone()
    out = vq(x)
    ref = fv.vector_quantize(x, before, beta=0.3, straight_through="rotation")
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.quantized, ref.quantized)
    assert torch.equal(out.loss, ref.commitment_loss)  # EMA: the commitment term only
    assert not torch.equal(vq.codebook, before)
    vq.eval()
    snapshot = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(x)
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in snapshot.items())


def test_learned_codebook_gets_the_codebook_loss_gradient():
    vq = fv.VectorQuantizer(4, 8, decay=None, commitment_weight=0.25)
    assert isinstance(vq.codebook, torch.nn.Parameter)
    x = _x(10, 4).requires_grad_()
    out = vq(x)
    torch.testing.assert_close(out.loss, out.codebook_loss + out.commitment_loss)
    out.loss.backward()
    q = vq.codebook.detach()[out.indices]
    expected = torch.zeros(8, 4).index_add_(0, out.indices, 2 * (q - x.detach()) / x.numel())
    torch.testing.assert_close(vq.codebook.grad, expected)
    torch.testing.assert_close(x.grad, 0.25 * 2 * (x.detach() - q) / x.numel())


def dense_kmeans(x, K, iters, perm):
    means = x[perm[:K]].clone()
    for _ in range(iters):
        a = torch.cdist(x, means).argmin(1)
        onehot = torch.nn.functional.one_hot(a, K).to(x.dtype)
        counts = onehot.sum(0)
        new = onehot.T @ x / counts.clamp_min(1)[:, None]
        means = torch.where((counts == 0)[:, None], means, new)
    return means, counts


def test_kmeans_init_on_the_first_training_batch():
    vq = fv.VectorQuantizer(3, 6, kmeans_init=True, kmeans_iters=4, decay=0.5)
    assert not bool(vq.initted)
    x = torch.cat([_x(20, 3, seed=s) * 0.1 + 3 * _x(1, 3, seed=10 + s) for s in range(6)])
    vq.eval()
    vq(x)  # evaluation does not initialize
    assert not bool(vq.initted)
    vq.train()
    torch.manual_seed(4)
    perm = torch.randperm(len(x))
    torch.manual_seed(4)
    vq(x)
    assert bool(vq.initted)
    means, counts = dense_kmeans(x.double(), 6, 4, perm)
    cs0 = counts.clamp_min(1)
    _, cs, _avg, cb = ema_reference(x, means, cs0, means * cs0[:, None], 0.5, 1e-5)
    torch.testing.assert_close(vq.cluster_size.double(), cs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vq.codebook.double(), cb, rtol=1e-5, atol=1e-5)
    # a second step does not run k-means again; a reload of an initialized state neither
    fresh = fv.VectorQuantizer(3, 6, kmeans_init=True)
    fresh.load_state_dict(vq.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x).indices, vq.eval()(x).indices)
    fresh.train()
    before = fresh.codebook.clone()
    fresh(x[:1])
    assert (fresh.codebook - before).abs().max() < 0.5 * before.abs().max()


def test_dead_codes_restart_from_batch_rows():
    vq = fv.VectorQuantizer(2, 8, decay=0.5, dead_code_threshold=1.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0]] + [[100.0 + i, 0.0] for i in range(7)]))
        vq.embed_avg.copy_(vq.codebook)
    x = _x(16, 2)  # all near code 0: the seven far codes die at the first step
    vq(x)
    assert int(vq.restarts) == 7
    restarted = vq.codebook[1:]
    assert torch.cdist(restarted, x).min(dim=1).values.max() < 1e-6
    assert len(torch.unique(restarted, dim=0)) == 7
    torch.testing.assert_close(vq.cluster_size[1:], torch.ones(7))
    torch.testing.assert_close(vq.embed_avg[1:], restarted)


def test_usage_and_perplexity_over_a_window():
    vq = fv.VectorQuantizer(1, 4, decay=0.99, usage_window=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
        vq.embed_avg.copy_(vq.codebook)
    vq(torch.tensor([[0.0], [0.1]]))  # code 0 twice
    assert vq.codebook_usage() == 0.25
    torch.testing.assert_close(vq.perplexity(), torch.tensor(1.0))
    vq(torch.tensor([[10.0], [20.0]]))  # codes 1, 2
    assert vq.codebook_usage() == 0.75
    # p = (1/2, 1/4, 1/4, 0): exp(H) = 2^1.5
    torch.testing.assert_close(vq.perplexity(), torch.tensor(2 ** 1.5))
    vq(torch.tensor([[30.0], [30.0]]))  # the first step leaves the window
    assert vq.codebook_usage() == 0.75
    assert vq.usage_total.tolist() == [0, 1, 1, 2]
    assert int(vq.steps) == 3


@contextlib.contextmanager
def _no_host_reads():
    """Tensor -> Python reads (item, bool, tolist, int, float) raise inside the block."""
    names = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor in the training step")

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("decay", [0.99, None])
def test_training_step_reads_nothing_back_from_the_device(decay):
    vq = fv.VectorQuantizer(4, 16, decay=decay, kmeans_init=True, dead_code_threshold=2.0,
                            straight_through="rotation")
    x = _x(40, 4).requires_grad_()
    with _no_host_reads():
        for _ in range(2):
            out = vq(x)
            out.loss.backward()
            vq.codebook_usage()
            vq.perplexity()
    assert bool(vq.initted)


def test_bfloat16_input_and_empty_batch():
    vq = fv.VectorQuantizer(4, 8)
    out = vq(_x(3, 4).bfloat16())
    assert out.quantized.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    out = vq(torch.zeros(0, 4))
    assert out.indices.shape == (0,)


@pytest.mark.parametrize(("kwargs", "err", "match"), [
    (dict(metric="l1"), ValueError, "metric"),
    (dict(decay=1.0), ValueError, "decay"),
    (dict(straight_through="x"), ValueError, "straight_through"),
    (dict(usage_window=0), ValueError, "usage_window"),
    (dict(kmeans_iters=1.5), TypeError, "kmeans_iters"),
    (dict(dead_code_threshold=-1), ValueError, "dead_code_threshold"),
])
def test_argument_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        fv.VectorQuantizer(4, 8, **kwargs)


def test_input_shape_error():
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        fv.VectorQuantizer(4, 8)(torch.zeros(3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_training_steps_make_no_host_sync(dtype):
    """On a GPU, k-means, EMA, restarts, usage and backward never wait for the device
    (``torch.cuda.set_sync_debug_mode("error")`` raises at a synchronizing call)."""
    warm = fv.VectorQuantizer(16, 256, kmeans_init=True, dead_code_threshold=2.0).cuda()
    x = torch.randn(1024, 16, device="cuda", dtype=dtype, requires_grad=True)
    warm(x).loss.backward()  # lazy CUDA initialization happens outside the checked block
    vq = fv.VectorQuantizer(16, 256, kmeans_init=True, dead_code_threshold=2.0,
                            straight_through="rotation").cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = vq(x)
            out.loss.backward()
            usage, perplexity = vq.codebook_usage(), vq.perplexity()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.quantized.dtype == dtype
    assert bool(vq.initted)
    assert 0 < float(usage) <= 1
    assert 1 <= float(perplexity) <= 256
    cpu = fv.vector_quantize(x.detach().cpu(), vq.codebook.cpu())
    gpu = fv.vector_quantize(x.detach(), vq.codebook)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)


@pytest.mark.parametrize("kind", ["native", "dropin"])
def test_float64_modules_train(kind):
    if kind == "native":
        vq = fv.VectorQuantizer(4, 8, kmeans_init=True, dead_code_threshold=1.0).double()
    else:
        vq = fv.VectorQuantize(4, 8, kmeans_init=True, threshold_ema_dead_code=1.0).double()
    x = _x(2, 30, 4, dtype=torch.float64)
    out = vq(x)
    assert out[0].dtype == torch.float64
    assert bool(vq.state_dict()[next(k for k in vq.state_dict() if k.endswith("initted"))])


def test_kmeans_flag_follows_a_nested_load_state_dict():
    def model():
        return torch.nn.Sequential(fv.VectorQuantizer(4, 8, kmeans_init=True),
                                   fv.VectorQuantize(4, 8, kmeans_init=True))
    trained = model()
    trained[0](_x(20, 4))
    trained[1](_x(1, 20, 4))
    fresh = model()
    fresh.load_state_dict(trained.state_dict())
    before = [fresh[0].codebook.clone(), fresh[1].codebook.clone()]
    fresh.eval()
    fresh[0](_x(20, 4, seed=1))
    fresh[1](_x(1, 20, 4, seed=1))  # the drop-in initializes in evaluation too, unless loaded
    assert torch.equal(fresh[0].codebook, before[0])
    assert torch.equal(fresh[1].codebook, before[1])
