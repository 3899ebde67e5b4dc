"""Confinement: a run reads only the places the operator allows, and a planted secret never reaches outputs.

Secrets are planted next to the catalogue (local disk, another prefix of the same bucket, another
bucket) and reached for in every way a run's parameters allow: prompt files, manifest rows (absolute,
`file://`, `..`, `s3://`), symlinks inside the catalogue. Every open() and every S3 call of the run
is recorded, so "nothing outside was read" is checked, not inferred from the outputs.
"""

import asyncio
import csv
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from sqlalchemy import create_engine, inspect, text

from flows.runs.catalogue import catalogue_run, run_embedded
from flows.platform.params import CatalogueRunParams
from flows.platform.places import InvalidInputs, OutsidePlaces, Places
from flows.steps.source import list_source
from tests.helpers import scene

SECRET = "aws_secret_access_key = PLANTED-SECRET-7f3a"
MARK = "PLANTED-SECRET-7f3a"


# --- who opened what ---------------------------------------------------------------------------

_opened: list[str] | None = None


def _audit(event, args):
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only while a test asks it to


@pytest.fixture
def opened():
    """The paths this process opens while the test runs."""
    global _opened
    _opened = []
    yield _opened
    _opened = None


@pytest.fixture
def s3_calls():
    """(operation, bucket, key) of every S3 call made through boto3's default session while the test runs."""
    calls = []

    def record(params, model, **kwargs):
        calls.append((model.name, params.get("Bucket"), params.get("Key") or params.get("Prefix")))

    session = boto3._get_default_session()
    session.events.register("provide-client-params.s3.*", record)
    yield calls
    session.events.unregister("provide-client-params.s3.*", record)


def secret_png(path: Path) -> None:
    """An image that is also a secret: the text rides in a PNG chunk, so any copy of it would show."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("note", SECRET)
    scene(size=(64, 64), box=(16, 16, 48, 48))[0].save(path, pnginfo=info)


@pytest.fixture
def planted(tmp_path, catalogue):
    """Secrets beside the catalogue: a credentials file, a secret image, and links to both from inside it."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "creds.txt").write_text(f"[default]\n{SECRET}\n")
    secret_png(secrets / "secret.png")
    (catalogue / "mug" / "LINKED.png").symlink_to(secrets / "secret.png")
    (catalogue / "linked-folder").symlink_to(secrets, target_is_directory=True)
    return secrets


def leaks(*texts: str) -> list[str]:
    return [t[:200] for t in texts if MARK in t]


def database_text(url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(url)
    with engine.connect() as db:
        rows = [str(row) for table in inspect(engine).get_table_names()
                for row in db.execute(text(f'SELECT * FROM "{table}"'))]
    engine.dispose()
    return "\n".join(rows)


# --- the rules ---------------------------------------------------------------------------------

def test_by_default_a_run_reads_its_own_folder_and_the_examples(tmp_path, planted, catalogue):
    places = Places.for_run(str(catalogue), [])
    assert places.check(str(catalogue / "mug" / "MUG-1.png"), "x").path.endswith("MUG-1.png")
    for uri in [str(planted / "creds.txt"), f"file://{planted}/creds.txt", f"{catalogue}/../secrets/creds.txt",
                str(catalogue / "mug" / "LINKED.png"), str(catalogue / "linked-folder" / "creds.txt"), "/etc/passwd",
                "s3://any-bucket/creds.txt"]:
        with pytest.raises(OutsidePlaces) as error:
            places.check(uri, "the item")
        message = str(error.value)
        assert message.startswith("the item is outside the places this run may read: ")
        assert "DREAMCACHE_ALLOWED_SOURCES" in message
        assert str(planted) not in message and "secrets" not in message  # the rule, never the resolved target


def test_a_manifest_reads_its_own_folder_only(tmp_path):
    places = Places.for_run(str(tmp_path / "shop" / "products.csv"), [])
    places.check(str(tmp_path / "shop" / "images" / "a.png"), "x")
    with pytest.raises(OutsidePlaces):
        places.check(str(tmp_path / "shop-private" / "a.png"), "x")  # a sibling sharing the folder's name prefix


def test_the_operators_places_bound_the_source_too(tmp_path):
    allowed = [str(tmp_path / "catalogue"), "s3://shop/catalogue/"]
    Places.for_run(str(tmp_path / "catalogue" / "products.csv"), allowed)
    Places.for_run("s3://shop/catalogue/summer/", allowed)
    for source in [str(tmp_path / "elsewhere"), "s3://shop/catalogue-private/", "s3://other/catalogue/", "/"]:
        with pytest.raises(OutsidePlaces, match=f"^source {source} is outside the places this run may read: .*"
                                                "DREAMCACHE_ALLOWED_SOURCES; ask the operator"):
            Places.for_run(source, allowed)


def test_s3_keys_with_dot_parts_are_refused():
    places = Places.for_run("s3://shop/catalogue/", [])
    with pytest.raises(ValueError, match="'.' or '..' parts"):
        places.check("s3://shop/catalogue/../private/creds.txt", "x")


def test_a_folder_listing_refuses_links_out_of_the_catalogue(planted, catalogue):
    listing = list_source(str(catalogue))
    assert "LINKED" not in {item.sku for item in listing.items}
    assert all("secrets" not in item.uri for item in listing.items)
    ((item, reason),) = [(i, r) for i, r in listing.rejected if "LINKED" in i]
    assert item == "mug/LINKED.png" and "outside the places" in reason and str(planted) not in reason


def test_prompt_files_must_be_small_text(tmp_path, catalogue):
    places = Places.for_run(str(catalogue), [])
    from flows.steps.prompts import load_prompts

    def load(content: bytes):
        (catalogue / "p.txt").write_bytes(content)
        return load_prompts(CatalogueRunParams(source=str(catalogue), prompt_file=str(catalogue / "p.txt")), places)

    with pytest.raises(InvalidInputs, match=r"p\.txt is larger than 1,000,000 bytes"):
        load(b"a mug\n" * 200_000)
    with pytest.raises(InvalidInputs, match="is not text"):
        load(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(InvalidInputs, match="holds no prompts"):
        load(b"# only a comment\n\n")
    assert load(b"a mug\n").templates == ["a mug"]


# --- whole runs --------------------------------------------------------------------------------

def hostile_manifest(catalogue: Path, planted: Path, extra_rows=()) -> Path:
    rows = [("sku", "category", "image_uri"), ("MUG-1", "mug", "mug/MUG-1.png"),
            ("ABS", "mug", str(planted / "secret.png")), ("FILE", "mug", f"file://{planted}/secret.png"),
            ("DOTS", "mug", "../secrets/secret.png"), ("LINK", "mug", "mug/LINKED.png"),
            ("ETC", "mug", "file:///etc/passwd"), *extra_rows]
    with open(catalogue / "products.csv", "w", newline="") as out:
        csv.writer(out).writerows(rows)
    return catalogue / "products.csv"


def test_an_embedded_run_never_reads_or_writes_a_planted_secret(platform_env, planted, catalogue, tmp_path, opened,
                                                                caplog, capsys):
    manifest = hostile_manifest(catalogue, planted)
    for prompt_file in [str(planted / "creds.txt"), f"{catalogue}/../secrets/creds.txt"]:
        with pytest.raises(OutsidePlaces, match=r"^prompt file .* is outside the places this run may read"):
            run_embedded(CatalogueRunParams(source=str(catalogue), prompt_file=prompt_file), progress=False)

    summary = run_embedded(CatalogueRunParams(source=str(manifest), prompts=["a {category} on a beach"], steps=1),
                           progress=False)
    assert summary["status"] == "completed" and summary["products_ingested"] == 1
    refused = {r["item"].rsplit(" ", 1)[-1]: r["reason"] for r in summary["rejections"] if "line" in r["item"]}
    assert sorted(refused) == ["3", "4", "5", "6", "7"], refused
    assert all("outside the places this run may read" in reason for reason in refused.values())

    # Confined reads open one component at a time from a folder's descriptor: the recorder sees each name.
    assert "MUG-1.png" in opened  # the recorder sees the run's reads
    assert not [path for path in opened if str(planted) in os.path.realpath(path) or path.startswith("/etc/")
                or os.path.basename(path) in ("secrets", "secret.png", "creds.txt", "passwd")]
    home = tmp_path / "home"
    written = [p.read_bytes().decode("latin-1") for p in home.rglob("*") if p.is_file()]
    logs = caplog.text + "".join(capsys.readouterr())
    assert not leaks(*written, logs, database_text(f"sqlite:///{home / 'dreamcache.db'}"))


def test_a_prefect_run_on_s3_reads_only_its_prefix(prefect_env, platform_env, s3_calls, caplog):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    bucket = prefect_env["bucket"]
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="other-team")
    s3.put_object(Bucket="other-team", Key="creds.txt", Body=SECRET.encode())
    s3.put_object(Bucket=bucket, Key="private/creds.txt", Body=SECRET.encode())
    s3.put_object(Bucket=bucket, Key="catalogue-private/creds.txt", Body=SECRET.encode())
    rows = "sku,category,image_uri\nMUG-1,mug,mug/MUG-1.png\n" + "".join(
        f"X{n},mug,{uri}\n" for n, uri in enumerate([
            f"s3://{bucket}/private/creds.txt", "s3://other-team/creds.txt", f"s3://{bucket}/catalogue-private/creds.txt",
            f"s3://{bucket}/catalogue/../private/creds.txt", "/etc/passwd"]))
    s3.put_object(Bucket=bucket, Key="catalogue/products.csv", Body=rows.encode())
    platform_env.setenv("DREAMCACHE_ALLOWED_SOURCES", f"s3://{bucket}/catalogue/")
    for prompt_file in ["s3://other-team/creds.txt", f"s3://{bucket}/private/creds.txt"]:
        with pytest.raises(Exception, match="outside the places this run may read"):
            catalogue_run(CatalogueRunParams(source=f"s3://{bucket}/catalogue/", prompt_file=prompt_file))
    with pytest.raises(Exception, match="outside the places this run may read"):
        catalogue_run(CatalogueRunParams(source="s3://other-team/", prompts=["a mug"]))
    summary = catalogue_run(CatalogueRunParams(source=f"s3://{bucket}/catalogue/products.csv",
                                               prompts=["a {category} on a beach"], steps=1))
    assert summary["status"] == "completed" and summary["products_ingested"] == 1
    assert sum("line" in r["item"] for r in summary["rejections"]) == 5

    read = [(op, b, k) for op, b, k in s3_calls if op in ("GetObject", "HeadObject", "ListObjectsV2")]
    assert read and all(b == bucket and (k or "").startswith(("catalogue/", "platform/")) for _, b, k in read), read

    async def prefect_records():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            ids = [r.id for r in runs]
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            return ([str(a.data) + str(a.description) for a in artifacts], [log.message for log in logs],
                    [str(r.state.message) + str(r.parameters) for r in runs])

    artifacts, logs, states = asyncio.run(prefect_records())
    objects = [s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode("latin-1")
               for o in s3.list_objects_v2(Bucket=bucket, Prefix="platform/").get("Contents", [])]
    assert not leaks(*artifacts, *logs, *states, *objects, caplog.text, database_text(prefect_env["database"]))


# --- races: a folder of the catalogue swapped for a link while the run reads it ------------------------------

FLIPPER = """
import os, sys
catalogue, outside = sys.argv[1], sys.argv[2]
os.chdir(catalogue)
while True:  # d: the real folder, then a link out of the catalogue, then the real folder again
    os.symlink(outside, "d.tmp")
    os.rename("d", "d.real")
    os.rename("d.tmp", "d")
    os.unlink("d")
    os.rename("d.real", "d")
"""


@pytest.fixture
def flipping(tmp_path, catalogue):
    """`catalogue/d/x0..x9.png`, with `d` swapped for a link to `outside/` (the same names, secret images) and back,
    in a loop, by another process, for as long as the test runs."""
    (catalogue / "d").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for n in range(10):
        scene(size=(64, 64), box=(16, 16, 48, 48))[0].save(catalogue / "d" / f"x{n}.png")
        secret_png(outside / f"x{n}.png")
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(catalogue), str(outside)])
    yield catalogue
    flipper.kill()
    flipper.wait()


def test_a_folder_swapped_for_a_link_while_images_are_read_is_never_followed(flipping):
    places = Places.for_run(str(flipping), [])
    leaked, raced, read = 0, 0, 0
    for n in range(100_000):  # until the race has been lost often enough to show that it was run
        try:
            data = places.read(str(flipping / "d" / f"x{n % 10}.png"), f"d/x{n % 10}.png")
        except FileNotFoundError:  # d between its two names
            continue
        except OutsidePlaces as exc:
            assert "\n" not in str(exc) and str(flipping.parent / "outside") not in str(exc)
            raced += "changed while it was read" in str(exc)
            continue
        read += 1
        leaked += MARK.encode() in data
        if leaked or raced >= 20:
            break
    assert leaked == 0, f"{leaked} of {read} reads returned the outside file's bytes"
    assert raced >= 20 and read > 0  # the swap did happen between check and open, and was refused


def test_a_folder_swapped_for_a_link_while_listed_costs_an_item_not_the_run(flipping):
    raced = 0
    for _ in range(20_000):  # until the swap has hit a listing mid-way often enough to show that it was run
        listing = list_source(str(flipping))  # never raises
        assert {"MUG-1", "MUG-2", "LAMP-1"} <= {item.sku for item in listing.items}
        assert all(str(flipping.parent / "outside") not in item.uri for item in listing.items)
        assert all("\n" not in reason and str(flipping.parent / "outside") not in reason
                   for _, reason in listing.rejected)
        raced += any(item.startswith("d") for item, _ in listing.rejected)
        if raced >= 20:
            break
    assert raced >= 20


# --- probing: what a run's answers reveal about the world outside its places -----------------------------------

def test_links_out_of_the_catalogue_are_refused_alike_whether_or_not_their_target_exists(tmp_path, catalogue):
    (tmp_path / "there.png").write_bytes((catalogue / "mug" / "MUG-1.png").read_bytes())
    (catalogue / "mug" / "THERE.png").symlink_to(tmp_path / "there.png")
    (catalogue / "mug" / "NOWHERE.png").symlink_to(tmp_path / "nowhere.png")  # no such file
    reasons = dict(list_source(str(catalogue)).rejected)
    assert reasons["mug/THERE.png"].replace("THERE", "X") == reasons["mug/NOWHERE.png"].replace("NOWHERE", "X")
    assert "outside the places" in reasons["mug/NOWHERE.png"]


def test_an_s3_prefix_is_a_folder_not_the_start_of_a_name(s3_bucket):
    s3 = boto3.client("s3")
    image = (Path(__file__).parents[2] / "flows" / "examples").rglob("*.png").__next__().read_bytes()
    s3.put_object(Bucket=s3_bucket, Key="catalogue/mug/MUG-1.png", Body=image)
    s3.put_object(Bucket=s3_bucket, Key="catalogue-private/mug/SECRET.png", Body=image)
    listing = list_source(f"s3://{s3_bucket}/catalogue")
    assert [item.sku for item in listing.items] == ["MUG-1"]
    assert not [item for item, reason in listing.rejected if "private" in item + reason]
