import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from db import claims
from db.models import Generation, Prompt, SubjectCache, WorkStatus, utcnow
from db.repository import ids_by_key, insert_missing
from db.session import transaction
from tests.db import factories as f


LEASE = timedelta(minutes=10)

def seed_generations(sessions, count: int) -> list[int]:
    with transaction(sessions) as s:
        cache = f.cache(s, f.subject(s, "SKU-1"))
        prompt = f.prompt(s, "a mug on a beach")
        return [f.generation(s, cache, prompt, seed).id for seed in range(count)]


def test_a_generation_exists_once_per_cache_prompt_seed_and_parameters(sessions):
    seed_generations(sessions, 1)
    with pytest.raises(IntegrityError, match="uq_generations_identity|UNIQUE"):
        with transaction(sessions) as s:
            f.generation(s, s.scalars(select(SubjectCache)).one(), s.scalars(select(Prompt)).one(), seed=0)
    with transaction(sessions) as s:  # another seed or other parameters are other generations
        f.generation(s, s.scalars(select(SubjectCache)).one(), s.scalars(select(Prompt)).one(), seed=1)
        f.generation(s, s.scalars(select(SubjectCache)).one(), s.scalars(select(Prompt)).one(), seed=0,
                     params_sha256=f.sha("other parameters"))
        assert s.scalar(select(func.count()).select_from(Generation)) == 3


def test_a_subject_is_cached_once_per_model_configuration(sessions):
    with transaction(sessions) as s:
        subject = f.subject(s, "SKU-1")
        f.cache(s, subject)
    with pytest.raises(IntegrityError):
        with transaction(sessions) as s:
            f.cache(s, s.get(type(subject), subject.id))


def test_insert_missing_is_idempotent(sessions):
    with transaction(sessions) as s:
        cache = f.cache(s, f.subject(s, "SKU-1"))
        prompt = f.prompt(s, "a mug")
        row = dict(subject_cache_id=cache.id, prompt_id=prompt.id, params_sha256="p" * 64, sampler="DDIM",
                   guidance="combined", text_scale=7.5, image_scale=0.35, steps=50, resolution=512,
                   base_model_id="sd21", adapter_id="default", parameters={})
        rows = [dict(row, seed=seed) for seed in range(4)]
        assert insert_missing(s, Generation, rows) == 4
    with transaction(sessions) as s:
        assert insert_missing(s, Generation, rows + [dict(row, seed=9)]) == 1
        keys = ids_by_key(s, Generation, ["seed"], [(0,), (9,), (77,)])
        assert set(keys) == {(0,), (9,)}
        assert s.scalar(select(func.count()).select_from(Generation)) == 5


def test_two_concurrent_workers_never_claim_the_same_item(sessions):
    ids = seed_generations(sessions, 60)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def work(worker: str) -> None:
        start.wait()
        while True:
            with transaction(sessions) as s:
                batch = claims.claim(s, Generation, worker, limit=4, lease=LEASE)
            if not batch:
                return
            claimed[worker] += batch
            time.sleep(0.01)  # the "work": lets the other worker in between claims
            with transaction(sessions) as s:
                for item in batch:
                    claims.complete(s, Generation, item, worker, output_uri=f"s3://out/{item}.png", duration_s=0.1)

    threads = [threading.Thread(target=work, args=(w,)) for w in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not set(claimed["a"]) & set(claimed["b"])
    assert sorted(claimed["a"] + claimed["b"]) == ids
    assert claimed["a"] and claimed["b"], "both workers should have had work"
    with transaction(sessions) as s:
        rows = s.scalars(select(Generation)).all()
        assert {r.status for r in rows} == {WorkStatus.done}
        assert all(r.attempts == 1 and r.output_uri == f"s3://out/{r.id}.png" for r in rows)
        assert all(r.claimed_by in ("a", "b") and r.lease_expires_at is None for r in rows)


def test_an_expired_lease_is_claimed_again_and_the_old_worker_cannot_finish(sessions):
    (item,) = seed_generations(sessions, 1)
    now = utcnow()
    with transaction(sessions) as s:
        assert claims.claim(s, Generation, "dead-worker", 1, lease=timedelta(seconds=30), now=now) == [item]
    with transaction(sessions) as s:  # still leased: nothing to claim
        assert claims.claim(s, Generation, "w2", 1, LEASE, now=now + timedelta(seconds=10)) == []
    with transaction(sessions) as s:
        assert claims.claim(s, Generation, "w2", 1, LEASE, now=now + timedelta(seconds=31)) == [item]
    with pytest.raises(claims.LostClaimError, match=f"generations {item} is no longer held by dead-worker"):
        with transaction(sessions) as s:
            claims.complete(s, Generation, item, "dead-worker", output_uri="s3://stale.png")
    with transaction(sessions) as s:
        claims.complete(s, Generation, item, "w2", output_uri="s3://fresh.png")
    with transaction(sessions) as s:
        row = s.get(Generation, item)
        assert (row.status, row.output_uri, row.attempts, row.claimed_by) == (WorkStatus.done, "s3://fresh.png", 2, "w2")


def test_heartbeat_keeps_a_lease_alive(sessions):
    (item,) = seed_generations(sessions, 1)
    with transaction(sessions) as s:
        claims.claim(s, Generation, "w1", 1, lease=timedelta(seconds=1))
    with transaction(sessions) as s:
        assert claims.heartbeat(s, Generation, [item], "w1", lease=timedelta(minutes=5)) == 1
        assert claims.heartbeat(s, Generation, [item], "someone-else", LEASE) == 0
    with transaction(sessions) as s:
        assert claims.claim(s, Generation, "w2", 1, LEASE, now=utcnow() + timedelta(seconds=10)) == []


def test_failures_keep_their_reason_and_can_be_retried(sessions):
    ids = seed_generations(sessions, 2)
    with transaction(sessions) as s:
        claimed = claims.claim(s, Generation, "w1", 1, LEASE)
        claims.fail(s, Generation, claimed[0], "w1", "CUDA out of memory at batch 32")
    with transaction(sessions) as s:
        failed = s.get(Generation, ids[0])
        assert (failed.status, failed.error) == (WorkStatus.failed, "CUDA out of memory at batch 32")
        assert claims.claim(s, Generation, "w2", 5, LEASE) == [ids[1]]  # failed items are not claimed by default
    with transaction(sessions) as s:
        assert claims.retry_failed(s, Generation) == 1
        assert claims.claim(s, Generation, "w2", 5, LEASE) == [ids[0]]
