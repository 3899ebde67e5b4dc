"""Fewer steps at equal fidelity (issue 23): samplers and step counts on the product-world model.

    python3 bench/samplers.py --output bench/results/samplers_h200.json --figures docs/figures
    python3 bench/samplers.py --products 2 --seeds 1 --steps-list 2 --baseline-steps 3 --repeats 2 --no-speed \
        --output X                                                                                  # CPU smoke

Fidelity: every condition generates the same held-out products x scenes x seeds at the model's
working point (combined guidance, its recommended image scale) and is scored by the world's
classifier and CLIP (identity, scene accuracy, toy CLIP-T). DDIM 50 runs `--repeats` times on
disjoint seed sets: the spread of those runs is the run-to-run noise a cheaper sampler must stay
within. The chosen default is the fewest steps whose identity, scene accuracy and CLIP-T all lie
within that noise of DDIM 50 (the rule is in the JSON).

Speed (GPU): images/s of the bundled model at batch 64 with its fast paths (compiled, CUDA graphs)
for DDIM 50, the model's shipped setting and the chosen default, after a warm-up batch of each; and
SD 1.5 shapes (random weights, 512 px, fp16, batch 16, combined guidance) for DDIM 50 against the
chosen sampler and step count, as images per hour.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.provenance import git_commit  # noqa: E402
from dreamcache.app.config import BUNDLED_DIR  # noqa: E402
from dreamcache.core.weights import read_adapter_config  # noqa: E402
from dreamcache.world.evaluation import Cases, Condition, FidelityEvaluator  # noqa: E402

logger = logging.getLogger("samplers")
METRICS = ("identity", "scene", "clip_t")
CANDIDATES = ("dpm++2m", "dpm++2m-karras", "unipc")


def conditions(image_scale: float, steps_list, shipped_steps: int) -> list[Condition]:
    out = [Condition(f"model {shipped_steps}", image_scale=image_scale, steps=shipped_steps)]
    out += [Condition(f"{sampler} {n}", image_scale=image_scale, sampler=sampler, steps=n)
            for sampler in CANDIDATES for n in steps_list]
    out.append(Condition(f"euler-a {max(steps_list)}", image_scale=image_scale, sampler="euler-a", steps=max(steps_list)))
    return out


def score(evaluator, cases, condition) -> tuple[dict, torch.Tensor]:
    started = time.perf_counter()
    images = evaluator.generate(cases, condition)
    scores = evaluator.score(cases, images)
    row = dict(identity=scores.identity, scene=scores.scene, clip_t=scores.clip_t, accuracy=scores.accuracy,
               images=scores.images, seconds=round(time.perf_counter() - started, 2), **{
                   k: v for k, v in asdict(condition).items() if k in ("sampler", "steps", "image_scale")})
    logger.info("%-22s identity %.3f scene %.3f clip-t %.4f (%.1f s)", condition.name, row["identity"], row["scene"],
                row["clip_t"], row["seconds"])
    return row, images.cpu()


def choose(results: dict, baseline: dict, noise: dict) -> dict:
    """The fewest-step candidate within the noise of DDIM 50 on every metric (ties: the earlier sampler)."""
    within = {}
    for name, row in results.items():
        if row.get("sampler") not in CANDIDATES or "error" in row:
            continue
        gaps = {m: baseline[m] - row[m] for m in METRICS}  # positive: worse than DDIM 50
        within[name] = all(gaps[m] <= noise[m] for m in METRICS)
        row["gap_to_ddim50"] = gaps
        row["within_noise"] = within[name]
    passing = [n for n, ok in within.items() if ok]
    if not passing:
        return dict(name=None, rule="none within noise")
    best = min(passing, key=lambda n: (results[n]["steps"], CANDIDATES.index(results[n]["sampler"])))
    return dict(name=best, sampler=results[best]["sampler"], steps=results[best]["steps"])


def sampler_grid(cases: Cases, shots: dict[str, torch.Tensor], products: int = 6, tile: int = 96):
    """Rows: products (first scene, first seed). Columns: the reference, then each condition's shot."""
    from PIL import Image, ImageDraw

    from dreamcache.world import scene as world
    from dreamcache.world.evaluation import _tile

    columns = ["reference", *shots]
    head = 18
    grid = Image.new("RGB", (tile * len(columns), head + tile * min(products, len(cases.products))), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(columns):
        draw.text((c * tile + 3, 3), title, fill="black")
    for r, product in enumerate(cases.products[:products]):
        y = head + r * tile
        grid.paste(world.reference_image(product, tile, seed=0), (0, y))
        row = r * len(cases.scenes) * len(cases.seeds)
        for c, images in enumerate(shots.values(), start=1):
            grid.paste(_tile(images[row], tile), (c * tile, y))
    return grid


def images_per_s(pipe, prompts, subjects, seeds, batch: int, **kwargs) -> float:
    pipe(prompts[:batch], subject=subjects[:batch], seed=seeds[:batch], batch_size=batch, progress=False,
         output_type="pt", **kwargs)  # warm-up: compile and capture this layout
    torch.cuda.synchronize()
    started = time.perf_counter()
    pipe(prompts, subject=subjects, seed=seeds, batch_size=batch, progress=False, output_type="pt", **kwargs)
    torch.cuda.synchronize()
    return len(prompts) / (time.perf_counter() - started)


def world_speed(model: Path, chosen: dict, shipped_steps: int, image_scale: float, batch: int = 64) -> dict:
    from dreamcache.core.pipeline import DreamCachePipeline
    from dreamcache.world import scene as world

    pipe = DreamCachePipeline.from_pretrained(model / "base", dtype=torch.float16).to("cuda")
    pipe.load_dreamcache(model / "adapter")
    pipe.enable_fast_paths()
    products = world.held_out_products(batch)
    caches = pipe.cache_subjects([world.reference_image(p, pipe.resolution, seed=0) for p in products])
    n = batch * 4
    prompts = [world.caption(products[i % batch].family, "beach") for i in range(n)]
    subjects = [caches[i % batch] for i in range(n)]
    runs = {"ddim 50": dict(sampler="ddim", num_inference_steps=50),
            f"model {shipped_steps}": dict(sampler="model", num_inference_steps=shipped_steps)}
    if chosen.get("name"):
        runs[chosen["name"]] = dict(sampler=chosen["sampler"], num_inference_steps=chosen["steps"])
    out = {}
    for name, kwargs in runs.items():
        rate = images_per_s(pipe, prompts, subjects, list(range(n)), batch, image_guidance_scale=image_scale, **kwargs)
        out[name] = dict(images_per_s=round(rate, 1), images_per_hour=round(rate * 3600), batch=batch, **kwargs)
        logger.info("world speed %-20s %.1f images/s", name, rate)
    return out


def sd15_speed(chosen: dict, batch: int = 16) -> dict:
    from bench.speed import random_pipeline
    from dreamcache.core.architectures import build_random_pipeline_components

    pipe = random_pipeline(build_random_pipeline_components("sd15", seed=0), "cuda", torch.float16)
    pipe.enable_fast_paths()
    from PIL import Image

    subject = pipe.cache_subject(Image.new("RGB", (512, 512), (200, 30, 40)))
    prompts = [f"a mug on a beach, view {i}" for i in range(batch * 2)]
    out = {}
    runs = {"ddim 50": dict(sampler="ddim", num_inference_steps=50)}
    if chosen.get("name"):
        runs[chosen["name"]] = dict(sampler=chosen["sampler"], num_inference_steps=chosen["steps"])
    for name, kwargs in runs.items():
        rate = images_per_s(pipe, prompts, [subject] * len(prompts), list(range(len(prompts))), batch, **kwargs)
        out[name] = dict(images_per_s=round(rate, 2), images_per_hour=round(rate * 3600), batch=batch, **kwargs)
        logger.info("sd15 speed %-20s %.2f images/s", name, rate)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--figures", type=Path, default=None, help="folder for the samplers' picture grid")
    parser.add_argument("--products", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="DDIM 50 runs on disjoint seed sets (the noise)")
    parser.add_argument("--steps-list", type=int, nargs="+", default=[10, 15, 20, 25])
    parser.add_argument("--baseline-steps", type=int, default=50, help="DDIM steps of the baseline (50: the authors')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recommended = read_adapter_config(args.model / "adapter").recommended
    scale = recommended.image_scale
    evaluator = FidelityEvaluator(args.model, args.device, steps=recommended.steps)
    report = dict(settings=dict(model=str(args.model), products=args.products, seeds=args.seeds, repeats=args.repeats,
                                image_scale=scale, guidance="combined", device=str(args.device),
                                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                commit=git_commit(), torch=torch.__version__),
                  results={}, ddim50_runs=[])

    def save():
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")

    ddim = Condition("ddim 50", image_scale=scale, sampler="ddim", steps=args.baseline_steps)
    shots = {}
    for r in range(args.repeats):
        cases = Cases.held_out(args.products, seeds=range(r * 100, r * 100 + args.seeds))
        row, images = score(evaluator, cases, ddim)
        report["ddim50_runs"].append(row)
        if r == 0:
            base_cases, shots["ddim 50"] = cases, images
        save()
    runs = report["ddim50_runs"]
    baseline = {m: float(np.mean([row[m] for row in runs])) for m in METRICS}
    # Run-to-run noise: twice the standard deviation of one run (the 95% band), from the repeats.
    noise = {m: float(2 * np.std([row[m] for row in runs], ddof=1)) if len(runs) > 1 else 0.0 for m in METRICS}
    report.update(ddim50_mean=baseline, noise=noise)
    for condition in conditions(scale, args.steps_list, recommended.steps):
        try:
            report["results"][condition.name], shots[condition.name] = score(evaluator, base_cases, condition)
        except Exception as exc:  # a sampler that cannot run this model's schedule: recorded, not fatal
            logger.exception("%s failed", condition.name)
            report["results"][condition.name] = dict(sampler=condition.sampler, steps=condition.steps,
                                                     error=f"{type(exc).__name__}: {exc}")
        save()
    report["chosen"] = choose(report["results"], baseline, noise)
    report["rule"] = ("fewest steps among " + ", ".join(CANDIDATES) + " whose identity, scene accuracy and toy CLIP-T "
                      "are each no more than the noise (2 sd of DDIM 50 over the repeats) below DDIM 50's mean")
    logger.info("chosen: %s", report["chosen"])
    save()
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        keep = ["ddim 50", f"model {recommended.steps}"] + [n for n in shots if n.startswith("dpm++2m ")]
        sampler_grid(base_cases, {k: shots[k] for k in keep if k in shots}).save(args.figures / "samplers_grid.png")
    if not args.no_speed and torch.cuda.is_available():
        report["speed_world"] = world_speed(args.model, report["chosen"], recommended.steps, scale)
        save()
        report["speed_sd15"] = sd15_speed(report["chosen"])
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
