"""Training on CPU with tiny models: it learns, touches only the adapters, resumes exactly."""

import json

import pytest
import torch

from dreamcache.training.schedule import lr_factor, stage_progress
from dreamcache.training.trainer import TrainConfig, Trainer
from tests.helpers import TEST_RESOLUTION, make_tiny_pipeline, scene

SCENES = [((200, 30, 40), (230, 200, 120), "a mug on a beach"), ((30, 60, 200), (240, 240, 250), "a bottle in snow"),
          ((240, 200, 60), (40, 120, 50), "a lamp in a forest"), ((120, 60, 20), (90, 90, 100), "a box in a city")]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny"
    make_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def manifest(tmp_path):
    rows = []
    for i, (product, background, caption) in enumerate(SCENES):
        target, _ = scene(product_color=product, background=background, size=(64, 64), box=(14, 12, 50, 54))
        reference, _ = scene(product_color=product, background=(255, 255, 255), size=(64, 64), box=(10, 8, 54, 58))
        target.save(tmp_path / f"target-{i}.png")
        reference.save(tmp_path / f"reference-{i}.png")
        rows.append(dict(target=f"target-{i}.png", reference=f"reference-{i}.png", caption=caption))
    rows.append(dict(target="missing.png", reference="reference-0.png", caption="broken row"))
    rows.append(dict(target="target-0.png", caption="no reference"))
    (tmp_path / "triplets.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "triplets.jsonl"


def config(base_model, manifest, tmp_path, **overrides) -> TrainConfig:
    values = dict(base_model=str(base_model), manifest=str(manifest) if manifest else None, output_dir=str(tmp_path / "run"),
                  resolution=TEST_RESOLUTION, batch_size=4, learning_rate=1e-2, max_steps=30, log_every=1,
                  checkpoint_every=10, validate_every=1000, text_dropout=0.0, data_workers=0)
    return TrainConfig(**{**values, **overrides})


def write_toml(cfg: TrainConfig, path) -> None:
    """The config as a TOML file (scalars only: enough for these tests)."""
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.model_dump().items()
                              if v is not None and not isinstance(v, list)))


def fixed_loss(trainer: Trainer) -> float:
    with torch.no_grad():
        return sum(trainer.loss(trainer.batch(list(range(s, s + 4)))).item() for s in (0, 100, 200)) / 3


def test_a_tiny_model_learns_the_triplets_and_only_adapters_change(base_model, manifest, tmp_path):
    trainer = Trainer(config(base_model, manifest, tmp_path))
    assert (trainer.manifest_report.usable, len(trainer.manifest_report.skipped)) == (4, 2)
    base = {k: v.clone() for k, v in make_tiny_pipeline().unet.state_dict().items()}
    before = fixed_loss(trainer)
    final = trainer.train()
    after = fixed_loss(trainer)
    assert after < 0.85 * before, (before, after)
    state = trainer.model_unet.state_dict()
    for key, value in base.items():
        assert torch.equal(state[key], value), f"base weight {key} changed"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31)) and all(r["samples_per_s"] > 0 for r in log)
    assert (final / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-0000010", "step-0000020", "step-0000030"]


def test_resume_repeats_the_next_step_exactly(base_model, manifest, tmp_path):
    straight = Trainer(config(base_model, manifest, tmp_path / "a", max_steps=12))
    losses = [straight.train_step() for _ in range(12)]
    assert straight.step == 12

    first = Trainer(config(base_model, manifest, tmp_path / "b", max_steps=10, checkpoint_every=10))
    first.train()
    resumed = Trainer(config(base_model, manifest, tmp_path / "b", max_steps=12))
    assert resumed.resume("latest") == 10
    assert [resumed.train_step(), resumed.train_step()] == pytest.approx(losses[10:12], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_step(base_model, manifest, tmp_path):
    plain = Trainer(config(base_model, manifest, tmp_path / "a", max_steps=2))
    checkpointed = Trainer(config(base_model, manifest, tmp_path / "b", max_steps=2, gradient_checkpointing=True))
    assert [plain.train_step() for _ in range(2)] == pytest.approx([checkpointed.train_step() for _ in range(2)],
                                                                   rel=1e-4)


def test_two_processes_train_like_one_with_the_same_global_batch(base_model, manifest, tmp_path):
    """DDP over gloo on CPU: 2 processes x batch 2 follow the same loss curve as 1 process x batch 4."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[3]
    runs = {}
    for name, processes, batch in (("one", 1, 4), ("two", 2, 2)):
        cfg = config(base_model, manifest, tmp_path / name, batch_size=batch, max_steps=3, checkpoint_every=100)
        path = tmp_path / f"{name}.toml"
        write_toml(cfg, path)
        torchrun = Path(sys.executable).parent / "torchrun"
        subprocess.run([str(torchrun), "--nproc_per_node", str(processes), "-m", "dreamcache.training.trainer", str(path)],
                       cwd=root, env=dict(os.environ, ACCELERATE_USE_CPU="true"), check=True, capture_output=True,
                       timeout=300)
        log = [json.loads(line) for line in (tmp_path / name / "run" / "log.jsonl").read_text().splitlines()]
        assert {r["processes"] for r in log} == {processes}
        runs[name] = ([r["loss"] for r in log], load_file(tmp_path / name / "run" / "adapter" / "adapter_model.safetensors"))
    assert len(runs["two"][0]) == 3, "one log line per step: only the main process logs"
    assert runs["two"][0] == pytest.approx(runs["one"][0], rel=1e-5)
    for key, value in runs["one"][1].items():
        # Adam divides by tiny second moments: summation-order differences of 1e-7 show up as ~1e-5.
        torch.testing.assert_close(runs["two"][1][key], value, atol=1e-4, rtol=1e-3)


def test_the_cli_trains_from_a_config_file(base_model, manifest, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg = config(base_model, manifest, tmp_path, max_steps=2, checkpoint_every=1)
    path = tmp_path / "train.toml"
    write_toml(cfg, path)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert f"adapters written to {tmp_path / 'run' / 'adapter'}" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('base_model = "x"\nlearning_rate = -1\n')
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 1 and "manifest" in result.output and "learning_rate" in result.output


def test_validation_images_are_written_at_the_interval(base_model, manifest, tmp_path):
    reference = manifest.parent / "reference-0.png"
    trainer = Trainer(config(base_model, manifest, tmp_path, max_steps=4, validate_every=2,
                             validation_references=[str(reference)], validation_prompts=["a mug on a beach", "a mug"],
                             validation_steps=2))
    trainer.train()
    sheets = sorted((tmp_path / "run" / "validation").glob("*.png"))
    assert [p.name for p in sheets] == ["step-0000002.png", "step-0000004.png"]
    from PIL import Image

    assert Image.open(sheets[0]).width == 3 * 256  # reference + two prompts


def test_data_workers_prepare_the_same_samples(base_model, manifest, tmp_path):
    here = Trainer(config(base_model, manifest, tmp_path / "a", max_steps=3))
    losses = [here.train_step() for _ in range(3)]
    workers = Trainer(config(base_model, manifest, tmp_path / "b", max_steps=3, data_workers=2))
    batches = workers.batches()
    assert [workers.train_step(batches) for _ in range(3)] == pytest.approx(losses, rel=1e-5)


class Scenes:
    """A dataset object for the trainer (`Triplets`): the test scenes, references not augmented."""

    def __init__(self):
        self.rows = []
        for product, background, caption in SCENES:
            target, _ = scene(product_color=product, background=background, size=(TEST_RESOLUTION,) * 2,
                              box=(8, 6, 26, 28))
            reference, _ = scene(product_color=product, background=(255, 255, 255), size=(TEST_RESOLUTION,) * 2,
                                 box=(5, 4, 27, 29))
            self.rows.append((target, reference, caption))

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index, generator):
        return self.rows[index]


def test_the_trainer_takes_a_dataset_object_instead_of_a_manifest(base_model, tmp_path):
    trainer = Trainer(config(base_model, None, tmp_path, max_steps=3), dataset=Scenes())
    assert trainer.manifest_report.usable == 4 and not trainer.samples.on_device
    assert all(0 < trainer.train_step() < 10 for _ in range(3))


def test_without_a_manifest_or_a_dataset_the_trainer_says_what_is_missing(base_model, tmp_path):
    with pytest.raises(ValueError, match="no manifest"):
        Trainer(config(base_model, None, tmp_path))


def test_training_stops_at_its_time_budget_and_saves_the_adapter(base_model, manifest, tmp_path):
    trainer = Trainer(config(base_model, manifest, tmp_path, max_steps=10_000, max_minutes=0.02, checkpoint_every=10**6))
    final = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert 0 < trainer.step < 10_000 and log[-1]["step"] == trainer.step
    assert log[-1]["elapsed_s"] >= 1.2 and (final / "adapter_model.safetensors").is_file()


def test_a_cosine_schedule_falls_from_the_full_rate_to_a_tenth_by_the_last_step(base_model, manifest, tmp_path):
    trainer = Trainer(config(base_model, manifest, tmp_path, max_steps=12, lr_schedule="cosine", checkpoint_every=10**6))
    trainer.train()
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # Logged after each step: the rate that step used, from progress (step - 1) / 12.
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-2 * lr_factor("cosine", 11 / 12))
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] < 0.12 * rates[0]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(rates[-1])


def test_the_cosine_schedule_follows_the_time_budget_when_it_ends_the_run_first():
    assert stage_progress(10, 100_000, seconds=30, minutes=1) == 0.5  # 10 of 100k steps, half the minute
    assert stage_progress(60, 100, seconds=30, minutes=1) == 0.6
    assert stage_progress(10, 100, seconds=600, minutes=1) == 1.0
    assert [round(lr_factor("cosine", f), 3) for f in (0, 0.5, 1)] == [1.0, 0.55, 0.1]
    assert lr_factor("constant", 0.7) == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        lr_factor("linear", 0.5)


def test_the_cache_effect_is_zero_for_adapters_that_ignore_the_memory(base_model, tmp_path):
    trainer = Trainer(config(base_model, None, tmp_path, max_steps=4, validate_every=2, log_every=100), dataset=Scenes())
    assert trainer.cache_effect() != 0  # PyTorch's default initialisation mixes the memory in
    with torch.no_grad():
        for adapter in trainer.adapter_modules.values():  # Linear_cat([self-attention, memory]) = self-attention
            d = adapter.linear_cat.out_features
            adapter.linear_cat.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
            adapter.linear_cat.bias.zero_()
    assert abs(trainer.cache_effect()) < 1e-6
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "cache_effect" in r] == [2, 4]


def test_the_adapter_config_names_the_base_by_its_weights_not_the_training_machines_folder(base_model, tmp_path):
    from dreamcache.core.cache import model_fingerprint
    from dreamcache.core.pipeline import DreamCachePipeline
    from dreamcache.core.weights import read_adapter_config
    from dreamcache.training.trainer import _named_base

    plain = make_tiny_pipeline()
    expected = f"fingerprint:{model_fingerprint(plain.unet, plain.vae)}"
    trainer = Trainer(config(base_model, None, tmp_path, max_steps=1, checkpoint_every=1), dataset=Scenes())
    final = trainer.train()
    assert read_adapter_config(final).base_model == expected
    assert str(base_model) not in (final / "adapter_config.json").read_text()
    # A bfloat16 copy rounds the weights otherwise than the fingerprint's float16: named from a float16 copy.
    bf16 = DreamCachePipeline.from_pretrained(base_model, dtype=torch.bfloat16)
    assert model_fingerprint(bf16.unet, bf16.vae) != expected[len("fingerprint:"):]
    assert _named_base(str(base_model), bf16, torch.bfloat16) == expected
    assert _named_base("org/hub-model", bf16, torch.bfloat16) == "org/hub-model"  # a hub id is kept as it is
