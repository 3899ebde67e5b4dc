"""The world model's stages run on CPU for a few steps and give a pipeline the platform loads."""

import json
import shutil
import time
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dreamcache.core.cache import model_fingerprint
from dreamcache.core.layers import resolve_preset
from dreamcache.core.pipeline import DreamCachePipeline
from dreamcache.core.weights import base_identity, read_adapter_config
from dreamcache.training.schedule import lr_factor
from dreamcache.world import model as world_model
from dreamcache.world import scene as world
from dreamcache.world.classifier import AttributeClassifier
from dreamcache.world.model import Processes, WorldModelConfig, _Progress
from dreamcache.world.pool import pixels, render_pool
from tests.dreamcache.world.conftest import TINY


def test_every_stage_runs_and_is_recorded(tiny_world):
    folder, record = tiny_world
    assert set(record["stages"]) == {"pool", "vae", "clip", "unet", "classifier", "adapter", "adapter-middle"}
    for stage in ("vae", "clip", "unet", "classifier"):
        summary = record["stages"][stage]
        assert summary["steps"] == 6 and summary["processes"] == 1, stage
        assert torch.isfinite(torch.tensor(summary["final_loss"])), stage
    assert record["stages"]["vae"]["final_loss"] < record["stages"]["vae"]["first_loss"]
    assert [step for step, _ in record["stages"]["adapter"]["cache_effect"]] == [1, 2]  # watched while training
    assert json.loads((folder / "training.json").read_text())["stages"] == record["stages"]
    assert record["device"] == "cpu x1" and record["config"]["resolution"] == 64


def test_the_result_loads_like_any_stable_diffusion(tiny_world):
    folder, _ = tiny_world
    pipe = DreamCachePipeline.from_pretrained(folder / "base", dtype=torch.float32)
    assert pipe.resolution == TINY.resolution and pipe.vae_scale_factor == 4
    # The adapters name the base they were trained on by its weights, not by the training machine's folder.
    named = f"fingerprint:{model_fingerprint(pipe.unet, pipe.vae)}"
    assert [read_adapter_config(folder / name).base_model for name in ("adapter", "adapter-middle")] == [named] * 2
    pipe.load_dreamcache(folder / "adapter")
    subject = pipe.cache_subject(world.reference_image(world.product(10), 64, seed=0))
    (image,) = pipe("a mug on a lawn", subject=subject, num_inference_steps=2, progress=False).images
    assert image.size == (64, 64)
    pipe.unload_dreamcache()
    pipe.load_dreamcache(folder / "adapter-middle")
    assert [layer.name for layer in pipe.dreamcache_layers] == ["mid_block.attentions.0"]
    from transformers import AutoProcessor, CLIPModel

    assert CLIPModel.from_pretrained(folder / "clip").config.projection_dim == 128
    pixels_ = AutoProcessor.from_pretrained(folder / "clip")(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels_.shape == (1, 3, 64, 64)  # the scorer's processor feeds the world CLIP at its own size
    assert AttributeClassifier.from_pretrained(folder / "classifier").resolution == TINY.resolution


def test_the_shipped_unet_has_stable_diffusions_layout_and_default_layers():
    with torch.device("meta"):
        unet = world_model.make_unet(WorldModelConfig())
    layers = resolve_preset(unet, "default")
    assert [layer.name for layer in layers] == ["mid_block.attentions.0", "up_blocks.1.attentions.1",
                                                "up_blocks.2.attentions.0", "up_blocks.2.attentions.2",
                                                "up_blocks.3.attentions.1"]  # as on SD 1.5 / 2.1
    assert [layer.channels for layer in layers] == [160, 160, 80, 80, 40]
    decoder = [name for name, m in unet.named_modules() if name.startswith("up_blocks") and
               type(m).__name__ == "Transformer2DModel"]
    assert len(decoder) == 9  # three cross-attention up blocks of three layers
    assert sum(p.numel() for p in unet.parameters()) < 16e6  # fits the repository's model budget in fp16


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
    pool = render_pool(64, seed=3, resolution=64)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels(pool.targets)).latent_dist.mean * pipe.vae.config.scaling_factor
    assert latents.shape[-1] == 16 and 0.7 < latents.std().item() < 1.4


def test_finished_stages_are_not_trained_again(tiny_world):
    folder, record = tiny_world
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    again = world_model.train_world_model(folder, TINY)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == before
    assert again["stages"]["unet"] == record["stages"]["unet"]


def test_a_stage_stops_at_its_time_budget():
    model = torch.nn.Linear(2, 1)
    progress = _Progress("probe", torch.optim.SGD(model.parameters(), lr=0.1), Processes(Accelerator(cpu=True)),
                         steps=1000, minutes=0.1 / 60)
    for _ in progress:
        time.sleep(0.005)
        progress.step(model(torch.ones(1, 2)).sum() ** 2)
    summary = progress.summary()
    assert 10 <= summary["steps"] < 1000 and summary["steps"] % 10 == 0  # the budget is checked every 10 steps


def test_a_stage_on_the_cosine_schedule_ends_at_a_tenth_of_its_rate_and_warms_up_first():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    progress = _Progress("probe", optimizer, Processes(Accelerator(cpu=True)), steps=100, warmup=5, schedule="cosine")
    rates = []
    for _ in progress:
        progress.step(model(torch.ones(1, 2)).sum() ** 2)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.1 / 5) and rates[4] == pytest.approx(0.1)  # warm-up; progress 0 until step 10
    assert rates[50] == pytest.approx(0.1 * lr_factor("cosine", 0.5)) and rates[-1] == pytest.approx(0.1 * lr_factor("cosine", 0.9))
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[-1] < 0.15 * rates[4]


def test_an_unknown_schedule_is_refused_before_any_stage_starts():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        WorldModelConfig(lr_schedule="step")


def test_adapter_stages_run_side_by_side_keep_each_others_records(tiny_world, tmp_path, monkeypatch):
    folder = tmp_path / "world"
    shutil.copytree(tiny_world[0], folder, ignore=shutil.ignore_patterns("adapter-middle"))

    def other_job_finishes_meanwhile(base, output, preset, pool, config, accelerator, steps, minutes):
        record = json.loads((folder / "training.json").read_text())
        record["stages"]["adapter-other"] = {"steps": 1}
        (folder / "training.json").write_text(json.dumps(record))
        output.mkdir()
        return {"steps": 2, "preset": preset}

    monkeypatch.setattr(world_model, "train_adapters", other_job_finishes_meanwhile)
    record = world_model.train_world_model(folder, TINY, adapters=("adapter-middle",))
    on_disk = json.loads((folder / "training.json").read_text())["stages"]
    assert {"adapter", "adapter-middle", "adapter-other"} <= set(on_disk) == set(record["stages"])
    assert on_disk["adapter-middle"]["preset"] == "middle"


def test_an_adapter_missing_from_the_model_continued_is_named_before_any_stage_starts(tiny_world, tmp_path):
    source = tmp_path / "shipped"
    shutil.copytree(tiny_world[0], source, ignore=shutil.ignore_patterns("adapter-middle", "pool", "runs"))
    continued = replace(TINY, init_from=str(source))
    with pytest.raises(FileNotFoundError, match="no adapter-middle/ to continue: pass --fresh-adapters"):
        world_model.train_world_model(tmp_path / "out", continued)
    assert not (tmp_path / "out").exists()
    assert world_model._adapter_init(continued, "adapter") == source / "adapter"
    assert world_model._adapter_init(replace(continued, fresh_adapters=True), "adapter-middle") is None


def test_fresh_adapters_on_a_continued_base_count_only_their_own_samples(tiny_world, tmp_path):
    source = tmp_path / "shipped"
    shutil.copytree(tiny_world[0], source, ignore=shutil.ignore_patterns("adapter-middle", "pool", "runs"))
    config = replace(TINY, init_from=str(source), fresh_adapters=True, vae_steps=0, clip_steps=0, unet_steps=0,
                     classifier_steps=0, adapter_steps=1, middle_adapter_steps=1)
    weights = source / "adapter" / "adapter_model.safetensors"
    shifted = {k: v + 1.0 for k, v in load_file(weights).items()}  # continuing would start a whole unit away
    save_file(shifted, weights)
    record = world_model.train_world_model(tmp_path / "out", config)
    assert record["samples"]["adapter"] == record["samples"]["adapter-middle"] == TINY.adapter_batch_size
    assert record["samples"]["unet"] == tiny_world[1]["samples"]["unet"]  # the base's own history is kept
    fresh = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert min((fresh[k] - shifted[k]).abs().mean().item() for k in shifted) > 0.5  # one step from fresh weights


def test_boolean_settings_are_flags():
    assert world_model._parser().parse_args(["--output", "x", "--fresh-adapters"]).fresh_adapters is True
    assert world_model._parser().parse_args(["--output", "x"]).fresh_adapters is False


def test_the_decoder_alone_trains_and_the_latents_keep_their_meaning(tiny_world, tmp_path):
    source = tmp_path / "shipped"
    shutil.copytree(tiny_world[0], source, ignore=shutil.ignore_patterns("pool", "runs", "stages"))
    config = replace(TINY, init_from=str(source), vae_decoder_only=True, vae_steps=3, clip_steps=0, unet_steps=0,
                     classifier_steps=0, adapter_steps=0)
    record = world_model.train_world_model(tmp_path / "out", config, adapters=("adapter",))
    assert record["stages"]["vae"]["steps"] == 3 and record["stages"]["adapter"]["steps"] == 0
    before = AutoencoderKL.from_pretrained(source / "base" / "vae")
    after = AutoencoderKL.from_pretrained(tmp_path / "out" / "base" / "vae")
    old, new = before.state_dict(), after.state_dict()
    kept = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in old if k.startswith("decoder.")]
    assert kept and all(torch.equal(old[k], new[k]) for k in kept)
    assert any(not torch.equal(old[k], new[k]) for k in trained)
    assert after.config.scaling_factor == before.config.scaling_factor  # the UNet's latents, unchanged
    # The adapters, continued for no steps, are kept as they were, for the new base.
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_model.safetensors").read_bytes() == (source / "adapter" / "adapter_model.safetensors").read_bytes()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "base" / "unet")
    assert read_adapter_config(adapter).base_model == base_identity(tmp_path / "out" / "base", unet, after)
    assert read_adapter_config(adapter).base_model != read_adapter_config(source / "adapter").base_model


def test_training_the_decoder_alone_needs_a_model_to_continue():
    with pytest.raises(ValueError, match="vae_decoder_only .* give init_from"):
        WorldModelConfig(vae_decoder_only=True)
