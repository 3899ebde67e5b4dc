"""Training from a config file: the trainer for its manifest, or for the procedural product world.

`world://` as a config's manifest trains on the world, rendered per sample (benchmarks use it, on
machines where only the library is installed); any other manifest is read through `loader`.

    python -m dreamcache.app.training config.toml
    accelerate launch --num_processes 2 -m dreamcache.app.training config.toml
"""

from __future__ import annotations

import sys

from dreamcache.training import trainer
from dreamcache.training.data import Loader, read_bytes
from dreamcache.training.trainer import TrainConfig, Trainer
from dreamcache.world.pool import WORLD_MANIFEST, WorldTriplets


def trainer_for(config: TrainConfig, loader: Loader = read_bytes) -> Trainer:
    """The trainer of a config: its manifest read through `loader`, or the product world."""
    if config.manifest != WORLD_MANIFEST:
        return Trainer(config, loader=loader)
    if config.resolution is None:
        raise ValueError(f"manifest {WORLD_MANIFEST} needs `resolution` in the config: the world renders at any size")
    return Trainer(config, dataset=WorldTriplets(config.resolution))


def main(argv: list[str] | None = None, loader: Loader = read_bytes) -> None:
    trainer.main(argv, loader, trainer_for)


if __name__ == "__main__":
    main(sys.argv[1:])
