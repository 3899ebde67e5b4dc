"""The rendered pool, its sharing between processes, and the datasets the adapter trainer draws from."""

import numpy as np
import pytest
import torch

from dreamcache.training.data import DeviceReferenceAugmentation
from PIL import Image

from dreamcache.core.images import foreground_box
from dreamcache.training.trainer import TrainConfig, Trainer
from dreamcache.world import scene as world
from dreamcache.world.pool import PoolTriplets, WorldTriplets, pool_seed, render_pool, to_uint8_tensor
from tests.helpers import TEST_RESOLUTION, make_tiny_pipeline


def test_the_pool_is_the_same_with_worker_processes():
    here = render_pool(40, seed=5, chunk=16, resolution=64)
    workers = render_pool(40, seed=5, workers=2, chunk=16, resolution=64)
    assert torch.equal(here.targets, workers.targets) and torch.equal(here.references, workers.references)
    assert torch.equal(here.captions, workers.captions)
    assert all(torch.equal(here.labels[h], workers.labels[h]) for h in here.labels)
    assert torch.equal(here.masks, workers.masks) and here.masks.shape == (40, 64, 64)
    assert here.targets.shape == (40, 3, 64, 64) and here.targets.dtype == torch.uint8
    first = world.triplet(pool_seed(5, 0), 64)
    assert world.CAPTIONS[here.captions[0]] == first.caption
    assert torch.equal(here.masks[0], torch.from_numpy(first.mask)) and 0 < first.mask.mean() < 0.5
    assert not any(world.is_held_out(world.triplet(pool_seed(5, i), 64).product.index) for i in range(40))


def test_processes_render_their_own_chunks_and_all_load_the_same_pool(tmp_path):
    one = render_pool(40, seed=2, chunk=16, resolution=32)
    waits, shares = [], {}

    def share(rank: int, barrier):  # one process's call: every second chunk, then the whole pool
        return render_pool(40, seed=2, chunk=16, resolution=32, directory=tmp_path / "pool", rank=rank, processes=2,
                           barrier=barrier)

    def process_0_waits():  # where process 0 waits, process 1 renders its chunks (and reaches its own barrier)
        waits.append(0)
        shares[1] = share(1, lambda: waits.append(1))

    done = share(0, process_0_waits)
    assert waits == [0, 1] and torch.equal(shares[1].targets, done.targets)
    assert torch.equal(done.targets, one.targets) and torch.equal(done.masks, one.masks)
    assert sorted(p.name for p in (tmp_path / "pool").glob("chunk-?????.npy")) == [
        "chunk-00000.npy", "chunk-00001.npy", "chunk-00002.npy"]
    again = render_pool(40, seed=2, chunk=16, resolution=32, directory=tmp_path / "pool", workers=2)
    assert torch.equal(again.references, one.references)  # loaded, not rendered again


def test_the_device_augmentation_places_the_foreground_on_white():
    references = [world.reference_image(world.product(i), 64, seed=0) for i in range(6)]
    batch = to_uint8_tensor(references)
    augmentation = DeviceReferenceAugmentation(64)
    params = torch.stack([augmentation.draw(torch.Generator().manual_seed(i)) for i in range(6)])
    params[:, augmentation.FIELDS.index("jitter")] = 0
    params[:, augmentation.FIELDS.index("erase")] = 0
    out = augmentation(batch, params)
    assert out.shape == (6, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    for image, p in zip(out, params):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        x0, y0, x1, y1 = foreground_box(Image.fromarray(array))
        cover = p[augmentation.FIELDS.index("cover")].item()  # the longer side's fraction of the frame
        assert max(x1 - x0, y1 - y0) == pytest.approx(cover * 64, abs=2)
        assert (array[:y0] >= 243).all() and (array[y1:] >= 243).all()  # white around the product (tolerance 12)
    # The same parameters give the same images whatever else shares the batch.
    assert torch.allclose(augmentation(batch[2:4], params[2:4]), out[2:4], atol=1e-6)


def test_the_device_augmentation_flips_erases_and_jitters_as_drawn():
    reference = to_uint8_tensor([world.reference_image(world.product(3), 64, seed=1)])
    augmentation = DeviceReferenceAugmentation(64)
    fields = augmentation.FIELDS
    plain = torch.tensor([[1.0, 0.5, 0.5, 0, 0, 1, 1, 1, 0, 0, 0.1, 0.0, 0.5, 0.5]])
    flipped, erased, jittered = plain.clone(), plain.clone(), plain.clone()
    flipped[0, fields.index("flip")] = 1
    erased[0, fields.index("erase")] = 1
    jittered[0, fields.index("jitter")], jittered[0, fields.index("brightness")] = 1, 0.8
    base = augmentation(reference, plain)
    assert torch.allclose(augmentation(reference, flipped), base.flip(-1), atol=1e-5)
    white = (augmentation(reference, erased) == 1).all(1).sum() - (base == 1).all(1).sum()
    assert white > 0.05 * 64 * 64  # a tenth of the frame erased, less what was white already
    assert augmentation(reference, jittered).mean() < base.mean()


def test_draws_are_reproducible_per_sample():
    augmentation = DeviceReferenceAugmentation(64)
    a, b = (augmentation.draw(torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (len(augmentation.FIELDS),)
    draws = torch.stack([augmentation.draw(torch.Generator().manual_seed(s)) for s in range(2000)])
    jitter, erase = (draws[:, augmentation.FIELDS.index(f)].mean().item() for f in ("jitter", "erase"))
    assert 0.07 < jitter < 0.13 and 0.36 < erase < 0.44  # the method's p = 0.1 and 0.4


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny"
    make_tiny_pipeline().save_pretrained(path)
    return path


def config(base_model, tmp_path, **overrides) -> TrainConfig:
    values = dict(base_model=str(base_model), output_dir=str(tmp_path / "run"), resolution=TEST_RESOLUTION,
                  batch_size=4, learning_rate=1e-2, max_steps=3, log_every=1, validate_every=1000, data_workers=0)
    return TrainConfig(**{**values, **overrides})


def test_adapters_train_on_world_triplets_rendered_per_sample(base_model, tmp_path):
    trainer = Trainer(config(base_model, tmp_path), dataset=WorldTriplets(TEST_RESOLUTION))
    target, reference, caption = trainer.dataset.get(4, torch.Generator().manual_seed(0))
    assert target.size == reference.size == (TEST_RESOLUTION, TEST_RESOLUTION) and caption.startswith("a ")
    assert all(0 < trainer.train_step() < 10 for _ in range(3))


def test_adapters_train_on_the_pool_augmented_on_the_device(base_model, tmp_path):
    pool = render_pool(16, seed=3, resolution=TEST_RESOLUTION)
    trainer = Trainer(config(base_model, tmp_path), dataset=PoolTriplets(pool))
    assert trainer.samples.on_device
    batch = trainer.batch(trainer.micro_batch(0, 0))
    targets, references = trainer.images(batch)
    assert targets.shape == references.shape == (4, 3, TEST_RESOLUTION, TEST_RESOLUTION)
    index = int(batch[0][0])
    assert torch.allclose(targets[0], pool.targets[index].float() / 127.5 - 1)  # targets as rendered
    assert references.min() >= -1 and references.max() <= 1
    assert all(0 < trainer.train_step() < 10 for _ in range(3))


def test_data_workers_draw_the_same_device_samples(base_model, tmp_path):
    pool = render_pool(16, seed=3, resolution=TEST_RESOLUTION)
    here = Trainer(config(base_model, tmp_path / "a"), dataset=PoolTriplets(pool))
    losses = [here.train_step() for _ in range(3)]
    workers = Trainer(config(base_model, tmp_path / "b", data_workers=2), dataset=PoolTriplets(pool))
    batches = workers.batches()
    assert [workers.train_step(batches) for _ in range(3)] == pytest.approx(losses, rel=1e-5)
