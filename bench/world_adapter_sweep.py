"""Which adapter-training settings make the toy world's adapters personalise: a side-by-side sweep.

Every variant trains adapters on the same base model for the same wall-clock budget, all at once on
one GPU, logging the cache effect (the relative loss drop the cache brings on a fixed batch); then a
quick identity check on held-out products: text-only against the cache at two image scales.

    python bench/world_adapter_sweep.py --model DIR --output DIR --minutes 7 [VARIANT ...]

`copy` variants use the target itself as the reference (no augmentation): an upper bound on what
the memory path can learn, which tells a mechanism that cannot use the cache from one that is slow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "b256-lr3e-4": dict(batch_size=256, learning_rate=3e-4),
    "b256-lr1e-3": dict(batch_size=256, learning_rate=1e-3),
    "b256-lr3e-4-identity": dict(batch_size=256, learning_rate=3e-4, identity_init=True),
    "copy-b256-lr3e-4": dict(batch_size=256, learning_rate=3e-4, copy=True),
}


def identity_init(adapters) -> None:
    """linear_cat = [I, 0]: the block starts as the base block, and the memory half grows from zero."""
    import torch

    with torch.no_grad():
        for adapter in adapters.values():
            d = adapter.linear_cat.out_features
            adapter.linear_cat.weight.zero_()
            adapter.linear_cat.bias.zero_()
            adapter.linear_cat.weight[:, :d] = torch.eye(d)


def run_one(name: str, model: Path, output: Path, minutes: float, workers: int, pool: int, products: int) -> None:
    import torch

    cuda = torch.cuda.is_available()

    from dreamcache.training import TrainConfig, Trainer
    from dreamcache.weights import save_adapters
    from dreamcache.world_eval import PERSONALISED, TEXT_ONLY, Cases, Condition, FidelityEvaluator, evaluate, picture_grid

    settings = dict(VARIANTS[name])
    copy, identity = settings.pop("copy", False), settings.pop("identity_init", False)
    folder = output / name
    config = TrainConfig(base_model=str(model / "base"), manifest="world://", world_pool=pool, output_dir=str(folder),
                         max_steps=10**6, data_workers=workers, mixed_precision="bf16" if cuda else "no", seed=0, **settings)
    trainer = Trainer(config)
    if identity:
        identity_init(trainer.adapter_modules)
    if copy:
        get = trainer.dataset.get
        trainer.dataset.get = lambda index, g: (lambda t: (t[0], t[0], t[2]))(get(index, g))
    log, started = [], time.perf_counter()
    batches = trainer.batches()
    while time.perf_counter() - started < minutes * 60:
        loss = trainer.train_step(batches)
        if trainer.step % 250 == 0 or trainer.step == 1:
            log.append(dict(step=trainer.step, loss=loss, cache_effect=trainer.cache_effect(),
                            seconds=round(time.perf_counter() - started, 1)))
            print(name, log[-1], flush=True)
    log.append(dict(step=trainer.step, loss=loss, cache_effect=trainer.cache_effect(),
                    seconds=round(time.perf_counter() - started, 1)))
    save_adapters(folder / "model" / "adapter", trainer.adapter_modules, trainer.adapter_config())
    del trainer, batches
    torch.cuda.empty_cache()

    for part in ("base", "clip", "classifier"):  # an evaluable model directory around these adapters
        link = folder / "model" / part
        if not link.exists():
            link.symlink_to((model / part).resolve())
    evaluator = FidelityEvaluator(folder / "model", "cuda" if cuda else "cpu", steps=25)
    cases = Cases.held_out(products, seeds=range(1))
    run = evaluate(evaluator, cases, [TEXT_ONLY, PERSONALISED, Condition("cache, image scale 1", image_scale=1.0)])
    picture_grid(cases, run["shots"]).save(folder / "grid.png")
    result = dict(variant=name, settings=VARIANTS[name], minutes=minutes, steps=log[-1]["step"], log=log,
                  identity={k: v["identity"] for k, v in run["results"].items()},
                  scene={k: v["scene"] for k, v in run["results"].items()},
                  accuracy={k: v["accuracy"] for k, v in run["results"].items()})
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(name, "identity", result["identity"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--model", type=Path, required=True, help="world model directory (base/, clip/, classifier/)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=7)
    parser.add_argument("--workers", type=int, default=3, help="data workers per variant")
    parser.add_argument("--pool", type=int, default=20_000)
    parser.add_argument("--products", type=int, default=24, help="held-out products in the identity check")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.variants[0], args.model, args.output, args.minutes, args.workers, args.pool, args.products)
        return
    args.output.mkdir(parents=True, exist_ok=True)
    jobs = [subprocess.Popen([sys.executable, __file__, name, "--one", "--model", str(args.model), "--output",
                              str(args.output), "--minutes", str(args.minutes), "--workers", str(args.workers),
                              "--pool", str(args.pool), "--products", str(args.products)],
                             stdout=open(args.output / f"{name}.log", "w"), stderr=subprocess.STDOUT)
            for name in args.variants]
    for job in jobs:
        job.wait()
    results = [json.loads(p.read_text()) for p in sorted(args.output.glob("*/result.json"))]
    (args.output / "sweep.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(f"{r['variant']:24} steps {r['steps']:6}  cache effect {r['log'][-1]['cache_effect']:+.4f}  "
              f"identity {json.dumps({k: round(v, 3) for k, v in r['identity'].items()})}")


if __name__ == "__main__":
    main()
