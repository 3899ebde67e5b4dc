"""Adapter training across processes (issue 11): samples/s and loss curves, 1 process vs N, same global batch.

    python3 bench/ddp.py                                   # CPU: 1 vs 2 processes over gloo, one core each, tiny model
    python3 bench/ddp.py --gpus 2 --model sd15 --global-batch 64 --precision bf16   # 1 GPU vs 2 GPUs over NCCL

Each configuration is a real `accelerate launch ... -m dreamcache.app.training config.toml`, the library's
form of the command docs/training.md gives users (`-m flows.runs.training` adds the platform's S3 loader and
needs Prefect, which the GPU machines lack), on the procedural product world (world://), so every
process count draws the same samples. N processes take global-batch/N samples each. The figures: samples/s over the steps
after warm-up (from the training log's elapsed times), the speed-up over one process, and the largest
relative difference between the loss curves and between the final adapter weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import git_commit  # noqa: E402
from dreamcache.core.architectures import TINY_RESOLUTION  # noqa: E402
from tests.servers import free_port  # noqa: E402


def save_base_model(folder: Path, model: str) -> Path:
    from dreamcache.core.architectures import build_random_pipeline_components, build_tiny_pipeline_components
    from dreamcache.core.pipeline import DreamCachePipeline

    components = build_tiny_pipeline_components() if model == "tiny" else build_random_pipeline_components(model)
    DreamCachePipeline(**components, safety_checker=None, feature_extractor=None,
                       requires_safety_checker=False).save_pretrained(folder / model)
    return folder / model


def launch(processes: int, args, base: Path, folder: Path) -> dict:
    """One training run under `accelerate launch`; returns its log and final adapter weights."""
    from safetensors.torch import load_file

    folder = Path(tempfile.mkdtemp(dir=folder))  # a run of its own, even for the same process count
    run = folder / f"processes-{processes}"
    config = dict(base_model=str(base), manifest="world://", output_dir=str(run),
                  batch_size=args.global_batch // processes, max_steps=args.warmup + args.steps,
                  learning_rate=1e-4, log_every=1, checkpoint_every=10**9, validate_every=10**9,
                  data_workers=args.data_workers, mixed_precision=args.precision, seed=0)
    # The world renders at any size; by default at the model's own.
    config["resolution"] = args.resolution or {"tiny": TINY_RESOLUTION, "sd15": 512, "sd21": 512}[args.model]
    # The training CLI reads TOML; these are all scalars, which JSON writes in TOML's syntax.
    path = folder / f"processes-{processes}.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()))
    topology = ["--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(free_port()),
                "--dynamo_backend", "no", "--mixed_precision", args.precision]
    topology += ["--multi_gpu"] if processes > 1 else []
    if args.gpus:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(processes)))
    else:
        # One core per process: 1 process is the one-core baseline, N processes use N cores. On CPUs
        # `--cpu` starts a single process whatever --num_processes says; the torchrun launcher
        # behind --multi_gpu with ACCELERATE_USE_CPU gives N processes over gloo.
        topology += ["--num_cpu_threads_per_process", "1"]
        env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    command = [sys.executable, "-m", "accelerate.commands.launch", *topology, "-m", "dreamcache.app.training", str(path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{processes} process(es) failed:\n{proc.stderr[-4000:]}")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    if log[-1]["processes"] != processes:  # e.g. a launcher that started one process, or N unconnected ones
        raise RuntimeError(f"asked for {processes} training processes, the run had {log[-1]['processes']}")
    warm, last = log[args.warmup - 1], log[-1]
    samples = (last["step"] - warm["step"]) * args.global_batch
    return dict(processes=processes, batch_per_process=args.global_batch // processes,
                samples_per_s=samples / (last["elapsed_s"] - warm["elapsed_s"]),
                losses=[r["loss"] for r in log], peak_memory_gb=last.get("peak_memory_gb"),
                weights=load_file(run / "adapter" / "adapter_model.safetensors"))


def relative_difference(a, b) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=0, help="compare 1 GPU with this many (default: CPU processes)")
    parser.add_argument("--processes", type=int, default=2, help="CPU only: processes to compare with one")
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15", "sd21"])
    parser.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--data-workers", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "bench/results/ddp_cpu.json"))
    args = parser.parse_args(argv)
    n = args.gpus or args.processes
    if args.global_batch % n:
        parser.error(f"--global-batch {args.global_batch} must divide by {n} processes")

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        base = save_base_model(Path(tmp), args.model)
        one, many = (launch(p, args, base, Path(tmp)) for p in (1, n))
    weight_difference = max(((many["weights"][k].float() - v.float()).abs().max() / v.float().abs().max()).item()
                            for k, v in one["weights"].items())
    out = dict(device=(torch.cuda.get_device_name() + f" x{n}") if args.gpus else f"cpu, {os.cpu_count()} cores",
               torch=torch.__version__, **git_commit(), settings={k: v for k, v in vars(args).items() if k != "output"},
               runs=[{k: v for k, v in r.items() if k != "weights"} for r in (one, many)],
               speedup=many["samples_per_s"] / one["samples_per_s"],
               loss_curve_max_relative_difference=relative_difference(many["losses"], one["losses"]),
               adapter_weights_max_relative_difference=weight_difference)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
