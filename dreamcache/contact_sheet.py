"""Contact sheets: the reference and its shots side by side, captioned, in one PNG."""

from __future__ import annotations

import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

TILE = 256
CAPTION_LINES = 3
LINE_HEIGHT = 16


def contact_sheet(
    reference: Image.Image, shots: Sequence[tuple[Image.Image, str]], title: str = "", columns: int = 5
) -> Image.Image:
    """A grid: the reference first, then each shot with its caption under it; `title` on top."""
    font = ImageFont.load_default(size=13)
    tiles = [(reference, "reference")] + list(shots)
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    caption_h = CAPTION_LINES * LINE_HEIGHT + 8
    title_h = 28 if title else 0
    sheet = Image.new("RGB", (cols * TILE, title_h + rows * (TILE + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill="black", font=ImageFont.load_default(size=16))
    for i, (image, caption) in enumerate(tiles):
        x, y = (i % cols) * TILE, title_h + (i // cols) * (TILE + caption_h)
        sheet.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST
                                                if image.width < TILE else Image.Resampling.LANCZOS), (x, y))
        lines = textwrap.wrap(caption, width=34)[:CAPTION_LINES]
        for j, line in enumerate(lines):
            draw.text((x + 6, y + TILE + 4 + j * LINE_HEIGHT), line, fill="black", font=font)
    return sheet
