"""Training data: the triplet manifest, and the reference augmentations of the method.

A triplet is (target image, reference, caption). The manifest is JSONL, one triplet a line:

    {"target": "scenes/0001.png", "reference": "refs/0001.png", "caption": "a mug on a beach"}
    {"target": "scenes/0002.png", "mask": "masks/0002.png", "caption": "a lamp in the snow"}

`target`, `reference` and `mask` are paths relative to the manifest, or absolute. The library
reads local files; give `loader=` a function of URI -> bytes for other stores (the platform's
`dreamcache train` passes one that reads s3:// too). With a `mask` instead of a `reference`, the
reference is the target's masked subject on white. Rows that cannot be used (missing fields,
unreadable images) are reported by line and skipped, with counts.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from dreamcache.core.errors import DreamCacheError
from dreamcache.core.images import WHITE_TOLERANCE, decode_image, fit_on_white, foreground_box

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Triplet:
    target: str
    caption: str
    reference: str | None = None
    mask: str | None = None


@dataclass
class ManifestReport:
    rows: int
    usable: int
    skipped: list[tuple[int, str]]  # (line, reason)


Loader = Callable[[str], bytes]


def read_bytes(uri: str) -> bytes:
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: the library reads local files; pass a loader for this kind of URI")
    return Path(uri.removeprefix("file://")).read_bytes()


def load_manifest(path: str | Path, check_images: bool = True,
                  loader: Loader = read_bytes) -> tuple[list[Triplet], ManifestReport]:
    """The usable triplets of a JSONL manifest, and a report of the rest."""
    path = str(path)
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    triplets, skipped, rows = [], [], 0
    for line_no, line in enumerate(loader(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
            caption = str(row.get("caption", "")).strip()
            target, reference, mask = (row.get(k) for k in ("target", "reference", "mask"))
            if not target or not caption:
                raise ValueError("needs a target and a caption")
            if not reference and not mask:
                raise ValueError("needs a reference or a mask")
            resolve = lambda uri: uri if uri is None or uri.startswith(("s3://", "/", "file://")) else f"{base}/{uri}"
            triplet = Triplet(resolve(target), caption, resolve(reference), resolve(mask))
            if check_images:
                for uri in filter(None, (triplet.target, triplet.reference, triplet.mask)):
                    decode_image(loader(uri), uri)
        except (ValueError, OSError, DreamCacheError) as exc:
            skipped.append((line_no, str(exc)))
            continue
        triplets.append(triplet)
    for line_no, reason in skipped:
        logger.warning("%s line %d skipped: %s", path, line_no, reason)
    return triplets, ManifestReport(rows, len(triplets), skipped)


def subject_on_white_from_mask(target: Image.Image, mask: Image.Image) -> Image.Image:
    keep = np.asarray(mask.convert("L").resize(target.size)) > 127
    pixels = np.where(keep[..., None], np.asarray(target.convert("RGB")), 255).astype(np.uint8)
    return Image.fromarray(pixels)


class ReferenceAugmentation:
    """The method's reference augmentations, drawn from an explicit generator (so runs resume exactly).

    Crop to the foreground; place it at a random scale (covering at least `min_cover` of the frame's
    area) and position on white; horizontal flip; colour jitter (0.2, 0.2, 0.2, 0.05) with p = 0.1;
    random erasing with p = 0.4 over 2-25% of the area, filled white.
    """

    def __init__(self, resolution: int, min_cover: float = 0.7):
        self.resolution = resolution
        self.min_cover = min_cover
        self.jitter = v2.ColorJitter(0.2, 0.2, 0.2, 0.05)
        self.erase = v2.RandomErasing(p=1.0, scale=(0.02, 0.25), value=1.0)

    def __call__(self, reference: Image.Image, generator: torch.Generator) -> Image.Image:
        def uniform(low: float, high: float) -> float:
            return low + (high - low) * torch.rand((), generator=generator).item()

        crop = reference.crop(foreground_box(reference))
        r = self.resolution
        cover = uniform(self.min_cover, 1.0) ** 0.5  # side fraction; the area fraction is uniform in [min, 1]
        scale = cover * r / max(crop.size)
        size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        canvas = Image.new("RGB", (r, r), "white")
        canvas.paste(crop.resize(size, Image.Resampling.BICUBIC),
                     (int(uniform(0, r - size[0])), int(uniform(0, r - size[1]))))
        image = v2.functional.to_image(canvas).float() / 255  # (3, r, r)
        if uniform(0, 1) < 0.5:
            image = image.flip(-1)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            # The CPU generator only: torch.manual_seed would also queue a CUDA reseed, with a stack
            # trace, in every data worker (half the cost of a sample).
            torch.default_generator.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            if torch.rand(()) < 0.1:
                image = self.jitter(image)
            if torch.rand(()) < 0.4:
                image = self.erase(image)
        return v2.functional.to_pil_image(image.clamp(0, 1))


class TripletDataset:
    """Triplets as (target image, reference image, caption), references augmented per draw."""

    def __init__(self, triplets: list[Triplet], resolution: int, augment: bool = True, loader: Loader = read_bytes):
        self.triplets = triplets
        self.resolution = resolution
        self.augmentation = ReferenceAugmentation(resolution) if augment else None
        self.loader = loader

    def __len__(self) -> int:
        return len(self.triplets)

    def _image(self, uri: str) -> Image.Image:
        return decode_image(self.loader(uri), uri)

    def get(self, index: int, generator: torch.Generator) -> tuple[Image.Image, Image.Image, str]:
        t = self.triplets[index]
        target = ImageOps.fit(self._image(t.target), (self.resolution, self.resolution), Image.Resampling.BICUBIC)
        if t.reference:
            reference = self._image(t.reference)
        else:
            reference = subject_on_white_from_mask(self._image(t.target), Image.open(io.BytesIO(self.loader(t.mask))))
        reference = (self.augmentation(reference, generator) if self.augmentation
                     else fit_on_white(reference.crop(foreground_box(reference)), self.resolution))
        return target, reference, t.caption


class DeviceReferenceAugmentation:
    """The method's reference augmentations for a batch of references already on the training device.

    The same augmentations as `ReferenceAugmentation`, computed for a whole batch at once: crop to
    the foreground, place at a random scale (covering at least `min_cover` of the area) and
    position on white, flip (one bilinear resampling does all three); colour jitter (brightness,
    contrast, saturation, hue; 0.2, 0.2, 0.2, 0.05) with p = 0.1, in that fixed order; random
    erasing with p = 0.4 over 2-25% of the area, filled white. Each sample's parameters are drawn
    on the CPU from its own generator (`draw`), so a batch's result does not depend on the device
    or on what else shares the batch.
    """

    # Layout of a sample's parameter vector.
    FIELDS = ("cover", "x", "y", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "erase", "area",
              "log_ratio", "erase_y", "erase_x")

    def __init__(self, resolution: int, min_cover: float = 0.7):
        self.resolution = resolution
        self.min_cover = min_cover

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(len(self.FIELDS), generator=generator, dtype=torch.float64)
        p = dict(zip(self.FIELDS, u.tolist()))
        p["cover"] = (self.min_cover + (1 - self.min_cover) * p["cover"]) ** 0.5  # side fraction; area uniform
        p["flip"] = float(p["flip"] < 0.5)
        p["jitter"] = float(p["jitter"] < 0.1)
        for name, strength in (("brightness", 0.2), ("contrast", 0.2), ("saturation", 0.2)):
            p[name] = 1 - strength + 2 * strength * p[name]
        p["hue"] = -0.05 + 0.1 * p["hue"]
        p["erase"] = float(p["erase"] < 0.4)
        p["area"] = 0.02 + 0.23 * p["area"]
        p["log_ratio"] = math.log(0.3) + (math.log(3.3) - math.log(0.3)) * p["log_ratio"]
        return torch.tensor([p[f] for f in self.FIELDS], dtype=torch.float32)

    def __call__(self, references: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, R, R) references on white, (B, len(FIELDS)) parameters -> float (B, 3, R, R) in [0, 1]."""
        r = self.resolution
        p = dict(zip(self.FIELDS, params.float().unbind(1)))  # each (B,)
        images = references.float() / 255
        x0, y0, x1, y1 = _foreground_boxes(references)  # (B,) each, pixels, end exclusive
        w, h = x1 - x0, y1 - y0
        scale = p["cover"] * r / torch.maximum(w, h)
        sw, sh = (w * scale).round().clamp(min=1), (h * scale).round().clamp(min=1)
        px, py = (p["x"] * (r - sw)).floor(), (p["y"] * (r - sh)).floor()
        # Output pixel centre u (flipped where asked) -> source pixel coordinate, normalised for grid_sample.
        u = torch.arange(r, device=images.device, dtype=torch.float32) + 0.5  # (R,)
        u_x = torch.where(p["flip"][:, None] > 0, r - u[None], u[None])  # (B, R)
        src_x = x0[:, None] + (u_x - px[:, None]) / sw[:, None] * w[:, None]  # (B, R)
        src_y = y0[:, None] + (u[None] - py[:, None]) / sh[:, None] * h[:, None]  # (B, R)
        inside_x = (u_x >= px[:, None]) & (u_x < (px + sw)[:, None])
        inside_y = (u[None] >= py[:, None]) & (u[None] < (py + sh)[:, None])
        grid = torch.stack(torch.broadcast_tensors(src_x[:, None, :], src_y[:, :, None]), dim=-1) * (2 / r) - 1  # (B, R, R, 2)
        placed = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        inside = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (B, 1, R, R)
        out = torch.where(inside, placed, torch.ones_like(placed))
        out = _jitter(out, p)
        return _erase(out, p, r)


def _foreground_boxes(references: torch.Tensor):
    """Per image, the box of its non-white pixels (as `images.foreground_box`); the whole frame if none."""
    mask = (255 - references.int()).amax(1) > WHITE_TOLERANCE  # (B, R, R)
    r = references.shape[-1]
    index = torch.arange(r, device=references.device)

    def span(any_of: torch.Tensor):  # (B, R) bool -> first and one-past-last True index
        present = any_of.any(1)
        first = torch.where(any_of, index, r).amin(1)
        last = torch.where(any_of, index, -1).amax(1) + 1
        return torch.where(present, first, 0).float(), torch.where(present, last, r).float()

    y0, y1 = span(mask.any(2))
    x0, x1 = span(mask.any(1))
    return x0, y0, x1, y1


def _jitter(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter where p["jitter"] is set (the others get identity factors)."""
    on = p["jitter"][:, None, None, None] > 0

    def factor(name: str, identity: float) -> torch.Tensor:
        return torch.where(p["jitter"] > 0, p[name], torch.full_like(p[name], identity))[:, None, None, None]

    grey = lambda x: (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # (B, 1, R, R)
    out = (images * factor("brightness", 1.0)).clamp(0, 1)
    c = factor("contrast", 1.0)
    out = (c * out + (1 - c) * grey(out).mean((2, 3), keepdim=True)).clamp(0, 1)
    s = factor("saturation", 1.0)
    out = (s * out + (1 - s) * grey(out)).clamp(0, 1)
    # Hue: a rotation of the chroma plane (YIQ), by hue x 360 degrees.
    angle = factor("hue", 0.0)[:, 0] * 2 * math.pi  # (B, 1, 1)
    y = grey(out)[:, 0]
    i = 0.596 * out[:, 0] - 0.274 * out[:, 1] - 0.322 * out[:, 2]
    q = 0.211 * out[:, 0] - 0.523 * out[:, 1] + 0.312 * out[:, 2]
    i, q = i * angle.cos() - q * angle.sin(), i * angle.sin() + q * angle.cos()
    rotated = torch.stack([y + 0.956 * i + 0.621 * q, y - 0.272 * i - 0.647 * q, y - 1.106 * i + 1.703 * q], 1)
    return torch.where(on, rotated.clamp(0, 1), images)


def _erase(images: torch.Tensor, p: dict[str, torch.Tensor], r: int) -> torch.Tensor:
    """A white rectangle of the drawn area and aspect ratio, where p["erase"] is set."""
    area = p["area"] * r * r
    ratio = p["log_ratio"].exp()
    eh = (area * ratio).sqrt().round().clamp(1, r)
    ew = (area / ratio).sqrt().round().clamp(1, r)
    top = (p["erase_y"] * (r - eh + 1)).floor()
    left = (p["erase_x"] * (r - ew + 1)).floor()
    index = torch.arange(r, device=images.device, dtype=torch.float32)
    rows = (index[None] >= top[:, None]) & (index[None] < (top + eh)[:, None])  # (B, R)
    cols = (index[None] >= left[:, None]) & (index[None] < (left + ew)[:, None])
    erased = (rows[:, :, None] & cols[:, None, :] & (p["erase"][:, None, None] > 0))[:, None]  # (B, 1, R, R)
    return torch.where(erased, torch.ones_like(images), images)
