"""A catalogue run on embedded backends (SQLite, a local object directory), as `dreamcache run` does it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from db.models import Generation, RejectedItem
from flows.runs.catalogue import run_embedded
from flows.cli import app
from flows.platform.params import CatalogueRunParams
from tests.helpers import home_database

PROMPTS = ["a {category} on a beach", "a {category} in the snow"]


def params(source, **kwargs) -> CatalogueRunParams:
    return CatalogueRunParams(source=str(source), prompts=PROMPTS, images_per_prompt=2, steps=2, batch_size=4,
                              **kwargs)


def test_a_run_writes_images_sheets_and_history(platform_env, catalogue, tmp_path):
    summary = run_embedded(params(catalogue), progress=False)
    home = tmp_path / "home"
    assert (summary["products_listed"], summary["products_ingested"], summary["rejected"]) == (5, 3, 2)
    assert summary["images_generated"] == 3 * 2 * 2 and summary["images_failed"] == 0
    reasons = {r["item"].rsplit("/", 1)[-1]: r["reason"] for r in summary["rejections"]}
    assert "truncated or corrupt" in reasons["BROKEN.png"] and "not an image" in reasons["NOT-AN-IMAGE.jpg"]

    with home_database(home).connect() as db:
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
    with home_database(tmp_path / "home").connect() as db:
        assert db.scalar(select(func.count()).select_from(Generation)) == 12
    # A new prompt is new work, and only that.
    more = run_embedded(params(catalogue).model_copy(update={"prompts": PROMPTS + ["a {category} on a table"]}),
                        progress=False)
    assert more["images_generated"] == 3 * 2


def test_dry_run_writes_nothing(platform_env, catalogue, tmp_path):
    summary = run_embedded(params(catalogue, dry_run=True), progress=False)
    assert summary["images_planned"] == 3 * 2 * 2 and summary["rejected"] == 2
    assert not (tmp_path / "home" / "dreamcache.db").exists()


def test_the_cli_runs_and_reports(platform_env, catalogue, tmp_path):
    result = CliRunner().invoke(app, ["run", "--source", str(catalogue), "-p", "a {category} at dusk",
                                      "--images-per-prompt", "1", "--steps", "2", "--compare-text-only"])
    assert result.exit_code == 0, result.output
    assert "3 ingested, 2 rejected" in result.output and "3 images generated, 0 failed" in result.output
    assert len(list((tmp_path / "home" / "objects" / "shots").rglob("*.text-only.png"))) == 3
    assert "BROKEN.png" in result.output and "contact sheet MUG-1" in result.output
    history = CliRunner().invoke(app, ["history", "--sku", "LAMP-1"])
    assert history.exit_code == 0 and "a lamp at dusk" in history.output and "MUG-1" not in history.output


def test_files_that_are_not_images_are_counted_as_skipped(platform_env, catalogue, tmp_path):
    (catalogue / "notes.txt").write_text("photographed in May")
    (catalogue / "mug" / ".DS_Store").write_bytes(b"\0")
    dry = CliRunner().invoke(app, ["run", "--source", str(catalogue), "-p", "a {category}", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "skipped 1 files that are not product images: notes.txt\n" in dry.output and ".DS_Store" not in dry.output
    summary = run_embedded(CatalogueRunParams(source=str(catalogue), prompts=["a {category}"], steps=2),
                           progress=False)
    assert (summary["files_skipped"], summary["skipped"]) == (1, ["notes.txt"])


def test_bad_parameters_are_refused_before_anything_runs(platform_env, catalogue):
    result = CliRunner().invoke(app, ["run", "--source", str(catalogue), "-p", "x", "--steps", "-1"])
    assert result.exit_code == 1 and "steps: Input should be greater than or equal to 0" in result.output
    result = CliRunner().invoke(app, ["run", "--source", str(catalogue), "-p", "\x00\x07  "])
    assert result.exit_code == 1 and "prompt 1 is empty" in result.output


def test_a_run_killed_midway_then_rerun_completes_exactly_the_missing_work(platform_env, catalogue, tmp_path):
    platform_env.setenv("DREAMCACHE_LEASE_SECONDS", "5")
    command = [sys.executable, "-m", "flows.cli", "run", "--source", str(catalogue), "-p", "a {category} on a beach",
               "-p", "a {category} in the snow", "-p", "a {category} at night", "--images-per-prompt", "3",
               "--steps", "3", "--batch-size", "2"]
    planned = 3 * 3 * 3
    engine = home_database(tmp_path / "home")
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
    with home_database(tmp_path / "home").connect() as db:
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
    with home_database(tmp_path / "home").connect() as db:
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
    with home_database(tmp_path / "home").connect() as db:
        rows = db.execute(text("SELECT sku, dino, clip_i, clip_t, output_uri FROM generation_history")).all()
        models = db.scalars(text("SELECT DISTINCT scorer_model_id FROM scores")).all()
    assert len(rows) == 3 and all(r.dino is not None and r.clip_i is not None and r.clip_t is not None for r in rows)
    assert sorted(models) == [clip, dino]
    sidecar = json.loads(Path(rows[0].output_uri.removeprefix("file://")).with_suffix(".json").read_text())
    assert {"dino", "clip_i", "clip_t"} <= set(sidecar["scores"]) and sorted(sidecar["scorer_models"]) == [clip, dino]
    assert {p["sku"] for p in summary["products"]} == {"MUG-1", "MUG-2", "LAMP-1"}
    assert all("best_dino" in p for p in summary["products"])


def test_text_only_twins_are_stored_beside_their_shots_and_paired_on_the_sheets(platform_env, catalogue, tmp_path):
    import numpy as np

    from dreamcache.perception.contact_sheet import PAIRS_PER_ROW, TILE, TITLE_HEIGHT

    summary = run_embedded(params(catalogue, compare_text_only=True), progress=False)
    assert summary["images_generated"] == 12 and summary["images_planned"] == 12
    with home_database(tmp_path / "home").connect() as db:
        rows = db.execute(text("SELECT generation_id, sku, output_uri FROM generation_history "
                               "ORDER BY generation_id")).all()
    for row in rows:
        shot_path = Path(row.output_uri.removeprefix("file://"))
        sidecar = json.loads(shot_path.with_suffix(".json").read_text())
        twin_path = Path(sidecar["text_only_uri"].removeprefix("file://"))
        assert twin_path == shot_path.with_name(shot_path.stem + ".text-only.png")
        shot, twin = (np.asarray(Image.open(p), dtype=int) for p in (shot_path, twin_path))
        assert twin.shape == shot.shape and np.abs(shot - twin).mean() > 1, "the twin is the shot: no cache effect?"

    # MUG-1's four shots: the reference, then [text only | personalised] pairs, in generation order.
    sheet = np.asarray(Image.open(summary["contact_sheets"]["MUG-1"].removeprefix("file://")).convert("RGB"))
    assert sheet.shape[1] == (1 + 2 * PAIRS_PER_ROW) * TILE
    first = Path(next(r for r in rows if r.sku == "MUG-1").output_uri.removeprefix("file://"))
    for column, path in ((1, first.with_name(first.stem + ".text-only.png")), (2, first)):
        tile = np.asarray(Image.open(path).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST))
        assert (sheet[TITLE_HEIGHT : TITLE_HEIGHT + TILE, column * TILE : (column + 1) * TILE] == tile).all(), column


def test_asking_for_twins_later_regenerates_nothing(platform_env, catalogue, tmp_path):
    shots = tmp_path / "home" / "objects" / "shots"
    run_embedded(params(catalogue), progress=False)
    before = {p: p.read_bytes() for p in shots.rglob("*") if p.is_file() and p.name != "contact_sheet.png"}
    again = run_embedded(params(catalogue, compare_text_only=True), progress=False)
    assert again["images_planned"] == 0 and again["images_generated"] == 0
    after = {p: p.read_bytes() for p in shots.rglob("*") if p.is_file() and p.name != "contact_sheet.png"}
    assert after == before, "shots made without twins stay as they were, and get none"
    with home_database(tmp_path / "home").connect() as db:
        assert db.scalar(select(func.count()).select_from(Generation)) == 12
        assert len(set(db.scalars(select(Generation.params_sha256)))) == 1
    # New work of a run that asks for twins gets them; the old shots still have none.
    more = run_embedded(params(catalogue, compare_text_only=True).model_copy(
        update={"prompts": PROMPTS + ["a {category} on a table"]}), progress=False)
    assert more["images_generated"] == 3 * 2
    assert len(list(shots.rglob("*.text-only.png"))) == 3 * 2


def test_a_default_run_records_all_five_scores_of_every_shot_with_the_bundled_models(platform_env, tmp_path):
    import shutil

    from dreamcache.app.config import BUNDLED_DIR
    from flows.cli import EXAMPLES

    for name in ("DREAMCACHE_BASE_MODEL", "DREAMCACHE_ADAPTER", "DREAMCACHE_CLIP_MODEL", "DREAMCACHE_DINO_MODEL",
                 "DREAMCACHE_SAM_CHECKPOINT"):
        platform_env.delenv(name, raising=False)
    shutil.copytree(EXAMPLES / "catalogue" / "mug", tmp_path / "catalogue" / "mug")
    # The model's own sampling settings (steps 0): a shot in which it draws the product, as the demo's.
    summary = run_embedded(CatalogueRunParams(source=str(tmp_path / "catalogue"),
                                              prompt_file=str(EXAMPLES / "prompts.txt"), images_per_prompt=1,
                                              approve_if=["mdino>=0.3"]), progress=False)
    assert summary["images_generated"] == 3 and summary["products_not_found"] == 0
    with home_database(tmp_path / "home").connect() as db:
        scores = db.execute(text("SELECT generation_id, metric, masked, scorer_model_id FROM scores")).all()
        history = db.execute(text("SELECT dino, mdino, clip_i, clip_t, mclip_i FROM generation_history")).all()
    assert sorted((metric, bool(masked)) for _, metric, masked, _ in scores) == sorted(
        [("clip_i", False), ("clip_t", False), ("dino", False), ("clip_i", True), ("dino", True)] * 3)
    assert {model for *_, model in scores} == {str(BUNDLED_DIR / "clip"), str(BUNDLED_DIR / "dino")}
    assert len(history) == 3 and all(None not in tuple(r) for r in history)
    assert summary["review"]["approved"] == sum(r.mdino >= 0.3 for r in history)  # a rule on mdino decides


def test_a_sheet_shows_every_done_shot_under_its_prefix_whichever_run_made_it(platform_env, catalogue, tmp_path):
    from dreamcache.perception.contact_sheet import TILE

    first = run_embedded(params(catalogue).model_copy(update={"prompts": PROMPTS[:1]}), progress=False)
    sheet = Path(first["contact_sheets"]["MUG-1"].removeprefix("file://"))
    assert Image.open(sheet).width == 3 * TILE  # the reference and this run's 2 shots
    second = run_embedded(params(catalogue), progress=False)  # the other prompt's 2 shots
    assert second["images_generated"] == 3 * 2
    assert Image.open(sheet).width == 5 * TILE  # the reference and all 4 shots, from both runs
    with home_database(tmp_path / "home").connect() as db:
        assert db.scalar(text("SELECT COUNT(DISTINCT run_id) FROM generation_history WHERE sku = 'MUG-1'")) == 2
    written = sheet.stat().st_mtime_ns
    run_embedded(params(catalogue), progress=False)
    assert sheet.stat().st_mtime_ns == written  # nothing new: the same sheet is not written again
