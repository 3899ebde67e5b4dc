"""Everything a run needs is checked before it works; one bad prompt line is rejected, not fatal; and the
model, not a fixed 50 x 2, decides the steps and shots a run takes by default."""

import json

import boto3
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

from db.models import Generation, Prompt, Run, Subject
from flows.cli import app
from tests.helpers import home_database


def rows(home, model) -> int:
    path = home / "dreamcache.db"
    if not path.exists():
        return 0
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as db:
        found = db.scalar(select(func.count()).select_from(model))
    engine.dispose()
    return found


def run(*args):
    return CliRunner().invoke(app, ["run", *args])


def test_a_typod_s3_prefix_fails_before_any_work(platform_env, s3_bucket, tmp_path):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="catalogue/mug/MUG-1.png", Body=b"x")
    result = run("--source", f"s3://{s3_bucket}/catalogeu/", "-p", "a mug")
    assert result.exit_code == 1
    assert f"source s3://{s3_bucket}/catalogeu/ holds no product images" in result.output
    assert "Traceback" not in result.output
    assert rows(tmp_path / "home", Run) == 0


def test_a_missing_or_empty_prompt_file_fails_before_ingest(platform_env, catalogue, tmp_path):
    result = run("--source", str(catalogue), "--prompt-file", str(catalogue / "prompts.txt"))
    assert result.exit_code == 1 and f"prompt file {catalogue / 'prompts.txt'} does not exist" in result.output
    (catalogue / "prompts.txt").write_text("# nothing yet\n\n")
    result = run("--source", str(catalogue), "--prompt-file", str(catalogue / "prompts.txt"))
    assert result.exit_code == 1 and "holds no prompts: write one prompt per line" in result.output
    assert rows(tmp_path / "home", Subject) == 0  # nothing ingested, segmented or cached


def test_a_bad_prompt_line_is_rejected_and_the_run_goes_on(platform_env, catalogue, tmp_path):
    (catalogue / "prompts.txt").write_text("a {category} on a beach\n" + "z" * 5000 + "\na {category} at night\n")
    result = run("--source", str(catalogue), "--prompt-file", str(catalogue / "prompts.txt"), "--steps", "1",
                 "--images-per-prompt", "1")
    assert result.exit_code == 0, result.output
    assert f"rejected at prompts: {catalogue / 'prompts.txt'} line 2: has 5000 characters, more than 1000" \
        in result.output
    # two prompts for two categories (mug, lamp); three products
    assert rows(tmp_path / "home", Prompt) == 2 * 2 and rows(tmp_path / "home", Generation) == 2 * 3


def test_defaults_come_from_the_model(platform_env, catalogue, tiny_model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((tiny_model / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "recommended": dict(
        steps=3, images_per_prompt=2, image_scale=1.5)}))
    (adapter / "adapter_model.safetensors").symlink_to(tiny_model / "adapter" / "adapter_model.safetensors")
    platform_env.setenv("DREAMCACHE_ADAPTER", str(adapter))

    result = run("--source", str(catalogue), "-p", "a {category} on a beach")
    assert result.exit_code == 0, result.output
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        (parameters,) = db.scalars(select(Run.parameters)).all()
        shots = db.execute(select(Generation.steps, Generation.image_scale)).all()
    engine.dispose()
    assert (parameters["steps"], parameters["images_per_prompt"], parameters["image_scale"]) == (3, 2, 1.5)
    assert sorted(set(shots)) == [(3, 1.5)] and len(shots) == 3 * 2


def test_the_bundled_model_runs_the_example_catalogue_in_a_few_minutes_by_default(platform_env):
    for name in ("DREAMCACHE_BASE_MODEL", "DREAMCACHE_ADAPTER"):
        platform_env.delenv(name)
    result = run("--dry-run")
    assert result.exit_code == 0, result.output
    # six products x three prompts x the bundled model's one shot each (at its 20 steps), not 50 x 2
    assert "6 products listed, 6 valid, 0 rejected; 3 prompts; 18 images would be generated" in result.output
