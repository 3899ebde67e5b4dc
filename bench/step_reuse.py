"""Feature reuse across steps (issue 35): fidelity of the DeepCache idea composed with the cache.

    python3 bench/step_reuse.py --output bench/results/step_reuse_fidelity_cpu.json   # CPU, about 30 minutes
    python3 bench/step_reuse.py --products 2 --seeds 1 --repeats 2 --output X       # smoke

The bundled product-world model at its recommended settings (sampler, steps, image scale; combined
guidance), scored by the world's classifier and CLIP as issue 23 scored samplers
(`bench/samplers.py`): the recommended sampler without reuse runs `--repeats` times on disjoint seed
sets, and twice the standard deviation of those runs is the run-to-run noise. Each reuse interval runs
on the first seed set; it keeps the fidelity when identity, scene accuracy and toy CLIP-T are each no
more than that noise below the no-reuse mean. The gap to the no-reuse run on the very same seeds (same
noise, same cases) is recorded beside it.

Also the share of a step's FLOPs the shallow path costs at SD 1.5 shapes (counted on the meta device,
no weights, no GPU): the bound on what reuse can save. The measured speed is `bench/levers.py --config
reuse` on a GPU.
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

logger = logging.getLogger("step_reuse")
METRICS = ("identity", "scene", "clip_t")


def score(evaluator: FidelityEvaluator, cases: Cases, condition: Condition) -> dict:
    started = time.perf_counter()
    scores = evaluator.score(cases, evaluator.generate(cases, condition))
    row = dict(identity=scores.identity, scene=scores.scene, clip_t=scores.clip_t, accuracy=scores.accuracy,
               images=scores.images, seconds=round(time.perf_counter() - started, 1),
               **{k: v for k, v in asdict(condition).items() if k in ("sampler", "steps", "deep_reuse_interval")})
    logger.info("%-24s identity %.3f scene %.3f clip-t %.4f (%.0f s)", condition.name, row["identity"], row["scene"],
                row["clip_t"], row["seconds"])
    return row


def shallow_flop_share(architecture: str = "sd15", batch: int = 3) -> dict:
    """FLOPs of a reusing step's shallow path over a full step's, at `architecture`'s shapes (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreamcache.core.architectures import build_unet
    from dreamcache.core.unet_halves import decode_deep, decode_shallow, encode

    unet = build_unet(architecture)  # meta device: shapes only
    c = unet.config
    x = torch.zeros(batch, c.in_channels, c.sample_size, c.sample_size, device="meta")
    text = torch.zeros(batch, 77, c.cross_attention_dim, device="meta")
    t = torch.tensor(500, device="meta")

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.no_grad():
        half = encode(unet, x, t, text)
        deep = decode_deep(unet, half, text)
        full = flops(lambda: decode_shallow(unet, decode_deep(unet, encode(unet, x, t, text), text), half, text))
        shallow = flops(lambda: decode_shallow(unet, deep, encode(unet, x, t, text, blocks=1), text))
    return dict(architecture=architecture, latent=c.sample_size, full_gflop_per_row=round(full / batch / 1e9, 1),
                shallow_gflop_per_row=round(shallow / batch / 1e9, 1), shallow_share=round(shallow / full, 4))


def flop_bound(share: float, interval: int) -> float:
    """Step FLOPs without reuse over step FLOPs with reuse every `interval` steps (the speed-up's ceiling)."""
    return interval / (1 + (interval - 1) * share)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--products", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="no-reuse runs on disjoint seed sets (the noise)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recommended = read_adapter_config(args.model / "adapter").recommended
    sampler, steps, scale = recommended.sampler, recommended.steps, recommended.image_scale
    evaluator = FidelityEvaluator(args.model, args.device, steps=steps)
    report = dict(settings=dict(model="bundled:product-world" if args.model == BUNDLED_DIR else str(args.model), products=args.products, seeds=args.seeds, scenes=4,
                                repeats=args.repeats, sampler=sampler, steps=steps, image_scale=scale,
                                guidance="combined", device=str(args.device),
                                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                commit=git_commit(), torch=torch.__version__),
                  flops={}, no_reuse_runs=[], results={})

    def save():
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")

    for architecture in ("sd15", "sd21"):
        share = shallow_flop_share(architecture)
        share["bound"] = {str(n): round(flop_bound(share["shallow_share"], n), 2) for n in args.intervals}
        report["flops"][architecture] = share
        logger.info("flops %s", share)
    plain = Condition(f"{sampler} {steps}", image_scale=scale, sampler=sampler, steps=steps)
    first = None
    for r in range(args.repeats):
        cases = Cases.held_out(args.products, seeds=range(r * 100, r * 100 + args.seeds))
        report["no_reuse_runs"].append(score(evaluator, cases, plain))
        first = first or cases
        save()
    runs = report["no_reuse_runs"]
    baseline = {m: float(np.mean([row[m] for row in runs])) for m in METRICS}
    # Run-to-run noise: twice the standard deviation of one run (the 95% band), from the repeats.
    noise = {m: float(2 * np.std([row[m] for row in runs], ddof=1)) if len(runs) > 1 else 0.0 for m in METRICS}
    report.update(no_reuse_mean=baseline, noise=noise)
    for interval in args.intervals:
        condition = Condition(f"{sampler} {steps}, deep reuse every {interval}", image_scale=scale, sampler=sampler,
                              steps=steps, deep_reuse_interval=interval)
        row = score(evaluator, first, condition)
        row["gap_to_no_reuse"] = {m: baseline[m] - row[m] for m in METRICS}  # positive: worse
        row["paired_gap"] = {m: runs[0][m] - row[m] for m in METRICS}  # same seeds and cases
        row["within_noise"] = all(row["gap_to_no_reuse"][m] <= noise[m] for m in METRICS)
        report["results"][condition.name] = row
        save()
    report["rule"] = ("an interval keeps the fidelity when identity, scene accuracy and toy CLIP-T are each no more "
                      "than the noise (2 sd of the no-reuse runs over the repeats) below the no-reuse mean")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
