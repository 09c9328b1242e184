"""Data read without guesses: the pixel range by a documented default per kind of data or by
``pixel_max`` (never the dtype's width), bool images as {0, 1}, flat arrays by an explicit
``shape``, an ``.npz`` of several arrays by ``key``; the same rules for the loaders, the command
line and ``fv.train``'s data arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastvae.cli import main
from fastvae.training import data
from fastvae.training.data import DataError
from fastvae.training.trainer import TrainConfig, train

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, size=(12, 5, 6))  # 8-bit values, int64
PIXELS[0, 0, 0] = 255
WIDE_INTS = ["int8", "int16", "int32", "int64", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("dtype", WIDE_INTS)
def test_integer_pixels_other_than_uint8_need_pixel_max(dtype):
    """The type's width says nothing of the range: 0..255 held in any integer type other than
    uint8 is refused without pixel_max, and read exactly like uint8 with pixel_max=255."""
    values = PIXELS % 128 if dtype == "int8" else PIXELS
    array = values.astype(dtype)
    with pytest.raises(DataError, match=rf"src: {dtype} pixels .* --pixel-max"):
        data.to_images(array, "src")
    top = 127 if dtype == "int8" else 255
    got = data.to_images(array, "src", pixel_max=top)
    want = torch.from_numpy(values.astype(np.float32) / np.float32(top)).unsqueeze(1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert float(got.max()) == 1.0


@pytest.mark.parametrize(("array", "pixel_max"), [
    (PIXELS.astype(np.uint8), 100),        # uint8 values above the declared maximum
    (PIXELS.astype(np.uint16) * 4, 1000),  # 10-bit declared, 0..1020 held
    (PIXELS.astype(np.int32) - 1, 255),    # a negative value
    (PIXELS / 255.0 * 2, None),            # floats above 1 without pixel_max
    (PIXELS / 1.0, 200),                   # floats above the declared maximum
])
def test_values_beyond_the_declared_range_are_refused(array, pixel_max):
    with pytest.raises(DataError, match=r"src: .*pixel values must lie in \[0, "):
        data.to_images(array, "src", pixel_max=pixel_max)


def test_float_pixels_scaled_by_pixel_max_and_uint8_by_255():
    torch.testing.assert_close(data.to_images(PIXELS.astype(np.float64), "s", pixel_max=255),
                               data.to_images(PIXELS.astype(np.uint8), "s"), rtol=0, atol=0)
    halves = np.full((3, 2, 2), 0.5, np.float32)
    assert torch.equal(data.to_images(halves, "s"), torch.full((3, 1, 2, 2), 0.5))


def test_bool_images_are_zero_and_one():
    mask = PIXELS > 127
    got = data.to_images(mask, "src")
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(mask).float().unsqueeze(1))


@pytest.mark.parametrize(("width", "considered"), [
    (784, ["--shape 1,28,28", "--shape 1,1,784"]),
    (3072, ["--shape 3,32,32", "--shape 1,1,3072"]),
    (64, ["--shape 1,8,8", "--shape 1,1,64"]),
    (30, ["--shape 1,1,30"]),
])
def test_flat_arrays_need_a_shape(width, considered):
    """(n, D) rows are not silently taken as 1x1xD images: the error lists the shapes
    considered, and ``shape`` reads each row row-major."""
    flat = RNG.random((4, width)).astype(np.float32)
    with pytest.raises(DataError) as info:
        data.to_images(flat, "src")
    message = str(info.value)
    assert f"(4, {width})" in message
    for option in considered:
        assert option in message
    shape = tuple(int(v) for v in considered[0].split()[1].split(","))
    got = data.to_images(flat, "src", shape=shape)
    assert got.shape == (4, *shape)
    assert torch.equal(got.flatten(1), torch.from_numpy(flat))


@pytest.mark.parametrize(("shape", "want"), [
    ((5, 3, 7, 6), (3, 7, 6)),     # channels-first
    ((5, 1, 6, 6), (1, 6, 6)),
    ((5, 7, 6, 3), (3, 7, 6)),     # channels-last
    ((5, 32, 32, 4), (4, 32, 32)),  # RGBA, channels-last
    ((5, 9, 9, 2), (2, 9, 9)),
])
def test_the_channel_axis_is_the_small_one(shape, want):
    array = RNG.random(shape).astype(np.float32)
    got = data.to_images(array, "src")
    assert got.shape == (5, *want)
    if shape[1:] != want:
        assert torch.equal(got, torch.from_numpy(array).permute(0, 3, 1, 2))


@pytest.mark.parametrize("shape", [(5, 3, 8, 3), (5, 16, 16, 16), (5, 1, 6, 4)])
def test_an_unknown_channel_axis_is_refused(shape):
    """Both candidate axes small, or neither: no guess; shape=(...) reads it channels-first."""
    array = RNG.random(shape).astype(np.float32)
    _, a, b, c = shape
    with pytest.raises(DataError, match=rf"channel axis .*--shape {a},{b},{c}"):
        data.to_images(array, "src")
    assert data.to_images(array, "src", shape=(a, b, c)).shape == shape


def test_a_shape_of_another_size_is_refused():
    with pytest.raises(DataError, match=r"784 values.*1,28,27"):
        data.to_images(np.zeros((3, 784)), "src", shape=(1, 28, 27))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("names", [("x", "y"), ("images", "labels", "extra"),
                                   ("x_train", "y_train", "x_test")])
def test_npz_of_several_arrays_needs_a_key(tmp_path, names):
    arrays = {name: RNG.integers(0, 256, size=(5 + i, 4, 3)).astype(np.uint8)
              for i, name in enumerate(names)}
    path = _npz(tmp_path / "many.npz", **arrays)
    with pytest.raises(DataError) as info:
        data.load(path)
    message = str(info.value)
    assert "--key" in message
    for i, name in enumerate(names):
        assert f"{name} ({5 + i}, 4, 3)" in message
    for name, array in arrays.items():
        images, _ = data.load(path, key=name)
        assert torch.equal(images, torch.from_numpy(array / np.float32(255)).float()[:, None])
    with pytest.raises(DataError, match=r"no array 'nope'.*" + names[0]):
        data.load(path, key="nope")


def test_npz_of_one_array_is_read_without_a_key(tmp_path):
    array = RNG.integers(0, 256, size=(6, 4, 3)).astype(np.uint8)
    images, name = data.load(_npz(tmp_path / "one.npz", pictures=array))
    assert name == "one"
    assert images.shape == (6, 1, 4, 3)


def test_digits_take_no_file_options():
    with pytest.raises(DataError, match="pixel_max"):
        data.load("digits", pixel_max=255)


# --- the command line -------------------------------------------------------------------------


def _train(tmp_path, *argv):
    return main(["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2",
                 "--iwae-samples", "0", "--no-progress", "--no-images",
                 "--out", str(tmp_path / "run"), *argv])


@pytest.mark.parametrize("dtype", ["int64", "uint16", "int32"])
def test_cli_integer_pixels(tmp_path, capsys, dtype):
    path = _npz(tmp_path / "ints.npz", x=PIXELS.astype(dtype))
    assert _train(tmp_path, "--data", path) == 2
    assert "--pixel-max" in capsys.readouterr().err
    assert _train(tmp_path, "--data", path, "--pixel-max", "100") == 2
    assert "[0, 100]" in capsys.readouterr().err
    assert _train(tmp_path, "--data", path, "--pixel-max", "255") == 0


def test_cli_flat_arrays_and_keys(tmp_path, capsys):
    path = _npz(tmp_path / "flat.npz", x=RNG.random((12, 30)).astype(np.float32),
                y=np.arange(12), z=RNG.random((12, 2)))
    assert _train(tmp_path, "--data", path) == 2
    err = capsys.readouterr().err
    assert "3 arrays" in err
    assert "x (12, 30) float32" in err
    assert "y (12,)" in err
    assert _train(tmp_path, "--data", path, "--key", "x") == 2
    assert "--shape 1,1,30" in capsys.readouterr().err
    assert _train(tmp_path, "--data", path, "--key", "x", "--shape", "2,3,5") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model_config"]["input_shape"] == [2, 3, 5]
    assert _train(tmp_path, "--data", path, "--key", "x", "--shape", "6,5") == 2
    assert "--shape" in capsys.readouterr().err


# --- fv.train's data arguments ----------------------------------------------------------------

CONFIG = {"input_shape": [1, 5, 6], "latent_dim": 2, "hidden": [8]}
QUICK = TrainConfig(epochs=1, batch_size=8, iwae_samples=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.int32])
def test_train_refuses_integer_tensors_of_unknown_range(dtype):
    x = torch.from_numpy(PIXELS).to(dtype).unsqueeze(1)
    with pytest.raises(DataError, match=r"train_data: .*pixel_max"):
        train(CONFIG, x[:8], x[8:], QUICK, progress=False)


def test_train_scales_uint8_and_bool_tensors():
    x = torch.from_numpy(PIXELS.astype(np.uint8)).unsqueeze(1)
    a = train(CONFIG, x[:8], x[8:], QUICK, progress=False)
    b = train(CONFIG, x[:8].float() / 255, x[8:].float() / 255, QUICK, progress=False)
    assert a.history[0].val_elbo == b.history[0].val_elbo
    mask = x > 127
    c = train(CONFIG, mask[:8].numpy(), mask[8:].numpy(), QUICK, progress=False)
    d = train(CONFIG, mask[:8].float(), mask[8:].float(), QUICK, progress=False)
    assert c.history[0].val_elbo == d.history[0].val_elbo


@pytest.mark.parametrize("shape", [(30,), (1, 30), (5, 6), (1, 6, 5)])
def test_train_refuses_images_of_another_shape(shape):
    x = torch.rand(12, *shape)
    with pytest.raises(DataError, match=r"train_data: images of shape .* input_shape \(1, 5, 6\)"):
        train(CONFIG, x[:8], x[8:], QUICK, progress=False)
