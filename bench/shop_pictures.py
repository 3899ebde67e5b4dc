"""The pictures of docs/catalogue-runs.md, "What the shop gets": placed shots and a format sheet, made by real
catalogue runs of the bundled product-world model over the example catalogue (CPU, about a minute).

    python3 bench/shop_pictures.py --output docs/images

Two embedded runs in a scratch home, the platform's defaults otherwise: one draws each product in three formats
(`generate`), one places its photo in the same formats (`place`), both with cut-outs and packshots. The pictures
are composed from what the runs wrote, read back through `generation_history` and `product_assets`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ["1:1@384", "4:5@384", "16:9@384"]
SKUS = ("MUG-TEAL-DOTS", "BOTTLE-ORANGE-CHECKS", "LAMP-RED-CHECKS")
PROMPT = "a {category} on a sandy beach"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["DREAMCACHE_HOME"] = home
        os.environ.pop("PREFECT_API_URL", None)
        from flows.runs.catalogue import run_embedded
        from flows.platform.params import CatalogueRunParams

        source = Path(home) / "catalogue"
        for sku in SKUS:  # three products of the example catalogue
            found = next((ROOT / "flows" / "examples" / "catalogue").rglob(f"{sku}.png"))
            (source / found.parent.name).mkdir(parents=True, exist_ok=True)
            (source / found.parent.name / found.name).write_bytes(found.read_bytes())
        for mode in ("generate", "place"):
            run_embedded(CatalogueRunParams(source=str(source), prompts=[PROMPT], formats=FORMATS, mode=mode,
                                            placement_x=0.5, placement_y=0.6, placement_scale=0.55, cutout=True,
                                            packshot=True, output_prefix=f"shots-{mode}"), progress=False)
        shots, assets, photos = collect(Path(home))
    args.output.mkdir(parents=True, exist_ok=True)
    placed_figure(shots, photos).save(args.output / "placed_shots.png")
    format_sheet(shots, assets).save(args.output / "format_sheet.png")
    print(f"wrote {args.output / 'placed_shots.png'} and {args.output / 'format_sheet.png'}")


def collect(home: Path):
    from PIL import Image
    from sqlalchemy import create_engine, text

    def image(uri: str):
        return Image.open(uri.removeprefix("file://")).copy()

    engine = create_engine(f"sqlite:///{home / 'dreamcache.db'}")
    with engine.connect() as db:
        shots = {(r.sku, r.mode, r.aspect): image(r.output_uri) for r in db.execute(text(
            "SELECT sku, mode, aspect, output_uri FROM generation_history WHERE status = 'done'"))}
        assets = {(r.sku, r.kind, r.aspect): image(r.uri) for r in db.execute(text(
            "SELECT s.sku, a.kind, a.aspect, a.uri FROM product_assets a JOIN subjects s ON s.id = a.subject_id"))}
        photos = {r.sku: image(r.source_uri) for r in db.execute(text("SELECT sku, source_uri FROM subjects"))}
    engine.dispose()
    return shots, assets, photos


def _grid(rows, labels, cell: int = 220, title: str = ""):
    """Rows of images, each letterboxed into a cell, a label under each."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    top = 30 if title else 0
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (columns * (cell + 8) + 8, top + len(rows) * (cell + 28) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 8), title, fill="black", font=ImageFont.load_default(size=15))
    for r, (row, row_labels) in enumerate(zip(rows, labels)):
        for c, (picture, label) in enumerate(zip(row, row_labels)):
            if picture is None:
                continue
            picture = picture.convert("RGBA")
            picture.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            checker = Image.new("RGBA", picture.size, (235, 235, 235, 255))  # a cut-out's transparency shows
            x = 8 + c * (cell + 8) + (cell - picture.width) // 2
            y = top + 8 + r * (cell + 28) + (cell - picture.height) // 2
            sheet.paste(Image.alpha_composite(checker, picture).convert("RGB"), (x, y))
            draw.text((8 + c * (cell + 8), top + 8 + r * (cell + 28) + cell + 4), label, fill="black", font=font)
    return sheet


def placed_figure(shots, photos):
    rows, labels = [], []
    for sku in SKUS:
        rows.append([photos[sku], shots[sku, "place", "16:9"], shots[sku, "generate", "16:9"]])
        labels.append([f"{sku}: photo", "place: the photo, scene around", "generate: drawn by the model"])
    return _grid(rows, labels, title=f"'{PROMPT}', 16:9 at 384 px, product-world model (bench/shop_pictures.py)")


def format_sheet(shots, assets):
    rows, labels = [], []
    for sku in SKUS:
        rows.append([shots[sku, "place", aspect] for aspect in ("1:1", "4:5", "16:9")]
                    + [assets[sku, "packshot", "4:5"], assets[sku, "cutout", None]])
        labels.append(["place 1:1", "place 4:5", "place 16:9", "packshot 4:5", "cut-out (transparent)"])
    return _grid(rows, labels, cell=180, title="One run's formats, packshots and cut-outs (bench/shop_pictures.py)")


if __name__ == "__main__":
    main()
