"""Contact sheets: the reference and its shots side by side, captioned, in one PNG."""

from __future__ import annotations

import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

TILE = 256
CAPTION_WIDTH = 34  # characters a caption line holds under a tile
LINE_HEIGHT = 16
TITLE_HEIGHT = 28
# A comparison sheet's pairs per row: three prompts, the demo's, read across one row.
PAIRS_PER_ROW = 3

Tile = tuple[Image.Image, str]


def contact_sheet(
    reference: Image.Image, shots: Sequence[Tile], title: str = "", columns: int = 5,
    text_only: Sequence[Tile | None] = (),
) -> Image.Image:
    """A grid: the reference first, then each shot with its caption under it; `title` on top.

    `text_only` holds, per shot, the text-only shot of the same prompt and seed (or None where there
    is none). When any is given, the reference has the first column to itself and each shot follows
    its text-only shot as a pair [text only | personalised], PAIRS_PER_ROW pairs a row, so that the
    cache's effect reads across (`columns` then does not apply).
    """
    if any(text_only):
        if len(text_only) != len(shots):
            raise ValueError(f"got {len(shots)} shots but {len(text_only)} text-only entries: give one per shot")
        pairs = [[(plain[0], f"text only: {plain[1]}") if plain else None, (shot[0], f"personalised: {shot[1]}")]
                 for shot, plain in zip(shots, text_only)]
        rows = [[(reference, "reference") if start == 0 else None]
                + [tile for pair in pairs[start : start + PAIRS_PER_ROW] for tile in pair]
                for start in range(0, len(pairs), PAIRS_PER_ROW)]
    else:
        tiles: list[Tile | None] = [(reference, "reference"), *shots]
        rows = [tiles[start : start + columns] for start in range(0, len(tiles), columns)]
    return _draw(rows, title)


def _draw(rows: Sequence[Sequence[Tile | None]], title: str) -> Image.Image:
    """Rows of captioned tiles (None leaves its place blank)."""
    font = ImageFont.load_default(size=13)
    cols = max(len(row) for row in rows)
    # Every caption whole: the rows are as tall as the longest needs (a shot's five scores take a fourth line).
    captions = [[textwrap.wrap(tile[1], width=CAPTION_WIDTH) if tile else [] for tile in row] for row in rows]
    caption_h = max((len(lines) for row in captions for lines in row), default=1) * LINE_HEIGHT + 8
    title_h = TITLE_HEIGHT if title else 0
    sheet = Image.new("RGB", (cols * TILE, title_h + len(rows) * (TILE + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill="black", font=ImageFont.load_default(size=16))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile is None:
                continue
            image = tile[0]
            x, y = c * TILE, title_h + r * (TILE + caption_h)
            thumb = _fit(image.convert("RGB"), TILE)  # a 16:9 or 4:5 shot keeps its shape, letterboxed
            sheet.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
            for j, line in enumerate(captions[r][c]):
                # A no-break space keeps words together on a line; the font has no glyph for it, so it prints as a space.
                draw.text((x + 6, y + TILE + 4 + j * LINE_HEIGHT), line.replace("\u00a0", " "), fill="black", font=font)
    return sheet


def _fit(image: Image.Image, side: int) -> Image.Image:
    """The image scaled to fit a square of `side`, keeping its aspect ratio (small images enlarged pixel-sharp)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if max(image.size) < side else Image.Resampling.LANCZOS)
