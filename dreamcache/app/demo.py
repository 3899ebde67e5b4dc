"""The library-level demo: cache the bundled example product once, generate a few shots with and
without its cache, and show them side by side."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from dreamcache.app.config import Settings
from dreamcache.perception.contact_sheet import contact_sheet
from dreamcache.core.images import open_image
from dreamcache.app.loading import load_pipeline
from dreamcache.world import scene as world

# A held-out mug of the product world on white (flows/examples/catalogue/mug/MUG-TEAL-DOTS.png):
# the bundled model never saw it in training.
EXAMPLE_PRODUCT = files("dreamcache") / "assets" / "example_product.png"
# World captions, because the bundled model knows no other texts; three, so that the pairs fill one row.
EXAMPLE_PROMPTS = tuple(world.caption("mug", scene) for scene in ("beach", "snow", "forest"))


@dataclass
class DemoResult:
    output_dir: Path
    images: list[Path]
    text_only: list[Path]
    contact_sheet: Path


def run_demo(
    settings: Settings,
    output_dir: Path | None = None,
    prompts: Sequence[str] = EXAMPLE_PROMPTS,
    steps: int | None = None,
    seed: int = 0,
    image_scale: float | None = None,
) -> DemoResult:
    """Cache the example product and generate `prompts` with and without its cache, with the model's own
    settings (its adapter's recommended ones: `DreamCachePipeline.dreamcache_defaults`) where `steps` or
    `image_scale` is None."""
    output_dir = Path(output_dir or settings.outputs_dir / "demo")
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(settings)
    reference = open_image(Path(str(EXAMPLE_PRODUCT)))
    subject = pipe.cache_subject(reference, seed=seed)
    n, seeds = len(prompts), [seed + i for i in range(len(prompts))]
    # Each text-only row has its shot's prompt and seed, so a pair differs by the cache alone.
    images = pipe(list(prompts) * 2, subject=[subject] * n + [None] * n, seed=seeds * 2, num_inference_steps=steps,
                  image_guidance_scale=image_scale, progress=True).images
    shots, plain = images[:n], images[n:]

    paths, plain_paths = [], []
    for i, (shot, plain_shot) in enumerate(zip(shots, plain)):
        paths.append(output_dir / f"shot-{i:02d}.png")
        plain_paths.append(output_dir / f"shot-{i:02d}.text-only.png")
        shot.save(paths[-1])
        plain_shot.save(plain_paths[-1])
    captions = [f"{prompt} (seed {s})" for prompt, s in zip(prompts, seeds)]
    sheet_path = output_dir / "contact_sheet.png"
    contact_sheet(reference, list(zip(shots, captions)), title="DreamCache demo",
                  text_only=list(zip(plain, captions))).save(sheet_path)
    return DemoResult(output_dir, paths, plain_paths, sheet_path)
