"""A catalogue run on embedded backends (SQLite, a local object directory), as `dreamcache run` does it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from sqlalchemy import create_engine, func, select, text
from typer.testing import CliRunner

from db.models import Generation, RejectedItem
from flows.catalogue import run_embedded
from flows.cli import app
from flows.params import CatalogueRunParams

PROMPTS = ["a {category} on a beach", "a {category} in the snow"]


def params(source, **kwargs) -> CatalogueRunParams:
    return CatalogueRunParams(source=str(source), prompts=PROMPTS, images_per_prompt=2, steps=2, batch_size=4,
                              **kwargs)


def database(home: Path):
    return create_engine(f"sqlite:///{home / 'dreamcache.db'}")


def test_a_run_writes_images_sheets_and_history(platform_env, catalogue, tmp_path):
    summary = run_embedded(params(catalogue), progress=False)
    home = tmp_path / "home"
    assert (summary["products_listed"], summary["products_ingested"], summary["rejected"]) == (5, 3, 2)
    assert summary["images_generated"] == 3 * 2 * 2 and summary["images_failed"] == 0
    reasons = {r["item"].rsplit("/", 1)[-1]: r["reason"] for r in summary["rejections"]}
    assert "truncated or corrupt" in reasons["BROKEN.png"] and "not an image" in reasons["NOT-AN-IMAGE.jpg"]

    with database(home).connect() as db:
        rows = db.execute(text("SELECT sku, prompt, seed, output_uri, status FROM generation_history")).all()
        assert len(rows) == 12 and {r.status for r in rows} == {"done"}
        assert {r.prompt for r in rows} == {"a mug on a beach", "a mug in the snow", "a lamp on a beach",
                                            "a lamp in the snow"}
        assert db.scalar(select(func.count()).select_from(RejectedItem)) == 2
    for row in rows:  # no row points to a missing object
        image_path = Path(row.output_uri.removeprefix("file://"))
        assert Image.open(image_path).size == (32, 32)
        sidecar = json.loads(image_path.with_suffix(".json").read_text())
        assert (sidecar["sku"], sidecar["prompt"], sidecar["seed"]) == (row.sku, row.prompt, row.seed)
    for sku in ("MUG-1", "MUG-2", "LAMP-1"):
        assert Path(summary["contact_sheets"][sku].removeprefix("file://")).is_file()


def test_a_second_run_generates_nothing_new(platform_env, catalogue, tmp_path):
    run_embedded(params(catalogue), progress=False)
    outputs = sorted((tmp_path / "home" / "objects" / "shots").rglob("*.png"))
    again = run_embedded(params(catalogue), progress=False)
    assert again["images_generated"] == 0 and again["images_planned"] == 0
    assert sorted((tmp_path / "home" / "objects" / "shots").rglob("*.png")) == outputs
    with database(tmp_path / "home").connect() as db:
        assert db.scalar(select(func.count()).select_from(Generation)) == 12
    # A new prompt is new work, and only that.
    more = run_embedded(params(catalogue).model_copy(update={"prompts": PROMPTS + ["a {category} on a table"]}),
                        progress=False)
    assert more["images_generated"] == 3 * 2


def test_dry_run_writes_nothing(platform_env, catalogue, tmp_path):
    summary = run_embedded(params(catalogue, dry_run=True), progress=False)
    assert summary["images_planned"] == 3 * 2 * 2 and summary["rejected"] == 2
    assert not (tmp_path / "home" / "dreamcache.db").exists()


def test_the_cli_runs_and_reports(platform_env, catalogue):
    result = CliRunner().invoke(app, ["run", "--source", str(catalogue), "-p", "a {category} at dusk",
                                      "--images-per-prompt", "1", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "3 ingested, 2 rejected" in result.output and "3 images generated, 0 failed" in result.output
    assert "BROKEN.png" in result.output and "contact sheet MUG-1" in result.output
    history = CliRunner().invoke(app, ["history", "--sku", "LAMP-1"])
    assert history.exit_code == 0 and "a lamp at dusk" in history.output and "MUG-1" not in history.output


def test_bad_parameters_are_refused_before_anything_runs(platform_env, catalogue):
    result = CliRunner().invoke(app, ["run", "--source", str(catalogue), "-p", "x", "--steps", "0"])
    assert result.exit_code == 1 and "steps: Input should be greater than or equal to 1" in result.output
    result = CliRunner().invoke(app, ["run", "--source", str(catalogue), "-p", "\x00\x07  "])
    assert result.exit_code == 1 and "prompt 1 is empty" in result.output


def test_a_run_killed_midway_then_rerun_completes_exactly_the_missing_work(platform_env, catalogue, tmp_path):
    platform_env.setenv("DREAMCACHE_LEASE_SECONDS", "5")
    command = [sys.executable, "-m", "flows.cli", "run", "--source", str(catalogue), "-p", "a {category} on a beach",
               "-p", "a {category} in the snow", "-p", "a {category} at night", "--images-per-prompt", "3",
               "--steps", "3", "--batch-size", "2"]
    planned = 3 * 3 * 3
    engine = database(tmp_path / "home")
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], env=dict(os.environ),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        try:
            with engine.connect() as db:
                done = db.scalar(select(func.count()).select_from(Generation).where(Generation.status == "done"))
        except Exception:
            continue  # the schema may not exist yet
        if done >= 4:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=30)
    with engine.connect() as db:  # what the killed run finished, counted after its death
        done = db.scalar(select(func.count()).select_from(Generation).where(Generation.status == "done"))
    assert 4 <= done < planned, f"the run was not killed mid-way ({done} of {planned} done):\n{process.stdout.read()}"

    time.sleep(5)  # let the dead worker's leases expire
    rerun = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=dict(os.environ),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    with engine.connect() as db:
        statuses = db.execute(select(Generation.status, func.count()).group_by(Generation.status)).all()
        outputs = db.scalars(select(Generation.output_uri)).all()
    assert dict(statuses) == {"done": planned}
    assert len(set(outputs)) == planned
    files = sorted((tmp_path / "home" / "objects" / "shots").rglob("*.png"))
    images = [f for f in files if f.name != "contact_sheet.png"]
    assert len(images) == planned, "every image exactly once, nothing duplicated"
    assert f"{planned - done} images generated, 0 failed" in rerun.stdout


def test_the_same_photo_under_two_skus_is_cached_once(platform_env, catalogue, tmp_path):
    from db.models import SubjectCache

    (catalogue / "mug" / "MUG-1-COPY.png").write_bytes((catalogue / "mug" / "MUG-1.png").read_bytes())
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["products_ingested"] == 4 and summary["products_cached"] == 4
    with database(tmp_path / "home").connect() as db:
        digests = db.scalars(select(SubjectCache.sha256)).all()
    assert len(digests) == 4 and len(set(digests)) == 3
    stored = list((tmp_path / "home" / "objects" / "caches").rglob("*.safetensors"))
    assert len(stored) == 3


def test_a_corrupt_cache_is_detected_recomputed_and_repaired(platform_env, catalogue, tmp_path):
    from hashlib import sha256

    from db.models import SubjectCache

    run_embedded(params(catalogue), progress=False)
    stored = sorted((tmp_path / "home" / "objects" / "caches").rglob("*.safetensors"))
    damaged = stored[0]
    damaged.write_bytes(damaged.read_bytes()[:-64])  # truncated in the store
    more = run_embedded(params(catalogue).model_copy(update={"prompts": ["a {category} at night"]}), progress=False)
    assert more["images_generated"] == 3 * 2 and more["images_failed"] == 0
    repaired = sorted((tmp_path / "home" / "objects" / "caches").rglob("*.safetensors"))
    assert damaged not in repaired and len(repaired) == 3  # the damaged object is gone, a good one replaces it
    assert all(sha256(p.read_bytes()).hexdigest() == p.stem for p in repaired)
    with database(tmp_path / "home").connect() as db:
        rows = db.execute(select(SubjectCache.sha256, SubjectCache.error)).all()
    assert {digest for digest, _ in rows} == {p.stem for p in repaired}
    (note,) = [error for _, error in rows if error]
    assert note.startswith("recomputed after:") and damaged.stem in note


def test_shots_are_scored_when_scorer_models_are_configured(platform_env, catalogue, tmp_path):
    from tests.helpers import save_tiny_scorers

    clip, dino = save_tiny_scorers(tmp_path / "scorers")
    platform_env.setenv("DREAMCACHE_CLIP_MODEL", clip)
    platform_env.setenv("DREAMCACHE_DINO_MODEL", dino)
    summary = run_embedded(params(catalogue).model_copy(update={"prompts": PROMPTS[:1], "images_per_prompt": 1}),
                           progress=False)
    assert summary["images_generated"] == 3
    with database(tmp_path / "home").connect() as db:
        rows = db.execute(text("SELECT sku, dino, clip_i, clip_t, output_uri FROM generation_history")).all()
        models = db.scalars(text("SELECT DISTINCT scorer_model_id FROM scores")).all()
    assert len(rows) == 3 and all(r.dino is not None and r.clip_i is not None and r.clip_t is not None for r in rows)
    assert sorted(models) == [clip, dino]
    sidecar = json.loads(Path(rows[0].output_uri.removeprefix("file://")).with_suffix(".json").read_text())
    assert {"dino", "clip-i", "clip-t"} <= set(sidecar["scores"]) and sorted(sidecar["scorer_models"]) == [clip, dino]
    assert {p["sku"] for p in summary["products"]} == {"MUG-1", "MUG-2", "LAMP-1"}
    assert all("best_dino" in p for p in summary["products"])
