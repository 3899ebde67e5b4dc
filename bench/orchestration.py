"""Orchestration overhead of a catalogue run, per generated image, at 100, 1,000 and 10,000 images.

Everything but model time is measured: listing, ingest, segmentation, planning, claiming, object
writes (PNG + JSON sidecar), database updates, contact sheets. The model is replaced by a
benchmark-only INSTANT GENERATOR that returns blank images and empty caches at once, so the
figures are the platform's own cost. Embedded run: SQLite and a local object directory.

    .venv/bin/python bench/orchestration.py [--sizes 100 1000 10000] [--output bench/results/orchestration.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamcache.core.cache import CacheMetadata, FeatureCache  # noqa: E402

PRODUCTS = 50


@dataclass
class _Images:
    images: list


class InstantGenerator:
    """BENCHMARK ONLY: stands in for the DreamCache pipeline and costs (almost) nothing."""

    resolution = 64
    base_fingerprint = "0" * 64
    _dreamcache_preset = "default"
    dreamcache_adapters: dict = {}
    scheduler = SimpleNamespace()
    unet = SimpleNamespace(dtype=torch.float32)

    def cache_subjects(self, images, seed=0, **_):
        meta = CacheMetadata("instant", self.base_fingerprint, "default", ("layer",), 1, seed, self.resolution,
                             "float32", "bench")
        return [FeatureCache({"layer": torch.zeros(1, 4)}, meta) for _ in images]

    def __call__(self, prompts, **_):
        return _Images([Image.new("RGB", (self.resolution, self.resolution), "white") for _ in prompts])


def make_catalogue(folder: Path) -> None:
    for i in range(PRODUCTS):
        image = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(image).ellipse((20, 16, 76, 80), fill=(40 + 4 * i, 30, 200 - 3 * i))
        (folder / f"cat{i % 5}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"cat{i % 5}" / f"SKU-{i:04d}.png")


def shape(images: int) -> tuple[int, int]:
    """(prompts, images per prompt) giving `images` over the PRODUCTS products."""
    per_product = images // PRODUCTS
    prompts = min(per_product, 20)
    return prompts, per_product // prompts


def run_once(images: int) -> dict:
    from dreamcache.app.config import Settings
    from dreamcache.perception.scoring import Scorer
    from flows.platform import resources as platform_module
    from flows.runs.catalogue import run_embedded
    from flows.platform.params import CatalogueRunParams

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_catalogue(tmp / "catalogue")
        os.environ["DREAMCACHE_HOME"] = str(tmp / "home")
        platform_module.close_platforms()
        plat = platform_module.get_platform(Settings())
        plat._models.update(pipeline=InstantGenerator(), scorer=Scorer())
        prompts, per_prompt = shape(images)
        params = CatalogueRunParams(source=str(tmp / "catalogue"), prompts=[f"a {{category}} in scene {k}" for k in
                                    range(prompts)], images_per_prompt=per_prompt, steps=1, batch_size=16)
        started = time.perf_counter()
        summary = run_embedded(params, progress=False)
        seconds = time.perf_counter() - started
    assert summary["images_generated"] == images, summary
    return dict(images=images, products=PRODUCTS, prompts=prompts, images_per_prompt=per_prompt,
                seconds=round(seconds, 3), ms_per_image=round(1000 * seconds / images, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "orchestration.json")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # the instant generator's "no scorer configured" notice, once per size
    rows = [run_once(n) for n in args.sizes]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = dict(benchmark="orchestration overhead per generated image (instant generator, embedded run)",
                  generator="INSTANT GENERATOR (benchmark only): blank images, no model time",
                  backends="SQLite + local object directory", commit=commit, machine=host.platform(),
                  cpus=os.cpu_count(), python=host.python_version(), results=rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['images']:>6} images: {row['seconds']:8.2f} s, {row['ms_per_image']:7.2f} ms per image")


if __name__ == "__main__":
    main()
