"""fv.ResidualVQ's codebooks without a copy: the levels' ``_codebook.embed`` buffers (1, K, D)
are views of one (L, K, D) tensor, which ``codebooks`` returns (state_dict unchanged both ways,
``load_state_dict`` copies into it, ``.to()`` / ``.double()`` share again, a broken sharing
falls back to stacking). A step that updates the codebooks gives the op a snapshot (its
backward recomputes the residuals from the codebooks it was given); a frozen or evaluation
call gives it the shared tensor itself."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv
import fastvae.models.residual_vq as rvq_module

vqp = pytest.importorskip("vector_quantize_pytorch")

BASE = dict(dim=8, num_quantizers=3, codebook_size=16)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_shared(rvq):
    codebooks = rvq.codebooks
    assert codebooks is rvq.codebooks  # the same tensor, not a new stack
    assert codebooks.shape == (3, 16, 8)
    for level, layer in enumerate(rvq.layers):
        embed = layer._codebook.embed
        assert embed.data_ptr() == codebooks[level].data_ptr()
        assert embed.dtype == codebooks.dtype
        assert embed.device == codebooks.device


def _spy(monkeypatch):
    """The codebooks tensor of every residual_vector_quantize call of the module."""
    seen = []
    op = rvq_module.residual_vector_quantize

    def spy(x, codebooks, **kwargs):
        seen.append(codebooks)
        return op(x, codebooks, **kwargs)

    monkeypatch.setattr(rvq_module, "residual_vector_quantize", spy)
    return seen


def test_levels_are_views_of_one_tensor_and_state_dict_is_unchanged():
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(**BASE)
    torch.manual_seed(0)
    ours = fv.ResidualVQ(**BASE)
    _assert_shared(ours)
    a, b = theirs.state_dict(), ours.state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(1)
    other = vqp.ResidualVQ(**BASE)
    ours.load_state_dict(other.state_dict())  # copies into the views
    _assert_shared(ours)
    assert torch.equal(ours.codebooks, other.codebooks)
    fresh = vqp.ResidualVQ(**BASE)
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh.codebooks, other.codebooks)


def test_to_and_assign_share_again_and_a_broken_sharing_stacks():
    ours = fv.ResidualVQ(**BASE)
    before = ours.codebooks.clone()
    ours.double()
    _assert_shared(ours)
    assert ours.codebooks.dtype == torch.float64
    assert torch.equal(ours.codebooks, before.double())
    ours.float()
    _assert_shared(ours)
    state = {k: v.clone() + 1 if k.endswith(".embed") else v.clone()
             for k, v in ours.state_dict().items()}
    ours.load_state_dict(state, assign=True)  # replaces the buffers: shared again after load
    _assert_shared(ours)
    assert torch.equal(ours.codebooks, before + 1)
    # a buffer replaced by hand: codebooks stacks the levels (the right values, a new tensor)
    ours.layers[1]._codebook.embed = torch.zeros(1, 16, 8)
    stacked = ours.codebooks
    assert stacked is not ours.codebooks
    assert torch.equal(stacked[1], torch.zeros(16, 8))
    assert torch.equal(stacked[0], before[0] + 1)
    assert torch.equal(stacked[2], before[2] + 1)


def test_shared_codebook_is_the_one_codebook_over_every_level():
    ours = fv.ResidualVQ(**BASE, shared_codebook=True)
    codebooks = ours.codebooks
    embed = ours.layers[0]._codebook.embed
    assert codebooks.shape == (3, 16, 8)
    assert codebooks.stride(0) == 0
    assert codebooks.data_ptr() == embed.data_ptr()


@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_eval_and_frozen_calls_give_the_op_the_codebooks_without_a_copy(monkeypatch, mode):
    ours = fv.ResidualVQ(**BASE)
    seen = _spy(monkeypatch)
    x = _x(2, 20, 8).requires_grad_()
    if mode == "eval":
        ours.eval()
        ours(x)
    else:
        q, _, _ = ours(x, freeze_codebook=True)
        q.sum().backward()
    assert seen[0].data_ptr() == ours.codebooks.data_ptr()


@pytest.mark.parametrize("kwargs", [dict(), dict(threshold_ema_dead_code=2),
                                    dict(shared_codebook=True)],
                         ids=["ema", "restarts", "shared"])
def test_updating_steps_snapshot_the_codebooks_and_give_the_package_gradients(monkeypatch,
                                                                             kwargs):
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(**BASE, rotation_trick=False, **kwargs)
    torch.manual_seed(0)
    ours = fv.ResidualVQ(**BASE, rotation_trick=False, **kwargs)
    seen = _spy(monkeypatch)
    for step in range(3):
        x = _x(2, 30, 8, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        before = ours.codebooks.clone()
        outs = []
        for vq, xi in ((theirs, xa), (ours, xb)):
            torch.manual_seed(10 + step)
            outs.append(vq(xi))
        (qa, ia, la), (qb, ib, lb) = outs
        assert torch.equal(ia, ib)
        assert not torch.equal(ours.codebooks, before)  # the step updated the codebooks
        assert seen[-1].data_ptr() != ours.codebooks.data_ptr()  # the op got a snapshot
        assert torch.equal(seen[-1], before)
        g = _x(2, 30, 8, seed=100 + step)
        ((qa * g).sum() + la.sum()).backward()  # after the update: the saved codebooks
        ((qb * g).sum() + lb.sum()).backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.codebooks, theirs.codebooks, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(decay=0.8), dict(decay=0.8, dead_code_threshold=2.0),
                                    dict(decay=None, dead_code_threshold=2.0)],
                         ids=["ema", "restarts", "learned_restarts"])
def test_native_updating_steps_give_the_gradients_of_the_step_codebooks(monkeypatch, kwargs):
    # fv.ResidualVectorQuantizer's update writes into its codebooks after the op saved them:
    # the op gets a snapshot, and the gradients (taken after the update) are those of the
    # functional op on the codebooks of the step
    torch.manual_seed(0)
    module = fv.ResidualVectorQuantizer(8, 16, 3, **kwargs)
    seen = _spy(monkeypatch)
    for step in range(2):
        x = _x(60, 8, seed=step).requires_grad_()
        before = module.codebooks.detach().clone()
        out = module(x)
        assert not torch.equal(module.codebooks.detach(), before)
        assert torch.equal(seen[-1].detach(), before)
        g = _x(60, 8, seed=100 + step)
        ((out.quantized * g).sum() + out.loss).backward()
        x2, cb = x.detach().clone().requires_grad_(), before.clone().requires_grad_()
        ref = fv.residual_vector_quantize(x2, cb, beta=module.commitment_weight)
        loss = ref.commitment_loss.sum() if module.ema else ref.loss
        ((ref.quantized * g).sum() + loss).backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-7)
        if not module.ema:
            torch.testing.assert_close(module.codebooks.grad, cb.grad, rtol=1e-6, atol=1e-7)
            module.codebooks.grad = None


def test_native_eval_gives_the_op_the_codebooks_without_a_copy(monkeypatch):
    module = fv.ResidualVectorQuantizer(8, 16, 3).eval()
    seen = _spy(monkeypatch)
    module(_x(10, 8))
    assert seen[0] is module.codebooks
