"""Publishing: a run's approved shots copied to a shop's prefix, with manifests of everything published there.

What lies under a publish prefix, and nothing else (nothing is ever written outside it):

    {prefix}/{SKU}/{shot's file name}                     the approved shots
    {prefix}/manifest.csv, manifest.json                  every shot published under the prefix, from every run
    {prefix}/publications/{UTC time}-run-{id}.csv, .json  what one publication added

Each shot is published once, under one prefix; publishing again copies only what is new, and withdraws (deletes,
and forgets) a shot published earlier that is no longer approved: nothing unapproved stays published. The
manifests are rewritten only when their bytes change, so a publication that changes nothing writes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timezone

from sqlalchemy import select, update

from db import queries
from db.models import Generation, ReviewState, Run, Subject, WorkStatus, utcnow
from db.objects import ObjectStoreError, put_if_changed
from db.session import transaction
from dreamcache.core.errors import DreamCacheError
from dreamcache.perception.metrics import METRICS
from flows.platform.params import PREFIX_PATTERN, PUBLISH_PREFIX, check_prefix, prefix_overlap
from flows.platform.resources import Platform
from flows.steps.layout import manifest_name, publication_name, published_key

# The manifests' columns, in order (CSV header, JSON keys): the shot, its scores, where it is and who approved it.
COLUMNS = ("generation_id", "sku", "category", "prompt", "seed", "mode", "aspect", "width", "height", *METRICS,
           "uri", "source_uri", "reviewed_by", "reviewed_at", "published_at")


class PublishError(DreamCacheError, ValueError):
    """A publication that cannot be made; the message names the run, shot or prefix and what to do."""


def publish(platform: Platform, run_id: int, prefix: str = PUBLISH_PREFIX) -> dict:
    """Publish run `run_id`'s approved shots under `prefix`: withdraw what is published there but no longer
    approved, copy what is approved and not yet published, then write the manifests.

    Returns how many shots were added and withdrawn, how many are published under the prefix (all runs), the
    manifests' URIs, the publication's URIs (None when nothing was added), and the shots that could not be
    copied (`failed`: id, sku, problem; their source is missing or damaged)."""
    prefix = _plain_prefix(prefix)
    objects = platform.objects
    under = objects.uri(prefix) + "/"
    with transaction(platform.sessions) as s:
        run = s.get(Run, run_id)
        if run is None:
            raise PublishError(f"run {run_id} does not exist: `dreamcache history` shows the runs' ids")
        output_prefix = run.parameters.get("output_prefix", "")
        if output_prefix and prefix_overlap(prefix, output_prefix):
            raise PublishError(f"publish prefix {prefix!r} and run {run_id}'s output prefix {output_prefix!r} contain "
                               "one another: publish to a prefix of its own, which holds approved shots only")
        approved = queries.shots(s, Generation.run_id == run_id, Generation.status == WorkStatus.done,
                                 Generation.review == ReviewState.approved)
        stale = s.execute(select(Generation.id, Generation.published_uri).where(
            _published_under(under), Generation.review != ReviewState.approved)).all()
    elsewhere = [(gen, subject) for gen, subject, _ in approved
                 if gen.published_uri and not gen.published_uri.startswith(under)]
    if elsewhere:
        gen, subject = elsewhere[0]
        other = objects.key_of(gen.published_uri).rsplit("/", 2)[0]
        raise PublishError(
            f"{len(elsewhere)} approved shots of run {run_id} are published under {other!r} already (e.g. shot "
            f"{gen.id} of {subject.sku}: {gen.published_uri}), not {prefix!r}; each shot is published once: publish "
            f"run {run_id} to {other!r}, or withdraw them there first (reject them with `dreamcache review`, then "
            f"`dreamcache publish {run_id} --to {other}`)")

    withdrawn = 0
    for generation_id, uri in stale:  # the copy goes first: nothing unapproved stays published
        objects.delete(objects.key_of(uri))
        with transaction(platform.sessions) as s:
            withdrawn += s.execute(update(Generation).where(Generation.id == generation_id,
                                                            Generation.published_uri == uri)
                                   .values(published_uri=None, published_at=None)).rowcount

    now, added, failed = utcnow(), set(), []
    for gen, subject, _ in approved:
        if gen.published_uri:
            continue
        source = objects.key_of(gen.output_uri)
        key = published_key(prefix, subject.sku, source)
        try:
            stored = objects.put(key, objects.get(source, expected_sha256=gen.output_sha256), "image/png")
        except ObjectStoreError as exc:
            failed.append(dict(id=gen.id, sku=subject.sku, problem=f"{exc}; `dreamcache verify --repair` and then the "
                               "run again make it anew"))
            continue
        with transaction(platform.sessions) as s:
            # Recorded only if still approved: a reviewer may have rejected it while it was copied.
            recorded = s.execute(update(Generation).where(Generation.id == gen.id,
                                                          Generation.review == ReviewState.approved,
                                                          Generation.published_uri.is_(None))
                                 .values(published_uri=stored.uri, published_at=now)).rowcount
            current = None if recorded else s.scalar(select(Generation.published_uri).where(Generation.id == gen.id))
        if recorded:
            added.add(gen.id)
        elif current != stored.uri:  # not published after all (and not by a publication running beside this one)
            objects.delete(key)

    entries = _entries(platform, under)
    result = dict(run_id=run_id, prefix=objects.uri(prefix), added=len(added), withdrawn=withdrawn,
                  total=len(entries), failed=failed, publication_csv=None, publication_json=None)
    result["manifest_csv"], result["manifest_json"] = _write(platform, manifest_name(prefix), entries)
    if added:
        name = publication_name(prefix, now, run_id)
        result["publication_csv"], result["publication_json"] = _write(
            platform, name, [e for e in entries if e["generation_id"] in added])
    return result


def _plain_prefix(prefix: str) -> str:
    cleaned = prefix.strip().strip("/")
    if not re.fullmatch(PREFIX_PATTERN, cleaned) or any(part in ("", ".", "..") for part in cleaned.split("/")):
        raise PublishError(f"publish prefix {prefix!r}: give a plain key prefix such as shop/spring (letters, digits, "
                           "'.', '_' and '-', parts separated by '/', none of them empty, '.' or '..')")
    try:
        return check_prefix(cleaned, "publish prefix")
    except ValueError as exc:
        raise PublishError(str(exc)) from None


def _published_under(under: str):
    return Generation.published_uri.startswith(under, autoescape=True)  # '_' and '%' in a key are no wildcards


def _entries(platform: Platform, under: str) -> list[dict]:
    """The manifest's rows: every shot published under the prefix, ordered by (SKU, prompt, seed, id)."""
    with transaction(platform.sessions) as s:
        rows = queries.shots(s, _published_under(under))
        scores = queries.scores_by_generation(s, [gen.id for gen, _, _ in rows])
    return [_entry(gen, subject, prompt, scores.get(gen.id, {})) for gen, subject, prompt in rows]


def _entry(gen: Generation, subject: Subject, prompt: str, scores: dict[str, float]) -> dict:
    entry = dict(generation_id=gen.id, sku=subject.sku, category=subject.category, prompt=prompt, seed=gen.seed,
                 mode=gen.mode, aspect=gen.aspect, width=gen.width, height=gen.height,
                 **{metric: scores.get(metric) for metric in METRICS},
                 uri=gen.published_uri, source_uri=gen.output_uri, reviewed_by=gen.reviewed_by,
                 reviewed_at=_utc(gen.reviewed_at), published_at=_utc(gen.published_at))
    return {column: entry[column] for column in COLUMNS}


def _utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite hands back the UTC times it stores without their zone)."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()


def _write(platform: Platform, name: str, entries: list[dict]) -> tuple[str, str]:
    """`name`.csv and `name`.json listing `entries`, each written only if its bytes differ; their URIs."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in entry.items()} for entry in entries)
    documents = ((f"{name}.csv", table.getvalue().encode(), "text/csv"),
                 (f"{name}.json", json.dumps(entries, indent=2, ensure_ascii=False).encode(), "application/json"))
    return tuple(put_if_changed(platform.objects, key, data, content_type).uri for key, data, content_type in documents)
