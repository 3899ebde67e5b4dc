"""What a shop gets from a run: prompts filled from its manifest columns, its formats, cut-outs and packshots,
and placed shots whose product pixels are the photo's (embedded runs on the tiny model)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner

from flows.runs.catalogue import run_embedded
from flows.cli import app
from flows.platform.params import CatalogueRunParams
from tests.helpers import home_database, scene

RED, YELLOW = (200, 30, 40), (240, 200, 60)


def history(home: Path, columns: str):
    engine = home_database(home)
    with engine.connect() as db:
        rows = db.execute(text(f"SELECT {columns} FROM generation_history ORDER BY generation_id")).all()
    engine.dispose()
    return rows


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


@pytest.fixture
def manifest(tmp_path):
    """Three products; MUG-2 has no colour, only LAMP-1 a brand."""
    folder = tmp_path / "shop"
    folder.mkdir()
    rows = [dict(sku="MUG-1", category="mug", colour="red", brand="", image_uri="mug1.png"),
            dict(sku="MUG-2", category="mug", colour="", brand="", image_uri="mug2.png"),
            dict(sku="LAMP-1", category="lamp", colour="yellow", brand="Acme", image_uri="lamp1.png")]
    for row, color in zip(rows, (RED, (30, 60, 200), YELLOW)):
        scene(product_color=color, background=(250, 250, 250), size=(96, 96), box=(20, 16, 76, 80))[0].save(
            folder / row["image_uri"])
    with open(folder / "products.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "products.csv"


def test_templates_are_filled_from_manifest_columns_and_a_missing_column_rejects_the_product_not_the_run(
        platform_env, manifest, tmp_path):
    templates = ["a {colour} {category} on a marble counter", "a {brand} {category}"]
    summary = run_embedded(CatalogueRunParams(source=str(manifest), prompts=templates, images_per_prompt=1, steps=2),
                           progress=False)
    assert summary["status"] == "completed"
    prompts = {(row.sku, row.prompt) for row in history(tmp_path / "home", "sku, prompt")}
    assert prompts == {("MUG-1", "a red mug on a marble counter"), ("LAMP-1", "a yellow lamp on a marble counter"),
                       ("LAMP-1", "a Acme lamp")}
    rejected = {(r["stage"], r["item"]): r["reason"] for r in summary["rejections"]}
    assert "names the column 'brand', which MUG-1 has no value for (its columns: colour)" in \
        rejected["prompts", "MUG-1: a {brand} {category}"]
    assert "which MUG-2 has no value for" in rejected["prompts", "MUG-2: a {colour} {category} on a marble counter"]
    # MUG-2 can fill no template: it is not ingested at all, and says why.
    assert "no prompt template can be filled for it" in rejected["ingest", "MUG-2"]
    assert summary["products_ingested"] == 2


def test_a_template_no_product_can_fill_stops_the_run_before_any_work(platform_env, manifest, tmp_path):
    result = CliRunner().invoke(app, ["run", "--source", str(manifest), "--prompt", "a {material} {category}",
                                      "--embedded"])
    assert result.exit_code == 1, result.output
    assert "no product of" in result.output and "names the column 'material'" in result.output
    assert not (tmp_path / "home" / "objects").exists()


def test_a_manifest_gives_its_columns_to_products_a_folder_brought_in_before(platform_env, catalogue, tmp_path):
    """The same photos first from a folder (no columns), then from a manifest with a colour column: the manifest's
    columns are used, the run makes what its dry run said, and its summary counts the manifest's rows."""
    first = run_embedded(CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a table"],
                                            images_per_prompt=1, steps=2), progress=False)
    assert first["products_ingested"] == 3
    (catalogue / "products.csv").write_text("sku,category,colour,image_uri\nMUG-1,mug,red,mug/MUG-1.png\n"
                                            "MUG-2,mug,blue,mug/MUG-2.png\nLAMP-1,lamp,yellow,lamp/LAMP-1.png\n"
                                            "MUG-3,mug,green,\n")
    params = CatalogueRunParams(source=str(catalogue / "products.csv"), images_per_prompt=2, steps=2,
                                prompts=["a {colour} {category} on a kitchen counter"], output_prefix="manifest")
    dry = run_embedded(params.model_copy(update={"dry_run": True}), progress=False)
    assert dry["images_planned"] == 6
    summary = run_embedded(params, progress=False)
    assert summary["status"] == "completed" and summary["images_generated"] == 6
    assert (summary["products_listed"], summary["products_ingested"], summary["rejected"]) == (4, 3, 1)
    prompts = {row.prompt for row in history(tmp_path / "home", "prompt")}
    assert {"a red mug on a kitchen counter", "a blue mug on a kitchen counter",
            "a yellow lamp on a kitchen counter"} <= prompts


def test_a_run_that_plans_no_image_fails_saying_why(platform_env, catalogue, tmp_path, monkeypatch):
    """A product whose template cannot be filled when the plan is made (its columns changed since the run
    checked them) is rejected at the plan with its reason; a run left with nothing to make is not completed."""
    from flows.steps import plan

    real = plan.render_prompt

    def columns_gone(template, subject):
        subject.attributes = {}
        return real(template, subject)

    monkeypatch.setattr(plan, "render_prompt", columns_gone)
    (catalogue / "products.csv").write_text("sku,category,colour,image_uri\nMUG-1,mug,red,mug/MUG-1.png\n")
    result = CliRunner().invoke(app, ["run", "--source", str(catalogue / "products.csv"), "--prompt",
                                      "a {colour} {category}", "--steps", "2", "--embedded"])
    assert result.exit_code == 1, result.output
    assert "planned no image" in result.output and "names the column 'colour', which MUG-1 has no value for" \
        in result.output
    assert "Traceback" not in result.output


def test_formats_cutouts_and_packshots(platform_env, catalogue, tmp_path):
    params = CatalogueRunParams(source=str(catalogue / "mug"), prompts=["a {category} on a table"], images_per_prompt=1,
                                steps=2, formats=["1:1", "4:5@80", "16:9@128"], cutout=True, packshot=True)
    summary = run_embedded(params, progress=False)
    assert summary["status"] == "completed" and summary["images_generated"] == 2 * 3
    rows = history(tmp_path / "home", "sku, aspect, width, height, output_uri")
    sizes = {(row.aspect, row.width, row.height) for row in rows}
    assert sizes == {("1:1", 32, 32), ("4:5", 64, 80), ("16:9", 128, 72)}
    for row in rows:  # delivered at the format's size, whole (the canvas resized, never cropped)
        assert Image.open(local(row.output_uri)).size == (row.width, row.height)
        sidecar = json.loads(local(row.output_uri).with_suffix(".json").read_text())
        assert sidecar["parameters"].get("aspect", "1:1") == row.aspect

    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        assets = db.execute(text("SELECT s.sku, a.kind, a.aspect, a.width, a.height, a.uri FROM product_assets a "
                                 "JOIN subjects s ON s.id = a.subject_id ORDER BY a.id")).all()
    engine.dispose()
    assert {(a.sku, a.kind, a.aspect) for a in assets} == {
        (sku, kind, aspect) for sku in ("MUG-1", "MUG-2")
        for kind, aspect in (("cutout", None), ("packshot", "1:1"), ("packshot", "4:5"), ("packshot", "16:9"))}
    for asset in assets:
        image = Image.open(local(asset.uri))
        assert image.size == (asset.width, asset.height)
        if asset.kind == "cutout":  # the product alone: transparent around it, opaque at its centre
            alpha = np.asarray(image)[..., 3]
            assert image.mode == "RGBA" and alpha[0, 0] == 0 and alpha[alpha.shape[0] // 2, alpha.shape[1] // 2] == 255
            assert abs(image.width - 56) <= 4 and abs(image.height - 64) <= 4  # the ellipse's box, give or take the mask
        else:  # on pure white, the product whole and centred
            pixels = np.asarray(image.convert("RGB"))
            assert (pixels[0, 0] == 255).all() and (pixels[-1, -1] == 255).all()
            assert not (pixels[image.height // 2, image.width // 2] == 255).all()
    assert {(a.width, a.height) for a in assets if a.kind == "packshot"} == {(32, 32), (64, 80), (128, 72)}

    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "home" / "objects").rglob("*.png")}
    again = run_embedded(params, progress=False)
    assert again["images_generated"] == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "home" / "objects").rglob("*.png")} == written


def test_a_placed_shot_keeps_the_product_photo_pixels_at_the_delivered_size(platform_env, catalogue, tmp_path):
    one = tmp_path / "one" / "mug"
    one.mkdir(parents=True)
    (one / "MUG-1.png").write_bytes((catalogue / "mug" / "MUG-1.png").read_bytes())
    common = ["run", "--source", str(one.parent), "--prompt", "a {category} on a table",
              "--images-per-prompt", "1", "--steps", "3", "--format", "16:9@160", "--embedded"]
    placed = CliRunner().invoke(app, common + ["--mode", "place", "--placement-x", "0.3", "--placement-scale", "0.5",
                                               "--output-prefix", "placed"])
    drawn = CliRunner().invoke(app, common + ["--output-prefix", "drawn"])
    assert placed.exit_code == 0 and drawn.exit_code == 0, placed.output + drawn.output
    rows = {row.mode: row for row in history(tmp_path / "home", "mode, width, height, output_uri")}
    assert (rows["place"].width, rows["place"].height) == (160, 90)
    place = np.asarray(Image.open(local(rows["place"].output_uri)).convert("RGB")).astype(int)
    draw = np.asarray(Image.open(local(rows["generate"].output_uri)).convert("RGB")).astype(int)
    # The product's box: fitted into 160x90 times 0.5, centred at (0.3, 0.55); its middle is the photo's red.
    cx, cy = round(0.3 * 160), round(0.55 * 90)
    middle = place[cy - 4:cy + 4, cx - 4:cx + 4]
    assert (middle == RED).all()
    assert not (draw[cy - 4:cy + 4, cx - 4:cx + 4] == RED).all()  # the drawn shot has no pasted product
    assert np.abs(place[:, -20:] - place[cy, cx]).sum(axis=2).mean() > 30  # far from the product: a scene, not red


def test_a_placed_shot_has_a_soft_shadow_by_default_and_none_when_asked(platform_env, catalogue, tmp_path):
    one = tmp_path / "one" / "mug"
    one.mkdir(parents=True)
    (one / "MUG-1.png").write_bytes((catalogue / "mug" / "MUG-1.png").read_bytes())
    common = ["run", "--source", str(one.parent), "--prompt", "a {category} on a table", "--images-per-prompt", "1",
              "--steps", "3", "--mode", "place", "--placement-scale", "0.5", "--embedded"]
    soft = CliRunner().invoke(app, common + ["--output-prefix", "soft"])
    none = CliRunner().invoke(app, common + ["--shadow", "none", "--output-prefix", "none"])
    assert soft.exit_code == 0 and none.exit_code == 0, soft.output + none.output
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        rows = db.execute(text("SELECT output_uri, parameters FROM generations ORDER BY id")).all()
    engine.dispose()
    shots = {json.loads(r.parameters)["placement"]["shadow"]: r for r in rows}
    assert set(shots) == {"soft", "none"}
    for row in rows:  # the category is the negative prompt of a placed shot, recorded in its parameters
        assert json.loads(row.parameters)["negative_category"] is True
    shaded, plain = (np.asarray(Image.open(local(shots[k].output_uri)).convert("RGB")).astype(int)
                     for k in ("soft", "none"))
    darker = (plain - shaded).sum(axis=2)
    assert (darker >= 0).all()  # the same scene, only darkened
    rows_darker = np.flatnonzero((darker > 0).any(axis=1))
    changed = darker > 0
    assert changed.any() and rows_darker.min() > 0.5 * plain.shape[0]  # under the product (placed at y 0.55)
    assert changed.mean() < 0.15


def test_bad_formats_and_rules_are_refused_naming_the_field():
    for field, value, words in (("formats", ["21:5"], "between 1:4 and 4:1"), ("formats", ["wide"], "is not W:H"),
                                ("approve_if", ["mdino>0.5"], "is not metric>=value"),
                                ("approve_if", ["sharpness>=0.5"], "unknown metric 'sharpness'"),
                                ("publish_prefix", "caches/x", "lies in the platform's own caches/"),
                                ("output_prefix", "products", "lies in the platform's own products/")):
        with pytest.raises(ValueError, match=words):
            CatalogueRunParams(source="s3://b/", prompts=["a mug"], **{field: value})
    with pytest.raises(ValueError, match=r"prompt 1: prompt template 'a \{sku.x\}'"):  # before any run exists
        CatalogueRunParams(source="s3://b/", prompts=["a {sku.x}"])
