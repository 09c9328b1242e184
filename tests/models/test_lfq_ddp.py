"""Two ranks (torchrun, gloo), each with its half of every batch: LFQ's loss and gradients are
those of one process on the whole batch. The batch-average distribution's code sums are
all-reduced with a differentiable all-reduce, so the codebook entropy is the global one on
every rank (bit for bit), the mean over ranks of the rank losses is the single-process loss,
and DDP's averaged gradients (here: each rank's input gradient / world size, the parameter
gradients averaged) are the single-process gradients, to float rounding."""

from __future__ import annotations

import pytest
import torch
from helpers import run_ranks

import fastvae as fv

PER_RANK, WORLD = 12, 2
KINDS = ("functional", "clamped", "dropin", "native")


def batch(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(kind))
    dim = 8 if kind == "dropin" else 6
    return torch.randn(WORLD * PER_RANK, dim, generator=g) * 0.1


def run(kind: str, rank: int | None) -> dict:
    """The loss, its breakdown and gradients on rank ``rank``'s half (None: the whole batch)."""
    torch.manual_seed(0)
    x = batch(kind)
    if rank is not None:
        x = x[rank * PER_RANK:(rank + 1) * PER_RANK]
    x = x.clone().requires_grad_(True)
    params: list[torch.Tensor] = []
    extra: dict = {}
    if kind in ("functional", "clamped"):
        out = fv.lookup_free_quantize(x, num_codebooks=2, inv_temperature=20.0,
                                      eps=1e-5 if kind == "clamped" else 0.0)
        loss = out.loss + out.quantized.square().mean()
        extra = dict(codebook_entropy=out.codebook_entropy.detach(),
                     per_sample_entropy=out.per_sample_entropy.detach())
    elif kind == "dropin":
        lfq = fv.LFQ(dim=8, codebook_size=2 ** 3, num_codebooks=2, commitment_loss_weight=0.25)
        params = list(lfq.parameters())
        (q, _, aux), breakdown = lfq(x[None], inv_temperature=20.0, return_loss_breakdown=True)
        loss = aux + q.square().mean()
        extra = dict(codebook_entropy=breakdown.batch_entropy.detach())
    else:
        module = fv.LookupFreeQuantizer(6, num_codebooks=2, inv_temperature=20.0)
        out = module(x)
        loss = out.loss
        extra = dict(codebook_loss=out.codebook_loss.detach(),
                     last_used=module.last_used.clone(), usage_ema=module.usage_ema.clone())
    grads = torch.autograd.grad(loss, [x, *params])
    return dict(loss=loss.detach(), x_grad=grads[0], param_grads=list(grads[1:]), **extra)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_loss_and_gradients(tmp_path):
    ranks = run_ranks(tmp_path, __file__, WORLD)
    tol = dict(rtol=1e-5, atol=1e-6)
    for kind in KINDS:
        single = run(kind, None)
        r0, r1 = ranks[0][kind], ranks[1][kind]
        # the global batch entropy on every rank, bit for bit
        for key in ("codebook_entropy", "last_used", "usage_ema"):
            if key in single:
                assert torch.equal(r0[key], r1[key]), (kind, key)
                torch.testing.assert_close(r0[key], single[key], **tol, msg=f"{kind} {key}")
        loss = (r0["loss"] + r1["loss"]) / WORLD
        torch.testing.assert_close(loss, single["loss"], **tol, msg=kind)
        x_grad = torch.cat([r0["x_grad"], r1["x_grad"]]) / WORLD
        torch.testing.assert_close(x_grad, single["x_grad"], **tol, msg=kind)
        for a, b, s in zip(r0["param_grads"], r1["param_grads"], single["param_grads"],
                           strict=True):
            torch.testing.assert_close((a + b) / WORLD, s, **tol, msg=kind)
        if kind == "native":  # the usage of both ranks' rows
            assert int((single["last_used"] == 0).sum()) > 0
        # the check has teeth: the local entropy alone differs from the global one
        if kind == "functional":
            alone = fv.lfq_entropy(batch(kind)[:PER_RANK], num_codebooks=2,
                                   inv_temperature=20.0).codebook_entropy
            assert not torch.allclose(alone, single["codebook_entropy"], rtol=1e-3)
