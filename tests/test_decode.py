"""Decoding real-ImageNet oddities and the paper's centre crop (sdfeat.sources.decode, via sources.read_images too)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

import imagegen
from sdfeat.sources import plan_samples, read_images
from sdfeat.sources.decode import ImageDecodeError, center_crop_resize, decode_rgb, image_size


def test_exif_orientation_is_applied():
    pixels = np.asarray(decode_rgb(imagegen.exif_rotated_jpeg()))
    assert pixels.shape == (40, 20, 3)  # stored 40 wide x 20 high, displayed rotated
    assert np.abs(pixels[5, 10].astype(int) - (255, 0, 0)).max() <= 3  # red on top
    assert np.abs(pixels[35, 10].astype(int) - (0, 0, 255)).max() <= 3


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (imagegen.cmyk_jpeg((0, 255, 255, 0)), (255, 0, 0)),
        (imagegen.gray_jpeg(77), (77, 77, 77)),
        (imagegen.palette_png((10, 200, 30)), (10, 200, 30)),
        (imagegen.rgba_png((200, 100, 50, 128)), (200, 100, 50)),
        (imagegen.png16(40000), (156, 156, 156)),  # round(40000 / 65535 * 255); convert("L") would clip to 255
        (imagegen.png16(65535), (255, 255, 255)),
        (imagegen.png16(128), (0, 0, 0)),  # 128 / 257 rounds down
        (imagegen.png16(129), (1, 1, 1)),
    ],
    ids=["cmyk", "gray", "palette", "rgba", "16bit-mid", "16bit-max", "16bit-low", "16bit-low-up"],
)
def test_odd_modes_become_8bit_rgb(data: bytes, expected: tuple[int, int, int]):
    img = decode_rgb(data)
    assert img.mode == "RGB" and img.size == (40, 30)
    pixels = np.asarray(img).astype(int)
    assert np.abs(pixels - np.array(expected)).max() <= 2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (imagegen.truncated_jpeg(), "truncated"),
        (imagegen.corrupt_png(), "OSError"),
        (b"<html>not an image</html>", "not a recognised image"),
        (b"", "not a recognised image"),
        (imagegen.png_bomb(100_000, 100_000), "decompression bomb"),  # above PIL's error limit
        (imagegen.png_bomb(10_000, 10_000), "decompression bomb"),  # in PIL's warn-only band: no warning either
    ],
    ids=["truncated", "corrupt", "text", "empty", "bomb", "bomb-warn-band"],
)
def test_bad_bytes_raise_a_short_reason_and_no_warning(data: bytes, reason: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError) as info:
            decode_rgb(data)
    assert reason in str(info.value)
    assert len(str(info.value)) <= 120


def test_image_size_reads_the_header_only():
    header_only = imagegen.png_bomb(5_000, 4_000)  # 64 bytes of pixel data: decoding it would fail
    assert image_size(header_only) == (5_000, 4_000)
    with pytest.raises(ImageDecodeError):
        decode_rgb(header_only)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        image_size(imagegen.png_bomb())
    with pytest.raises(ImageDecodeError):
        image_size(b"nope")


def test_center_crop_uses_the_papers_box_on_odd_sizes():
    width, height = 9, 5  # s = 5, box = (4-2, 2-2, 4+2, 2+2) = (2, 0, 6, 4): 4 x 4, one pixel short of s
    columns = np.broadcast_to((np.arange(width) * 20)[None, :, None], (height, width, 3))
    rows = np.broadcast_to((np.arange(height) * 40)[:, None, None], (height, width, 3))
    pixels = (columns + rows).astype(np.uint8)
    out = center_crop_resize(Image.fromarray(pixels), 4)  # same size as the box: resize is the identity
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out, pixels[0:4, 2:6])


def test_center_crop_tall_image_and_default_filter():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)  # h=30, w=20: s=20, box (0, 5, 20, 25)
    out = center_crop_resize(Image.fromarray(pixels), 64)
    expected = np.asarray(Image.fromarray(pixels[5:25, 0:20]).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, expected)


def test_center_crop_converts_non_rgb_input():
    out = center_crop_resize(Image.new("L", (10, 6), 90), 8)
    assert out.shape == (8, 8, 3) and (out == 90).all()


def test_read_images_keeps_good_images_and_reports_bad_ones(tmp_path):
    odd = {
        "a_good.JPEG": imagegen.solid_jpeg(60, 40, (250, 10, 10)),
        "b_png_named_jpeg.JPEG": imagegen.palette_png((10, 200, 30), (30, 50)),
        "c_truncated.JPEG": imagegen.truncated_jpeg(),
        "d_text.JPEG": b"GIF89a? no",
        "e_bomb.JPEG": imagegen.png_bomb(),
        "f_cmyk.JPEG": imagegen.cmyk_jpeg((0, 255, 255, 0)),
    }
    folder = tmp_path / "n00000001"
    folder.mkdir()
    for name, data in odd.items():
        (folder / name).write_bytes(data)
    plan = plan_samples(str(tmp_path))
    assert [r.sample_id for r in plan.refs] == [f"n00000001/{name}" for name in sorted(odd)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = list(read_images(plan.refs, 16, threads=2))
    assert [r.index for r in results] == list(range(6))
    ok = {plan.refs[r.index].sample_id.split("/")[1]: r for r in results if r.pixels is not None}
    assert sorted(ok) == ["a_good.JPEG", "b_png_named_jpeg.JPEG", "f_cmyk.JPEG"]
    assert np.abs(ok["a_good.JPEG"].pixels.astype(int) - (250, 10, 10)).max() <= 3
    assert (ok["b_png_named_jpeg.JPEG"].pixels == (10, 200, 30)).all()
    assert np.abs(ok["f_cmyk.JPEG"].pixels.astype(int) - (255, 0, 0)).max() <= 3
    failed = [r for r in results if r.pixels is None]
    assert all(r.error for r in failed) and len(failed) == 3


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (3, 1), (1, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_images_with_a_one_pixel_side_give_their_own_pixels(size: tuple[int, int]):
    """The paper's box is empty for a 1 px short side; the middle pixel, resized up, is the image's own colour."""
    data = imagegen.encode(Image.new("RGB", size, (201, 37, 90)), "PNG")
    out = center_crop_resize(decode_rgb(data), 64)
    assert out.shape == (64, 64, 3) and (out == (201, 37, 90)).all()


def test_one_pixel_side_takes_the_middle_pixel():
    row = np.zeros((1, 5, 3), np.uint8)
    row[0, :, 0] = [10, 20, 30, 40, 50]  # w=5, h=1: the middle pixel is x = 5 // 2 = 2
    assert (center_crop_resize(Image.fromarray(row), 8)[..., 0] == 30).all()
