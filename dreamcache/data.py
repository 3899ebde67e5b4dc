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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from dreamcache.errors import DreamCacheError
from dreamcache.images import decode_image, fit_on_white, foreground_box

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
