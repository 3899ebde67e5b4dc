"""The synthetic triplet pipeline of the paper's supplement, stage by stage, each resumable.

1. **Captions**: from a language model through transformers when one is configured, otherwise from
   a template grammar (category x scene x style); then filtered: exact duplicates out, and a
   caption too similar to one already kept (token-set Jaccard above `max_similarity`) out, for
   diversity.
2. **Targets**: one image per caption from any diffusers text-to-image pipeline (SDXL in the paper).
3. **Masks**: the subject of each target from the platform's segmenter (a text-grounded detector
   plus SAM when configured), prompted with the caption's category; the reference is the subject on
   white. Unusable cut-outs are rejected with their reason.
4. **Manifest**: one JSONL line per triplet (target, mask, reference, caption), see dreamcache.training.data.

Every item is named by a hash of its caption and seed, and each stage skips items whose outputs
exist, so an interrupted run continues where it stopped and shards can run anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from dreamcache.perception.segmentation import Segmenter, SegmentationError, subject_on_white

logger = logging.getLogger(__name__)

CATEGORIES = ("mug", "bottle", "sneaker", "backpack", "lamp", "box", "teapot", "watch", "handbag", "headphones")
SCENES = ("on a sandy beach", "on a snowy mountain", "on a kitchen counter", "in a forest", "on a city street at night",
          "in a minimalist studio", "on green grass", "on a wooden desk", "next to a swimming pool", "in a desert")
STYLES = ("a photo of", "a close-up photo of", "a product photo of", "a wide shot of")


@dataclass(frozen=True)
class SyntheticItem:
    id: str
    caption: str
    category: str
    seed: int


def item_for(caption: str, category: str, seed: int) -> SyntheticItem:
    return SyntheticItem(hashlib.sha256(f"{caption}|{seed}".encode()).hexdigest()[:16], caption, category, seed)


def grammar_captions(count: int, seed: int = 0, categories: Sequence[str] = CATEGORIES,
                     scenes: Sequence[str] = SCENES, styles: Sequence[str] = STYLES) -> list[tuple[str, str]]:
    """(caption, category) pairs drawn without replacement from category x scene x style."""
    combos = [(f"{style} a {category} {scene}", category) for category in categories for scene in scenes
              for style in styles]
    random.Random(seed).shuffle(combos)
    return combos[:count]


def language_model_captions(model: str, count: int, seed: int = 0,
                            categories: Sequence[str] = CATEGORIES) -> list[tuple[str, str]]:
    """Captions written by a text-generation model, one scene per request, for each category in turn."""
    import torch
    from transformers import pipeline

    generator = pipeline("text-generation", model=model)
    torch.manual_seed(seed)
    captions = []
    for i in range(count):
        category = categories[i % len(categories)]
        prompt = f"Write one short photo caption showing a {category} in an interesting place. Caption: a {category}"
        text = generator(prompt, max_new_tokens=24, do_sample=True, return_full_text=False)[0]["generated_text"]
        line = text.strip().splitlines()[0] if text.strip() else ""
        captions.append((f"a {category} {line}".strip(" ."), category))
    return captions


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def filter_captions(captions: Sequence[tuple[str, str]], max_similarity: float = 0.8) -> list[tuple[str, str]]:
    """Drop duplicates and near-duplicates (token-set Jaccard above `max_similarity`)."""
    kept, seen = [], []
    for caption, category in captions:
        tokens = _tokens(caption)
        if not tokens or any(len(tokens & other) / len(tokens | other) > max_similarity for other in seen):
            continue
        kept.append((caption, category))
        seen.append(tokens)
    return kept


def render_targets(pipe, items: Sequence[SyntheticItem], folder: Path, steps: int = 30,
                   batch_size: int = 4) -> list[SyntheticItem]:
    """`targets/<id>.png` for each item (skipping those already there) with any diffusers text-to-image pipeline."""
    import torch

    folder = Path(folder) / "targets"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [item for item in items if not (folder / f"{item.id}.png").exists()]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(item.seed) for item in batch]
        images = pipe([item.caption for item in batch], num_inference_steps=steps, generator=generators).images
        for item, image in zip(batch, images):
            tmp = folder / f".{item.id}.png"
            image.save(tmp, format="PNG")
            tmp.replace(folder / f"{item.id}.png")  # a half-written target never looks finished
    return list(items)


@dataclass
class Triplet:
    id: str
    target: str
    mask: str
    reference: str
    caption: str
    category: str


def segment_targets(segmenter: Segmenter, items: Sequence[SyntheticItem], folder: Path,
                    resolution: int = 512) -> tuple[list[Triplet], list[tuple[str, str]]]:
    """Masks and references for rendered targets; returns the triplets and the rejected (id, reason)."""
    folder = Path(folder)
    for sub in ("masks", "references"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    triplets, rejected = [], []
    for item in items:
        names = dict(target=f"targets/{item.id}.png", mask=f"masks/{item.id}.png", reference=f"references/{item.id}.png")
        if not (folder / names["target"]).exists():
            rejected.append((item.id, "no target image"))
            continue
        if not (folder / names["reference"]).exists():
            image = Image.open(folder / names["target"]).convert("RGB")
            try:
                cut = segmenter.segment(image, item.category, name=f"{item.id} ({item.caption})")
            except SegmentationError as exc:
                rejected.append((item.id, str(exc)))
                continue
            Image.fromarray(cut.mask).save(folder / names["mask"])
            subject_on_white(image, cut.mask, resolution).save(folder / names["reference"])
        triplets.append(Triplet(id=item.id, caption=item.caption, category=item.category, **names))
    return triplets, rejected


def write_manifest(triplets: Sequence[Triplet], path: Path) -> int:
    """Write (or extend) a triplet manifest; an id already in it is not written twice."""
    path = Path(path)
    existing = set()
    if path.exists():
        existing = {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}
    new = [t for t in triplets if t.id not in existing]
    with open(path, "a") as f:
        for triplet in new:
            f.write(json.dumps(asdict(triplet)) + "\n")
    return len(new)
