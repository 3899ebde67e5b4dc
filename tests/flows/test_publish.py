"""Publishing approved shots to a shop's prefix, with manifests, on S3 and PostgreSQL."""

import csv
import io
import json
from datetime import timezone
from typing import NamedTuple

import boto3
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from db.session import transaction
from flows.runs.catalogue import run_embedded
from flows.cli import app
from flows.platform.params import CatalogueRunParams
from flows.platform.resources import Platform, get_platform
from flows.steps.publish import COLUMNS, PublishError, publish
from flows.steps.review import decide
from tests.helpers import save_tiny_scorers


class Shop(NamedTuple):
    platform: Platform
    run_id: int
    shots: dict[tuple[str, int], int]  # (SKU, seed) -> generation id
    bucket: str
    written: list[str]  # the keys the platform's object store was asked to write, in order


@pytest.fixture
def shop(platform_env, catalogue, postgres_url, s3_bucket, tmp_path) -> Shop:
    """A scored run on PostgreSQL and S3: three products, one prompt, two shots each."""
    clip, dino = save_tiny_scorers(tmp_path / "scorers")
    for name, value in dict(DREAMCACHE_DATABASE_URL=postgres_url, DREAMCACHE_OBJECTS_URL=f"s3://{s3_bucket}/platform",
                            DREAMCACHE_CLIP_MODEL=clip, DREAMCACHE_DINO_MODEL=dino).items():
        platform_env.setenv(name, value)
    params = CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a beach"], images_per_prompt=2,
                                steps=2)
    run_id = run_embedded(params, progress=False)["run_id"]
    platform = get_platform()
    with transaction(platform.sessions) as s:
        rows = s.execute(text("SELECT sku, seed, generation_id FROM generation_history WHERE run_id = :run"),
                         dict(run=run_id)).all()
    written, put = [], platform.objects.put
    platform_env.setattr(platform.objects, "put", lambda key, *args: written.append(key) or put(key, *args))
    return Shop(platform, run_id, {(sku, seed): i for sku, seed, i in rows}, s3_bucket, written)


def _keys(bucket: str, prefix: str) -> set[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _read(platform: Platform, uri: str) -> bytes:
    return platform.objects.get(platform.objects.key_of(uri))


def _manifests(platform: Platform, result: dict, name: str = "manifest") -> list[dict]:
    """The CSV and JSON manifests (or the publication's), checked to agree; the JSON's rows."""
    rows = json.loads(_read(platform, result[f"{name}_json"]))
    table = list(csv.DictReader(io.StringIO(_read(platform, result[f"{name}_csv"]).decode())))
    assert all(list(row) == list(COLUMNS) for row in rows) and list(table[0] if table else COLUMNS) == list(COLUMNS)
    assert table == [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]
    return rows


def _history(platform: Platform, generation_id: int):
    with transaction(platform.sessions) as s:
        return s.execute(text("SELECT review, reviewed_by, output_uri, published_uri, published_at FROM "
                              "generation_history WHERE generation_id = :id"), dict(id=generation_id)).one()


def test_publishing_again_copies_only_what_was_approved_since(shop):
    platform, run_id, shots, bucket, written = shop
    a, b, c, d = shots["MUG-1", 0], shots["MUG-1", 1], shots["LAMP-1", 0], shots["MUG-2", 1]
    decide(platform, run_id, approve=[a, b], reject=[c], reviewer="ana")

    first = publish(platform, run_id, "shop/spring")
    assert (first["added"], first["withdrawn"], first["total"], first["failed"]) == (2, 0, 2, [])
    root = f"s3://{bucket}/platform/"
    shots_written = [_history(platform, i) for i in (a, b)]
    for shot in shots_written:
        assert shot.published_uri.startswith(f"{root}shop/spring/MUG-1/")
        assert shot.published_uri.rsplit("/", 1)[1] == shot.output_uri.rsplit("/", 1)[1]
        assert _read(platform, shot.published_uri) == _read(platform, shot.output_uri)
    publication = first["publication_csv"].removeprefix(root).removesuffix(".csv")
    assert publication.startswith("shop/spring/publications/") and publication.endswith(f"-run-{run_id}")
    assert _keys(bucket, "platform/shop/") == {uri.removeprefix(f"s3://{bucket}/") for uri in (
        *(shot.published_uri for shot in shots_written), first["manifest_csv"], first["manifest_json"],
        first["publication_csv"], first["publication_json"])}  # the approved shots and the lists, nothing else
    manifest = _manifests(platform, first)
    assert [row["generation_id"] for row in manifest] == [a, b]  # by SKU, prompt and seed
    row = manifest[0]
    assert (row["uri"], row["source_uri"]) == (shots_written[0].published_uri, shots_written[0].output_uri)
    assert (row["reviewed_by"], row["prompt"]) == ("ana", "a mug on a beach")
    assert (row["mode"], row["aspect"]) == ("generate", "1:1") and {"width", "height"} <= set(row)
    assert isinstance(row["clip_t"], float)
    assert row["published_at"] == shots_written[0].published_at.astimezone(timezone.utc).isoformat()
    assert [row["generation_id"] for row in _manifests(platform, first, "publication")] == [a, b]
    assert all(key.startswith("shop/spring/") for key in written)

    # Again: nothing to copy, and the manifests' bytes are the same, so nothing is written at all.
    written.clear()
    again = publish(platform, run_id, "shop/spring")
    assert (again["added"], again["total"], again["publication_csv"]) == (0, 2, None) and written == []

    # One more approved: only it is copied, and the publication lists only it.
    decide(platform, run_id, approve=[d], reviewer="bo")
    third = publish(platform, run_id, "shop/spring")
    assert (third["added"], third["withdrawn"], third["total"]) == (1, 0, 3)
    new = _history(platform, d).published_uri
    assert written[0] == new.removeprefix(root) and len(written) == 5  # the shot, two manifests, two publication lists
    assert [row["generation_id"] for row in _manifests(platform, third, "publication")] == [d]
    manifest = _manifests(platform, third)
    assert [row["generation_id"] for row in manifest] == [a, b, d]
    assert {row["generation_id"] for row in manifest}.isdisjoint(set(shots.values()) - {a, b, d})  # nothing unapproved
    pngs = {key for key in _keys(bucket, "platform/shop/") if key.endswith(".png")}
    assert len(pngs) == 3 and _history(platform, c).published_uri is None


def test_a_shot_rejected_after_publishing_is_withdrawn(shop):
    platform, run_id, shots, bucket, _ = shop
    a, b = shots["MUG-1", 0], shots["LAMP-1", 1]
    decide(platform, run_id, approve=[a, b])
    publish(platform, run_id, "shop")
    published = _history(platform, a).published_uri
    assert _read(platform, published)

    decide(platform, run_id, reject=[a], reviewer="ana", note="wrong colour")
    result = publish(platform, run_id, "shop")
    assert (result["added"], result["withdrawn"], result["total"]) == (0, 1, 1)
    assert (_history(platform, a).review, _history(platform, a).published_uri) == ("rejected", None)
    assert published.removeprefix(f"s3://{bucket}/") not in _keys(bucket, "platform/shop/")
    assert [row["generation_id"] for row in _manifests(platform, result)] == [b]

    # Each shot is published once: the run's approved shots are under 'shop' already.
    with pytest.raises(PublishError, match=f"run {run_id} are published under 'shop' already .* not 'outlet'"):
        publish(platform, run_id, "outlet")
    assert _keys(bucket, "platform/outlet/") == set()

    decide(platform, run_id, approve=[a], reviewer="ana")  # changed their mind again
    back = publish(platform, run_id, "shop")
    assert (back["added"], back["total"]) == (1, 2) and _history(platform, a).published_uri == published


def test_the_cli_publishes_and_says_what_is_wrong(shop):
    platform, run_id, shots, bucket, _ = shop
    decide(platform, run_id, approve=[shots["MUG-2", 0]])
    cli = CliRunner()
    result = cli.invoke(app, ["publish", str(run_id)])
    assert result.exit_code == 0, result.output
    assert (f"run {run_id}: 1 added, 0 withdrawn; 1 shots published under s3://{bucket}/platform/published"
            in result.output)
    assert f"manifest: s3://{bucket}/platform/published/manifest.csv" in result.output
    assert "this publication: " in result.output
    again = cli.invoke(app, ["publish", str(run_id), "--to", "published/"])
    assert again.exit_code == 0 and "0 added, 0 withdrawn; 1 shots published" in again.output
    assert "this publication" not in again.output

    for args, message in ((["publish", "999"], "run 999 does not exist"),
                          (["publish", str(run_id), "--to", "../x"], "publish prefix '../x': give a plain key prefix"),
                          (["publish", str(run_id), "--to", "shots/shop"], "contain one another")):
        refused = cli.invoke(app, args)
        assert refused.exit_code == 1 and message in refused.output, refused.output
    assert not _keys(bucket, "platform/shots/shop/")

    # A shot whose image is gone is named, the others are published, and the command fails.
    lost, kept = shots["LAMP-1", 0], shots["LAMP-1", 1]
    decide(platform, run_id, approve=[lost, kept])
    source = _history(platform, lost).output_uri
    boto3.client("s3").delete_object(Bucket=bucket, Key=source.removeprefix(f"s3://{bucket}/"))
    partly = cli.invoke(app, ["publish", str(run_id)])
    assert partly.exit_code == 1 and "1 added, 0 withdrawn; 2 shots published" in partly.output
    assert f"shot {lost} of LAMP-1 not published: {source} does not exist" in partly.output
    assert "dreamcache verify --repair" in partly.output and _history(platform, lost).published_uri is None
