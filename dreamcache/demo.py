"""The library-level demo: cache the bundled example product once, generate a few shots, show them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from dreamcache.config import Settings
from dreamcache.contact_sheet import contact_sheet
from dreamcache.images import open_image
from dreamcache.models import is_bundled_untrained, load_pipeline

EXAMPLE_PRODUCT = files("dreamcache") / "assets" / "example_product.png"
EXAMPLE_PROMPTS = (
    "a mug on a sandy beach",
    "a mug on a snowy mountain",
    "a mug on a kitchen counter",
    "a mug in a forest",
)


@dataclass
class DemoResult:
    output_dir: Path
    images: list[Path]
    contact_sheet: Path
    untrained: bool


def run_demo(
    settings: Settings,
    output_dir: Path | None = None,
    prompts: Sequence[str] = EXAMPLE_PROMPTS,
    steps: int = 25,
    seed: int = 0,
) -> DemoResult:
    output_dir = Path(output_dir or settings.outputs_dir / "demo")
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(settings)
    reference = open_image(Path(str(EXAMPLE_PRODUCT)))
    subject = pipe.cache_subject(reference, seed=seed)
    shots = pipe(list(prompts), subject=subject, seed=seed, num_inference_steps=steps, progress=True).images

    paths = []
    for i, (prompt, image) in enumerate(zip(prompts, shots)):
        path = output_dir / f"shot-{i:02d}.png"
        image.save(path)
        paths.append(path)
    untrained = is_bundled_untrained(settings)
    title = "DreamCache demo" + (" - UNTRAINED bundled model: images are noise" if untrained else "")
    captions = [f"{prompt} (seed {seed + i})" for i, prompt in enumerate(prompts)]
    sheet_path = output_dir / "contact_sheet.png"
    contact_sheet(reference, list(zip(shots, captions)), title=title).save(sheet_path)
    return DemoResult(output_dir, paths, sheet_path, untrained)
