"""Bad reference files each give an error that names the file and the problem."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dreamcache.core.errors import ReferenceImageError
from dreamcache.core.images import foreground_box, load_reference, open_image
from tests.helpers import product_image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring huge dimensions, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.png", b"", "empty"),
        ("truncated.png", png_bytes(product_image())[:200], "truncated or corrupt"),
        ("page.jpg", b"<html><body>404 not found</body></html>", "not an image"),
        ("bomb.png", bomb_png(50_000, 50_000), "over the limit"),
        ("big.png", bomb_png(8_000, 8_000), "8000x8000 pixels is over the limit"),
        ("blank.png", png_bytes(Image.new("RGB", (64, 64), "white")), "no foreground"),
    ],
    ids=["empty", "truncated", "html", "bomb", "over-our-limit", "blank"],
)
def test_bad_files_are_named_with_their_problem(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ReferenceImageError, match=problem) as error:
        load_reference(path, 32)
    assert str(path) in str(error.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ReferenceImageError, match=f"{tmp_path / 'nope.png'}: file not found"):
        load_reference(tmp_path / "nope.png", 32)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ReferenceImageError, match="folder.png: cannot be read"):
        load_reference(tmp_path / "folder.png", 32)


def test_transparency_goes_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((10, 200, 10, 255), (10, 10, 30, 30))
    rgba.save(tmp_path / "cutout.png")
    image = open_image(tmp_path / "cutout.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((20, 20)) == (10, 200, 10)


def test_sixteen_bit_and_cmyk_are_normalised(tmp_path):
    gray16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    gray16.save(tmp_path / "deep.png")
    product_image().convert("CMYK").save(tmp_path / "print.jpg")
    assert open_image(tmp_path / "deep.png").mode == "RGB"
    assert open_image(tmp_path / "print.jpg").mode == "RGB"


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (30, 60)


def test_fitted_on_white_keeping_the_aspect():
    wide = Image.new("RGB", (200, 50), (0, 0, 255))
    fitted = load_reference(wide, 64)
    assert fitted.size == (64, 64)
    assert fitted.getpixel((32, 2)) == (255, 255, 255) and fitted.getpixel((32, 32))[2] > 200


def test_foreground_box():
    assert foreground_box(product_image(size=(100, 60))) == (20, 10, 81, 51)
