"""Adapter training speed and peak memory on one GPU: SD 1.5 architecture (random weights), 512x512.

For each gradient-checkpointing setting, batch sizes go up until the GPU runs out of memory; each
point times `--steps` optimiser steps after `--warmup` steps. A step includes everything the
training loop does: data loading and reference augmentation (CPU), VAE encoding of targets and
references, the on-the-fly cache pass of the base UNet, and the adapter forward/backward/AdamW.

    python3 bench/training_speed.py --output bench/results/training_speed_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamcache.core.architectures import build_random_pipeline_components  # noqa: E402
from dreamcache.core.pipeline import DreamCachePipeline  # noqa: E402
from dreamcache.training.trainer import TrainConfig, Trainer  # noqa: E402


def make_data(folder: Path, count: int = 16) -> Path:
    rows = []
    for i in range(count):
        target = Image.new("RGB", (512, 512), (40 + 10 * i, 120, 200 - 8 * i))
        ImageDraw.Draw(target).ellipse((150, 120, 360, 420), fill=(200, 30 + 10 * i, 40))
        reference = Image.new("RGB", (512, 512), "white")
        ImageDraw.Draw(reference).ellipse((120, 90, 390, 450), fill=(200, 30 + 10 * i, 40))
        target.save(folder / f"t{i}.png")
        reference.save(folder / f"r{i}.png")
        rows.append(json.dumps(dict(target=f"t{i}.png", reference=f"r{i}.png", caption=f"a product in scene {i}")))
    (folder / "triplets.jsonl").write_text("\n".join(rows))
    return folder / "triplets.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--data-workers", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", ".")) / "training_speed.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    pipe = DreamCachePipeline(**build_random_pipeline_components("sd15"), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False)
    pipe.save_pretrained(tmp / "sd15-random")
    del pipe
    manifest = make_data(tmp)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, precision=args.precision,
                  data_workers=args.data_workers,
                  resolution=512, architecture="sd15 (random weights)", preset="default", points=[])
    for checkpointing in (False, True):
        config = TrainConfig(base_model=str(tmp / "sd15-random"), manifest=str(manifest), output_dir=str(tmp / "run"),
                             mixed_precision=args.precision, gradient_checkpointing=checkpointing, batch_size=1,
                             data_workers=args.data_workers,
                             learning_rate=1e-5, log_every=10**9, checkpoint_every=10**9, validate_every=10**9)
        trainer = Trainer(config)
        for batch in args.batch_sizes:
            trainer.config.batch_size = batch
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                trainer.step, trainer.config.max_steps = 0, args.warmup + args.steps
                batches = trainer.batches()
                for _ in range(args.warmup):
                    trainer.train_step(batches)
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step(batches)
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - started) / args.steps
            except torch.OutOfMemoryError:
                result["points"].append(dict(gradient_checkpointing=checkpointing, batch_size=batch, oom=True))
                print(f"checkpointing={checkpointing} batch={batch}: out of memory", flush=True)
                trainer.optimizer.zero_grad(set_to_none=True)
                break
            point = dict(gradient_checkpointing=checkpointing, batch_size=batch, seconds_per_step=round(seconds, 4),
                         samples_per_s=round(batch / seconds, 2),
                         peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
            result["points"].append(point)
            print(point, flush=True)
            args.output.write_text(json.dumps(result, indent=2))
        del trainer
        torch.cuda.empty_cache()
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
