"""The world model's stages run on CPU for a few steps and give a pipeline the platform loads."""

import json
import shutil

import torch

from dreamcache import world, world_model
from dreamcache.pipeline import DreamCachePipeline
from dreamcache.world_classifier import AttributeClassifier


def test_every_stage_runs_and_is_recorded(tiny_world):
    folder, record = tiny_world
    assert set(record["stages"]) == {"pool", "vae", "clip", "unet", "classifier", "adapter", "adapter-middle"}
    for stage in ("vae", "clip", "unet", "classifier"):
        summary = record["stages"][stage]
        assert summary["steps"] == 6 and torch.isfinite(torch.tensor(summary["final_loss"])), stage
    assert record["stages"]["vae"]["final_loss"] < record["stages"]["vae"]["first_loss"]
    assert [step for step, _ in record["stages"]["adapter"]["cache_effect"]] == [1, 2]  # watched while training
    assert json.loads((folder / "training.json").read_text())["stages"] == record["stages"]


def test_the_result_loads_like_any_stable_diffusion(tiny_world):
    folder, _ = tiny_world
    pipe = DreamCachePipeline.from_pretrained(folder / "base", dtype=torch.float32)
    assert pipe.resolution == world_model.RESOLUTION
    pipe.load_dreamcache(folder / "adapter")
    subject = pipe.cache_subject(world.reference_image(world.product(10), 64, seed=0))
    (image,) = pipe("a mug on a lawn", subject=subject, num_inference_steps=2, progress=False).images
    assert image.size == (64, 64)
    pipe.unload_dreamcache()
    pipe.load_dreamcache(folder / "adapter-middle")
    assert [layer.name for layer in pipe.dreamcache_layers] == ["mid_block.attentions.0"]
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(folder / "clip").config.projection_dim == 128
    assert AttributeClassifier.from_pretrained(folder / "classifier").resolution == world_model.RESOLUTION


def test_the_schedule_ends_in_pure_noise_and_the_model_predicts_velocity(tiny_world):
    # A base trained on SD's schedule reads colour through the noise at t = 999 and, sampling from
    # pure noise, draws nearly every product in one colour (docs/toy-world.md).
    folder, _ = tiny_world
    pipe = DreamCachePipeline.from_pretrained(folder / "base", dtype=torch.float32)
    assert pipe.scheduler.alphas_cumprod[-1].item() < 1e-9
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps[0] == 999  # sampling starts where training saw no signal


def test_the_product_weighs_more_than_the_scene_in_the_unet_loss():
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 16:32, 16:34] = True  # 4x4 latent pixels covered, two more half covered
    weights = world_model.product_weights(masks, 16, 5.0)
    assert weights.shape == (1, 1, 16, 16)
    assert weights[0, 0, 4:8, 4:8].eq(5).all() and weights[0, 0, 4:8, 8].eq(3).all()
    assert weights.eq(1).sum() == 256 - 20


def test_the_vae_scaling_factor_gives_unit_variance_latents(tiny_world):
    folder, _ = tiny_world
    pipe = DreamCachePipeline.from_pretrained(folder / "base", dtype=torch.float32)
    pool = world_model.render_pool(64, seed=3)
    with torch.no_grad():
        latents = pipe.vae.encode(world_model.pixels(pool.targets)).latent_dist.mean * pipe.vae.config.scaling_factor
    assert 0.7 < latents.std().item() < 1.4


def test_finished_stages_are_not_trained_again(tiny_world):
    folder, record = tiny_world
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    again = world_model.train_world_model(folder, world_model.StageSteps(pool_size=8), torch.device("cpu"))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == before
    assert again["stages"]["unet"] == record["stages"]["unet"]


def test_the_pool_is_the_same_with_worker_processes():
    here, workers = world_model.render_pool(40, seed=5, chunk=16), world_model.render_pool(40, seed=5, workers=2, chunk=16)
    assert torch.equal(here.targets, workers.targets) and torch.equal(here.references, workers.references)
    assert torch.equal(here.captions, workers.captions)
    assert all(torch.equal(here.labels[h], workers.labels[h]) for h in here.labels)
    assert torch.equal(here.masks, workers.masks) and here.masks.shape == (40, 64, 64)
    assert here.targets.shape == (40, 3, 64, 64) and here.targets.dtype == torch.uint8
    first = world.triplet(5 * 10_000_019, 64)
    assert world.CAPTIONS[here.captions[0]] == first.caption
    assert torch.equal(here.masks[0], torch.from_numpy(first.mask)) and 0 < first.mask.mean() < 0.5
    assert not any(world.is_held_out(world.triplet(5 * 10_000_019 + i, 64).product.index) for i in range(40))


def test_adapter_stages_in_parallel_processes_keep_each_others_records(tiny_world, tmp_path, monkeypatch):
    folder = tmp_path / "world"
    shutil.copytree(tiny_world[0], folder, ignore=shutil.ignore_patterns("adapter-middle"))

    def other_process_finishes_meanwhile(base, output, preset, steps):
        record = json.loads((folder / "training.json").read_text())
        record["stages"]["adapter-other"] = {"steps": 1}
        (folder / "training.json").write_text(json.dumps(record))
        output.mkdir()
        return {"steps": 2, "preset": preset}

    monkeypatch.setattr(world_model, "train_adapters", other_process_finishes_meanwhile)
    record = world_model.train_world_model(folder, world_model.StageSteps(), torch.device("cpu"), ("adapter-middle",))
    on_disk = json.loads((folder / "training.json").read_text())["stages"]
    assert {"adapter", "adapter-middle", "adapter-other"} <= set(on_disk) == set(record["stages"])
    assert on_disk["adapter-middle"]["preset"] == "middle"
