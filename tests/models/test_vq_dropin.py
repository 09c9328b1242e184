"""fv.VectorQuantize against the installed vector-quantize-pytorch (the anchor): state_dict keys
and shapes both ways, the same indices, quantized values and loss in evaluation, the same EMA
update (codebook, cluster sizes, sums), k-means initialization and dead-code restarts after a
training step (same draws from the default generator), and the same gradients."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv

vqp = pytest.importorskip("vector_quantize_pytorch")

TOL = dict(rtol=1e-5, atol=1e-6)


def _pair(*args, **kwargs):
    theirs = vqp.VectorQuantize(*args, **kwargs)
    ours = fv.VectorQuantize(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _assert_state_close(theirs, ours, exact=False):
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(b[k], a[k], **TOL, msg=k)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CONFIGS = [
    dict(),
    dict(use_cosine_sim=True),
    dict(rotation_trick=False),
    dict(threshold_ema_dead_code=2),
    dict(decay=0.9, eps=1e-3, commitment_weight=0.25),
    dict(codebook_dim=4),
    dict(ema_update=False, learnable_codebook=True),
    dict(ema_update=False, threshold_ema_dead_code=1.5),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(k) or "defaults")
def test_state_dict_keys_and_shapes_both_ways(kwargs):
    theirs = vqp.VectorQuantize(8, 32, **kwargs)
    ours = fv.VectorQuantize(8, 32, **kwargs)
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in sa.items()] == \
        [(k, v.shape, v.dtype) for k, v in sb.items()]
    ours.load_state_dict(sa)
    _assert_state_close(theirs, ours, exact=True)
    other = vqp.VectorQuantize(8, 32, **kwargs)
    other.load_state_dict(ours.state_dict())
    _assert_state_close(other, ours, exact=True)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(k) or "defaults")
def test_eval_same_indices_values_and_loss(kwargs):
    theirs, ours = _pair(8, 32, **kwargs)
    theirs.eval()
    ours.eval()
    x = _x(2, 50, 8)
    qa, ia, la = theirs(x)
    qb, ib, lb = ours(x)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(qb, qa, **TOL)
    torch.testing.assert_close(lb, la)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(k) or "defaults")
def test_training_step_same_ema_update_loss_and_gradients(kwargs):
    theirs, ours = _pair(8, 32, **kwargs)
    x = _x(2, 50, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs = []
    for vq, xi in ((theirs, xa), (ours, xb)):
        torch.manual_seed(5)  # the same draws for dead-code restarts
        outs.append(vq(xi))
    (qa, ia, la), (qb, ib, lb) = outs
    assert torch.equal(ia, ib)
    torch.testing.assert_close(qb, qa, **TOL)
    torch.testing.assert_close(lb, la, **TOL)
    _assert_state_close(theirs, ours)
    g = _x(2, 50, 8, seed=1)
    ((qa * g).sum() + la).backward()
    ((qb * g).sum() + lb).backward()
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    pa, pb = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert list(pa) == list(pb)
    for k in pa:
        torch.testing.assert_close(pb[k].grad, pa[k].grad, **TOL, msg=k)


def test_dead_code_restarts_happen_and_match():
    theirs, ours = _pair(4, 16, threshold_ema_dead_code=2)
    x = _x(1, 40, 4)
    for vq in (theirs, ours):
        torch.manual_seed(3)
        vq(x)
    before = theirs.codebook.clone()
    _assert_state_close(theirs, ours)
    # restarted codes are batch rows, with the reset cluster size
    restarted = (ours._codebook.cluster_size[0] == 2).nonzero()[:, 0]
    assert len(restarted) > 5
    rows = x.reshape(-1, 4)
    assert (torch.cdist(ours.codebook[restarted], rows).min(dim=1).values < 1e-6).all()
    assert before.shape == ours.codebook.shape


def test_more_dead_codes_than_rows_restarts_the_lowest_indices():
    # the package restarts a random subset (after a host sync); fastvae the lowest-index dead
    # codes, one distinct row each, without a sync; the others wait for a later step
    ours = fv.VectorQuantize(4, 64, threshold_ema_dead_code=2)
    x = _x(1, 10, 4)
    ours(x)
    restarted = (ours._codebook.cluster_size[0] == 2).nonzero()[:, 0]
    assert len(restarted) == 10
    dead_before = torch.arange(64)[ours._codebook.cluster_size[0] < 2]
    assert restarted.max() < dead_before.max()
    codes = ours.codebook[restarted]
    assert torch.cdist(codes, x[0]).min(dim=1).values.max() < 1e-6
    assert len(torch.unique(codes, dim=0)) == 10


@pytest.mark.parametrize("cosine", [False, True])
def test_kmeans_init_same_codebook(cosine):
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(6, 16, kmeans_init=True, kmeans_iters=5, use_cosine_sim=cosine)
    ours = fv.VectorQuantize(6, 16, kmeans_init=True, kmeans_iters=5, use_cosine_sim=cosine)
    x = _x(3, 40, 6)
    results = []
    for vq in (theirs, ours):
        torch.manual_seed(11)
        results.append(vq(x))
    assert bool(ours._codebook.initted)
    assert torch.equal(results[0][1], results[1][1])
    _assert_state_close(theirs, ours)
    assert ours.codebook.abs().sum() > 0


def test_kmeans_init_fewer_vectors_than_codes_and_in_eval():
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(3, 16, kmeans_init=True, kmeans_iters=3)
    ours = fv.VectorQuantize(3, 16, kmeans_init=True, kmeans_iters=3)
    theirs.eval()
    ours.eval()
    x = _x(1, 10, 3)
    for vq in (theirs, ours):
        torch.manual_seed(2)
        vq(x)
    _assert_state_close(theirs, ours)


def test_loaded_initted_checkpoint_skips_kmeans():
    theirs = vqp.VectorQuantize(4, 8, kmeans_init=True)
    theirs(_x(1, 30, 4))
    ours = fv.VectorQuantize(4, 8, kmeans_init=True)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    before = ours.codebook.clone()
    ours(_x(1, 30, 4, seed=9))
    assert torch.equal(ours.codebook, before)


@pytest.mark.parametrize("layout", ["image", "3d", "channel_first", "single"])
def test_layouts(layout):
    if layout == "image":
        kwargs, x = dict(accept_image_fmap=True), _x(2, 8, 3, 5)
    elif layout == "3d":
        kwargs, x = dict(accept_3d_fmap=True), _x(2, 8, 2, 3, 2)
    elif layout == "channel_first":
        kwargs, x = dict(channel_last=False), _x(2, 8, 7)
    else:
        kwargs, x = dict(), _x(5, 8)
    theirs, ours = _pair(8, 16, **kwargs)
    for train in (False, True):
        theirs.train(train)
        ours.train(train)
        qa, ia, la = theirs(x)
        qb, ib, lb = ours(x)
        assert ia.shape == ib.shape
        assert torch.equal(ia, ib)
        assert qa.shape == qb.shape == x.shape
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
    _assert_state_close(theirs, ours)
    idx = ib
    torch.testing.assert_close(ours.get_output_from_indices(idx),
                               theirs.get_output_from_indices(idx))


def test_several_steps_stay_equal():
    theirs, ours = _pair(8, 32, decay=0.9)
    for step in range(4):
        x = _x(4, 25, 8, seed=step)
        (_, ia, la), (_, ib, lb) = theirs(x), ours(x)
        assert torch.equal(ia, ib)
        torch.testing.assert_close(lb, la, **TOL)
    _assert_state_close(theirs, ours)


def test_unsupported_arguments_raise_type_error_naming_them():
    with pytest.raises(TypeError, match="heads=2"):
        fv.VectorQuantize(8, 32, heads=2)
    with pytest.raises(TypeError, match="orthogonal_reg_weight"):
        fv.VectorQuantize(8, 32, orthogonal_reg_weight=0.1)
    with pytest.raises(TypeError, match="stochastic_sample_codes"):
        fv.VectorQuantize(8, 32, stochastic_sample_codes=True)
    with pytest.raises(TypeError, match="not_an_argument"):
        fv.VectorQuantize(8, 32, not_an_argument=1)
    # defaults passed explicitly are fine, positionally too (codebook_dim, heads)
    fv.VectorQuantize(8, 32, None, 1, orthogonal_reg_weight=0.0, affine_param=False)
    vq = fv.VectorQuantize(8, 32)
    with pytest.raises(TypeError, match="mask"):
        vq(_x(1, 4, 8), mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="learnable_codebook"):
        fv.VectorQuantize(8, 32, learnable_codebook=True)


def test_projection_gradients_when_the_input_needs_none():
    # the straight-through applies only when the input itself requires grad (as the package)
    theirs, ours = _pair(8, 16, codebook_dim=4)
    x = _x(2, 10, 8)
    for vq in (theirs, ours):
        q, _, loss = vq(x)
        (q.square().sum() + loss).backward()
    pa, pb = dict(theirs.named_parameters()), dict(ours.named_parameters())
    for k in pa:
        torch.testing.assert_close(pb[k].grad, pa[k].grad, **TOL, msg=k)


@pytest.mark.gpu
def test_cuda_same_as_the_package():
    theirs, ours = _pair(32, 512)
    theirs, ours = theirs.cuda(), ours.cuda()
    x = _x(8, 256, 32).cuda()
    for train in (False, True):
        theirs.train(train)
        ours.train(train)
        (qa, ia, la), (qb, ib, lb) = theirs(x), ours(x)
        assert torch.equal(ia, ib)
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
    _assert_state_close(theirs, ours)
