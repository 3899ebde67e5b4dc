"""Rendered world triplets as tensors, and the two ways the adapter trainer draws from the world.

- `render_pool`: N triplets rendered once by worker processes (and, under DDP, shared out between
  the processes, each rendering its own chunks), saved as plain `.npy` arrays so that every stage
  and every process loads the same pool without rendering it again.
- `PoolTriplets`: the pool on the training device; the trainer augments references there, a whole
  batch at once (`dreamcache.training.data.DeviceReferenceAugmentation`), so no image crosses a process
  boundary and adapter training is no longer bound by data workers.
- `WorldTriplets`: triplets rendered on the fly, per sample, as PIL images: the trainer's ordinary
  path (data workers, the method's PIL augmentations), used by `world://` manifests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamcache.training.data import DeviceReferenceAugmentation, ReferenceAugmentation
from dreamcache.world import scene as world
from dreamcache.world.classifier import HEADS
from dreamcache.world.classifier import labels as attribute_labels

logger = logging.getLogger(__name__)

WORLD_MANIFEST = "world://"  # a training config's `manifest` that means: triplets from this world, on the fly


@dataclass
class WorldPool:
    """Rendered triplets: images (N, 3, R, R) uint8, caption indices, attribute labels, and the
    product's exact mask in each target."""

    targets: torch.Tensor
    references: torch.Tensor
    captions: torch.Tensor  # (N,) index into world.CAPTIONS
    labels: dict[str, torch.Tensor]  # head -> (N,)
    masks: torch.Tensor  # (N, R, R) bool

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def resolution(self) -> int:
        return self.targets.shape[-1]

    def to(self, device) -> "WorldPool":
        return WorldPool(self.targets.to(device), self.references.to(device), self.captions.to(device),
                         {h: v.to(device) for h, v in self.labels.items()}, self.masks.to(device))

    def sample(self, generator: torch.Generator, size: int) -> torch.Tensor:
        """Random indices, drawn on the CPU (reproducible on any device), on the pool's device."""
        return torch.randint(len(self), (size,), generator=generator).to(self.captions.device)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(targets=self.targets.numpy(), references=self.references.numpy(), captions=self.captions.numpy(),
                    masks=self.masks.numpy(), **{f"label_{h}": v.numpy() for h, v in self.labels.items()})

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "WorldPool":
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return cls(t["targets"], t["references"], t["captions"], {h: t[f"label_{h}"] for h in HEADS}, t["masks"])

    @classmethod
    def cat(cls, parts: list["WorldPool"]) -> "WorldPool":
        return cls(torch.cat([p.targets for p in parts]), torch.cat([p.references for p in parts]),
                   torch.cat([p.captions for p in parts]), {h: torch.cat([p.labels[h] for p in parts]) for h in HEADS},
                   torch.cat([p.masks for p in parts]))


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], as the VAE expects."""
    return images.float() / 127.5 - 1


def to_uint8_tensor(images) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def pool_seed(seed: int, index: int) -> int:
    """The world seed of triplet `index` of the pool for `seed`."""
    return seed * 10_000_019 + index


class _Chunks(torch.utils.data.Dataset):
    """Chunk k of the pool (a `WorldPool` of up to `chunk` triplets), rendered in a data-loader worker."""

    def __init__(self, size: int, seed: int, chunk: int, resolution: int, ks: list[int]):
        self.size, self.seed, self.chunk, self.resolution, self.ks = size, seed, chunk, resolution, ks

    def __len__(self) -> int:
        return len(self.ks)

    def __getitem__(self, i: int) -> tuple[int, WorldPool]:
        k = self.ks[i]
        triplets = [world.triplet(pool_seed(self.seed, s), self.resolution)
                    for s in range(k * self.chunk, min((k + 1) * self.chunk, self.size))]
        rows = [attribute_labels(t.product, t.scene) for t in triplets]
        return k, WorldPool(to_uint8_tensor([t.target for t in triplets]), to_uint8_tensor([t.reference for t in triplets]),
                            torch.tensor([world.CAPTIONS.index(t.caption) for t in triplets]),
                            {h: torch.tensor([r[h] for r in rows]) for h in HEADS},
                            torch.from_numpy(np.stack([t.mask for t in triplets])))


def render_pool(size: int, seed: int, workers: int = 0, chunk: int = 128, resolution: int = 128,
                directory: Path | None = None, rank: int = 0, processes: int = 1, barrier=None) -> WorldPool:
    """The first `size` triplets of the world for `seed` (training instances only), the same for any
    number of workers and processes.

    With `directory`, each chunk is saved there as it is rendered and chunks already there are not
    rendered again; under DDP, process `rank` of `processes` renders every `processes`-th chunk and
    `barrier()` waits for the others before all load the whole pool.
    """
    count = -(-size // chunk)
    done = {k for k in range(count) if directory and (directory / f"chunk-{k:05d}.npy").exists()}
    mine = [k for k in range(count) if k % processes == rank and k not in done]
    parts: dict[int, WorldPool] = {}
    if mine:
        loader = torch.utils.data.DataLoader(_Chunks(size, seed, chunk, resolution, mine), batch_size=None,
                                             num_workers=workers)
        for k, part in loader:
            if directory:
                _save_chunk(directory, k, part)
            else:
                parts[k] = part
    if directory:
        if barrier:
            barrier()
        parts = {k: _load_chunk(directory, k) for k in range(count)}
    return WorldPool.cat([parts[k] for k in range(count)])


def _save_chunk(directory: Path, k: int, part: WorldPool) -> None:
    # One .npy per array, no pickle; the marker file written last says the chunk is whole.
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in part.arrays().items():
        np.save(directory / f"chunk-{k:05d}.{name}.npy", array, allow_pickle=False)
    np.save(directory / f"chunk-{k:05d}.npy", np.array([len(part)]), allow_pickle=False)


def _load_chunk(directory: Path, k: int) -> WorldPool:
    names = ["targets", "references", "captions", "masks"] + [f"label_{h}" for h in HEADS]
    return WorldPool.from_arrays({n: np.load(directory / f"chunk-{k:05d}.{n}.npy", allow_pickle=False) for n in names})


# --- what the adapter trainer draws from --------------------------------------------------------

class PoolTriplets:
    """The pool on the training device, references augmented there a batch at a time.

    Implements the trainer's `DeviceTriplets`: `draw` runs per sample (cheap: a few numbers from
    the sample's generator), `pixels` once per batch on the device.
    """

    def __init__(self, pool: WorldPool, augment: bool = True,
                 latents: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.pool = pool
        self.latents = latents  # every target's VAE posterior (mean, std), encoded once, or None
        # `draw` runs in data workers, which must not touch the GPU: the captions they read stay on the CPU.
        self.captions = pool.captions.cpu()
        self.augmentation = DeviceReferenceAugmentation(pool.resolution) if augment else None

    def __len__(self) -> int:
        return len(self.pool)

    def draw(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        params = self.augmentation.draw(generator) if self.augmentation else torch.zeros(0)
        return params, world.CAPTIONS[int(self.captions[index])]

    def pixels(self, indices: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.pool.targets.device
        indices = indices.to(device)
        targets, references = self.pool.targets[indices], self.pool.references[indices]
        if self.augmentation:
            references = self.augmentation(references, draws.to(device))
        else:
            references = references.float() / 255
        return pixels(targets), references * 2 - 1

    def target_latents(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.latents is None:
            return None
        indices = indices.to(self.latents[0].device)
        return self.latents[0][indices], self.latents[1][indices]


class WorldTriplets:
    """Endless training triplets (training instances only), rendered per sample, with the method's
    PIL reference augmentations: the trainer's `Triplets`."""

    def __init__(self, resolution: int, augment: bool = True):
        self.resolution = resolution
        self.augmentation = ReferenceAugmentation(resolution) if augment else None

    def __len__(self) -> int:
        return 2**31

    def get(self, index: int, generator: torch.Generator) -> tuple[Image.Image, Image.Image, str]:
        t = world.triplet(index, self.resolution)
        reference = self.augmentation(t.reference, generator) if self.augmentation else t.reference
        return t.target, reference, t.caption
