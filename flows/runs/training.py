"""Training runs from the platform: a Prefect flow and the entry point for multi-process launches.

Single process: the flow runs the trainer in its own process. Several GPUs (or nodes): the flow
starts `accelerate launch -m flows.runs.training CONFIG`, whose processes each run `main` below; the
platform's loader lets manifests and images live on S3 as well as on local disk. (The manifest
`world://` trains on the procedural product world: `dreamcache.app.training`.)
"""

import subprocess
import sys
from pathlib import Path

from prefect import flow

from dreamcache.app import training as app_training
from dreamcache.training.trainer import TrainConfig
from flows.steps.source import read_uri


def trainer_for(config: TrainConfig):
    """The trainer of a config, its manifest and images read through the platform's loader (S3 too)."""
    return app_training.trainer_for(config, loader=read_uri)


@flow(name="train-adapters", persist_result=False)
def train_adapters(config: str, processes: int = 1, resume: str | None = None) -> str:
    """Train DreamCache adapters from a TOML config; returns the directory of the final adapter."""
    settings = TrainConfig.from_file(config)
    if processes == 1:
        return str(trainer_for(settings).train(resume=resume))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "-m", "flows.runs.training", config] + (["--resume", resume] if resume else [])
    subprocess.run(command, check=True)
    return str(Path(settings.output_dir) / "adapter")


def main(argv: list[str] | None = None) -> None:
    app_training.main(argv, loader=read_uri)


if __name__ == "__main__":
    main(sys.argv[1:])
