"""Two ranks (torchrun, gloo) train fv.ResidualVectorQuantizer and fv.ResidualVQ with k-means
initialization and dead-code restarts, each on its half of every batch: after several steps
both ranks hold the same codebooks (bit for bit), equal to one process on the whole batches
(to float rounding: the all-reduce adds two partial sums), with the same indices."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_ranks_hold_the_single_process_state, run_ranks

import fastvae as fv

STEPS, PER_RANK, DIM, K, L = 4, 24, 4, 16, 3


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(2 * PER_RANK, DIM, generator=g)


KINDS = ("native", "dropin")


def build(kind: str) -> torch.nn.Module:
    if kind == "native":
        return fv.ResidualVectorQuantizer(DIM, K, L, decay=0.8, kmeans_init=True,
                                          kmeans_iters=3, dead_code_threshold=1.0)
    return fv.ResidualVQ(dim=DIM, num_quantizers=L, codebook_size=K, decay=0.8,
                         kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.0)


def run(kind: str, rank: int | None) -> tuple[dict, list[torch.Tensor]]:
    """Trains one quantizer for STEPS steps on rank ``rank``'s half of each batch (or the
    whole batch for None); returns its state and the indices of every step."""
    torch.manual_seed(0)
    rvq = build(kind)
    indices = []
    for step in range(STEPS):
        x = batch(step)
        if rank is not None:
            x = x[rank * PER_RANK:(rank + 1) * PER_RANK]
        out = rvq(x[None]) if kind == "dropin" else rvq(x)
        indices.append(out[1].reshape(-1, L))
    return rvq.state_dict(), indices


@pytest.mark.slow
def test_two_ranks_hold_the_single_process_codebooks(tmp_path):
    ranks = run_ranks(tmp_path, __file__)
    assert_ranks_hold_the_single_process_state(ranks, run, KINDS, STEPS)
    state = ranks[0]["native"][0]
    assert int(state["restarts"]) > 0  # the restarts were exercised
    assert int(state["steps"]) == STEPS
