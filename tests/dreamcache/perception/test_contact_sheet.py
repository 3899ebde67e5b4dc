import numpy as np
import pytest
from PIL import Image

from dreamcache.perception.contact_sheet import LINE_HEIGHT, PAIRS_PER_ROW, TILE, TITLE_HEIGHT, contact_sheet


def solid(color) -> Image.Image:
    return Image.new("RGB", (32, 32), color)


def tile_at(sheet: Image.Image, column: int, row: int, title_h: int, row_h: int) -> np.ndarray:
    x, y = column * TILE, title_h + row * row_h
    return np.asarray(sheet.crop((x, y, x + TILE, y + TILE)))


def test_a_sheet_without_text_only_shots_is_a_plain_grid():
    shots = [(solid((40 + i * 40, 0, 0)), f"shot {i}") for i in range(6)]
    sheet = contact_sheet(solid("white"), shots, columns=5)
    assert sheet.width == 5 * TILE  # seven tiles: two rows of five columns
    row_h = sheet.height // 2
    assert (tile_at(sheet, 0, 0, 0, row_h) == 255).all()
    assert (tile_at(sheet, 1, 0, 0, row_h) == (40, 0, 0)).all() and (tile_at(sheet, 1, 1, 0, row_h) == (240, 0, 0)).all()


def test_each_shot_follows_its_text_only_shot_and_a_missing_one_leaves_a_gap():
    shots = [(solid((200, 0, 0)), "a mug on a sandy beach"), (solid((0, 200, 0)), "a mug in a forest"),
             (solid((0, 0, 200)), "a mug on a snowy mountain"), (solid((200, 200, 0)), "a mug on a lawn")]
    twins = [(solid((100, 0, 0)), "beach"), (solid((0, 100, 0)), "forest"), None, (solid((100, 100, 0)), "lawn")]
    sheet = contact_sheet(solid((0, 0, 0)), shots, title="MUG-1", text_only=twins)
    assert sheet.width == (1 + 2 * PAIRS_PER_ROW) * TILE
    row_h = (sheet.height - TITLE_HEIGHT) // 2  # four pairs: two rows
    expected = {(0, 0): (0, 0, 0), (1, 0): (100, 0, 0), (2, 0): (200, 0, 0), (3, 0): (0, 100, 0),
                (4, 0): (0, 200, 0), (5, 0): (255, 255, 255), (6, 0): (0, 0, 200),
                (0, 1): (255, 255, 255), (1, 1): (100, 100, 0), (2, 1): (200, 200, 0)}
    for (column, row), color in expected.items():
        assert (tile_at(sheet, column, row, TITLE_HEIGHT, row_h) == color).all(), (column, row)


def test_text_only_shots_must_match_the_shots_one_to_one():
    with pytest.raises(ValueError, match="2 shots but 1 text-only"):
        contact_sheet(solid("white"), [(solid("red"), "a"), (solid("blue"), "b")], text_only=[(solid("red"), "a")])


def test_a_long_caption_is_drawn_whole_and_a_score_keeps_its_value_on_its_line():
    """A shot's five scores took a fourth caption line, which the sheet used to cut (`mclip_i` without its value)."""
    scores = "  ".join(f"{name}\u00a0{value:.2f}" for name, value in
                       [("clip_i", 0.5), ("clip_t", 0.84), ("dino", 0.94), ("mclip_i", 0.8), ("mdino", 0.71)])
    short = contact_sheet(solid("white"), [(solid("red"), "#5 a bottle")], columns=2)
    long = contact_sheet(solid("white"), [(solid("red"), f"#5 a bottle on a snowy mountain (seed 0) {scores}")],
                         columns=2)
    captions = np.asarray(long.convert("L"))[TILE:, TILE:]  # under the shot
    inked = [y for y in range(captions.shape[0]) if (captions[y] < 128).any()]
    lines = 1 + sum(1 for a, b in zip(inked, inked[1:]) if b - a > 3)  # bands of ink, one per caption line
    assert lines == 4 and long.height == short.height + 3 * LINE_HEIGHT  # four lines against one: none dropped
    assert inked[-1] < long.height - TILE - 4  # the last line ends inside the sheet
