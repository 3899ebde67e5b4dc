"""Reference images: opened defensively, put on white, fitted to the model's resolution."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreamcache.core.errors import ReferenceImageError

ImageInput = Union[str, os.PathLike, Image.Image]

# 40 megapixels: larger than any catalogue photo, far below what a decompression bomb asks for.
MAX_PIXELS = 40_000_000
# A pixel counts as foreground when it is this far (0-255, any channel) from pure white.
WHITE_TOLERANCE = 12
# Below this many pixels on a side there is no product to learn from (and segmentation erodes it away).
MIN_SIDE = 16


def open_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGB, or raise an error naming the file and the problem."""
    if isinstance(source, Image.Image):
        _check_size("<in-memory image>", source.size, max_pixels)
        return _to_rgb_on_white(ImageOps.exif_transpose(source))
    name = str(source)
    path = Path(source)
    if not path.exists():
        raise ReferenceImageError(name, "file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReferenceImageError(name, f"cannot be read ({exc.strerror or exc})") from exc
    return decode_image(data, name, max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes (from a file, S3, ...) as RGB; `name` is what errors call the item."""
    if not data:
        raise ReferenceImageError(name, "file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ReferenceImageError(name, "not an image PIL can read (wrong format or not an image)") from None
    except Image.DecompressionBombError as exc:  # PIL's own, far higher, limit
        raise ReferenceImageError(name, f"is over the limit of {max_pixels:,} pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # a header cut short (truncated JPEG) fails here already
        raise ReferenceImageError(name, f"image data is truncated or corrupt ({exc})") from None
    # The header gives the size before any pixel is decoded: refuse bombs before decoding them.
    _check_size(name, image.size, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ReferenceImageError(name, f"image data is truncated or corrupt ({exc})") from exc
    try:
        return _to_rgb_on_white(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, TypeError) as exc:  # e.g. a malformed EXIF block
        raise ReferenceImageError(name, f"cannot be normalised to RGB ({type(exc).__name__}: {exc})") from exc


def _check_size(name: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ReferenceImageError(
            name, f"{width}x{height} pixels is over the limit of {max_pixels:,}; downscale it first"
        )
    if width < 1 or height < 1:
        raise ReferenceImageError(name, f"has no pixels ({width}x{height})")
    if min(width, height) < MIN_SIDE:
        raise ReferenceImageError(
            name, f"{width}x{height} pixels is too small (each side needs at least {MIN_SIDE}): use a larger photo"
        )


def _to_rgb_on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white (the method caches subjects on white) and convert to RGB."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "I;16" or image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        array = 255.0 * (array - array.min()) / max(array.max() - array.min(), 1.0)
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def foreground_box(image: Image.Image, name: str = "<image>") -> tuple[int, int, int, int]:
    """Bounding box of the non-white pixels; an image with none has nothing to personalise."""
    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    mask = (255 - array).max(axis=2) > WHITE_TOLERANCE
    if not mask.any():
        raise ReferenceImageError(
            name, "has no foreground (every pixel is white): segment the product onto white first"
        )
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def fit_on_white(image: Image.Image, resolution: int) -> Image.Image:
    """Scale to fit a square of `resolution` keeping the aspect ratio, padded with white."""
    scale = resolution / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (resolution, resolution), (255, 255, 255))
    canvas.paste(resized, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return canvas


# How a reference is brought to the model's square: letterboxed on white keeping its shape (the default,
# for products), or stretched to the square with bilinear resampling (the authors' released inference).
REFERENCE_MODES = ("letterbox", "stretch")


def load_reference(source: ImageInput, resolution: int, max_pixels: int = MAX_PIXELS,
                   mode: str = "letterbox") -> Image.Image:
    """A reference ready to cache: decoded, on white, with a foreground, at the model's resolution."""
    name = "<in-memory image>" if isinstance(source, Image.Image) else str(source)
    image = open_image(source, max_pixels=max_pixels)
    foreground_box(image, name)
    if mode == "stretch":
        return image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    if mode != "letterbox":
        raise ValueError(f"unknown reference mode {mode!r}; choose one of {', '.join(REFERENCE_MODES)}")
    return fit_on_white(image, resolution)
