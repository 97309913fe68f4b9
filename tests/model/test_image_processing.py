"""Image loading/validation, and preprocessing against transformers' PIL-based Gemma 3 image processor."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
import torch
import transformers  # the reference implementation; a test-only dependency
from PIL import Image
from transformers.image_transforms import convert_to_rgb as reference_convert_to_rgb

from tpa_model.model.image_processing import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageProcessorConfig,
    NotAnImageError,
    TooManyPixelsError,
    load_image,
    pan_and_scan_crops,
    preprocess,
)

TOL = 1e-5
MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "I;16", "CMYK"]


def random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)

    def channel(high: int = 256) -> np.ndarray:
        return rng.integers(0, high, (height, width), dtype=np.uint8)

    if mode in ("RGB", "RGBA", "CMYK"):
        bands = np.stack([channel() for _ in mode], axis=-1)
        if mode == "RGBA":  # fully transparent, fully opaque and everything between
            bands[..., 3].flat[:2] = (0, 255)
        return Image.frombytes(mode, (width, height), bands.tobytes())
    if mode == "L":
        return Image.fromarray(channel())
    if mode == "LA":
        return Image.merge("LA", (Image.fromarray(channel()), Image.fromarray(channel())))
    if mode.startswith("P"):
        image = Image.frombytes("P", (width, height), channel(16).tobytes())
        image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
        if mode == "P+transparency":
            image.info["transparency"] = 3
        return image
    if mode == "1":
        return Image.fromarray(channel(2).astype(bool))
    if mode == "I;16":  # values above 255 saturate in Pillow's RGB conversion, as in the reference
        return Image.fromarray(rng.integers(0, 400, (height, width), dtype=np.uint16))
    raise ValueError(mode)


def reference_processor(size: int, **kwargs) -> transformers.Gemma3ImageProcessorPil:
    return transformers.Gemma3ImageProcessorPil(size={"height": size, "width": size}, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("mode", MODES)
def test_preprocess_matches_reference(mode):
    images = [random_image(mode, 37, 53, seed=1), random_image(mode, 101, 23, seed=2)]
    assert images[0].mode == mode.split("+")[0]
    expected = reference_processor(896, do_pan_and_scan=False)(images=images, return_tensors="pt")["pixel_values"]
    pixel_values, crops = preprocess(images, ImageProcessorConfig())
    assert crops == [0, 0]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == expected.shape == (2, 3, 896, 896)
    diff = max_diff(pixel_values, expected)
    print(f"{mode}: max abs diff {diff:.3e}")
    assert diff <= TOL
    assert -1.0 <= pixel_values.min() and pixel_values.max() <= 1.0


def test_preprocess_composites_alpha_onto_white():
    image = Image.new("RGBA", (5, 7), (10, 200, 30, 0))  # fully transparent: the colour must not leak through
    pixel_values, _ = preprocess([image], ImageProcessorConfig(image_size=14))
    assert torch.equal(pixel_values, torch.ones(1, 3, 14, 14))


@pytest.mark.parametrize("size", [(101, 30), (30, 101), (50, 45), (130, 30)])
def test_pan_and_scan_matches_reference(size):
    kwargs = dict(pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=3, pan_and_scan_min_ratio_to_activate=1.2)
    config = ImageProcessorConfig(image_size=64, do_pan_and_scan=True, **kwargs)
    images = [random_image("RGB", *size, seed=3), random_image("RGBA", 40, 40, seed=4)]
    expected = reference_processor(64, do_pan_and_scan=True, **kwargs)(images=images, return_tensors="pt")
    pixel_values, crops = preprocess(images, config)
    assert crops == expected["num_crops"].tolist()
    assert pixel_values.shape == expected["pixel_values"].shape
    diff = max_diff(pixel_values, expected["pixel_values"])
    print(f"pan and scan {size}: crops {crops}, max abs diff {diff:.3e}")
    assert diff <= TOL


def test_pan_and_scan_defaults_match_reference():
    config = dataclasses.replace(ImageProcessorConfig(), do_pan_and_scan=True)
    image = random_image("RGB", 1200, 290, seed=5)
    crops = pan_and_scan_crops(image, config)
    assert [c.size for c in crops] == [(300, 290)] * 4
    expected = reference_processor(
        896, do_pan_and_scan=True, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )(images=[image], return_tensors="pt")
    pixel_values, num_crops = preprocess([image], config)
    assert num_crops == expected["num_crops"].tolist() == [4]
    assert max_diff(pixel_values, expected["pixel_values"]) <= TOL
    # Off by default: the same image is one slot.
    assert preprocess([image])[0].shape == (1, 3, 896, 896) and preprocess([image])[1] == [0]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "I;16", "CMYK"])
def test_load_image_converts_like_reference(mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    data = encode(random_image(mode, 37, 53, seed=6), fmt)
    ours = load_image(data)
    assert ours.mode == "RGB" and ours.size == (37, 53)
    expected = reference_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    assert np.array_equal(np.asarray(ours), expected)


def test_load_image_sources(tmp_path):
    image = random_image("RGB", 20, 10)
    path = tmp_path / "x.png"
    path.write_bytes(encode(image, "PNG"))
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(image))


def test_load_image_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(random_image("RGB", 40, 16), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 16)
    assert load_image(data).size == (16, 40)


def test_not_an_image():
    for data in (np.random.default_rng(0).bytes(1000), b"", b"GIF89a but not really"):
        with pytest.raises(NotAnImageError) as info:
            load_image(data)
        assert isinstance(info.value, ImageError) and isinstance(info.value, ValueError)
        assert info.value.code == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt):
    data = encode(random_image("RGB", 64, 64, seed=7), fmt)
    load_image(data)  # the whole file is fine
    with pytest.raises(CorruptImageError, match="image is truncated or corrupt") as info:
        load_image(data[: len(data) // 2])
    assert info.value.code == "truncated_or_corrupt"


def test_corrupt_pil_image_fails_on_load():
    """A lazily opened PIL image is decoded inside load_image, so its truncation is reported there."""
    data = encode(random_image("RGB", 64, 64, seed=8), "PNG")
    with pytest.raises(CorruptImageError):
        load_image(Image.open(io.BytesIO(data[: len(data) // 2])))


def test_zero_size_image():
    empty = Image.new("RGB", (0, 5))
    with pytest.raises(EmptyImageError, match=r"zero size \(0x5\)") as info:
        load_image(empty)
    assert info.value.code == "zero_size"
    with pytest.raises(EmptyImageError):
        preprocess([Image.new("L", (7, 0))])


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no pixel data: decoding it would fail, sizing it must not."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_too_many_pixels_checked_from_header():
    with pytest.raises(TooManyPixelsError) as info:
        load_image(png_header(10_000, 6_000))
    assert str(info.value) == "image has 10000x6000 = 60000000 pixels, more than the limit of 50000000"
    assert info.value.code == "too_many_pixels"
    # The same header under a higher limit gets as far as decoding, which fails: the check came first.
    with pytest.raises(CorruptImageError):
        load_image(png_header(10_000, 6_000), max_pixels=60_000_000)
    with pytest.raises(TooManyPixelsError, match="20x10 = 200 pixels, more than the limit of 199"):
        load_image(encode(random_image("RGB", 20, 10), "PNG"), max_pixels=199)
    with pytest.raises(TooManyPixelsError, match="more than the limit of 100"):
        load_image(random_image("L", 20, 10), max_pixels=100)


def test_pil_decompression_bomb_guards_become_image_errors():
    # Beyond twice PIL's own limit, PIL raises before we can see the size.
    with pytest.raises(TooManyPixelsError, match="1600000000 pixels, more than the limit of 50000000"):
        load_image(png_header(40_000, 40_000))
    # Between PIL's limit and twice it, PIL only warns; that is an error too, whatever our own limit.
    pixels = Image.MAX_IMAGE_PIXELS + 1000
    with pytest.raises(TooManyPixelsError, match=f"more than the limit of {Image.MAX_IMAGE_PIXELS}"):
        load_image(png_header(pixels // 1000, 1000), max_pixels=10 * pixels)
