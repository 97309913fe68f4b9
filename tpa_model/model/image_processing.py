"""Untrusted image bytes -> validated RGB images -> Gemma 3 pixel tensors.

`preprocess` reproduces the PIL-based Gemma 3 image processor of transformers: RGB conversion (alpha
composited onto white), Pillow bilinear resize of the uint8 image to S x S, then x / 255 mapped to [-1, 1].
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image we cannot use; `code` tells an API layer which kind of failure it was."""

    code = "invalid_image"


class NotAnImageError(ImageError):
    code = "not_an_image"


class CorruptImageError(ImageError):
    code = "truncated_or_corrupt"


class EmptyImageError(ImageError):
    code = "zero_size"


class TooManyPixelsError(ImageError):
    code = "too_many_pixels"


class UnsupportedImageError(ImageError):
    code = "unsupported_image"


def check_size(size: tuple[int, int], max_pixels: int | None = None) -> None:
    """Reject by the header size alone, before any pixel data is decoded (decompression bombs)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise EmptyImageError(f"image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixelsError(
            f"image has {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )


def _bomb_error(error: Exception, max_pixels: int) -> TooManyPixelsError:
    """PIL's own decompression-bomb guard fired before we saw the size; it reports only the pixel count."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    if match is None:
        return TooManyPixelsError(f"image is too large: {error}")
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    return TooManyPixelsError(f"image has {match[1]} pixels, more than the limit of {limit}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb makes it: anything with alpha (an A band, or a palette or
    tRNS transparency) is composited onto opaque white; every other mode goes through Pillow's convert."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(
    source: bytes | str | os.PathLike | Image.Image, *, max_pixels: int = 50_000_000
) -> Image.Image:
    """Decode and validate an image from bytes, a file path or a PIL image; returns a fully loaded RGB image.

    The EXIF orientation is applied (as transformers' load_image does) so photos come out upright.
    Every failure is an ImageError subclass. PIL's own pixel limit (Image.MAX_IMAGE_PIXELS) also applies,
    so the effective limit is the smaller of the two.
    """
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want a hard error there too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = _decode(source, max_pixels)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb_error(e, max_pixels) from e
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not make a decodable image unusable
        pass
    try:
        return to_rgb(image)
    except (ValueError, OSError) as e:
        raise UnsupportedImageError(f"cannot convert image mode {image.mode!r} to RGB: {e}") from e


def _decode(source: bytes | str | os.PathLike | Image.Image, max_pixels: int) -> Image.Image:
    if isinstance(source, Image.Image):
        check_size(source.size, max_pixels)
        image = source
    else:
        data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
        if not data:
            raise NotAnImageError("image data is empty")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise NotAnImageError("data is not an image in any supported format") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise
        except Exception as e:  # the format was recognised but its header is broken
            raise CorruptImageError(f"image is truncated or corrupt: {e}") from e
        check_size(image.size, max_pixels)
    try:
        image.load()  # decode everything now, so truncated data fails here and not later
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as e:  # decoders signal bad data with many types (OSError, SyntaxError, struct.error, ...)
        raise CorruptImageError(f"image is truncated or corrupt: {e}") from e
    return image


@dataclass
class ImageProcessorConfig:
    """Gemma 3's preprocessor_config.json values; pan-and-scan is off in the released configs."""

    image_size: int = 896
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BILINEAR
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2


def pan_and_scan_crops(image: Image.Image, config: ImageProcessorConfig) -> list[Image.Image]:
    """Crops of an elongated image along its long side, or [] when it is square enough or crops would be
    smaller than pan_and_scan_min_crop_size. Crops are ceil(side / n) long; the last one is cut at the edge."""
    width, height = image.size
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < config.pan_and_scan_min_ratio_to_activate:
        return []
    num_crops = int(math.floor(long_side / short_side + 0.5))  # round half up
    num_crops = min(long_side // config.pan_and_scan_min_crop_size, num_crops)
    num_crops = min(config.pan_and_scan_max_num_crops, max(2, num_crops))
    num_w, num_h = (num_crops, 1) if width >= height else (1, num_crops)
    crop_w, crop_h = math.ceil(width / num_w), math.ceil(height / num_h)
    if min(crop_w, crop_h) < config.pan_and_scan_min_crop_size:
        return []
    return [
        image.crop((left, top, min(left + crop_w, width), min(top + crop_h, height)))
        for top, left in itertools.product(range(0, num_h * crop_h, crop_h), range(0, num_w * crop_w, crop_w))
    ]


def _pixels(image: Image.Image, config: ImageProcessorConfig) -> torch.Tensor:
    """Resize the uint8 image with Pillow (exactly as the reference does), then scale to [-1, 1], CHW."""
    size = config.image_size
    resized = np.asarray(image.resize((size, size), resample=config.resample))
    scaled = (resized.astype(np.float64) * config.rescale_factor).astype(np.float32)  # the reference's rounding
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    x = (scaled - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess(
    images: list[Image.Image], config: ImageProcessorConfig | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Images -> (pixel_values [N, 3, S, S] float32, crops_per_image).

    Each image is followed by its pan-and-scan crops (none unless config.do_pan_and_scan), so
    N = len(images) + sum(crops_per_image) and a prompt builder knows how many image slots each image takes.
    """
    config = config or ImageProcessorConfig()
    batch: list[torch.Tensor] = []
    crops_per_image: list[int] = []
    for image in images:
        check_size(image.size)
        image = to_rgb(image)
        crops = pan_and_scan_crops(image, config) if config.do_pan_and_scan else []
        crops_per_image.append(len(crops))
        batch.extend(_pixels(im, config) for im in [image, *crops])
    if not batch:
        return torch.empty(0, 3, config.image_size, config.image_size), crops_per_image
    return torch.stack(batch), crops_per_image
