"""fv.ResidualVQ against the installed vector-quantize-pytorch's ResidualVQ (the anchor): the
same initial codebooks and state_dict keys and shapes both ways, the same indices, outputs and
per-level losses in evaluation and training, the same gradients, the same EMA codebooks after
several steps (k-means and dead-code restarts included: same draws from the default generator),
quantize dropout with a fixed seed, ``get_codes_from_indices`` / ``get_output_from_indices``,
and TypeError for what is not supported."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv

vqp = pytest.importorskip("vector_quantize_pytorch")

TOL = dict(rtol=1e-5, atol=1e-6)


def _assert_grad_close(actual, expected, msg=None):
    """Gradients of the two implementations: the same sums in another order (and matrix
    products that round differently on each CPU), where terms of both signs cancel: held to
    1e-5 of the largest gradient element, not of each element."""
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=msg)


def _pair(**kwargs):
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(**kwargs)
    torch.manual_seed(0)
    ours = fv.ResidualVQ(**kwargs)
    _assert_state_close(theirs, ours, exact=True)  # the same draws made the same codebooks
    return theirs, ours


def _assert_state_close(theirs, ours, exact=False, **tol):
    a, b = theirs.state_dict(), ours.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in a.items()] == \
        [(k, v.shape, v.dtype) for k, v in b.items()]
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(b[k], a[k], **(tol or TOL), msg=k)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = dict(dim=8, num_quantizers=4, codebook_size=16)
CONFIGS = [
    dict(),
    dict(rotation_trick=False),
    dict(decay=0.9, eps=1e-3, commitment_weight=0.25),
    dict(codebook_dim=4),
    dict(threshold_ema_dead_code=2),
    dict(kmeans_init=True, kmeans_iters=4, rotation_trick=False),
    dict(kmeans_init=True, kmeans_iters=4, threshold_ema_dead_code=1, rotation_trick=False),
]
IDS = [",".join(k) or "defaults" for k in CONFIGS]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=IDS)
def test_state_dict_keys_and_shapes_both_ways(kwargs):
    theirs, ours = _pair(**BASE, **kwargs)
    assert [k for k in ours.state_dict() if k.startswith("layers.0.")] == [
        "layers.0._codebook.initted", "layers.0._codebook.cluster_size",
        "layers.0._codebook.embed_avg", "layers.0._codebook.embed"]
    torch.manual_seed(1)
    other = vqp.ResidualVQ(**BASE, **kwargs)
    ours.load_state_dict(other.state_dict())
    _assert_state_close(other, ours, exact=True)
    fresh = vqp.ResidualVQ(**BASE, **kwargs)
    fresh.load_state_dict(ours.state_dict())
    _assert_state_close(fresh, ours, exact=True)
    assert ours.codebooks.shape == theirs.codebooks.shape
    assert torch.equal(ours.codebooks, other.codebooks)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=IDS)
def test_eval_same_indices_outputs_and_losses(kwargs):
    theirs, ours = _pair(**BASE, **kwargs)
    theirs.eval()
    ours.eval()
    x = _x(2, 50, 8)
    results = []
    for vq in (theirs, ours):
        torch.manual_seed(3)  # k-means draws
        results.append(vq(x))
    (qa, ia, la), (qb, ib, lb) = results
    assert torch.equal(ia, ib)
    torch.testing.assert_close(qb, qa, **TOL)
    assert torch.equal(lb, la)  # zeros (L,)
    assert lb.shape == (4,)
    _assert_state_close(theirs, ours)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=IDS)
def test_training_steps_same_indices_losses_gradients_and_codebooks(kwargs):
    # Batch sizes: the package draws restart rows only when a level has a dead code (after a
    # host sync), fastvae at every level and step (no sync): the draws coincide when every level
    # has dead codes at every step (few rows). The package's k-means assigns by a distance
    # clamped at 1e-8 (ties below 1e-4): with few rows, residuals of one-row clusters sit that
    # close to two means and its choice is not the nearest; enough rows avoid such clusters.
    theirs, ours = _pair(**BASE, **kwargs)
    shape = (2, 40) if kwargs == dict(threshold_ema_dead_code=2) else (4, 100)
    for step in range(3):
        x = _x(*shape, 8, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        outs = []
        for vq, xi in ((theirs, xa), (ours, xb)):
            torch.manual_seed(10 + step)  # the same draws for k-means and restarts
            outs.append(vq(xi))
        (qa, ia, la), (qb, ib, lb) = outs
        assert torch.equal(ia, ib), step
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
        g = _x(*shape, 8, seed=100 + step)
        w = torch.arange(1.0, 5.0)
        ((qa * g).sum() + (la * w).sum()).backward()
        ((qb * g).sum() + (lb * w).sum()).backward()
        _assert_grad_close(xb.grad, xa.grad)
        _assert_state_close(theirs, ours)
    pa, pb = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert list(pa) == list(pb)
    for k in pa:
        _assert_grad_close(pb[k].grad, pa[k].grad, msg=k)


@pytest.mark.parametrize("extra", [dict(), dict(kmeans_init=True, kmeans_iters=3,
                                                rotation_trick=False),
                                   dict(quantize_dropout=True)], ids=["ema", "kmeans", "dropout"])
def test_shared_codebook(extra):
    # one codebook module for every level (repeated state_dict keys, as the package), the
    # package's manual EMA: every level's statistics in turn, one codebook update at the end
    theirs, ours = _pair(**BASE, shared_codebook=True, **extra)
    assert ours.layers[1]._codebook is ours.layers[0]._codebook
    for step in range(3):
        x = _x(4, 100, 8, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        seed = dict(rand_quantize_dropout_fixed_seed=step) if extra.get("quantize_dropout") \
            else {}
        outs = []
        for vq, xi in ((theirs, xa), (ours, xb)):
            torch.manual_seed(step)
            outs.append(vq(xi, **seed))
        (qa, ia, la), (qb, ib, lb) = outs
        assert torch.equal(ia, ib)
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
        (qa.sum() + la.sum()).backward()
        (qb.sum() + lb.sum()).backward()
        _assert_grad_close(xb.grad, xa.grad)
        _assert_state_close(theirs, ours)


def test_gradient_is_the_sum_of_per_level_straight_throughs():
    # with the codes subtracted stopped, every level passes the gradient to x: L g (STE)
    _, ours = _pair(**BASE, rotation_trick=False, commitment_weight=0.0)
    x = _x(2, 10, 8).requires_grad_()
    q, _, _ = ours(x)
    g = _x(2, 10, 8, seed=1)
    (q * g).sum().backward()
    torch.testing.assert_close(x.grad, 4 * g)


@pytest.mark.parametrize("multiple_of", [1, 2])
def test_quantize_dropout_with_a_fixed_seed_matches(multiple_of):
    kwargs = dict(dim=8, num_quantizers=6, codebook_size=16, quantize_dropout=True,
                  quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=multiple_of)
    theirs, ours = _pair(**kwargs)
    x = _x(2, 30, 8)
    dropped = set()
    for seed in range(8):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        qa, ia, la = theirs(xa, rand_quantize_dropout_fixed_seed=seed)
        qb, ib, lb = ours(xb, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(ia, ib), seed
        dropped.add(int((ib[0, 0] == -1).sum()))
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
        (qa.sum() + la.sum()).backward()
        (qb.sum() + lb.sum()).backward()
        _assert_grad_close(xb.grad, xa.grad)
    assert len(dropped) > 1
    _assert_state_close(theirs, ours)  # skipped levels kept their EMA state
    # the codes of coarse indices (fewer levels) as the package
    torch.testing.assert_close(ours.get_codes_from_indices(ib[..., :3]),
                               theirs.get_codes_from_indices(ia[..., :3]))


def test_quantize_dropout_without_a_seed_draws_on_the_device():
    ours = fv.ResidualVQ(dim=4, num_quantizers=5, codebook_size=8, quantize_dropout=True,
                         quantize_dropout_cutoff_index=2)
    x = _x(3, 6, 4)
    counts = set()
    for seed in range(20):
        torch.manual_seed(seed)
        _, idx, _ = ours(x)
        active = (idx != -1).sum(-1)
        assert (active == active[0, 0]).all()  # one number of levels per call
        counts.add(int(active[0, 0]))
        torch.manual_seed(seed)
        _, again, _ = ours(x)
        assert torch.equal((again != -1), (idx != -1))  # repeatable by seed
    assert counts == {3, 4, 5}  # levels 0..cutoff always kept
    ours.eval()
    assert (ours(x)[1] != -1).all()  # no dropout in evaluation


@pytest.mark.parametrize("return_all_codes", [False, True])
def test_codes_and_outputs_from_indices(return_all_codes):
    theirs, ours = _pair(**BASE, codebook_dim=6)
    theirs.eval()
    ours.eval()
    x = _x(2, 9, 8)
    ra = theirs(x, return_all_codes=return_all_codes)
    rb = ours(x, return_all_codes=return_all_codes)
    assert len(ra) == len(rb)
    for a, b in zip(ra, rb, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, **TOL)
    idx = rb[1]
    torch.testing.assert_close(ours.get_codes_from_indices(idx),
                               theirs.get_codes_from_indices(idx))
    torch.testing.assert_close(ours.get_output_from_indices(idx),
                               theirs.get_output_from_indices(idx), **TOL)
    torch.testing.assert_close(ours.get_output_from_indices(idx), rb[0], **TOL)


def test_single_vectors_and_image_maps():
    theirs, ours = _pair(**BASE)
    x = _x(5, 8)
    (qa, ia, _), (qb, ib, _) = theirs(x), ours(x)
    assert ib.shape == ia.shape == (5, 4)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(qb, qa, **TOL)
    # accept_image_fmap: (B, C, H, W) -> indices (B, H, W, L) (the package's ResidualVQ 1.32.0
    # fails on image maps; the layout is its VectorQuantize's, levels last)
    _, img = _pair(**BASE, accept_image_fmap=True)
    img.eval()
    fmap = _x(2, 8, 3, 5)
    q, idx, _ = img(fmap)
    assert q.shape == fmap.shape
    assert idx.shape == (2, 3, 5, 4)
    flat = fmap.flatten(2).transpose(1, 2)
    img2 = fv.ResidualVQ(**BASE)
    img2.load_state_dict(img.state_dict())
    img2.eval()
    q2, idx2, _ = img2(flat)
    assert torch.equal(idx.reshape(2, 15, 4), idx2)
    torch.testing.assert_close(q.flatten(2).transpose(1, 2), q2)


def test_freeze_codebook_and_eval_leave_the_state():
    _, ours = _pair(**BASE)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours(_x(2, 10, 8), freeze_codebook=True)
    ours.eval()
    ours(_x(2, 10, 8))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unsupported_arguments_raise_type_error_naming_them():
    for kwargs, name in [(dict(shared_codebook=True, threshold_ema_dead_code=1),
                          "shared_codebook"),
                         (dict(beam_size=2), "beam_size"),
                         (dict(implicit_neural_codebook=True), "implicit_neural_codebook"),
                         (dict(quant_grad_frac=0.5), "quant_grad_frac"),
                         (dict(use_cosine_sim=True), "use_cosine_sim"),
                         (dict(heads=2), "heads"),
                         (dict(orthogonal_reg_weight=0.1), "orthogonal_reg_weight"),
                         (dict(not_an_argument=1), "not_an_argument")]:
        with pytest.raises(TypeError, match=name):
            fv.ResidualVQ(**BASE, **kwargs)
    with pytest.raises(TypeError, match="codebook_size"):
        fv.ResidualVQ(dim=8, num_quantizers=2, codebook_size=(8, 16))
    # defaults passed explicitly are fine
    fv.ResidualVQ(**BASE, shared_codebook=False, beam_size=None, quant_grad_frac=0.0,
                  mlp_kwargs={}, heads=1)
    ours = fv.ResidualVQ(**BASE)
    for name, value in [("mask", torch.ones(1, 4, dtype=torch.bool)),
                        ("indices", torch.zeros(1, 4, 4, dtype=torch.int64)),
                        ("beam_size", 2)]:
        with pytest.raises(TypeError, match=name):
            ours(_x(1, 4, 8), **{name: value})


def test_differences_documented_zero_residual_rotation():
    # a zero residual (an exact hit at an earlier level): the package divides by max(|r|, 1e-6)
    # and passes |c| / 1e-6 times the gradient; fastvae's rotation falls back to the identity
    _, ours = _pair(dim=4, num_quantizers=2, codebook_size=4)
    x = ours.layers[0]._codebook.embed[0, :2].clone()[None].requires_grad_()
    q, _, _ = ours(x)
    q.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max() < 10
