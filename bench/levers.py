"""GPU speed levers, second round (issue 24): each lever in its own process, side by side in one session.

    python3 bench/levers.py --output bench/results/levers_h200.json          # all configurations, in turn
    python3 bench/levers.py --config baseline --output X                     # one (what each process runs)

SD 1.5 shapes, random weights, 512x512, fp16, 50 DDIM steps, VAE decode included, one warm-up call of
each shape (compilation, CUDA-graph capture) and then one timed call; images/s. Each configuration runs
in a fresh process, so that global switches (memory format, attention backend) are traced into its own
compiled graphs and none inherits another's.

baseline        diffusers + torch.compile(unet) (text-only CFG, 2 passes) and this project's fast paths
                (compiled halves, CUDA graphs, static batches) for text only, joint and combined
channels_last   the same fast paths with the UNet and the VAE in channels-last memory format
cudnn           channels_last, and attention through cuDNN's fused kernel (SDPA's cuDNN backend)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("baseline", "channels_last", "cudnn")


def one(config: str, batches: list[int]) -> dict:
    from bench.speed import Bench, timed
    from dreamcache.core.denoiser import FastPaths

    args = argparse.Namespace(tiny=False, output="/dev/null", only=None)
    bench = Bench(args)
    pipe = bench.pipe
    if config in ("channels_last", "cudnn"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if config == "cudnn":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
    out = {"config": config, "rows": []}
    pipe.enable_fast_paths(FastPaths.gpu())
    for n in batches:
        row = {"batch": n}
        for label, guidance, subject in (("text_only", "joint", False), ("joint", "joint", True),
                                         ("combined", "combined", True)):
            started = time.perf_counter()
            bench.generate(n, guidance, subject, steps=2)  # warm-up: compile and capture this layout
            row[f"{label}_first_call_s"] = round(time.perf_counter() - started, 1)
            row[label] = round(n / timed(lambda: bench.generate(n, guidance, subject), bench.device), 3)
        row["adapter_overhead"] = round(row["text_only"] / row["joint"] - 1, 4)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if config == "baseline":  # what a diffusers user gets from its documented knob
        base = bench.base
        base.unet = torch.compile(base.unet)
        out["diffusers_compiled"] = {}
        for n in batches:
            bench.diffusers_generate(base, n, 2)
            out["diffusers_compiled"][n] = round(n / timed(lambda: bench.diffusers_generate(base, n), bench.device), 3)
            print(json.dumps({"diffusers_compiled": out["diffusers_compiled"]}), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.config:
        args.output.write_text(json.dumps(one(args.config, args.batches), indent=1) + "\n")
        return 0
    from bench.provenance import git_commit

    report = {"settings": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(),
                           "model": "SD 1.5 shapes, random weights, 512 px, fp16, DDIM 50, VAE decode included"},
              "configs": {}}
    for config in CONFIGS:
        part = args.output.with_suffix(f".{config}.json")
        started = time.perf_counter()
        batches = args.batches if config == "baseline" else args.batches[-1:]  # the levers at the largest batch
        proc = subprocess.run([sys.executable, __file__, "--config", config, "--output", str(part), "--batches",
                               *map(str, batches)], capture_output=True, text=True)
        report["configs"][config] = (json.loads(part.read_text()) if proc.returncode == 0 else
                                     {"error": proc.stderr[-3000:]})
        report["configs"][config]["process_s"] = round(time.perf_counter() - started, 1)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(config, json.dumps(report["configs"][config])[:600], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
