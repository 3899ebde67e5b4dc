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
reuse           channels_last, combined guidance at the recommended sampler (UniPC 10): the fast paths
                without reuse (with and without CUDA graphs), then the deep features reused every 2 and 3
                steps (`deep_reuse_interval`; compiled halves, no CUDA graphs): issue 35's speed figures

    python3 bench/levers.py --config reuse --batches 16 32 --output bench/results/levers_reuse_h100.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("baseline", "channels_last", "cudnn", "reuse")


def one(config: str, batches: list[int]) -> dict:
    from bench.speed import Bench, timed
    from dreamcache.core.denoiser import FastPaths

    args = argparse.Namespace(tiny=False, output="/dev/null", only=None)
    bench = Bench(args)
    pipe = bench.pipe
    if config == "reuse":
        return reuse(bench, batches)
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


def reuse(bench, batches: list[int], sampler: str = "unipc", steps: int = 10) -> dict:
    """Images/s of combined guidance at `sampler` and `steps`, without and with deep feature reuse."""
    from bench.speed import prompts, timed
    from dreamcache.core.denoiser import FastPaths

    pipe = bench.pipe
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    out = {"config": "reuse", "sampler": sampler, "steps": steps, "guidance": "combined", "rows": []}
    settings = {"no reuse, CUDA graphs": (FastPaths.gpu(), None),
                "no reuse, no CUDA graphs": (replace(FastPaths.gpu(), cuda_graphs=False), None),
                "reuse every 2": (FastPaths.gpu(), 2), "reuse every 3": (FastPaths.gpu(), 3)}
    for n in batches:
        row = {"batch": n}
        subjects = [bench.caches[i % len(bench.caches)] for i in range(n)]
        for label, (fast, interval) in settings.items():
            pipe.enable_fast_paths(fast)

            def generate(count=steps):
                return pipe(prompts(n), subject=subjects, seed=list(range(n)), guidance="combined", sampler=sampler,
                            num_inference_steps=count, batch_size=n, output_type="pt", progress=False,
                            deep_reuse_interval=interval).images

            generate(max(2, interval or 1) * 2)  # warm-up: compile (both step kinds) and capture this layout
            row[label] = round(n / timed(generate, bench.device), 3)
        for label in ("reuse every 2", "reuse every 3"):
            row[f"{label} / no reuse, CUDA graphs"] = round(row[label] / row["no reuse, CUDA graphs"], 3)
            row[f"{label} / no reuse, no CUDA graphs"] = round(row[label] / row["no reuse, no CUDA graphs"], 3)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
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
