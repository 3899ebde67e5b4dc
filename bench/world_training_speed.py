"""Training throughput of the product-world model's UNet and adapter stages on one GPU: the fourth
training's settings (eager, no levers, its per-GPU batch of 512) against the speed levers, side by
side in one process on one pool (BENCHMARKS.md, "Training throughput").

    python bench/world_training_speed.py --pool DIR [--init-from dreamcache/assets/product-world] --output X.json

Each configuration continues the shipped model for a few dozen steps (throughput does not depend on
the weights) and reports samples/s after its first steps (compilation and kernel tuning excluded).
The compiled UNet is measured here too (its compilation falls in the untimed first steps); the
training run (`python -m dreamcache.world.model`) records its own samples/s in `training.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from transformers import CLIPModel

from dreamcache.world.model import Processes, WorldModelConfig, text_encoder_of, train_adapters, train_unet
from dreamcache.world.pool import render_pool

ATTEMPT_4 = "none"
EAGER_LEVERS = "channels-last,fused-adamw,latents-once"
ALL_LEVERS = WorldModelConfig().levers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, required=True, help="pool directory (rendered here if missing)")
    parser.add_argument("--init-from", default="dreamcache/assets/product-world")
    parser.add_argument("--pool-size", type=int, default=120_000)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, default=40)
    parser.add_argument("--adapter-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=512, help="the fourth training's per-GPU batch")
    parser.add_argument("--large-batch", type=int, default=1024)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    p = Processes(accelerator)
    base = WorldModelConfig(init_from=args.init_from, pool_size=args.pool_size, workers=args.workers)
    pool = render_pool(base.pool_size, base.seed, base.workers, resolution=base.resolution, directory=args.pool).to(p.device)
    init = Path(args.init_from)
    vae = AutoencoderKL.from_pretrained(init / "base" / "vae").float().to(p.device).eval()
    text_encoder = text_encoder_of(CLIPModel.from_pretrained(init / "clip").float().to(p.device))
    rows = []

    def unet(name: str, levers: str, batch: int) -> None:
        config = replace(base, levers=levers, unet_batch_size=batch, unet_steps=args.unet_steps)
        _, summary = train_unet(pool, config, vae, text_encoder, p)
        rows.append(dict(stage="unet", configuration=name, levers=levers, batch=batch,
                         samples_per_s=summary["samples_per_s"]))
        print(rows[-1], flush=True)

    def adapters(name: str, levers: str, batch: int) -> None:
        config = replace(base, levers=levers, adapter_batch_size=batch)
        with tempfile.TemporaryDirectory() as folder:
            summary = train_adapters(init / "base", Path(folder) / "adapter", "default", pool, config, accelerator,
                                     args.adapter_steps)
        rows.append(dict(stage="adapter", configuration=name, levers=levers, batch=batch,
                         samples_per_s=summary["samples_per_s"]))
        print(rows[-1], flush=True)

    unet("fourth training's settings", ATTEMPT_4, args.batch)
    unet("channels-last + fused AdamW, eager", EAGER_LEVERS, args.batch)
    unet("channels-last + fused AdamW, eager", EAGER_LEVERS, args.large_batch)
    unet("all levers, compiled", ALL_LEVERS, args.large_batch)
    adapters("fourth training's settings", ATTEMPT_4, args.batch)
    adapters("channels-last + fused AdamW + latents once", EAGER_LEVERS, args.batch)
    adapters("channels-last + fused AdamW + latents once", EAGER_LEVERS, args.large_batch)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(dict(device=device, torch=torch.__version__, rows=rows), indent=1) + "\n")
    print(f"\n{'stage':8s} {'configuration':48s} {'batch':>6s} {'samples/s':>10s}")
    for r in rows:
        print(f"{r['stage']:8s} {r['configuration']:48s} {r['batch']:6d} {r['samples_per_s']:10.0f}")


if __name__ == "__main__":
    main()
