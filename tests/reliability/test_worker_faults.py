"""Faults a GPU worker meets, injected against the real servers: a worker SIGKILLed mid-batch, out of GPU
memory for a batch, and two runs of one catalogue at once. Nothing may be lost or produced twice.

Every test runs on the suite's PostgreSQL and the moto S3 server over HTTP; the only fakes are the
faults themselves (the signal is real, the out-of-memory error is raised on purpose).
"""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import torch
from sqlalchemy import create_engine, func, select

from db.models import Generation, Subject
from flows.runs.catalogue import TASK_BATCHES, run_embedded
from flows.cli import EXIT_INCOMPLETE
from flows.platform.params import CatalogueRunParams
from flows.platform.resources import get_platform

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a {category} on a beach", "a {category} in the snow"]
IMAGES = 2  # per product and prompt: 3 products x 2 prompts x 2 = 12 items, enough for several batches of 2


@pytest.fixture
def served_env(platform_env, postgres_url, s3_bucket):
    """The platform on PostgreSQL and S3 (moto), for this process and the worker processes it starts."""
    platform_env.setenv("DREAMCACHE_DATABASE_URL", postgres_url)
    platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}/platform")
    engine = create_engine(postgres_url)
    yield dict(engine=engine, bucket=s3_bucket, monkeypatch=platform_env)
    engine.dispose()


def cli_run(catalogue, prompts=PROMPTS, images=IMAGES, batch_size=2) -> list[str]:
    command = [sys.executable, "-m", "flows.cli", "run", "--embedded", "--source", str(catalogue),
               "--images-per-prompt", str(images), "--steps", "2", "--batch-size", str(batch_size)]
    return command + [arg for p in prompts for arg in ("-p", p)]


def params(catalogue, prompts=PROMPTS, images=IMAGES, batch_size=2) -> CatalogueRunParams:
    return CatalogueRunParams(source=str(catalogue), prompts=prompts, images_per_prompt=images, steps=2,
                              batch_size=batch_size)


def image_keys(bucket: str) -> dict[str, object]:
    """Generated images in the bucket (contact sheets aside), with their last-modified times."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="platform/shots/")
    return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", [])
            if o["Key"].endswith(".png") and not o["Key"].endswith("/contact_sheet.png")}


def sidecar_keys(bucket: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="platform/shots/")
    return [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".json")]


def statuses(engine) -> dict[str, int]:
    with engine.connect() as db:
        return dict(db.execute(select(Generation.status, func.count()).group_by(Generation.status)).all())


def assert_each_item_once(engine, bucket: str, planned: int) -> None:
    """All done; one row, one image and one sidecar per item; every row points to an object that exists."""
    with engine.connect() as db:
        outputs = db.scalars(select(Generation.output_uri)).all()
    assert statuses(engine) == {"done": planned}
    assert len(outputs) == planned and len(set(outputs)) == planned
    keys = image_keys(bucket)
    assert len(keys) == planned, f"{len(keys)} images in S3 for {planned} items"
    assert len(sidecar_keys(bucket)) == planned
    assert {uri.removeprefix(f"s3://{bucket}/") for uri in outputs} == set(keys)


# --- 1. a worker killed mid-batch ---------------------------------------------------------------------

def test_a_worker_killed_mid_batch_leaves_nothing_running_and_a_rerun_finishes_only_the_rest(served_env, catalogue):
    engine, bucket = served_env["engine"], served_env["bucket"]
    planned = 3 * len(PROMPTS) * IMAGES
    worker = subprocess.Popen(cli_run(catalogue), cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    dead = f"{os.uname().nodename}:{worker.pid}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
        try:
            counts = statuses(engine)
        except Exception:
            continue  # the schema may not exist yet
        if counts.get("done", 0) >= 4 and counts.get("running", 0) >= 1:  # outputs written, a batch in hand
            worker.send_signal(signal.SIGKILL)
            break
    worker.wait(timeout=30)
    output = worker.stdout.read().decode()
    assert worker.returncode == -signal.SIGKILL, f"the worker was not killed mid-run:\n{output}"

    with engine.connect() as db:  # what the dead worker left, counted after its death
        finished = dict(db.execute(select(Generation.id, Generation.finished_at)
                                   .where(Generation.status == "done")).all())
        held = db.execute(select(Generation.id, Generation.claimed_by, Generation.lease_expires_at)
                          .where(Generation.status == "running")).all()
        db_now = db.scalar(select(func.now()))
    assert 4 <= len(finished) < planned
    assert held and {worker_id for _, worker_id, _ in held} == {dead}, "the dead worker held claimed items"
    expires = max(expiry for _, _, expiry in held)
    assert expires > db_now + timedelta(seconds=20), "the dead worker's lease (60 s by default) is still running"
    before = image_keys(bucket)

    # Re-run at once (this process, a new worker id): the dead worker ran on this host and its process is
    # gone, so its items are taken over without waiting for its leases to run out.
    summary = run_embedded(params(catalogue), progress=False)

    assert summary["images_generated"] == planned - len(finished) and summary["images_failed"] == 0
    assert_each_item_once(engine, bucket, planned)
    with engine.connect() as db:
        rows = {r.id: r for r in db.execute(select(Generation.id, Generation.claimed_by, Generation.attempts,
                                                   Generation.finished_at))}
    for item_id, _, _ in held:  # claimed again, by the re-run
        assert rows[item_id].claimed_by != dead and rows[item_id].attempts == 2, f"generation {item_id}"
    for item_id, finished_at in finished.items():  # finished work was kept, not redone
        assert rows[item_id].claimed_by == dead and rows[item_id].finished_at == finished_at, f"generation {item_id}"
    after = image_keys(bucket)
    done_before = {uri for uri in before if before[uri] == after[uri]}
    assert len(done_before) >= len(finished), "objects of finished items were rewritten"


# --- 2. out of GPU memory ---------------------------------------------------------------------------

@pytest.fixture
def batch_sizes(served_env):
    """The batch sizes the pipeline is called with; fail(sizes, items) decides which calls run out of memory."""
    pipe = get_platform().pipeline
    real_call = type(pipe).__call__
    calls, rule = [], {"fail": lambda prompts: False}

    def call(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if rule["fail"](prompts):  # the injected fault: what CUDA raises when a batch does not fit
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected) for a batch of {len(prompts)}")
        return real_call(self, prompts, *args, **kwargs)

    served_env["monkeypatch"].setattr(type(pipe), "__call__", call)
    return calls, rule


def test_a_batch_out_of_gpu_memory_is_split_and_retried_not_failed(served_env, batch_sizes, catalogue, caplog):
    calls, rule = batch_sizes
    rule["fail"] = lambda prompts: len(prompts) > 2  # this "GPU" fits two images at a time
    planned = 3 * 2 * 2
    with caplog.at_level(logging.WARNING, logger="flows.steps"):
        summary = run_embedded(params(catalogue, prompts=PROMPTS[:2], images=2, batch_size=4), progress=False)

    assert summary["images_generated"] == planned and summary["images_failed"] == 0
    assert_each_item_once(served_env["engine"], served_env["bucket"], planned)
    # The task's first batch of 4 runs out of memory once; the task goes on in batches of 2 (the size that fits,
    # kept for its other batches); no batch larger than 2 ever succeeded. (One task: TASK_BATCHES batches of 4.)
    assert planned <= 4 * TASK_BATCHES and calls == [4] + [2] * (planned // 2), calls
    with served_env["engine"].connect() as db:
        assert set(db.scalars(select(Generation.attempts))) == {1}, "a split is not a failed attempt"
    splits = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(splits) == 1 and "splitting it, batches of 2 from now on" in splits[0]


def test_an_image_too_large_for_the_gpu_alone_fails_with_its_reason_and_the_rest_are_done(
        served_env, batch_sizes, catalogue):
    calls, rule = batch_sizes
    rule["fail"] = lambda prompts: any("lamp" in p for p in prompts)  # LAMP-1's images never fit
    summary = run_embedded(params(catalogue, prompts=PROMPTS[:1], images=2, batch_size=4), progress=False)

    assert summary["images_generated"] == 4 and summary["images_failed"] == 2
    with served_env["engine"].connect() as db:
        failed = db.execute(select(Generation.error).where(Generation.status == "failed")).scalars().all()
    assert len(failed) == 2 and all(e.startswith("out of GPU memory for a single image of LAMP-1") for e in failed)
    assert min(calls) == 1 and statuses(served_env["engine"]) == {"done": 4, "failed": 2}


# --- 3. two runs of one catalogue at once ------------------------------------------------------------

def test_two_runs_of_one_catalogue_at_once_do_each_item_once(served_env, catalogue):
    engine, bucket = served_env["engine"], served_env["bucket"]
    # A first run ingests, segments and caches the products (and creates the schema), so that the two runs
    # below race where it matters: claiming the same 12 generations at the same time.
    warm = run_embedded(params(catalogue, prompts=["a {category} on a table"], images=1), progress=False)
    assert warm["images_generated"] == 3
    planned = 3 * len(PROMPTS) * IMAGES
    runs = [subprocess.Popen(cli_run(catalogue), cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=240)[0] for run in runs]
    names = [f"{os.uname().nodename}:{run.pid}" for run in runs]
    for run, output, other in zip(runs, outputs, reversed(names)):
        # A run that ends while the other still holds some of its images says so: incomplete, naming it.
        assert run.returncode in (0, EXIT_INCOMPLETE), output
        if run.returncode == EXIT_INCOMPLETE:
            assert f"held by {other} until" in output, output

    assert_each_item_once(engine, bucket, planned + 3)
    with engine.connect() as db:
        workers = dict(db.execute(select(Generation.claimed_by, func.count()).where(Generation.run_id != warm["run_id"])
                                  .group_by(Generation.claimed_by)).all())
        attempts = set(db.scalars(select(Generation.attempts)))
    assert attempts == {1}, "an item was claimed twice"
    assert set(workers) <= set(names)
    assert sum(workers.values()) == planned  # who did them: the database's word, whichever run's record they end on


def test_a_run_whose_product_caches_another_run_holds_ends_incomplete_naming_them(served_env, catalogue,
                                                                                   s3_endpoint):
    """Two `dreamcache run` processes over products with no cache yet: the first holds the caches (its uploads
    of them stalled at the object store, an injected fault), so the second can make nothing; it ends
    `incomplete` naming each cache, its holder and the holder's run, not "planned no image"."""
    import threading

    from db.models import Run, SubjectCache
    from tests.reliability.test_infra_faults import FaultyS3Proxy

    engine = served_env["engine"]
    with FaultyS3Proxy(s3_endpoint, rate=0.0, stall_s=0) as proxy:
        uploading, release = threading.Event(), threading.Event()
        forward = proxy.choose

        def gate(method, path):  # the first run's cache uploads wait here until the second run has ended
            if method == "PUT" and "/platform/caches/" in path:
                uploading.set()
                release.wait(timeout=600)
            return forward(method, path)

        proxy.choose = gate
        # Enough attempts that the stalled upload outlasts the second run, however slow the machine.
        env = dict(os.environ, AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS="40")
        first = subprocess.Popen(cli_run(catalogue), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        holder = f"{os.uname().nodename}:{first.pid}"
        try:
            while not uploading.wait(timeout=1):
                assert first.poll() is None, first.communicate()[0]
            second = subprocess.run(cli_run(catalogue), cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, timeout=600)
        finally:
            release.set()
        output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output
    assert second.returncode == EXIT_INCOMPLETE, second.stdout
    assert "Traceback" not in second.stdout and "planned no image" not in second.stdout
    assert "incomplete: 0 images and 3 product caches are still open" in second.stdout, second.stdout
    with engine.connect() as db:
        caches = db.execute(select(SubjectCache.id, Subject.sku).join(Subject, Subject.id == SubjectCache.subject_id)
                            .order_by(SubjectCache.id)).all()
        runs = db.execute(select(Run.id, Run.status, Run.owner).order_by(Run.id)).all()
    (first_run, _, owner), (second_run, status, _) = [(r.id, r.status, r.owner) for r in runs]
    assert owner == holder and status == "incomplete"
    for cache_id, sku in caches:  # each named: which cache, of which product, held by whom, for which run
        assert re.search(rf"cache {cache_id} of {sku} held by {re.escape(holder)} until \S+ \(run {first_run}\)",
                         second.stdout), second.stdout
    assert_each_item_once(engine, served_env["bucket"], 3 * len(PROMPTS) * IMAGES)
    with engine.connect() as db:
        assert set(db.scalars(select(SubjectCache.attempts))) == {1}  # each cache computed once, by the first run
