"""Bad input, from a corpus built here: every item is normalised or rejected with a reason naming it.

The classes: empty, truncated, mislabelled and oversized files; CMYK, 16-bit, palette-with-alpha,
animated and EXIF-rotated images; tiny, extreme-aspect and blank (unsegmentable) images; manifests with
missing columns, duplicate SKUs, unusable SKUs and unreachable URIs; empty, enormous, control-character
and unsafe prompts; out-of-range parameters. The last test runs a whole embedded catalogue run over a
manifest mixing all of them with good products and checks that nothing is lost and the summary counts.
"""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError
from sqlalchemy import func, select

from db.models import Generation, Subject
from dreamcache.core.errors import ReferenceImageError
from dreamcache.core.images import decode_image
from dreamcache.perception.segmentation import BorderColourSegmenter, SegmentationError
from flows.runs.catalogue import run_embedded
from flows.platform.params import CatalogueRunParams
from flows.platform.places import InvalidInputs, Places
from flows.steps.source import list_source, read_uri
from flows.steps.prompts import MissingColumn, load_prompts, render_prompt
from tests.helpers import home_database, scene

RED, WHITE = (200, 30, 40), (255, 255, 255)


# --- the corpus --------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def product(color=RED, size=(96, 96), box=(20, 16, 76, 80)) -> Image.Image:
    return scene(product_color=color, background=(250, 250, 250), size=size, box=box)[0]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and holds no pixels: a decompression bomb's calling card."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def palette_with_transparency() -> bytes:
    """Green background at palette index 0, marked transparent; a red product at index 1."""
    image = Image.new("P", (96, 96), 0)
    image.putpalette([0, 255, 0, *RED] + [0] * (256 - 2) * 3)
    ImageDraw.Draw(image).ellipse((20, 16, 76, 80), fill=1)
    return encode(image, "PNG", transparency=0)


def sixteen_bit() -> bytes:
    grey = np.asarray(product().convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")  # mode I;16


def animated(fmt: str) -> bytes:
    frames = [product(RED), product((30, 200, 40))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    """A 60x96 (portrait) photo stored with orientation 6: it must come out 96x60, turned."""
    image = product(size=(60, 96), box=(10, 16, 50, 80))
    exif = image.getexif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif, quality=95)


def corpus() -> dict[str, bytes]:
    """File name -> bytes. Names say the class; the outcome of each is in OUTCOMES."""
    good_png = encode(product(), "PNG")
    return {
        "GOOD-1.png": good_png,
        "GOOD-2.png": encode(product((30, 60, 200)), "PNG"),
        "EMPTY.png": b"",
        "TRUNC-JPEG.jpg": encode(product(), "JPEG")[:400],
        "TRUNC-PNG.png": good_png[:150],
        "HTML.jpg": b"<!doctype html><html><body>404 Not Found</body></html>",
        "TEXT.jpg": b"just some text, not a photo\n",
        "BOMB-PIXELS.png": encode(Image.new("1", (8000, 6000)), "PNG"),  # 48 MP, a few KB
        "BOMB-HEADER.png": png_header_only(100_000, 100_000),  # 10 GP claimed
        "CMYK.jpg": encode(product().convert("CMYK"), "JPEG", quality=95),
        "GREY16.png": sixteen_bit(),
        "PALETTE-ALPHA.png": palette_with_transparency(),
        "ANIMATED-GIF.gif": animated("GIF"),
        "ANIMATED-WEBP.webp": animated("WEBP"),
        "EXIF-ROTATED.jpg": exif_rotated(),
        "TINY.png": encode(product(size=(8, 8), box=(2, 2, 5, 5)), "PNG"),
        "WIDE.png": encode(product(size=(1200, 24), box=(100, 4, 1100, 19)), "PNG"),
        "BLANK-WHITE.png": encode(Image.new("RGB", (96, 96), WHITE), "PNG"),
    }


# name -> None (normalised and usable) or (stage where rejected, words the reason must contain)
OUTCOMES = {
    "GOOD-1.png": None,
    "GOOD-2.png": None,
    "EMPTY.png": ("ingest", "file is empty (0 bytes)"),
    "TRUNC-JPEG.jpg": ("ingest", "truncated or corrupt"),
    "TRUNC-PNG.png": ("ingest", "truncated or corrupt"),
    "HTML.jpg": ("ingest", "not an image"),
    "TEXT.jpg": ("ingest", "not an image"),
    "BOMB-PIXELS.png": ("ingest", "8000x6000 pixels is over the limit of 40,000,000"),
    "BOMB-HEADER.png": ("ingest", "over the limit of 40,000,000 pixels"),
    "CMYK.jpg": None,
    "GREY16.png": None,
    "PALETTE-ALPHA.png": None,
    "ANIMATED-GIF.gif": None,
    "ANIMATED-WEBP.webp": None,
    "EXIF-ROTATED.jpg": None,
    "TINY.png": ("ingest", "8x8 pixels is too small"),
    "WIDE.png": None,
    "BLANK-WHITE.png": ("segment", "mask is blank"),
}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return corpus()


# --- images, one class at a time ---------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, o in OUTCOMES.items() if o and o[0] == "ingest"])
def test_unusable_files_are_rejected_with_a_reason_naming_them(files, name):
    with pytest.raises(ReferenceImageError) as error:
        decode_image(files[name], f"s3://shop/{name}")
    assert str(error.value).startswith(f"reference image s3://shop/{name}: ")
    assert OUTCOMES[name][1] in str(error.value)


@pytest.mark.parametrize("name", [n for n, o in OUTCOMES.items() if o is None])
def test_odd_but_valid_images_are_normalised_to_rgb_and_segment(files, name):
    image = decode_image(files[name], name)
    assert image.mode == "RGB"
    cut = BorderColourSegmenter().segment(image, None, name)
    assert cut.mask.any() and cut.area_fraction > 0.05


def test_transparency_is_flattened_onto_white(files):
    image = decode_image(files["PALETTE-ALPHA.png"], "PALETTE-ALPHA.png")
    assert image.getpixel((0, 0)) == WHITE  # the transparent green background
    assert image.getpixel((48, 48)) == RED


def test_cmyk_and_16_bit_keep_their_content(files):
    cmyk = np.asarray(decode_image(files["CMYK.jpg"], "CMYK.jpg"), dtype=int)
    assert abs(cmyk[48, 48] - np.array(RED)).max() < 30 and cmyk[2, 2].min() > 230
    grey = np.asarray(decode_image(files["GREY16.png"], "GREY16.png"))
    assert grey[48, 48, 0] < grey[2, 2, 0]  # the product stays darker than its background


def test_animations_use_their_first_frame(files):
    for name in ("ANIMATED-GIF.gif", "ANIMATED-WEBP.webp"):
        centre = np.asarray(decode_image(files[name], name), dtype=int)[48, 48]
        assert abs(centre - np.array(RED)).max() < 40, (name, centre)


def test_exif_orientation_is_applied(files):
    image = decode_image(files["EXIF-ROTATED.jpg"], "EXIF-ROTATED.jpg")
    assert image.size == (96, 60)


def test_a_blank_image_cannot_be_segmented_and_says_so(files):
    image = decode_image(files["BLANK-WHITE.png"], "BLANK-WHITE.png")
    with pytest.raises(SegmentationError, match=r"^BLANK-1 \(x\): mask is blank .* the product was not found"):
        BorderColourSegmenter().segment(image, None, "BLANK-1 (x)")


# --- manifests and URIs ------------------------------------------------------------------------

def test_a_manifest_missing_columns_names_the_manifest_and_columns(tmp_path):
    (tmp_path / "m.csv").write_text("sku,category\nA,mug\n")
    words = r"manifest .*m\.csv lacks the column\(s\) image_uri \(it has: \['category', 'sku'\]\)"
    with pytest.raises(ValueError, match=words):
        list_source(str(tmp_path / "m.csv"))


def test_manifest_rows_that_cannot_be_used_are_rejected_with_their_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "b.png").write_bytes(b"b")
    long_sku = "S" * 300
    rows = ["sku,image_uri", "A,a.png", "A,a.png", "A,b.png", ",a.png", "B,", "BEL\x07L,a.png", f"{long_sku},a.png",
            "C,b.png"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    listing = list_source(str(tmp_path / "m.csv"))
    assert [i.sku for i in listing.items] == ["A", "C"]
    reasons = {item.rsplit(" ", 1)[-1]: reason for item, reason in listing.rejected}
    assert reasons == {
        "3": "duplicate of line 2 (same SKU and image)",
        "4": "duplicate SKU 'A': line 2 gives it another image; one image per SKU, give this one its own SKU",
        "5": "empty sku or image_uri",
        "6": "empty sku or image_uri",
        "7": "SKU 'BEL\\x07L' contains control characters; use printable characters only",
        "8": f"SKU {long_sku[:40]!r}... has 300 characters, more than 255",
    }
    assert all(item.startswith(f"{tmp_path}/m.csv line ") for item, _ in listing.rejected)


def test_malformed_manifest_rows_are_rejected_with_their_line_and_the_others_kept(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join([
        '{"sku": "A", "image_uri": "a.png"}', "[1, 2]", "null", "[" * 100_000 + "]" * 100_000, '"text"', "{",
        '{"sku": "C", "image_uri": "c.png"}']) + "\n")
    listing = list_source(str(tmp_path / "m.jsonl"))
    assert [i.sku for i in listing.items] == ["A", "C"]
    reasons = {item.rsplit(" ", 1)[-1]: reason for item, reason in listing.rejected}
    assert reasons == {"2": "an array, not a JSON object; give one JSON object a line",
                       "3": "null, not a JSON object; give one JSON object a line",
                       "4": "nested too deeply to read; give one flat JSON object a line",
                       "5": "a string, not a JSON object; give one JSON object a line",
                       "6": "not valid JSON (Expecting property name enclosed in double quotes)"}
    (tmp_path / "m.csv").write_text(f"sku,image_uri\nA,a.png\nB,{'x' * 200_000}\nC,c.png\n")
    listing = list_source(str(tmp_path / "m.csv"))
    assert [i.sku for i in listing.items] == ["A", "C"]
    ((item, reason),) = listing.rejected
    assert item.endswith("m.csv line 3") and "field larger than field limit" in reason


def test_many_rejections_are_logged_as_the_first_few_and_a_count(platform_env, tmp_path, caplog):
    from flows.platform.resources import get_platform
    from flows.steps.run_record import LOGGED_REJECTIONS, reject

    platform = get_platform()
    platform.migrate()
    reject(platform, None, "inputs", [(f"m.csv line {n}", "empty sku or image_uri") for n in range(2, 10_002)]
           + [("new\nline.png", "the file is empty")])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected at inputs")]
    assert len(lines) == LOGGED_REJECTIONS + 1 and lines[-1].startswith(f"rejected at inputs: {10_001 - LOGGED_REJECTIONS} more")
    reject(platform, None, "inputs", [("new\nline.png", "the file is empty")])
    assert "new\\nline.png" in caplog.records[-1].getMessage() and "\n" not in caplog.records[-1].getMessage()


def test_a_folder_with_the_same_sku_twice_keeps_the_first(tmp_path):
    for name in ("mug/X-1.png", "lamp/X-1.jpg", "lamp/Y-1.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listing = list_source(str(tmp_path))
    assert [(i.sku, i.category) for i in listing.items] == [("X-1", "lamp"), ("Y-1", "lamp")]
    ((item, reason),) = listing.rejected
    assert item.endswith("mug/X-1.png") and reason.startswith("duplicate SKU 'X-1': ") and "lamp/X-1.jpg" in reason


@pytest.mark.parametrize("uri, words", [
    ("/nowhere/missing.png", "No such file or directory: '/nowhere/missing.png'"),
    ("http://example.invalid/a.jpg", "http://example.invalid/a.jpg: unsupported URI scheme http://"),
    ("ftp://example.invalid/a.jpg", "ftp://example.invalid/a.jpg: unsupported URI scheme ftp://"),
])
def test_unreachable_uris_fail_naming_the_uri(uri, words):
    with pytest.raises((OSError, ValueError), match=words.replace(".", r"\.").replace("/", "/")):
        read_uri(uri)


# --- prompts and parameters --------------------------------------------------------------------

@pytest.mark.parametrize("prompts, words", [
    (["", "ok"], "prompt 1 is empty"),
    (["ok", " \t\x00\x07\n "], "prompt 2 is empty"),
    (["x" * 5000], "prompt 1 has 5000 characters, more than 1000"),
])
def test_bad_prompts_are_refused_naming_them(prompts, words):
    with pytest.raises(ValidationError, match=words):
        CatalogueRunParams(source="s3://b/", prompts=prompts)


def test_control_characters_in_prompts_are_removed():
    params = CatalogueRunParams(source="s3://b/", prompts=["a\x1b[31m red\x00 mug\u200b\r\non a\tbeach"])
    assert params.prompts == ["a [31m red mug on a beach"]


def test_a_bad_line_in_a_prompt_file_is_rejected_with_its_line_and_the_others_kept(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na {category} on a beach\n\n" + "y" * 2000 + "\na mug\n")
    params = CatalogueRunParams(source=str(tmp_path), prompt_file=str(tmp_path / "p.txt"))
    prompts = load_prompts(params, Places.for_run(str(tmp_path), []))
    assert prompts.templates == ["a {category} on a beach", "a mug"]
    assert prompts.rejected == [(f"{tmp_path}/p.txt line 4", "has 2000 characters, more than 1000")]
    (tmp_path / "p.txt").write_bytes(b"a \xff\xfe mug\n")
    with pytest.raises(InvalidInputs, match=r"prompt file .*p\.txt is not text: save it as UTF-8"):
        load_prompts(params, Places.for_run(str(tmp_path), []))


@pytest.mark.parametrize("template, words", [
    ("a {category", "is not valid"),
    ("a {sku.__class__} mug", r"\{sku.__class__\} is not a plain field"),
    ("a {category[0]} mug", r"\{category\[0\]\} is not a plain field"),
    ("a {sku:>999999999} mug", r"\{sku\} is not a plain field"),
    ("a {sku!r} mug", r"\{sku\} is not a plain field"),
    ("a {} mug", r"\{\} is not a plain field"),
])
def test_unsafe_templates_are_refused_naming_the_template(template, words):
    with pytest.raises(ValueError, match=words) as error:
        render_prompt(template, Subject(sku="MUG-1", category="mug", attributes={}))
    assert repr(template) in str(error.value)


def test_templates_fill_fields_and_name_a_missing_column():
    subject = Subject(sku="MUG-1", category="mug", attributes={"color": "red\x07\n", "brand": ""})
    assert render_prompt("a {color} {category} ({sku}) {{literal}}", subject) == "a red mug (MUG-1) {literal}"
    for template, column in (("a {unknown} mug", "'unknown'"), ("a {brand} mug", "'brand'")):  # empty: no value
        with pytest.raises(MissingColumn, match=f"names the column {column}, which MUG-1 has no value for "
                                                r"\(its columns: color\)"):
            render_prompt(template, subject)
    huge = Subject(sku="MUG-2", category="mug", attributes={"note": "z" * 2000})
    with pytest.raises(ValueError, match=r"prompt 'a \{note\}' for MUG-2 has 2002 characters"):
        render_prompt("a {note}", huge)


@pytest.mark.parametrize("field, value", [
    ("images_per_prompt", -1), ("images_per_prompt", 65), ("steps", -1), ("steps", 501), ("seed", -1),
    ("text_scale", -0.1), ("text_scale", 31), ("image_scale", 11), ("resolution", 63), ("resolution", 100),
    ("resolution", 4096), ("batch_size", 0), ("shard_size", 0), ("guidance", "both"), ("execution", "gpu"),
    ("output_prefix", "/abs"), ("output_prefix", "a/../../b"), ("output_prefix", ""), ("source", ""),
])
def test_out_of_range_parameters_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as error:
        CatalogueRunParams(**{"source": "s3://b/", "prompts": ["ok"], field: value})
    assert {e["loc"][0] for e in error.value.errors()} == {field}


# --- everything at once ------------------------------------------------------------------------

def test_an_embedded_run_over_the_whole_corpus_finishes_the_good_and_accounts_for_the_bad(
        platform_env, files, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    rows = [("sku", "category", "image_uri", "note")]
    rows += [(Path(name).stem, "mug", name, "plain") for name in files]
    extra = {  # manifest-level classes; each with its expected (stage, words) in the run's rejections
        "DUP-ROW": (("GOOD-1", "mug", "GOOD-1.png", "plain"), ("listing", "duplicate of line 2")),
        "DUP-SKU": (("GOOD-2", "mug", "CMYK.jpg", "plain"), ("listing", "duplicate SKU 'GOOD-2'")),
        "EMPTY-SKU": (("", "mug", "GOOD-1.png", "plain"), ("listing", "empty sku or image_uri")),
        "CONTROL-SKU": (("CTRL\x01SKU", "mug", "GOOD-1.png", "plain"), ("listing", "contains control characters")),
        "MISSING": (("MISSING", "mug", "missing.png", "plain"), ("ingest", "No such file or directory")),
        "HTTP": (("HTTP", "mug", "http://example.invalid/a.jpg", "plain"), ("listing", "unsupported URI scheme")),
        "LONG-NOTE": (("LONG-NOTE", "mug", "GOOD-1.png", "n" * 1200), ("plan", "more than 1000")),
    }
    rows += [row for row, _ in extra.values()]
    import csv

    with open(folder / "products.csv", "w", newline="") as out:
        csv.writer(out).writerows(rows)

    prompts = ["a {category} on a beach", "a {note} {category}"]
    summary = run_embedded(CatalogueRunParams(source=str(folder / "products.csv"), prompts=prompts,
                                              images_per_prompt=1, steps=2, batch_size=8), progress=False)

    rejections = summary["rejections"]
    attempted = len(rows) - 1
    good = [Path(n).stem for n, o in OUTCOMES.items() if o is None] + ["LONG-NOTE"]  # one prompt of LONG-NOTE
    bad_files = {Path(n).stem: o for n, o in OUTCOMES.items() if o}

    def rejection_of(sku: str, filename: str | None, stage: str) -> dict:
        """The one rejection of an item; ingest names the URI, segment and plan the SKU."""
        found = [r for r in rejections if r["stage"] == stage and (
            (filename and r["item"].endswith("/" + filename)) or (not filename and r["item"] == sku))]
        assert len(found) == 1, (sku, stage, rejections)
        return found[0]

    for sku, (stage, words) in bad_files.items():
        filename = next(n for n in files if Path(n).stem == sku)
        r = rejection_of(sku, filename if stage == "ingest" else None, stage)
        assert words in r["reason"] and (filename in r["reason"] or sku in r["reason"]), r
    listing_rejections = [r for r in rejections if r["stage"] == "ingest" and " line " in r["item"]]
    for sku, (row, (stage, words)) in extra.items():
        if stage == "listing":
            line = 1 + max(i for i, r in enumerate(rows) if r == row)  # rows[0], the header, is line 1
            (r,) = [r for r in listing_rejections if r["item"].endswith(f"products.csv line {line}")]
            assert words in r["reason"], r
        elif stage == "ingest":
            r = rejection_of(sku, row[2].rsplit("/", 1)[-1], "ingest")
            assert words in r["reason"] and row[2].rsplit("/", 1)[-1] in r["reason"], r
        else:
            r = rejection_of(sku, None, "plan")
            assert words in r["reason"] and sku in r["reason"], r

    listing_rejected = sum(1 for _, (_, (stage, _)) in extra.items() if stage == "listing")
    ingest_rejected = sum(1 for o in bad_files.values() if o[0] == "ingest") + 1  # + MISSING
    assert summary["products_listed"] == attempted  # every row, the rejected ones too
    assert summary["products_ingested"] == attempted - listing_rejected - ingest_rejected, \
        [r["reason"] for r in listing_rejections]
    assert summary["products_cached"] == len(good)
    expected_images = (len(good) - 1) * 2 + 1
    assert summary["rejected"] == len(rejections) == listing_rejected + ingest_rejected + 1 + 1  # + blank + plan
    assert (summary["images_planned"], summary["images_generated"], summary["images_failed"],
            summary["images_open"]) == (expected_images, expected_images, 0, 0)
    assert set(summary["contact_sheets"]) == set(good)

    # Nothing lost, nothing twice: every manifest row is a finished product or a rejection.
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        generations = db.scalar(select(func.count()).select_from(Generation))
        outputs = db.scalars(select(Generation.output_uri)).all()
    assert generations == expected_images and len(set(outputs)) == expected_images
    assert {p["sku"]: p["images"] for p in summary["products"]} == {sku: 1 if sku == "LONG-NOTE" else 2 for sku in good}
    images = [p for p in (tmp_path / "home" / "objects" / "shots").rglob("*.png") if p.name != "contact_sheet.png"]
    assert len(images) == expected_images
    accounted = len(good) + len(bad_files) + len(extra) - 1  # LONG-NOTE is both done and rejected once
    assert accounted == attempted
    for image in images:  # the sidecar of each names its product
        assert json.loads(image.with_suffix(".json").read_text())["sku"] in good


def test_unread_formats_and_odd_csv_columns_are_named_not_passed_over(tmp_path):
    from flows.platform.places import InvalidInputs

    (tmp_path / "shop" / "mug").mkdir(parents=True)
    (tmp_path / "shop" / "mug" / "MUG-9.avif").write_bytes(b"\x00\x00\x00\x1cftypavif")
    listing = list_source(str(tmp_path / "shop"))
    assert listing.rejected == [("mug/MUG-9.avif", ".avif images are not read; convert it to PNG, JPEG or WebP")]
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "m.csv").write_text("sku,image_uri\nA,a.png\nB,b, red.png\n")
    ((item, reason),) = list_source(str(tmp_path / "m.csv")).rejected
    assert item.endswith("m.csv line 3") and reason.startswith("1 more field(s) than the header's 2 columns")
    (tmp_path / "m.csv").write_text("sku,image_uri,sku\nA,a.png,B\n")
    with pytest.raises(InvalidInputs, match=r"m\.csv names the column\(s\) 'sku' twice; keep one of each"):
        list_source(str(tmp_path / "m.csv"))
