"""Done rows checked against storage: the cheap check of every re-run, and `dreamcache verify [--repair]`
(docs/reliability.md). Local store here; S3 is the same code through the ObjectStore protocol, and
`test_verify_finds_damage_on_s3` runs the thorough check there."""

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from db.models import Generation, Segmentation, SubjectCache
from flows.runs.catalogue import run_embedded
from flows.cli import app
from flows.platform.params import CatalogueRunParams
from flows.steps.plan import OutputsElsewhere
from tests.helpers import home_database

PROMPTS = ["a {category} on a beach", "a {category} in the snow"]
PLANNED = 3 * 2 * 2


def params(catalogue, **changes) -> CatalogueRunParams:
    return CatalogueRunParams(source=str(catalogue), prompts=PROMPTS, images_per_prompt=2, steps=2, batch_size=4,
                              **changes)


@pytest.fixture
def made(platform_env, catalogue, tmp_path):
    """A finished run: its database and the paths of its shots, by generation id."""
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["status"] == "completed" and summary["images_generated"] == PLANNED
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        shots = {i: Path(uri.removeprefix("file://")) for i, uri in db.execute(select(Generation.id, Generation.output_uri))}
    yield engine, shots
    engine.dispose()


def test_a_rerun_makes_again_the_shots_that_are_missing_or_truncated(made, catalogue):
    engine, shots = made
    (deleted, truncated, *_) = sorted(shots)
    shots[deleted].unlink()
    shots[truncated].write_bytes(shots[truncated].read_bytes()[:100])
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["shots_repaired"] == 2 and summary["images_generated"] == 2 and summary["status"] == "completed"
    assert shots[deleted].is_file() and len(shots[truncated].read_bytes()) > 100
    again = run_embedded(params(catalogue), progress=False)
    assert again["shots_repaired"] == 0 and again["images_generated"] == 0


def test_verify_finds_every_kind_of_damage_and_repair_makes_it_whole(made, catalogue):
    engine, shots = made
    first, second, *_ = sorted(shots)
    shots[first].write_bytes(shots[first].read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    sidecar = shots[second].with_suffix(".json")
    edited = json.loads(sidecar.read_text())
    edited["prompt"] = "a tampered prompt"
    sidecar.write_text(json.dumps(edited))
    with engine.connect() as db:
        cache_uri = db.scalar(select(SubjectCache.tensor_uri).order_by(SubjectCache.id))
        mask_uri = db.scalar(select(Segmentation.mask_uri).order_by(Segmentation.id))
    Path(cache_uri.removeprefix("file://")).write_bytes(b"not a cache")
    Path(mask_uri.removeprefix("file://")).unlink()

    found = CliRunner().invoke(app, ["verify"])
    assert found.exit_code == 1, found.output
    assert f"shot {first}: " in found.output and "damaged (sha256 differs)" in found.output
    assert f"sidecar {second}: " in found.output and "differs from the database" in found.output
    assert "cache 1: " in found.output and "mask 1: " in found.output and "is missing" in found.output
    assert "4 problems" in found.output

    repaired = CliRunner().invoke(app, ["verify", "--repair"])
    assert repaired.exit_code == 0 and "repaired:" in repaired.output
    assert json.loads(sidecar.read_text())["prompt"] != "a tampered prompt"  # written again from the database
    summary = run_embedded(params(catalogue), progress=False)  # makes again what repair made pending
    assert summary["status"] == "completed" and summary["images_generated"] == 1
    clean = CliRunner().invoke(app, ["verify"])
    assert clean.exit_code == 0 and "all whole" in clean.output, clean.output


def test_a_new_output_prefix_is_refused_when_its_shots_exist_under_another(made, catalogue):
    with pytest.raises(OutputsElsewhere, match="12 of the 12 shots this run plans were made already, under another"):
        run_embedded(params(catalogue, output_prefix="exports/2026"), progress=False)


def test_verify_finds_damage_on_s3(platform_env, catalogue, s3_bucket):
    import boto3

    platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}/platform")
    run_embedded(params(catalogue), progress=False)
    client = boto3.client("s3")
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="platform/shots/")["Contents"]
               if o["Key"].endswith(".png") and not o["Key"].endswith("contact_sheet.png"))
    client.delete_object(Bucket=s3_bucket, Key=key)
    found = CliRunner().invoke(app, ["verify"])
    assert found.exit_code == 1 and f"s3://{s3_bucket}/{key} is missing" in found.output


def test_a_lost_sidecar_and_a_half_written_sheet_are_made_whole_by_the_next_run(made, catalogue, tmp_path):
    # What a kill between an image and its sidecar, or while a sheet was written, leaves.
    engine, shots = made
    first = sorted(shots)[0]
    shots[first].with_suffix(".json").unlink()
    sheet = tmp_path / "home" / "objects" / "shots" / "MUG-1" / "contact_sheet.png"
    whole = sheet.read_bytes()
    sheet.write_bytes(whole[: len(whole) // 3])
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["shots_repaired"] == 1 and summary["images_generated"] == 1
    assert shots[first].with_suffix(".json").is_file()
    assert sheet.read_bytes() == whole  # every shot of the product, as before the damage


def test_skus_that_escape_alike_get_their_own_folders_end_to_end(platform_env, catalogue, tmp_path):
    from flows.platform.resources import safe_key_part

    image = catalogue / "mug" / "MUG-1.png"
    lookalike = safe_key_part("a b")  # the SKU "a b" escaped, written out as a SKU of its own
    manifest = tmp_path / "products.csv"
    manifest.write_text(f"sku,category,image_uri\na b,mug,{image}\n{lookalike},mug,{image}\n")
    summary = run_embedded(CatalogueRunParams(source=str(manifest), prompts=["a {category}"], images_per_prompt=2,
                                              steps=2), progress=False)
    assert summary["images_generated"] == 4 and len(summary["contact_sheets"]) == 2
    folders = {Path(uri.removeprefix("file://")).parent for uri in summary["contact_sheets"].values()}
    assert len(folders) == 2
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        outputs = db.scalars(select(Generation.output_uri)).all()
    engine.dispose()
    assert len(set(outputs)) == 4 and all(Path(o.removeprefix("file://")).is_file() for o in outputs)


def test_a_lost_cut_out_is_cut_again_by_the_next_run(made, catalogue):
    engine, _ = made
    with engine.connect() as db:
        reference = db.scalar(select(Segmentation.reference_uri).order_by(Segmentation.id))
    Path(reference.removeprefix("file://")).unlink()
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["status"] == "completed" and Path(reference.removeprefix("file://")).is_file()
    assert CliRunner().invoke(app, ["verify"]).exit_code == 0


def test_a_shot_damaged_at_its_size_is_never_shown_and_is_made_again(made, catalogue):
    engine, shots = made
    damaged = sorted(shots)[0]
    data = shots[damaged].read_bytes()
    shots[damaged].write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))  # same size: the cheap check passes
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["images_generated"] == 0
    with engine.connect() as db:
        status, error = db.execute(select(Generation.status, Generation.error).where(Generation.id == damaged)).one()
    assert status == "pending" and "found by the contact sheet" in error  # not on the sheet: named, to be made again
    waiting = CliRunner().invoke(app, ["verify"])
    assert waiting.exit_code == 0 and "1 shots found damaged before wait to be made again" in waiting.output
    again = run_embedded(params(catalogue), progress=False)
    assert again["status"] == "completed" and again["images_generated"] == 1
    assert shots[damaged].read_bytes() != data[:-10] + bytes(b ^ 0xFF for b in data[-10:])
    clean = CliRunner().invoke(app, ["verify"])
    assert clean.exit_code == 0 and "all whole" in clean.output, clean.output


def test_a_damaged_sidecar_blocks_nothing_and_is_named(made, catalogue):
    engine, shots = made
    sidecar = shots[sorted(shots)[0]].with_suffix(".json")
    sidecar.write_text("{")
    summary = run_embedded(params(catalogue), progress=False)  # the contact sheets do not read it
    assert summary["status"] == "completed" and len(summary["contact_sheets"]) == 3
    found = CliRunner().invoke(app, ["verify"])
    assert found.exit_code == 1 and "differs from the database" in found.output
    assert CliRunner().invoke(app, ["verify", "--repair"]).exit_code == 0
    assert CliRunner().invoke(app, ["verify"]).exit_code == 0


def test_a_shot_made_again_keeps_none_of_the_old_images_scores(made, catalogue):
    from db.models import Score

    engine, shots = made
    remade = sorted(shots)[0]
    with engine.begin() as db:  # a score the old image had (the tiny models record none of their own)
        db.execute(Score.__table__.insert().values(generation_id=remade, metric="clip_i", masked=False, value=0.123,
                                                         scorer_model_id="a-clip"))
    shots[remade].unlink()
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["shots_repaired"] == 1 and summary["images_generated"] == 1
    with engine.connect() as db:
        assert db.scalars(select(Score.value).where(Score.generation_id == remade)).all() == []
    clean = CliRunner().invoke(app, ["verify"])
    assert clean.exit_code == 0 and "all whole" in clean.output, clean.output


def test_verify_checks_the_product_copies_and_repair_restores_them(made, tmp_path):
    copies = [p for p in (tmp_path / "home" / "objects" / "products").rglob("*") if p.is_file()]
    copies[0].write_bytes(b"damaged")
    found = CliRunner().invoke(app, ["verify"])
    assert found.exit_code == 1 and "product " in found.output and "damaged (sha256 differs)" in found.output
    repaired = CliRunner().invoke(app, ["verify", "--repair"])
    assert repaired.exit_code == 0 and "restored from the source" in repaired.output
    assert CliRunner().invoke(app, ["verify"]).exit_code == 0


def test_a_sidecar_that_spells_scores_the_older_way_is_whole():
    from flows.runs.verify import _same_sidecar

    expected = json.dumps(dict(sku="MUG-1", scores={"clip_i": 0.5, "mclip_i": 0.7}), indent=2).encode()
    assert _same_sidecar(json.dumps(dict(sku="MUG-1", scores={"clip-i": 0.5, "mclip-i": 0.7})).encode(), expected)
    assert not _same_sidecar(json.dumps(dict(sku="MUG-1", scores={"clip-i": 0.6, "mclip-i": 0.7})).encode(), expected)
    assert not _same_sidecar(b"not json", expected) and not _same_sidecar(None, expected)


def test_after_every_kind_of_damage_at_once_repair_and_one_run_verify_exits_0(made, catalogue, tmp_path):
    """Issue 38's "done when": whatever was damaged, a run is not blocked by it, and `verify --repair` and one
    re-run leave nothing for `verify` to find."""
    from db.models import Score

    engine, shots = made
    deleted, truncated, flipped, emptied, lost, scored, *_ = sorted(shots)
    with engine.begin() as db:  # a score the deleted shot's image had (the tiny models record none of their own)
        db.execute(Score.__table__.insert().values(generation_id=deleted, metric="clip_i", masked=False, value=0.123,
                                                   scorer_model_id="a-clip"))
    shots[deleted].unlink()
    shots[truncated].write_bytes(shots[truncated].read_bytes()[:100])
    data = shots[flipped].read_bytes()
    shots[flipped].write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    shots[emptied].with_suffix(".json").write_text("{")
    shots[lost].with_suffix(".json").unlink()
    edited = json.loads(shots[scored].with_suffix(".json").read_text())
    edited["scores"] = {"mdino": 0.99}  # a sidecar claiming a score the database does not have
    shots[scored].with_suffix(".json").write_text(json.dumps(edited))
    with engine.connect() as db:
        cache_uri = db.scalar(select(SubjectCache.tensor_uri).order_by(SubjectCache.id))
        mask_uri, reference_uri = db.execute(select(Segmentation.mask_uri, Segmentation.reference_uri)
                                             .order_by(Segmentation.id)).first()
    Path(cache_uri.removeprefix("file://")).write_bytes(b"not a cache")
    Path(mask_uri.removeprefix("file://")).unlink()
    reference = Path(reference_uri.removeprefix("file://"))
    reference.write_bytes(reference.read_bytes()[:-4] + b"\0\0\0\0")  # same size, other bytes
    objects = tmp_path / "home" / "objects"
    copy = next(p for p in (objects / "products").rglob("*") if p.is_file())
    copy.write_bytes(b"damaged")
    sheet = next((objects / "shots").rglob("contact_sheet.png"))
    sheet.write_bytes(sheet.read_bytes()[:200])

    first = run_embedded(params(catalogue), progress=False)  # damage blocks nothing: what the run can see it remakes
    assert first["status"] == "completed" and first["shots_repaired"] == 3, first  # lost, truncated, no sidecar
    found = CliRunner().invoke(app, ["verify"])
    assert found.exit_code == 1, found.output
    repaired = CliRunner().invoke(app, ["verify", "--repair"])
    assert repaired.exit_code == 0, repaired.output
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["status"] == "completed", summary
    clean = CliRunner().invoke(app, ["verify"])
    assert clean.exit_code == 0 and "all whole" in clean.output, clean.output
    with engine.connect() as db:
        assert db.scalar(select(func.count()).where(Generation.status == "done")) == PLANNED
    for shot in shots.values():
        assert shot.is_file() and shot.with_suffix(".json").is_file()
    assert len(sheet.read_bytes()) > 200  # the sheet written again
