"""Placement and formats on the GPU (issue 26): what a placed shot and a 16:9 canvas cost, and that the fast paths
keep a placed product's pixels exact.

    python3 bench/placement_gpu.py --output bench/results/placement_h200.json

SD 1.5 shapes (random weights with random adapters, fp16, the GPU fast paths: compiled, CUDA graphs, channels-last),
combined guidance, UniPC 10 steps, batch 16, one cached subject. Four layouts side by side in one process: drawn
and placed, at 512x512 and at 16:9 (896x512, the canvas `canvas_size` gives for 16:9 at 512). For each: the first
batch's seconds (compile and capture of a new layout: what a run's first batch of a new format costs), then
images/s over 4 batches. The check: a placed batch made with the fast paths and one made eagerly have identical
pixels wherever the product is pasted at full opacity, and their other pixels differ by no more than fp16 noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.provenance import git_commit  # noqa: E402
from bench.speed import random_pipeline  # noqa: E402
from dreamcache.core.architectures import build_random_pipeline_components  # noqa: E402
from dreamcache.core.denoiser import FastPaths  # noqa: E402
from dreamcache.core.placement import PlacedProduct, Placement, canvas_size  # noqa: E402

BATCH, STEPS, SAMPLER = 16, 10, "unipc"


def photo() -> tuple[Image.Image, np.ndarray]:
    image = Image.new("RGB", (600, 800), (250, 250, 250))
    ImageDraw.Draw(image).rounded_rectangle((150, 120, 450, 700), 40, fill=(30, 90, 200))
    ImageDraw.Draw(image).ellipse((220, 300, 380, 460), fill=(240, 200, 40))
    mask = (np.asarray(image).astype(int) - 250).__abs__().max(axis=2) > 12
    return image, mask


def timed(pipe, n: int, **kwargs) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    pipe([f"a bottle on a beach, view {i}" for i in range(n)], seed=list(range(n)), batch_size=BATCH, progress=False,
         output_type="pt", sampler=SAMPLER, num_inference_steps=STEPS, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--square-only", action="store_true", help="Skip the 16:9 layouts (each compiles for ~3 min).")
    args = parser.parse_args()
    pipe = random_pipeline(build_random_pipeline_components("sd15", seed=0), "cuda", torch.float16)
    pipe.enable_fast_paths(FastPaths.gpu())
    image, mask = photo()
    subject = pipe.cache_subject(image)
    product = PlacedProduct.from_photo(image, mask, Placement(x=0.5, y=0.55, scale=0.6))
    wide = canvas_size(16, 9, pipe.resolution, pipe.size_multiple)
    results = dict(device=torch.cuda.get_device_name(), commit=git_commit(), torch=torch.__version__, batch=BATCH,
                   steps=STEPS, sampler=SAMPLER, dtype="float16", guidance="combined", layouts={})
    layouts = [("drawn 512x512", (512, 512), None), ("placed 512x512", (512, 512), product)]
    if not args.square_only:
        layouts += [("drawn 16:9", wide, None), ("placed 16:9", wide, product)]
    check = (512, 512) if args.square_only else wide
    for name, size, placed in layouts:
        kwargs = dict(subject=subject, width=size[0], height=size[1], placed=placed)
        first = timed(pipe, BATCH, **kwargs)
        rate = 4 * BATCH / timed(pipe, 4 * BATCH, **kwargs)
        results["layouts"][name] = dict(width=size[0], height=size[1], first_batch_s=round(first, 1),
                                        images_per_s=round(rate, 2))
        print(f"{name:>16}: first batch {first:6.1f} s, {rate:6.2f} images/s", flush=True)

    kwargs = dict(subject=subject, width=check[0], height=check[1], placed=product, seed=list(range(4)), batch_size=4,
                  progress=False, output_type="np", sampler=SAMPLER, num_inference_steps=STEPS)
    prompts = [f"a bottle on a beach, view {i}" for i in range(4)]
    fast = np.stack(pipe(prompts, **kwargs).images)
    pipe.disable_fast_paths()
    eager = np.stack(pipe(prompts, **kwargs).images)
    alpha = product.layer(check).alpha
    opaque = alpha >= 1
    diff = np.abs(fast - eager)
    results["fast_vs_eager"] = dict(width=check[0], height=check[1],
        opaque_pixels=int(opaque.sum()), max_diff_where_pasted=float(diff[:, opaque].max()),
        mean_diff_elsewhere=float(diff[:, ~opaque].mean()), max_diff_elsewhere=float(diff[:, ~opaque].max()))
    print(json.dumps(results, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
