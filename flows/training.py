"""Training runs from the platform: a Prefect flow and the entry point for multi-process launches.

Single process: the flow runs the trainer in its own process. Several GPUs (or nodes): the flow
starts `accelerate launch -m flows.training CONFIG`, whose processes each run `main` below; the
platform's loader lets manifests and images live on S3 as well as on local disk. The manifest
`world://` trains on the procedural product world instead, rendered per sample (benchmarks use it).
"""

import subprocess
import sys
from pathlib import Path

from prefect import flow

from dreamcache.training import trainer as training
from dreamcache.world.pool import WORLD_MANIFEST, WorldTriplets
from flows.sources import read_uri


def trainer_for(config: training.TrainConfig) -> training.Trainer:
    """The trainer of a config: its manifest read through the platform's loader, or the product world."""
    if config.manifest != WORLD_MANIFEST:
        return training.Trainer(config, loader=read_uri)
    if config.resolution is None:
        raise ValueError(f"manifest {WORLD_MANIFEST} needs `resolution` in the config: the world renders at any size")
    return training.Trainer(config, dataset=WorldTriplets(config.resolution))


@flow(name="train-adapters", persist_result=False)
def train_adapters(config: str, processes: int = 1, resume: str | None = None) -> str:
    """Train DreamCache adapters from a TOML config; returns the directory of the final adapter."""
    settings = training.TrainConfig.from_file(config)
    if processes == 1:
        return str(trainer_for(settings).train(resume=resume))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "-m", "flows.training", config] + (["--resume", resume] if resume else [])
    subprocess.run(command, check=True)
    return str(Path(settings.output_dir) / "adapter")


def main(argv: list[str] | None = None) -> None:
    import argparse
    import logging

    parser = argparse.ArgumentParser(description="Train DreamCache adapters (see docs/training.md).")
    parser.add_argument("config", help="TOML training config")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    final = trainer_for(training.TrainConfig.from_file(args.config)).train(resume=args.resume)
    print(f"adapters written to {final}")


if __name__ == "__main__":
    main(sys.argv[1:])
