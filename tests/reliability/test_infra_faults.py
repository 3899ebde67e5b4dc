"""Infrastructure faults injected into real catalogue runs: nothing is lost, nothing is recorded twice.

- object storage: a fault-injecting HTTP proxy in front of the real (moto) S3 server answers a share
  of all requests with 503 SlowDown or 500, stalls past the client's read timeout, drops the
  connection, or cuts a download short; one output key fails every time;
- the database: a dedicated PostgreSQL server is stopped and started again while a run generates;
- the tensor store: a stored feature cache is truncated or overwritten behind the platform's back.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import logging
import random
import threading
import time
from collections import Counter
from hashlib import sha256
from pathlib import Path
from urllib.parse import urlparse

import boto3
import psycopg
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import DBAPIError, OperationalError

from db import objects
from db.session import make_engine
from db.models import Generation, Run, RunStatus, Segmentation, Subject, SubjectCache
from flows.runs.catalogue import run_embedded
from flows.platform.params import CatalogueRunParams
from tests.helpers import home_database
from tests.servers import PostgresServer

PRODUCTS = 3  # the good products of the `catalogue` fixture (it also has two bad files, rejected at ingest)


def params(source, prompts, images_per_prompt=2, batch_size=4, **kwargs) -> CatalogueRunParams:
    return CatalogueRunParams(source=str(source), prompts=prompts, images_per_prompt=images_per_prompt, steps=2,
                              batch_size=batch_size, **kwargs)


# --- a fault-injecting S3 proxy -------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "content-length"}


class FaultyS3Proxy:
    """An HTTP proxy in front of an S3 server that injects faults into a share of the requests.

    Faults rotate through KINDS so every kind occurs; no request (method and path) is failed more
    than `max_consecutive` times in a row, so a client with more attempts than that must get through:
    a lost item is then the platform's fault, never bad luck. Requests matching `poison` fail always.
    """

    KINDS = ("slowdown", "internal", "stall", "drop", "truncate")

    def __init__(self, upstream: str, rate: float, stall_s: float, max_consecutive: int = 3, seed: int = 8):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rate, self.stall_s, self.max_consecutive = rate, stall_s, max_consecutive
        self.random = random.Random(seed)
        self.kinds = itertools.cycle(self.KINDS)
        self.lock = threading.Lock()
        self.consecutive: Counter = Counter()
        self.requests = 0
        self.faults: Counter = Counter()
        self.poison = lambda method, path: False
        self.poisoned: set[str] = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and `Expect: 100-continue`, as S3 speaks it

            def log_message(self, *args):
                pass

            def do_request(self):
                body = self._body()
                fault = proxy.choose(self.command, self.path)
                if fault in ("slowdown", "internal"):
                    code, status = ("SlowDown", 503) if fault == "slowdown" else ("InternalError", 500)
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response_only(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault in ("stall", "drop"):  # no answer: after the client gave up, or at once
                    if fault == "stall":
                        time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                status, headers, answer = proxy.forward(self.command, self.path, self.headers, body)
                self.send_response_only(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0") \
                    if self.command == "HEAD" else str(len(answer))
                self.send_header("Content-Length", length)
                self.end_headers()
                if fault == "truncate":  # the announced length, half the bytes, then the connection ends
                    self.wfile.write(answer[: len(answer) // 2])
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(answer)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if not size:
                            break
                        data += chunk
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def choose(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            if path in self.poisoned or self.poison(method, path):
                self.poisoned.add(path)
                self.faults["poisoned"] += 1
                return "internal"
            request = (method, path)
            if self.consecutive[request] >= self.max_consecutive or self.random.random() >= self.rate:
                self.consecutive[request] = 0
                return None
            kind = next(self.kinds)
            if kind == "truncate" and method != "GET":  # only a download has a body to cut short
                kind = next(self.kinds)
            self.consecutive[request] += 1
            self.faults[kind] += 1
            return kind

    def forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request(method, path, body=body or None,
                         headers={k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
                         | ({"Content-Length": str(len(body))} if body else {}))
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def s3_images(endpoint: str, bucket: str, prefix: str) -> dict[str, str]:
    """Generated images in the bucket (contact sheets aside), key -> recorded sha256, read past the proxy."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", []) if o["Key"].endswith(".png") and "contact_sheet" not in o["Key"]]
    return {k: s3.head_object(Bucket=bucket, Key=k)["Metadata"]["sha256"] for k in keys}


def test_object_storage_faults_are_retried_and_a_lost_upload_fails_only_its_item(
        platform_env, catalogue, tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    # A short read timeout so that a stalled request is abandoned (and retried) quickly.
    monkeypatch.setattr(objects, "READ_TIMEOUT_S", 1)
    with FaultyS3Proxy(s3_endpoint, rate=0.25, stall_s=1.3) as proxy:
        # Every request to the first LAMP-1 image's key fails: its upload can never succeed.
        proxy.poison = lambda method, path: (not proxy.poisoned and method == "PUT" and "/shots/LAMP-1/" in path
                                             and "contact_sheet" not in path)
        platform_env.setenv("AWS_ENDPOINT_URL", proxy.url)
        platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}/platform")
        prompts = ["a {category} on a beach", "a {category} in the snow"]
        planned = PRODUCTS * 2 * 2
        summary = run_embedded(params(catalogue, prompts), progress=False)
        figures = dict(requests=proxy.requests, **proxy.faults)
        print(f"object storage faults: {figures}, summary: generated {summary['images_generated']}, "
              f"failed {summary['images_failed']}")

        assert summary["products_cached"] == PRODUCTS, summary
        assert (summary["images_generated"], summary["images_failed"]) == (planned - 1, 1), summary
        assert all(proxy.faults[kind] >= 1 for kind in FaultyS3Proxy.KINDS), figures
        assert sum(proxy.faults.values()) >= 15, f"too few faults injected to mean anything: {figures}"
        (poisoned,) = proxy.poisoned
        poisoned_key = urlparse(poisoned).path.split("/", 2)[2]

        engine = home_database(tmp_path / "home")
        with engine.connect() as db:
            rows = db.execute(select(Generation.id, Generation.status, Generation.output_uri, Generation.error)).all()
        (failed,) = [r for r in rows if r.status == "failed"]
        assert failed.output_uri is None
        assert "writing results failed" in failed.error and f"s3://{s3_bucket}/{poisoned_key}" in failed.error, \
            failed.error
        done = [r for r in rows if r.status == "done"]
        stored = s3_images(s3_endpoint, s3_bucket, "platform/shots/")
        assert len(done) == planned - 1 and len({r.output_uri for r in done}) == planned - 1
        assert {r.output_uri for r in done} == {f"s3://{s3_bucket}/{k}" for k in stored}  # no orphan, no duplicate
        assert poisoned_key not in stored  # no partial object left for the failed item

        # Storage healthy again: a re-run makes exactly the one missing image.
        proxy.rate, proxy.poison, proxy.poisoned = 0.0, (lambda method, path: False), set()
        again = run_embedded(params(catalogue, prompts), progress=False)
    assert (again["images_generated"], again["images_failed"], again["images_planned"]) == (1, 0, 1), again
    stored = s3_images(s3_endpoint, s3_bucket, "platform/shots/")
    assert len(stored) == planned and poisoned_key in stored
    with engine.connect() as db:
        assert dict(db.execute(select(Generation.status, func.count()).group_by(Generation.status)).all()) == \
            {"done": planned}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for key, digest in stored.items():  # every image whole, as recorded
        assert sha256(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()).hexdigest() == digest, key


# --- the database restarted mid-run ---------------------------------------------------------------

LEASE_S = 5


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own: it is restarted, the suite's shared one must not be."""
    server = PostgresServer().start()
    yield server
    server.destroy()


def test_a_database_restart_mid_run_loses_nothing(platform_env, catalogue, tmp_path, own_postgres, caplog):
    url = own_postgres.create_database("restarted")
    platform_env.setenv("DREAMCACHE_DATABASE_URL", url)
    dsn = f"host=127.0.0.1 port={own_postgres.port} user=postgres dbname=restarted"
    platform_env.setenv("DREAMCACHE_LEASE_SECONDS", str(LEASE_S))  # work a failed run held is free again soon
    prompts = ["a {category} on a beach", "a {category} in the snow", "a {category} at night"]
    run_params = params(catalogue, prompts, images_per_prompt=3, batch_size=2)
    planned = PRODUCTS * 3 * 3
    restart: dict = {}

    def restart_when_generating():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    done = conn.execute("SELECT count(*) FROM generations WHERE status = 'done'").fetchone()[0]
            except psycopg.Error:
                continue  # no schema yet
            if done >= 2:
                restart["done_at_stop"] = done
                own_postgres.stop("fast")  # every open connection is cut
                time.sleep(3)  # long enough for the run to need the database while it is down
                own_postgres.resume()
                restart["resumed_at"] = time.monotonic()
                return

    restarter = threading.Thread(target=restart_when_generating, daemon=True)
    restarter.start()
    interrupted = None
    try:
        with caplog.at_level(logging.WARNING, logger="db.session"):
            summary = run_embedded(run_params, progress=False)
    except DBAPIError as exc:
        # The stop cut a connection in the middle of a statement: that transaction is rolled back and
        # the run fails, naming the cause; nothing it wrote is half-recorded, and a re-run finishes.
        interrupted = exc
    finally:
        finished_at = time.monotonic()
        restarter.join(30)  # the server is up again before anything else (teardown included) touches it
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("database unreachable")]
    assert "resumed_at" in restart and restart["done_at_stop"] < planned, f"not restarted mid-run: {restart}"
    assert finished_at > restart["resumed_at"]
    assert waits, "the run never needed the database while it was down: the restart proved nothing"
    rerun = None
    if interrupted is None:  # the run rode out the restart: every image made, none failed
        assert (summary["images_generated"], summary["images_failed"], summary["images_open"]) == \
            (planned, 0, 0), summary
    else:
        assert "terminating connection" in str(interrupted) or "server closed" in str(interrupted), interrupted
        time.sleep(LEASE_S + 0.5)  # the interrupted batch's leases run out
        rerun = run_embedded(run_params, progress=False)
        assert rerun["images_failed"] == 0 and rerun["images_open"] == 0, rerun
    print(f"database restart: done at stop {restart['done_at_stop']}, connection retries {len(waits)}, "
          f"run interrupted: {interrupted is not None}, re-run generated {rerun and rerun['images_generated']}")

    engine = create_engine(url)
    with engine.connect() as db:
        statuses = dict(db.execute(select(Generation.status, func.count()).group_by(Generation.status)).all())
        outputs = db.scalars(select(Generation.output_uri)).all()
        counts = [db.scalar(select(func.count()).select_from(t)) for t in (Subject, Segmentation, SubjectCache)]
        runs = db.execute(select(Run.status, Run.error).order_by(Run.id)).all()
    engine.dispose()
    assert statuses == {"done": planned} and counts == [PRODUCTS] * 3
    if interrupted is None:
        assert runs == [(RunStatus.completed, None)], runs
    else:  # the interrupted run is on record as failed, with its reason; the re-run completed
        assert [r.status for r in runs] == [RunStatus.failed, RunStatus.completed], runs
        assert "OperationalError" in runs[0].error and runs[1].error is None, runs
    images = [p for p in (tmp_path / "home" / "objects" / "shots").rglob("*.png") if p.name != "contact_sheet.png"]
    assert len(set(outputs)) == planned == len(images), "every image exactly once, each row pointing at one"
    assert {Path(uri.removeprefix("file://")) for uri in outputs} == set(images)

    # Waiting is for a server that is away, not for a misconfiguration: an unknown role fails at once, with an
    # hour to retry in and not one retry taken.
    platform_env.setattr("db.session.CONNECT_RETRY_S", 3600)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="db.session"):
        with pytest.raises(OperationalError, match='role "nobody" does not exist'):
            make_engine(url.replace("postgres@", "nobody@")).connect().close()
    assert not [r for r in caplog.records if r.getMessage().startswith("database unreachable")]


# --- a damaged cache in the tensor store ----------------------------------------------------------

@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_damaged_cache_object_is_detected_recomputed_and_recorded(platform_env, catalogue, tmp_path, backend,
                                                                    request, caplog):
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{bucket}/platform")
    run_embedded(params(catalogue, ["a {category} on a beach"], images_per_prompt=1), progress=False)
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        caches = db.execute(select(SubjectCache.id, SubjectCache.sha256).order_by(SubjectCache.id)).all()
    assert len(caches) == PRODUCTS
    damaged_id, digest = caches[1]
    key = f"caches/{digest[:2]}/{digest}.safetensors"
    if backend == "local":  # truncated on disk
        path = tmp_path / "home" / "objects" / key
        path.write_bytes(path.read_bytes()[:-100])
    else:  # bytes flipped in place, the recorded hash kept: bit rot, or a bad copy behind our back
        s3 = boto3.client("s3")
        data = bytearray(s3.get_object(Bucket=bucket, Key=f"platform/{key}")["Body"].read())
        data[len(data) // 2] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=f"platform/{key}", Body=bytes(data), Metadata={"sha256": digest})

    with caplog.at_level(logging.WARNING, logger="flows.steps"):
        again = run_embedded(params(catalogue, ["a {category} at night"], images_per_prompt=1), progress=False)
    assert (again["images_generated"], again["images_failed"]) == (PRODUCTS, 0), again
    (warning,) = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
    assert f"cache {damaged_id} " in warning and "corrupt" in warning and digest[:12] in warning, warning
    with engine.connect() as db:
        rows = {r.id: r for r in db.execute(select(SubjectCache.id, SubjectCache.sha256, SubjectCache.status,
                                                   SubjectCache.error))}
    assert {r.status for r in rows.values()} == {"done"}
    assert rows[damaged_id].error.startswith("recomputed after:") and digest[:12] in rows[damaged_id].error
    assert [r.error for i, r in rows.items() if i != damaged_id] == [None] * (PRODUCTS - 1)
    # The store holds the cache whole again, under its content hash.
    repaired = rows[damaged_id].sha256
    store = objects.open_store(f"s3://{bucket}/platform" if backend == "s3" else str(tmp_path / "home" / "objects"))
    assert sha256(store.get(f"caches/{repaired[:2]}/{repaired}.safetensors", expected_sha256=repaired)).hexdigest() \
        == repaired
    assert len(list(store.list("caches/"))) == PRODUCTS
