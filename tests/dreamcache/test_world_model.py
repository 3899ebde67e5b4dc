"""The world model's stages run on CPU for a few steps and give a pipeline the platform loads."""

import pytest
import torch

from dreamcache import world_model
from dreamcache.pipeline import DreamCachePipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    steps = world_model.StageSteps(vae_steps=6, clip_steps=6, unet_steps=6, batch_size=8, learning_rate=1e-3)
    device = torch.device("cpu")
    vae, vae_losses = world_model.train_vae(steps, device)
    clip, clip_losses = world_model.train_clip(steps, device)
    unet, unet_losses = world_model.train_unet(steps, vae, world_model.text_encoder_of(clip), device)
    folder = world_model.save_pipeline(vae, clip, unet, tmp_path_factory.mktemp("world"))
    return folder, dict(vae=vae_losses, clip=clip_losses, unet=unet_losses)


def test_each_stage_learns(trained):
    _, losses = trained
    for stage, values in losses.items():
        assert all(torch.isfinite(torch.tensor(values))), stage
    assert losses["vae"][-1] < losses["vae"][0]  # reconstruction improves within a few steps


def test_the_result_loads_like_any_stable_diffusion(trained):
    folder, _ = trained
    pipe = DreamCachePipeline.from_pretrained(folder / "base", dtype=torch.float32)
    assert pipe.resolution == world_model.RESOLUTION
    pipe.load_dreamcache()
    from dreamcache import world

    subject = pipe.cache_subject(world.reference_image(world.product(10), 64, seed=0))
    (image,) = pipe("a mug on a lawn", subject=subject, num_inference_steps=2, progress=False).images
    assert image.size == (64, 64)
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(folder / "clip").config.projection_dim == 128


def test_worker_rendering_gives_the_same_batches():
    here = list(world_model.batches(3, 4, seed=5, offset=7))
    workers = list(world_model.batches(3, 4, seed=5, offset=7, workers=2))
    for (a_scenes, a_captions, a_refs), (b_scenes, b_captions, b_refs) in zip(here, workers):
        assert torch.equal(a_scenes, b_scenes) and a_captions == b_captions and torch.equal(a_refs, b_refs)
    assert len(here) == 3
