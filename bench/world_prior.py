"""The base model's prior before any adapter: text-only shots of held-out products, read by the
world's classifier, against the true renders (docs/toy-world.md: a base whose text-only shots
spread over the colours as the renders do is the first condition for adapters to personalise).

    python bench/world_prior.py MODEL_DIR [--products 24] [--output bench/results/world_prior.json]

MODEL_DIR needs base/, classifier/ and clip/ (no adapters).
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from dreamcache.world.evaluation import TEXT_ONLY, Cases, FidelityEvaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--products", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    evaluator = FidelityEvaluator(args.model, "cuda" if torch.cuda.is_available() else "cpu", steps=args.steps)
    cases = Cases.held_out(args.products, seeds=(0,))
    report = {"ceiling (true renders)": asdict(evaluator.score(cases, evaluator.renders(cases, evaluator.pipe.resolution))),
              "text-only": asdict(evaluator.score(cases, evaluator.generate(cases, TEXT_ONLY)))}
    for name, scores in report.items():
        print(f"{name:24s} identity {scores['identity']:.3f} colour {scores['accuracy']['color']:.3f} "
              f"colour spread {scores['colour_spread']:.2f} scene {scores['scene']:.2f} clip-t {scores['clip_t']:.3f}")
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
