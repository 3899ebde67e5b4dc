"""A product image that changes or vanishes during a run: every step after ingest reads ingest's copy,
checked against the content hash the product is recorded under (docs/reliability.md)."""

import io

import numpy as np
from PIL import Image

from db.models import Segmentation, Subject
from db.session import transaction
from flows.platform.params import CatalogueRunParams
from flows.platform.resources import get_platform
from flows.platform.places import Places
from flows.steps.source import list_source
from flows.steps import ingest, run_record, segment
from flows.steps.layout import product_key
from tests.flows.conftest import PRODUCTS
from tests.helpers import scene


def reference_colour(platform, subject_id: int) -> tuple[int, int, int]:
    with transaction(platform.sessions) as s:
        uri = s.query(Segmentation.reference_uri).filter(Segmentation.subject_id == subject_id).scalar()
    pixels = np.asarray(Image.open(io.BytesIO(platform.objects.get(platform.objects.key_of(uri)))).convert("RGB"))
    product = pixels[(pixels < 230).any(axis=2)]  # not the white background
    return tuple(int(v) for v in np.median(product, axis=0))


def test_a_file_swapped_between_ingest_and_segmentation_does_not_reach_the_product(platform_env, catalogue):
    platform = get_platform()
    platform.migrate()
    params = CatalogueRunParams(source=str(catalogue), prompts=["a {category}"])
    run_id = run_record.start_run(platform, params)
    items = [i for i in list_source(str(catalogue)).items if i.sku == "MUG-1"]
    (subject_id,) = ingest.ingest(platform, run_id, items, Places.for_run(str(catalogue), []))
    swapped = scene(product_color=(20, 200, 20), background=(250, 250, 250), size=(96, 96), box=(20, 16, 76, 80))[0]
    swapped.save(catalogue / "mug" / "MUG-1.png")  # another product under the same name, mid-run
    assert segment.segment(platform, run_id, [subject_id]) == [subject_id]
    red, green, blue = reference_colour(platform, subject_id)
    assert (red, green, blue) != (20, 200, 20) and abs(red - PRODUCTS["mug/MUG-1"][0]) < 30  # the ingested red mug


def test_a_lost_copy_comes_back_from_an_unchanged_source_and_a_changed_one_is_named(platform_env, catalogue):
    platform = get_platform()
    platform.migrate()
    params = CatalogueRunParams(source=str(catalogue), prompts=["a {category}"])
    run_id = run_record.start_run(platform, params)
    items = {i.sku: i for i in list_source(str(catalogue)).items}
    subjects = ingest.ingest(platform, run_id, [items["MUG-1"], items["LAMP-1"]], Places.for_run(str(catalogue), []))
    with transaction(platform.sessions) as s:
        by_sku = {sub.sku: (sub.id, sub.content_sha256) for sub in s.query(Subject).filter(Subject.id.in_(subjects))}
    for sku in ("MUG-1", "LAMP-1"):  # both copies lost
        platform.objects.delete(product_key(by_sku[sku][1]))
    swapped = scene(product_color=(20, 200, 20), background=(250, 250, 250), size=(96, 96), box=(20, 16, 76, 80))[0]
    swapped.save(catalogue / "lamp" / "LAMP-1.png")  # and one source changed
    usable = segment.segment(platform, run_id, sorted(subjects))
    assert usable == [by_sku["MUG-1"][0]]
    assert platform.objects.exists(product_key(by_sku["MUG-1"][1]))  # restored from the unchanged source
    summary = run_record.summarise(platform, run_id, 2, subjects, [], 0, {}, "shots")
    (rejection,) = summary.rejections
    assert rejection.item == "LAMP-1" and "has changed since it was ingested" in rejection.reason


def test_a_source_image_changed_between_runs_supersedes_the_old_images_shots(platform_env, catalogue):
    from sqlalchemy import select

    from db.models import Generation, SubjectCache
    from flows.runs.catalogue import run_embedded

    params = CatalogueRunParams(source=str(catalogue), prompts=["a {category}"], images_per_prompt=2, steps=1)
    original = (catalogue / "mug" / "MUG-1.png").read_bytes()
    assert run_embedded(params, progress=False)["status"] == "completed"
    scene(product_color=(20, 200, 20), background=(250, 250, 250), size=(96, 96), box=(20, 16, 76, 80))[0].save(
        catalogue / "mug" / "MUG-1.png")  # a new photo of MUG-1
    assert run_embedded(params, progress=False)["images_generated"] == 2

    def shots():
        with transaction(get_platform().sessions) as s:
            return {(content[:6], gen.review.value, gen.reviewed_by, gen.status.value): gen.review_note
                    for gen, content in s.execute(
                        select(Generation, Subject.content_sha256)
                        .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                        .join(Subject, Subject.id == SubjectCache.subject_id)
                        .where(Subject.sku == "MUG-1")).all()}, s.scalars(
                select(Subject.content_sha256).where(Subject.sku == "MUG-1").order_by(Subject.id)).all()

    found, (old, new) = shots()
    assert set(found) == {(old[:6], "rejected", "superseded", "done"), (new[:6], "pending", None, "done")}
    assert "MUG-1's image changed" in found[(old[:6], "rejected", "superseded", "done")]
    (catalogue / "mug" / "MUG-1.png").write_bytes(original)  # and back to the first photo
    assert run_embedded(params, progress=False)["images_generated"] == 0
    found, _ = shots()
    assert set(found) == {(old[:6], "pending", None, "done"), (new[:6], "rejected", "superseded", "done")}


def test_a_superseded_shot_cannot_be_approved_or_published_even_by_its_id(platform_env, catalogue):
    from sqlalchemy import select
    from typer.testing import CliRunner

    from db.models import Generation, SubjectCache
    from flows.runs.catalogue import run_embedded
    from flows.cli import app

    params = CatalogueRunParams(source=str(catalogue), prompts=["a {category}"], images_per_prompt=1, steps=1)
    first = run_embedded(params, progress=False)["run_id"]
    scene(product_color=(20, 200, 20), background=(250, 250, 250), size=(96, 96), box=(20, 16, 76, 80))[0].save(
        catalogue / "mug" / "MUG-1.png")  # a new photo of MUG-1: the first run's MUG-1 shot is superseded
    run_embedded(params, progress=False)
    with transaction(get_platform().sessions) as s:
        shots = dict(s.execute(select(Subject.sku, Generation.id)
                               .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                               .join(Subject, Subject.id == SubjectCache.subject_id)
                               .where(Generation.run_id == first)).all())

    def review_of(shot: int) -> tuple:
        with transaction(get_platform().sessions) as s:
            gen = s.get(Generation, shot)
            return gen.review.value, gen.reviewed_by

    old, lamp = shots["MUG-1"], shots["LAMP-1"]
    assert review_of(old) == ("rejected", "superseded")
    cli = CliRunner()
    refused = cli.invoke(app, ["review", str(first), "--approve", f"{old},{lamp}", "--by", "ana"])
    assert refused.exit_code == 1, refused.output
    (line,) = [line for line in refused.output.splitlines() if line.strip()]
    assert line.startswith(f"error: shot {old} (MUG-1) is superseded and cannot be approved: MUG-1's image changed")
    assert "Traceback" not in refused.output
    assert review_of(old) == ("rejected", "superseded") and review_of(lamp) == ("pending", None)  # nothing applied
    # Rejecting it keeps the mark that brings it back should its image return; the rest of the decision applies.
    rejected = cli.invoke(app, ["review", str(first), "--reject", str(old), "--approve", str(lamp), "--by", "ana"])
    assert rejected.exit_code == 0, rejected.output
    assert review_of(old) == ("rejected", "superseded") and review_of(lamp) == ("approved", "ana")
    published = cli.invoke(app, ["publish", str(first), "--to", "shop"])
    assert published.exit_code == 0 and f"run {first}: 1 added" in published.output, published.output
    keys = list(get_platform().objects.list("shop/"))
    assert any(k.startswith("shop/LAMP-1/") for k in keys) and not any(k.startswith("shop/MUG-1/") for k in keys)
