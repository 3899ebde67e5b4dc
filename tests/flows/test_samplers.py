"""Samplers, negative prompts and the authors' preset in catalogue runs: recorded per shot, visible in
`generation_history`, and part of a cache's identity (a cache made with another text is not reused)."""

import json

from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from dreamcache.core.weights import AUTHORS_NEGATIVE_PROMPT
from flows.cli import app
from tests.helpers import home_database


def run(*args):
    return CliRunner().invoke(app, ["run", "--images-per-prompt", "1", "-p", "a {category} on a beach", *args])


def history(home) -> list:
    engine = home_database(home)
    with engine.connect() as db:
        rows = db.execute(text("SELECT sku, sampler, eta, negative_prompt, steps, image_scale, cache_preparation "
                               "FROM generation_history ORDER BY generation_id")).all()
    engine.dispose()
    return rows


def caches(home) -> list:
    engine = home_database(home)
    with engine.connect() as db:
        rows = db.execute(text("SELECT subject_id, preparation FROM subject_caches ORDER BY id")).all()
    engine.dispose()
    return rows


def test_sampler_and_negative_prompt_are_recorded_and_the_cache_follows_the_text(platform_env, catalogue, tmp_path):
    home = tmp_path / "home"
    result = run("--source", str(catalogue), "--steps", "2", "--sampler", "dpm++2m", "-n", "blurred, low quality")
    assert result.exit_code == 0, result.output
    rows = history(home)
    assert len(rows) == 3 and {r.sampler for r in rows} == {"dpm++2m"}
    assert {r.negative_prompt for r in rows} == {"blurred, low quality"} and {r.eta for r in rows} == {0.0}
    prepared = {json.loads(r.cache_preparation)["text"] for r in rows}
    assert prepared == {"blurred, low quality"}

    # Without the negative prompt: other shots, and other caches (the first ones are not reused).
    result = run("--source", str(catalogue), "--steps", "2", "--sampler", "dpm++2m")
    assert result.exit_code == 0, result.output
    assert "3 images generated" in result.output
    assert sorted(p for _, p in caches(home)).count("") == 3 and len(caches(home)) == 6
    # The same run again does nothing new.
    result = run("--source", str(catalogue), "--steps", "2", "--sampler", "dpm++2m", "-n", "blurred, low quality")
    assert "0 images generated, 0 failed (3 already made, 0 to do this run)" in result.output


def test_the_authors_preset_samples_and_caches_their_way(platform_env, catalogue, tmp_path):
    result = run("--source", str(catalogue), "--preset", "authors", "--steps", "2")
    assert result.exit_code == 0, result.output
    rows = history(tmp_path / "home")
    assert {(r.sampler, r.eta, r.negative_prompt, r.steps, r.image_scale) for r in rows} == {
        ("ddim", 0.0, AUTHORS_NEGATIVE_PROMPT, 2, 0.35)}
    assert {r.cache_preparation for r in rows} == {json.dumps(
        dict(latent="sample", reference_mode="stretch", text=AUTHORS_NEGATIVE_PROMPT), sort_keys=True)}


def test_the_models_sampler_is_recorded_by_its_class_and_eta_needs_ddim(platform_env, catalogue, tmp_path):
    result = run("--source", str(catalogue), "--steps", "2", "--sampler", "model")
    assert result.exit_code == 0, result.output
    assert {r.sampler for r in history(tmp_path / "home")} == {"DDIMScheduler"}  # the tiny model's own
    result = run("--source", str(catalogue), "--sampler", "unipc", "--eta", "0.5")
    assert result.exit_code == 1 and "eta 0.5 applies to the ddim sampler only, not 'unipc'" in result.output
    # With the preset's sampler (the tiny model's own), an eta is refused as clearly, before any work.
    result = run("--source", str(catalogue), "--eta", "0.5")
    assert result.exit_code == 1 and "eta 0.5 applies to ddim only, not 'model'" in result.output
    assert "name the ddim sampler" in result.output


def test_the_prefect_form_parameters_reach_the_shots(served):
    """What the Prefect form sends (a deployment run's parameters) is what the shots are made and recorded with."""
    from tests.flows.test_prefect_run import trigger

    flow_run = trigger(served["bucket"], preset="authors", sampler="dpm++2m",
                       negative_prompt="blurred")
    assert flow_run.state.is_completed(), flow_run.state
    engine = create_engine(served["database"])
    with engine.connect() as db:
        rows = db.execute(text("SELECT sampler, negative_prompt, image_scale, cache_preparation "
                               "FROM generation_history")).all()
    engine.dispose()
    assert len(rows) == 3 * 2 and {(r.sampler, r.negative_prompt, r.image_scale) for r in rows} == {
        ("dpm++2m", "blurred", 0.35)}  # the authors' preset, with the sampler and text the form chose
    assert {json.loads(r.cache_preparation)["reference_mode"] for r in rows} == {"stretch"}


def test_deep_feature_reuse_is_part_of_a_shots_identity_only_when_on(platform_env, catalogue, tmp_path):
    def parameters(home) -> list[dict]:
        engine = home_database(home)
        with engine.connect() as db:
            rows = db.execute(text("SELECT parameters FROM generations ORDER BY id")).scalars().all()
        engine.dispose()
        return [json.loads(r) if isinstance(r, str) else r for r in rows]

    home = tmp_path / "home"
    result = run("--source", str(catalogue), "--steps", "3", "--deep-reuse-interval", "2")
    assert result.exit_code == 0, result.output
    assert [p.get("deep_reuse_interval") for p in parameters(home)] == [2, 2, 2]
    # Interval 1 is no reuse: other shots, recorded as every shot made before reuse existed (no key, same hash).
    result = run("--source", str(catalogue), "--steps", "3", "--deep-reuse-interval", "1")
    assert result.exit_code == 0, result.output
    assert "3 images generated" in result.output
    assert ["deep_reuse_interval" in p for p in parameters(home)] == [True] * 3 + [False] * 3
    result = run("--source", str(catalogue), "--steps", "3")  # 0: the model's, none for the bundled model
    assert "0 images generated" in result.output
