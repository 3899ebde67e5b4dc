import pickle

import numpy as np
import pytest
from PIL import Image

from dreamcache.perception.segmentation import (
    keep_holes,
    BorderColourSegmenter,
    QualityLimits,
    SamSegmenter,
    SegmentationError,
    border_box,
    build_segmenter,
    check_mask,
    load_sam,
    subject_on_white,
)
from tests.helpers import scene, tiny_sam


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("background, noise", [((255, 255, 255), 0.0), ((90, 140, 200), 0.0), ((235, 235, 230), 6.0)])
def test_the_border_box_finds_a_product_on_a_plain_background(background, noise):
    image, _ = scene(background=background, noise=noise, box=(30, 20, 90, 80))
    x0, y0, x1, y1 = border_box(image)
    assert abs(x0 - 30) <= 2 and abs(y0 - 20) <= 2 and abs(x1 - 91) <= 2 and abs(y1 - 81) <= 2


def test_the_classical_segmenter_cuts_out_a_studio_product():
    image, truth = scene(background=(240, 240, 240), noise=4.0)
    result = BorderColourSegmenter().segment(image, name="SKU-1")
    assert iou(result.mask, truth) > 0.95
    assert result.quality == "ok" and not result.touches_border
    assert result.area_fraction == pytest.approx(truth.mean(), abs=0.01)
    assert result.method == "border-colour"


def test_a_blank_image_is_rejected_with_its_name():
    with pytest.raises(SegmentationError, match="SKU-9: mask is blank"):
        BorderColourSegmenter().segment(Image.new("RGB", (64, 64), (128, 128, 128)), name="SKU-9")


def test_blank_and_all_foreground_masks_are_rejected():
    with pytest.raises(SegmentationError, match=r"SKU-1: mask is blank \(0.00% of the image"):
        check_mask(np.zeros((50, 50), bool), "test", "SKU-1")
    with pytest.raises(SegmentationError, match=r"SKU-2: mask covers 100.00% of the image"):
        check_mask(np.ones((50, 50), bool), "test", "SKU-2")


def test_doubtful_masks_get_warnings_with_figures():
    mask = np.zeros((100, 100), bool)
    mask[40:60, 0:30] = True  # touches the left border
    mask[10:20, 70:90] = True  # a second, large part
    result = check_mask(mask, "test", "SKU-3")
    assert result.quality == "warning" and result.touches_border
    assert any("fragmented: largest of 2 parts holds 75%" in w for w in result.warnings)
    assert any("touches the image border" in w for w in result.warnings)


def test_subject_on_white_keeps_the_aspect_and_whitens_the_background():
    image, truth = scene(background=(20, 160, 20), size=(200, 100), box=(20, 30, 180, 70))
    cut = subject_on_white(image, truth, resolution=64, margin=0.0)
    array = np.asarray(cut)
    assert cut.size == (64, 64)
    assert (array[0, 0] == 255).all() and (array[:10] == 255).all()  # padding above a wide product
    assert array[32, 32, 0] > 150 and array[32, 32, 1] < 80  # the product's red at the centre
    assert not ((array[..., 1] > 120) & (array[..., 0] < 60)).any()  # none of the green background left


def test_sam_checkpoints_are_read_without_unpickling_code(tmp_path):
    evil = tmp_path / "sam_vit_b_evil.pth"
    evil.write_bytes(pickle.dumps({"x": type("Payload", (), {"__reduce__": lambda self: (print, ("pwned",))})()},
                                  protocol=2))
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        load_sam(evil)
    with pytest.raises(ValueError, match="cannot tell the SAM model type of model.pth"):
        load_sam(tmp_path / "model.pth")


def test_sam_segments_with_a_border_box_prompt():
    image, _ = scene(background=(250, 250, 250), size=(160, 120), box=(40, 30, 120, 90))
    segmenter = SamSegmenter(tiny_sam(), model_type="vit_b", limits=QualityLimits(min_area=0.0, max_area=1.0))
    result = segmenter.segment(image, category="mug", name="SKU-1")
    assert result.mask.shape == (120, 160) and result.mask.dtype == bool
    assert result.method == "sam-vit_b+border-box"


def test_without_a_sam_checkpoint_the_classical_segmenter_is_used():
    assert isinstance(build_segmenter(None), BorderColourSegmenter)


def _mug_on_white(noise: float = 0.0) -> tuple[Image.Image, np.ndarray, np.ndarray, np.ndarray]:
    """A ring-handled mug on white: (photo, its body-and-handle mask with the hole filled, the hole, its white logo).
    The logo is near-white (250) ringed by a dark outline, as the world draws logos."""
    rgb = np.full((64, 64, 3), 255.0)
    yy, xx = np.mgrid[:64, :64]
    body = (yy >= 16) & (yy < 48) & (xx >= 10) & (xx < 38)
    ring = np.hypot(yy - 32, xx - 40) < 10
    hole = np.hypot(yy - 32, xx - 40) < 6
    handle = ring & ~hole & ~body
    hole &= ~body
    outline = (np.abs(yy - 32) <= 5) & (np.abs(xx - 24) <= 5)
    logo = (np.abs(yy - 32) <= 3) & (np.abs(xx - 24) <= 3)
    rgb[body | handle] = (30, 150, 150)
    rgb[outline], rgb[logo] = (20, 20, 20), (250, 250, 250)
    rgb += np.random.default_rng(0).normal(0, noise, rgb.shape)
    photo = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return photo, body | handle | hole, hole, logo


def test_a_hole_found_in_part_is_taken_out_whole_and_a_white_logo_stays():
    photo, filled, hole, logo = _mug_on_white()
    partly = filled.copy()
    partly[30:33, 40:42] = False  # the segmenter found a few pixels of the hole
    kept = keep_holes(photo, partly)
    assert not (kept & hole).any()
    assert kept[logo].all() and (kept & ~hole).sum() == (filled & ~hole).sum()


def test_a_filled_hole_stays_filled_and_a_scene_is_left_alone():
    photo, filled, hole, logo = _mug_on_white()
    # no trace of the hole: as like a white logo as a hole can be, so it stays (the border-colour segmenter's case)
    assert np.array_equal(keep_holes(photo, filled), filled)
    noisy, *_ = _mug_on_white(noise=20.0)  # a border with a texture: not a studio backdrop
    partly = filled.copy()
    partly[30:33, 40:42] = False
    assert np.array_equal(keep_holes(noisy, partly), partly)
    # a rim of the backdrop around the product, marked as product, goes too
    rim = np.zeros_like(filled)
    rim[15:49, 9:51] = True
    assert not (keep_holes(photo, rim | filled) & ~filled).any()
