"""Every query in docs/sql.md runs on both databases and returns what the page promises."""

import re
from pathlib import Path

import pytest
from sqlalchemy import text

from db.models import RejectedItem, ReviewState, WorkStatus
from db.session import transaction
from tests.db import factories as f

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"


def queries() -> dict[str, str]:
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)
    named = {}
    for block in blocks:
        name = re.match(r"-- name: (\w+)\n", block)
        assert name, f"every SQL block in docs/sql.md starts with '-- name: ...':\n{block}"
        named[name[1]] = block
    return named


@pytest.fixture
def history(sessions):
    """Two runs over two SKUs, with scores, a failed generation and a failed cache."""
    with transaction(sessions) as s:
        mug, lamp = f.subject(s, "MUG-1", "mug"), f.subject(s, "LAMP-7", "lamp")
        mug_cache, lamp_cache = f.cache(s, mug), f.cache(s, lamp)
        broken = f.cache(s, f.subject(s, "BOX-3", "box"), status=WorkStatus.failed)
        broken.error = "tensor store unreachable"
        beach, snow = f.prompt(s, "a mug on a beach"), f.prompt(s, "a lamp in snow")
        first, second = f.run(s, "first"), f.run(s, "second")
        shots = {}
        for seed, mdino, duration in [(0, 0.71, 1.0), (1, 0.93, 2.0), (2, 0.85, 3.0)]:
            g = f.generation(s, mug_cache, beach, seed, first, WorkStatus.done, output_uri=f"s3://out/mug-{seed}.png",
                             duration_s=duration)
            f.score(s, g, "dino", mdino, masked=True)
            f.score(s, g, "clip_t", 0.30)
            shots[("MUG-1", seed)] = g
        shots["MUG-1", 1].review, shots["MUG-1", 1].reviewed_by = ReviewState.approved, "ana"
        shots["MUG-1", 2].review, shots["MUG-1", 2].reviewed_by = ReviewState.approved, "rule: mdino>=0.8"
        shots["MUG-1", 2].published_uri = "s3://shop/MUG-1/mug-2.png"
        g = f.generation(s, lamp_cache, snow, 0, second, WorkStatus.done, output_uri="s3://out/lamp-0.png",
                         duration_s=4.0, guidance="joint")
        f.score(s, g, "dino", 0.60, masked=True)
        f.generation(s, lamp_cache, snow, 1, second, WorkStatus.failed, error="NaN in latents", attempts=2)
        s.add(RejectedItem(run_id=second.id, stage="ingest", item="s3://shop/CUP-9.jpg",
                           reason="image data is truncated or corrupt"))
        return {"first": first.id, "second": second.id}


def run(sessions, name, **params):
    with transaction(sessions) as s:
        return [tuple(row) for row in s.execute(text(queries()[name]), params)]


def test_the_page_has_the_promised_queries():
    assert {"best_shots_per_sku", "run_outputs", "failures", "time_per_image"} <= set(queries())


def test_best_shots_per_sku(sessions, history):
    rows = run(sessions, "best_shots_per_sku", n=2)
    assert [(sku, seed, mdino) for sku, _, seed, mdino, _ in rows] == [
        ("LAMP-7", 0, 0.60), ("MUG-1", 1, 0.93), ("MUG-1", 2, 0.85)
    ]


def test_run_outputs(sessions, history):
    rows = run(sessions, "run_outputs", run_id=history["first"])
    assert [r[3] for r in rows] == ["s3://out/mug-0.png", "s3://out/mug-1.png", "s3://out/mug-2.png"]
    assert all(r[5] == pytest.approx(0.30) for r in rows)
    assert run(sessions, "run_outputs", run_id=history["second"])[0][0] == "LAMP-7"


def test_failures(sessions, history):
    rows = run(sessions, "failures")
    assert [(r[0], r[1], r[2], r[5]) for r in rows] == [
        ("input (ingest)", history["second"], "s3://shop/CUP-9.jpg", "image data is truncated or corrupt"),
        ("generation", history["second"], "LAMP-7", "NaN in latents"),
        ("cache", None, "BOX-3", "tensor store unreachable"),
    ]


def test_time_per_image(sessions, history):
    rows = run(sessions, "time_per_image")
    assert [(r[1], r[3], r[4]) for r in rows] == [("first", 3, 0), ("second", 1, 1)]
    assert rows[0][5] == pytest.approx(2.0) and rows[1][5] == pytest.approx(4.0)


def test_scores_by_category(sessions, history):
    rows = run(sessions, "scores_by_category")
    assert [(r[0], r[1], r[2]) for r in rows] == [("lamp", "joint", 1), ("mug", "combined", 3)]
    assert rows[1][3] == pytest.approx((0.71 + 0.93 + 0.85) / 3)


def test_review_queue(sessions, history):
    rows = run(sessions, "review_queue")
    assert [(r[2], r[4]) for r in rows] == [("LAMP-7", 0), ("MUG-1", 0)]


def test_approved_unpublished(sessions, history):
    rows = run(sessions, "approved_unpublished")
    assert [(r[2], r[4], r[5]) for r in rows] == [("MUG-1", 1, "ana")]
