"""Faults of a kind across every quantizer: empty inputs (never a crash), the opt-in data checks
(non-finite inputs, indices out of range), constructor arguments that only fail later."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import vector_quantize_pytorch as vqp

import fastvae as fv


@pytest.fixture
def validation():
    fv.set_validation(True)
    try:
        yield
    finally:
        fv.set_validation(False)


DROPINS = {
    "fsq": lambda: fv.FSQ(levels=[8, 5, 5, 5]),
    "fsq_projected": lambda: fv.FSQ(levels=[8, 5, 5, 5], dim=6),
    "lfq": lambda: fv.LFQ(dim=4, codebook_size=16),
    "rvq": lambda: fv.ResidualVQ(dim=4, num_quantizers=2, codebook_size=8),
    "vq": lambda: fv.VectorQuantize(dim=4, codebook_size=8),
}


@pytest.mark.parametrize("name", DROPINS)
@pytest.mark.parametrize("shape", [(2, 0), (0, 10)])
@pytest.mark.parametrize("training", [False, True])
def test_dropins_take_empty_sequences(name, shape, training):
    module = DROPINS[name]().train(training)
    dim = module.dim if hasattr(module, "dim") else 4
    out = module(torch.randn(*shape, dim))
    assert out[0].shape == (*shape, dim)
    assert out[1].shape[:2] == shape


@pytest.mark.parametrize("name", ["fsq", "lfq", "rvq_image", "vq_image"])
def test_dropins_take_an_empty_batch_of_images(name):
    module = {"fsq": lambda: fv.FSQ(levels=[8, 5, 5, 5]),
              "lfq": lambda: fv.LFQ(dim=4, codebook_size=16),
              "rvq_image": lambda: fv.ResidualVQ(dim=4, num_quantizers=2, codebook_size=8,
                                                 accept_image_fmap=True),
              "vq_image": lambda: fv.VectorQuantize(dim=4, codebook_size=8,
                                                    accept_image_fmap=True)}[name]().eval()
    out, indices = module(torch.randn(0, 4, 5, 6))[:2]
    assert out.shape == (0, 4, 5, 6)
    assert indices.shape[:3] == (0, 5, 6)


def test_fsq_empty_matches_the_package():
    ours, theirs = fv.FSQ(levels=[8, 5, 5, 5]), vqp.FSQ(levels=[8, 5, 5, 5])
    for shape in [(2, 0, 4), (0, 10, 4)]:
        a, b = ours(torch.randn(shape)), theirs(torch.randn(shape))
        assert [t.shape for t in a] == [t.shape for t in b]
        assert a[1].dtype == b[1].dtype


def test_fsq_minus_one_round_trips_to_nan():
    module = fv.FSQ(levels=[8, 5, 5, 5])
    z = torch.randn(1, 3, 4)
    z[0, 1, 2] = math.nan
    codes, indices = module(z)
    assert indices[0, 1] == -1
    back = module.indices_to_codes(indices)
    assert torch.isnan(back[0, 1]).all()
    assert torch.equal(back[0, [0, 2]], codes[0, [0, 2]])
    assert torch.isnan(fv.fsq_indices_to_codes(torch.tensor([-1]), [8, 5])).all()


def test_fsq_levels_as_numpy_array():
    a = fv.FSQ(levels=np.array([8, 5, 5]))
    b = fv.FSQ(levels=[8, 5, 5])
    z = torch.randn(2, 7, 3)
    assert all(torch.equal(x, y) for x, y in zip(a(z), b(z), strict=True))
    assert torch.equal(fv.finite_scalar_quantize(z, np.array([8, 5, 5])).indices,
                       fv.finite_scalar_quantize(z, [8, 5, 5]).indices)
    with pytest.raises(TypeError, match="levels"):
        fv.FSQ(levels=np.array([8.0, 5.0]))


def test_rvq_cutoff_index_beyond_the_levels_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"quantize_dropout_cutoff_index.*num_quantizers = 3"):
        fv.ResidualVQ(dim=8, num_quantizers=3, codebook_size=4, quantize_dropout=True,
                      quantize_dropout_cutoff_index=3)
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index"):
        fv.ResidualVectorQuantizer(8, 4, 3, quantize_dropout=True,
                                   quantize_dropout_cutoff_index=3)


# the opt-in data checks: refused with validation on, the documented behaviour without


def test_out_of_range_indices_wrap_without_validation():
    codes = fv.fsq_indices_to_codes(torch.tensor([40 + 3]), [8, 5])
    assert torch.equal(codes, fv.fsq_indices_to_codes(torch.tensor([3]), [8, 5]))


INDEX_CASES = {
    "fsq_function": lambda i: fv.fsq_indices_to_codes(i, [8, 5]),
    "fsq_dropin": lambda i: fv.FSQ(levels=[8, 5]).indices_to_codes(i),
    "fsq_native": lambda i: fv.FiniteScalarQuantizer(2, [8, 5]).get_codes_from_indices(i),
    "lfq_dropin": lambda i: fv.LFQ(dim=4, codebook_size=16).indices_to_codes(i),
    "lfq_native": lambda i: fv.LookupFreeQuantizer(4).get_codes_from_indices(i),
    "vq_native": lambda i: fv.VectorQuantizer(4, 40).get_codes_from_indices(i),
    "vq_dropin": lambda i: fv.VectorQuantize(dim=4, codebook_size=40).get_codes_from_indices(i),
    "rvq_native": lambda i: fv.ResidualVectorQuantizer(4, 40, 2).get_codes_from_indices(
        torch.stack([i, i], -1)),
    "rvq_dropin": lambda i: fv.ResidualVQ(dim=4, num_quantizers=2, codebook_size=40)
    .get_output_from_indices(torch.stack([i, i], -1)[None]),
}
TOO_BIG = {"lfq_dropin": 16, "lfq_native": 16}


@pytest.mark.parametrize("case", INDEX_CASES)
@pytest.mark.usefixtures("validation")
def test_indices_out_of_range_are_refused_with_validation(case):
    top = TOO_BIG.get(case, 40)
    INDEX_CASES[case](torch.tensor([0, top - 1]))  # the ends are codes
    for bad in (top, -2):
        with pytest.raises(ValueError, match="indices must be in"):
            INDEX_CASES[case](torch.tensor([0, bad]))


@pytest.mark.usefixtures("validation")
def test_rvq_levels_per_vector_are_checked_with_validation():
    x, codebooks = torch.randn(2, 4), torch.randn(3, 5, 4)
    fv.residual_vector_quantize(x, codebooks, n_levels=torch.tensor([3, 0]))
    for bad in ([4, 1], [1, -1]):
        with pytest.raises(ValueError, match=r"n_levels must be in \[0, 3\]"):
            fv.residual_vector_quantize(x, codebooks, n_levels=torch.tensor(bad))


def test_rvq_levels_per_vector_saturate_without_validation():
    x, codebooks = torch.randn(2, 4), torch.randn(3, 5, 4)
    wild = fv.residual_vector_quantize(x, codebooks, n_levels=torch.tensor([5, -3])).indices
    clipped = fv.residual_vector_quantize(x, codebooks, n_levels=torch.tensor([3, 0])).indices
    assert torch.equal(wild, clipped)


NONFINITE = {
    "nearest_code": lambda x: fv.nearest_code(x, torch.randn(5, 4)),
    "vector_quantize": lambda x: fv.vector_quantize(x, torch.randn(5, 4)),
    "residual_vector_quantize": lambda x: fv.residual_vector_quantize(x, torch.randn(2, 5, 4)),
    "finite_scalar_quantize": lambda x: fv.finite_scalar_quantize(x, [8, 5, 5, 5]),
    "lfq_entropy": lambda x: fv.lfq_entropy(x),
    "lookup_free_quantize": lambda x: fv.lookup_free_quantize(x),
}


@pytest.mark.parametrize("fn", NONFINITE)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_quantizers_refuse_nonfinite_inputs_with_validation(fn, value):
    x = torch.randn(3, 4)
    NONFINITE[fn](x)  # without validation: an answer (the documented convention)
    x[1, 2] = value
    NONFINITE[fn](x)
    fv.set_validation(True)
    try:
        NONFINITE[fn](torch.randn(3, 4))
        with pytest.raises(ValueError, match="non-finite"):
            NONFINITE[fn](x)
    finally:
        fv.set_validation(False)
