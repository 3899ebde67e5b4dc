"""Cutting the product out: a mask, quality figures, and the subject on white.

Three ways, by what is configured:

- Segment Anything with a box from a text-grounded detector (OWL-ViT / OWLv2 / Grounding DINO
  through transformers' zero-shot object detection), prompted with the product's category;
- Segment Anything with a box from the image itself: catalogue photos have plain borders, so the
  border colour's statistics separate the product from its background (`border_box`);
- no SAM checkpoint: the same border-colour statistics give the mask directly, a classical
  segmenter that suits plain studio backgrounds.

Among SAM's three candidate masks the one with the highest predicted IoU is kept. Every mask is
checked (area, largest connected component, contact with the border): an unusable mask is an
error naming the item and the figures, a doubtful one a warning, never a silent bad cut-out.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from dreamcache.core.errors import DreamCacheError
from dreamcache.core.images import fit_on_white

logger = logging.getLogger(__name__)


# Doubts about a mask (small, fragmented, at the border) are warnings when the mask cuts out a reference,
# whose cut-out every shot of the product inherits; for a generated shot being scored they are the
# generator's look, not a fault, and one per shot would bury a run's real warnings (issue 32).
_DOUBTS_AS_INFO: contextvars.ContextVar[bool] = contextvars.ContextVar("mask_doubts_as_info", default=False)


@contextlib.contextmanager
def doubts_logged_at_info() -> Iterator[None]:
    """Within this block (this thread or task only), `check_mask` logs doubtful masks at info."""
    token = _DOUBTS_AS_INFO.set(True)
    try:
        yield
    finally:
        _DOUBTS_AS_INFO.reset(token)


class SegmentationError(DreamCacheError, ValueError):
    """No usable mask for an item; the message names it and gives the figures."""


@dataclass(frozen=True)
class QualityLimits:
    min_area: float = 0.005  # below: rejected as empty
    max_area: float = 0.97  # above: rejected as "everything is foreground"
    small_area: float = 0.02  # below: warning, the product is tiny in the frame
    min_largest_share: float = 0.85  # below: warning, the mask is fragmented
    border_fraction: float = 0.02  # touching border pixels above this share of the perimeter: warning


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) bool, True on the product
    method: str
    area_fraction: float
    largest_component_share: float
    touches_border: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def quality(self) -> str:
        return "warning" if self.warnings else "ok"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return mask_box(self.mask)

    def subject_on_white(self, image: Image.Image, resolution: int, margin: float = 0.08) -> Image.Image:
        return subject_on_white(image, self.mask, resolution, margin)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def subject_on_white(image: Image.Image, mask: np.ndarray, resolution: int, margin: float = 0.08) -> Image.Image:
    """The masked product on white, cropped to its box (plus a margin), fitted to a square, padded."""
    if not mask.any():
        raise SegmentationError("mask is empty: nothing to cut out")
    rgb = np.asarray(image.convert("RGB"))
    composite = np.where(mask[..., None], rgb, 255).astype(np.uint8)
    x0, y0, x1, y1 = mask_box(mask)
    pad = int(round(margin * max(x1 - x0, y1 - y0)))
    h, w = mask.shape
    crop = Image.fromarray(composite).crop((max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)))
    return fit_on_white(crop, resolution)


def cutout(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The product alone: RGBA cropped to its mask's box, transparent where the mask is off, pixels untouched."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise SegmentationError("mask is empty: nothing to cut out")
    rgba = np.dstack([np.asarray(image.convert("RGB")), np.where(mask, 255, 0).astype(np.uint8)])
    x0, y0, x1, y1 = mask_box(mask)
    return Image.fromarray(rgba[y0:y1, x0:x1], "RGBA")


# A packshot's product fills this share of the frame's limiting side: a margin shops ask for.
PACKSHOT_FILL = 0.85


def packshot(image: Image.Image, mask: np.ndarray, size: tuple[int, int], fill: float = PACKSHOT_FILL) -> Image.Image:
    """The product on pure white, centred, fitted whole into a frame of `size` (width, height): never cropped."""
    product = cutout(image, mask)
    scale = fill * min(size[0] / product.width, size[1] / product.height)
    fitted = product.resize((max(1, round(product.width * scale)), max(1, round(product.height * scale))),
                            Image.Resampling.LANCZOS)
    frame = Image.new("RGB", size, (255, 255, 255))
    frame.paste(fitted, ((size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2), fitted)
    return frame


def check_mask(mask: np.ndarray, method: str, name: str, limits: QualityLimits = QualityLimits()) -> Segmentation:
    """Quality figures of a mask; an error for unusable masks, warnings for doubtful ones."""
    mask = np.asarray(mask, dtype=bool)
    area = float(mask.mean())
    if area < limits.min_area:
        raise SegmentationError(
            f"{name}: mask is blank ({area:.2%} of the image, minimum {limits.min_area:.1%}): "
            "the product was not found; check the image or give a category to the detector"
        )
    if area > limits.max_area:
        raise SegmentationError(
            f"{name}: mask covers {area:.2%} of the image (maximum {limits.max_area:.0%}): "
            "foreground and background could not be told apart"
        )
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    largest = float(sizes.max() / sizes.sum())
    perimeter = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    touches = float(perimeter.mean()) > limits.border_fraction
    warnings = []
    if area < limits.small_area:
        warnings.append(f"product covers only {area:.2%} of the image")
    if largest < limits.min_largest_share:
        warnings.append(f"mask is fragmented: largest of {count} parts holds {largest:.0%}")
    if touches:
        warnings.append(f"mask touches the image border on {perimeter.mean():.0%} of it: product may be cut off")
    level = logging.INFO if _DOUBTS_AS_INFO.get() else logging.WARNING
    for warning in warnings:
        logger.log(level, "%s: %s", name, warning)
    return Segmentation(mask, method, area, largest, touches, warnings)


def _border_distance(image: Image.Image) -> tuple[np.ndarray, float]:
    """Each pixel's RGB distance to the border's median colour (H, W), and the border's own spread around it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    ring = max(1, round(0.03 * min(h, w)))
    border = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                             rgb[:, :ring].reshape(-1, 3), rgb[:, -ring:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    spread = float(np.median(np.abs(np.linalg.norm(border - background, axis=1))))
    return np.linalg.norm(rgb - background, axis=2), spread


# The hole rule: background is the photo's own colour, this close to it (in RGB levels, or a few times the
# border's own noise if larger). Tighter than the foreground's 25 levels: the product's near-white parts stay.
HOLE_TOLERANCE = 6.0


def keep_holes(image: Image.Image, mask: np.ndarray) -> np.ndarray:
    """`mask` with the photo's background taken out where it reaches into the mask: the rim of a mug's handle's
    hole, and the rest of a hole that a segmenter found only in part (the world's network leaves about a fifth
    of a handle's hole as product, pasting the photo's white inside it).

    A connected region (4-connected: no leaking through a diagonal gap) of the border's own colour is background
    if any of it lies outside the mask: it is the photo's backdrop, seen around the product or through it. A region
    wholly inside the mask stays product: a white logo ringed by its outline looks the same as a hole that the
    segmenter filled, so a mask without a trace of a hole (the border-colour segmenter's) keeps it filled. Photos
    without a plain border (a scene) are returned as they are."""
    mask = np.asarray(mask, dtype=bool)
    distance, spread = _border_distance(image)
    if spread > HOLE_TOLERANCE or not mask.any():
        return mask
    background = distance <= max(HOLE_TOLERANCE, 3 * spread)
    labels, count = ndimage.label(background)
    seen = np.zeros(count + 1, bool)
    seen[np.unique(labels[background & ~mask])] = True
    seen[0] = False
    return mask & ~seen[labels]


def border_foreground(image: Image.Image) -> np.ndarray:
    """Pixels that differ from the border colour, cleaned up: the foreground of a studio photo (holes filled)."""
    distance, spread = _border_distance(image)
    h, w = distance.shape
    # 25 levels of RGB distance, or well above the border's own noise (gradients, JPEG) if larger.
    foreground = distance > max(25.0, 6.0 * float(spread))
    structure = np.ones((3, 3), dtype=bool)
    foreground = ndimage.binary_opening(foreground, structure, iterations=max(1, min(h, w) // 200))
    foreground = ndimage.binary_fill_holes(foreground)
    labels, count = ndimage.label(foreground)
    if count > 1:  # drop specks: keep parts at least 5% the size of the largest
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        foreground = sizes[labels] >= 0.05 * sizes.max()
    return foreground


def border_box(image: Image.Image, name: str = "<image>") -> tuple[int, int, int, int]:
    """A box around the product from border-colour statistics, for prompting SAM."""
    foreground = border_foreground(image)
    if not foreground.any():
        raise SegmentationError(f"{name}: no product found against the border colour (the image looks uniform)")
    return mask_box(foreground)


class Segmenter(Protocol):
    method: str

    def segment(self, image: Image.Image, category: str | None = None, name: str = "<image>") -> Segmentation: ...


class BorderColourSegmenter:
    """The classical fallback for plain studio backgrounds, used when no SAM checkpoint is configured."""

    method = "border-colour"

    def __init__(self, limits: QualityLimits = QualityLimits()):
        self.limits = limits

    def segment(self, image: Image.Image, category: str | None = None, name: str = "<image>") -> Segmentation:
        return check_mask(border_foreground(image), self.method, name, self.limits)


class TextGroundedDetector:
    """A box for a category name from a zero-shot object detector (OWL-ViT, OWLv2, Grounding DINO)."""

    def __init__(self, model: str, device: str | torch.device = "cpu", threshold: float = 0.1):
        from transformers import pipeline

        self.model_id = model
        self.threshold = threshold
        self.pipe = pipeline("zero-shot-object-detection", model=model, device=torch.device(device))

    def detect(self, image: Image.Image, category: str) -> tuple[int, int, int, int] | None:
        found = self.pipe(image, candidate_labels=[f"a photo of a {category}"], threshold=self.threshold)
        if not found:
            return None
        best = max(found, key=lambda d: d["score"])["box"]
        w, h = image.size
        box = (max(0, int(best["xmin"])), max(0, int(best["ymin"])), min(w, int(best["xmax"])), min(h, int(best["ymax"])))
        return box if box[2] > box[0] and box[3] > box[1] else None


SAM_TYPES = ("vit_h", "vit_l", "vit_b")


def load_sam(checkpoint: str | Path, model_type: str | None = None, device: str | torch.device = "cpu"):
    """A Segment Anything model from a checkpoint, read without unpickling code.

    segment-anything's own loader calls `torch.load` without `weights_only`; the model is built
    empty here and its weights read with `weights_only=True` (or from safetensors).
    """
    from segment_anything import sam_model_registry

    checkpoint = Path(checkpoint)
    model_type = model_type or next((t for t in SAM_TYPES if t in checkpoint.name), None)
    if model_type not in SAM_TYPES:
        raise ValueError(
            f"cannot tell the SAM model type of {checkpoint.name}: set DREAMCACHE_SAM_MODEL_TYPE to one of "
            f"{', '.join(SAM_TYPES)}"
        )
    if not checkpoint.is_file():
        raise FileNotFoundError(f"SAM checkpoint {checkpoint} not found")
    sam = sam_model_registry[model_type](checkpoint=None)
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    return sam.to(device).eval(), model_type


class SamSegmenter:
    """Segment Anything prompted with a box from a detector or from border-colour statistics."""

    def __init__(self, sam, model_type: str = "sam", detector: TextGroundedDetector | None = None,
                 limits: QualityLimits = QualityLimits()):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam)
        self.model_type = model_type
        self.detector = detector
        self.limits = limits
        self.method = f"sam-{model_type}"

    @classmethod
    def from_checkpoint(cls, checkpoint, model_type=None, device="cpu", detector=None) -> "SamSegmenter":
        sam, model_type = load_sam(checkpoint, model_type, device)
        return cls(sam, model_type, detector)

    def segment(self, image: Image.Image, category: str | None = None, name: str = "<image>") -> Segmentation:
        image = image.convert("RGB")
        box, source = None, "border-box"
        if self.detector is not None and category:
            box = self.detector.detect(image, category)
            source = "detector-box" if box else "border-box (detector found nothing)"
        if box is None:
            box = border_box(image, name)
        with torch.inference_mode():
            self.predictor.set_image(np.asarray(image))
            masks, predicted_iou, _ = self.predictor.predict(box=np.asarray(box), multimask_output=True)
        best = int(np.argmax(predicted_iou))
        return check_mask(keep_holes(image, masks[best]), f"{self.method}+{source}", name, self.limits)


def build_segmenter(sam_checkpoint=None, sam_model_type=None, detector_model=None, device="cpu") -> Segmenter:
    """The best segmenter the configuration allows, saying which one it is."""
    if sam_checkpoint is None:
        logger.info("no SAM checkpoint configured: using the border-colour segmenter (plain backgrounds only)")
        return BorderColourSegmenter()
    detector = TextGroundedDetector(detector_model, device) if detector_model else None
    return SamSegmenter.from_checkpoint(sam_checkpoint, sam_model_type, device, detector)
