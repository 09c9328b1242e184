"""A folder of image files as a data set: every image below it in sorted order, grey or RGB,
resized and centre-cropped on request, unreadable files listed (or refused with ``strict``),
never dropped silently; the loader in Python and ``fastvae train --data DIR``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.cli import main
from fastvae.training import data
from fastvae.training.data import DataError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (16, 16), dtype=np.uint16)
PALETTE_INDEX = RNG.integers(0, 4, (16, 16), dtype=np.uint8)
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]], np.uint8)
JPEG_RGB = (200, 60, 30)
JPEG_GREY = 90

# In the order the loader reads them (sorted relative paths), with what each must become.
GOOD = ["a/c.png", "a/d.jpg", "b.png", "grey16.png", "palette.png", "rgba.png", "z.JPEG"]
BROKEN = {"broken/truncated.jpg": "", "broken/truncated.png": "truncated",
          "empty.jpg": "empty file", "not_image.png": "not an image"}


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def make_folder(root):
    (root / "a").mkdir(parents=True)
    (root / "broken").mkdir()
    Image.fromarray(GREY).save(root / "a" / "c.png")
    Image.new("RGB", (16, 16), JPEG_RGB).save(root / "a" / "d.jpg", quality=95)
    Image.fromarray(RGB).save(root / "b.png")
    Image.fromarray(GREY16).save(root / "grey16.png")
    palette = Image.fromarray(PALETTE_INDEX, mode="P")
    palette.putpalette(PALETTE.flatten().tolist())
    palette.save(root / "palette.png", transparency=0)
    Image.fromarray(RGBA).save(root / "rgba.png")
    Image.new("L", (16, 16), JPEG_GREY).save(root / "z.JPEG", "JPEG", quality=95)
    jpeg = _encoded(Image.fromarray(RGB), "JPEG")
    png = _encoded(Image.fromarray(RGB), "PNG")
    (root / "broken" / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (root / "broken" / "truncated.png").write_bytes(png[:len(png) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "not_image.png").write_text("this is not a picture")
    (root / "labels.txt").write_text("not an image file")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


def _expected_rgb() -> list[np.ndarray]:
    """What each good file is in RGB, (3, 16, 16); None where JPEG makes it approximate."""
    grey16 = np.round(GREY16 / 257.0).astype(np.uint8)
    return [np.stack([GREY] * 3), None, RGB.transpose(2, 0, 1), np.stack([grey16] * 3),
            PALETTE[PALETTE_INDEX].transpose(2, 0, 1), RGBA[..., :3].transpose(2, 0, 1), None]


def test_rgb_values_order_and_the_skipped_files(folder):
    got = data.load_image_folder(folder, channels=3)
    assert got.files == GOOD
    assert [name for name, _ in got.skipped] == list(BROKEN)
    for (name, reason), (want_name, words) in zip(got.skipped, BROKEN.items(), strict=True):
        assert name == want_name
        assert words in reason, (name, reason)
    assert got.ignored == ["labels.txt"]
    assert got.images.dtype == np.uint8
    assert got.images.shape == (7, 3, 16, 16)
    for i, want in enumerate(_expected_rgb()):
        if want is not None:
            np.testing.assert_array_equal(got.images[i], want, err_msg=GOOD[i])
    jpeg = got.images[GOOD.index("a/d.jpg")].astype(int)
    assert np.abs(jpeg - np.array(JPEG_RGB)[:, None, None]).max() <= 4
    assert np.abs(got.images[GOOD.index("z.JPEG")].astype(int) - JPEG_GREY).max() <= 2


def test_grey_is_pillows_luma(folder):
    got = data.load_image_folder(folder, channels=1)
    assert got.images.shape == (7, 1, 16, 16)
    np.testing.assert_array_equal(got.images[GOOD.index("a/c.png"), 0], GREY)
    luma = np.asarray(Image.fromarray(RGB).convert("L"))
    np.testing.assert_array_equal(got.images[GOOD.index("b.png"), 0], luma)
    # R, G, B of the luma weights 0.299, 0.587, 0.114 (ITU-R 601), to the rounding
    weights = RGB.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(got.images[GOOD.index("b.png"), 0] - weights).max() <= 1


def test_threads_change_nothing(folder):
    one = data.load_image_folder(folder, channels=3, workers=1)
    many = data.load_image_folder(folder, channels=3, workers=4)
    np.testing.assert_array_equal(one.images, many.images)
    assert (one.files, one.skipped) == (many.files, many.skipped)


def test_strict_names_every_unreadable_file(folder):
    with pytest.raises(DataError, match="4 image files cannot be read") as e:
        data.load_image_folder(folder, strict=True)
    for name in BROKEN:
        assert name in str(e.value)


def test_resize_the_short_side_and_crop_the_centre(tmp_path):
    wide = RNG.integers(0, 256, (8, 16, 3), dtype=np.uint8)  # 16 wide, 8 high
    tall = RNG.integers(0, 256, (3, 2, 3), dtype=np.uint8)  # 2 wide, 3 high: enlarged
    Image.fromarray(wide).save(tmp_path / "0_wide.png")
    Image.fromarray(tall).save(tmp_path / "1_tall.png")
    Image.fromarray(RGB[:4, :4]).save(tmp_path / "2_square.png")
    got = data.load_image_folder(tmp_path, image_size=4)
    assert got.images.shape == (3, 3, 4, 4)
    bicubic = Image.Resampling.BICUBIC
    want_wide = Image.fromarray(wide).resize((8, 4), bicubic).crop((2, 0, 6, 4))
    want_tall = Image.fromarray(tall).resize((4, 6), bicubic).crop((0, 1, 4, 5))
    np.testing.assert_array_equal(got.images[0], np.asarray(want_wide).transpose(2, 0, 1))
    np.testing.assert_array_equal(got.images[1], np.asarray(want_tall).transpose(2, 0, 1))
    np.testing.assert_array_equal(got.images[2], RGB[:4, :4].transpose(2, 0, 1))  # as it is
    # a constant image stays constant whatever its size
    Image.new("RGB", (13, 7), (7, 77, 177)).save(tmp_path / "3_constant.png")
    constant = data.load_image_folder(tmp_path, image_size=5).images[3]
    np.testing.assert_array_equal(constant, np.array([7, 77, 177], np.uint8)[:, None, None]
                                  .repeat(5, 1).repeat(5, 2))
    # without image_size, images of several sizes are refused with the sizes found
    with pytest.raises(DataError, match=r"4 sizes .*16x8 \(1 file, e\.g\. 0_wide\.png\).*"
                                        r"--image-size"):
        data.load_image_folder(tmp_path)


def test_bad_folders_and_options(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        data.load_image_folder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no image files.*notes\.txt"):
        data.load_image_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"none of its 1 image files can be read: bad\.png"):
        data.load_image_folder(tmp_path)
    for channels in (2, 4, True):
        with pytest.raises(DataError, match="channels must be 1"):
            data.load_image_folder(tmp_path, channels=channels)
    for size in (0, 2.5, True):
        with pytest.raises(DataError, match="image_size must be an integer"):
            data.load_image_folder(tmp_path, image_size=size)


def test_data_load_reads_a_folder_and_warns_of_skipped_files(folder):
    with pytest.warns(UserWarning, match=r"skipped 4 image files .*empty\.jpg \(empty file"):
        images, name = data.load(str(folder), channels=3)
    want = data.load_image_folder(folder).images
    assert name == folder.name
    torch.testing.assert_close(images, torch.from_numpy(want).float() / 255, rtol=0, atol=0)
    with pytest.raises(DataError, match="key apply to array files only"):
        data.load(str(folder), key="x")
    with pytest.raises(DataError, match="image_size apply to folders"):
        data.load(str(folder / "b.png"), image_size=4)


def test_cli_trains_on_a_folder_and_eval_reads_it_again(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--channels", "1", "--image-size", "8",
                 "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--iwae-samples", "5",
                 "--no-progress", "--no-images", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "6 train / 1 validation images of shape (1, 8, 8)" in captured.out
    warning = captured.err.strip()
    assert warning.startswith("fastvae train: warning:")
    assert "skipped 4 image files" in warning
    for name in BROKEN:
        assert name in warning
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] | {"source": None} == {
        "source": None, "key": None, "pixel_max": None, "shape": None, "channels": 1,
        "image_size": 8, "strict": False, "val_fraction": 0.1, "split_seed": 0}
    assert metrics["data"]["source"] == str(folder.resolve())
    # fastvae eval reads the same folder the same way: the same validation image, same numbers
    assert main(["eval", str(out / "checkpoint.safetensors"), "--iwae-samples", "5",
                 "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    for key in ("elbo", "iwae_log_likelihood", "active_units"):
        assert got[key] == metrics["final"][key]
    # --data DIR: a folder is read with the model's channels (1 here) unless --channels says
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.safetensors"), "--data", str(folder),
                 "--image-size", "8", "--iwae-samples", "0", "--no-progress", "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["images"] == 7
    assert "skipped 4 image files" in captured.err
    # --strict: the same folder is refused, naming the files
    assert main(["train", "--data", str(folder), "--strict", "--image-size", "8", "--epochs",
                 "1", "--no-progress", "--out", str(tmp_path / "strict")]) == 2
    assert "not_image.png" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()
