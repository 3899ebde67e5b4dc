"""The review gate: nothing is published unless approved, by a person or by the run's score rules.

A done shot's `review` starts pending. The run's rules (`approve_if`, `keep_best`) only ever approve pending
shots that no person has decided (`auto_approve`); a person decides any shot of a run, and may change their
mind (`decide`: `dreamcache review`, or the form of a run paused for review). `reviewed_by` says who decided:
a reviewer's name, or `rule: ...` for the rules. Publishing (flows/steps/publish.py) withdraws what is no longer
approved.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from prefect.input import RunInput
from pydantic import ConfigDict, Field
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db import queries
from db.models import SUPERSEDED, Generation, ReviewState, Run, Subject, SubjectCache, WorkStatus, utcnow
from db.session import transaction
from dreamcache.core.errors import DreamCacheError
from dreamcache.perception.metrics import METRICS, ranking_key
from flows.platform.markdown import md
from flows.platform.params import in_reading_order

if TYPE_CHECKING:  # the platform module loads the model library: this one stays cheap to import
    from flows.platform.resources import Platform

RULE = "rule:"  # how `reviewed_by` begins when the run's rules approved a shot, not a person
DEFAULT_REVIEWER = "reviewer"
MAX_REVIEWER_CHARS = 100
MAX_NOTE_CHARS = 1000
MAX_FORM_ROWS = 200  # shots listed in the review form's table; the rest are counted
MAX_THUMBNAILS = 48  # shots shown as pictures there (each a few kB in the form's description)
PROMPT_CHARS = 40  # a prompt's characters in the table, which must fit the dialog
Rest = Literal["pending", "approve", "reject"]
_STATE = {"approve": ReviewState.approved, "reject": ReviewState.rejected}


class ReviewError(DreamCacheError, ValueError):
    """A review decision that cannot be applied; the message names the run or shots and what to do."""


class ReviewDecision(RunInput):
    """A reviewer's decision on a run's shots: the form a run paused for review shows (apply it with `decide`,
    whose arguments are these fields)."""

    model_config = ConfigDict(json_schema_extra=in_reading_order)

    approve: list[int] = Field(
        default=[], description="Ids of the shots to approve (the id column of the table above).")
    reject: list[int] = Field(default=[], description="Ids of the shots to reject.")
    rest: Rest = Field(
        default="pending",
        description="The shots awaiting review that you do not list: pending: they wait (`dreamcache review RUN` "
        "lists them later); approve or reject: all of them.")
    reviewer: str = Field(default="", max_length=MAX_REVIEWER_CHARS,
                          description="Your name, recorded with each shot you decide.")
    note: str = Field(default="", max_length=MAX_NOTE_CHARS,
                      description="Why, if worth keeping: recorded with the shots you list by id (with those `rest` "
                      "decides only when you list none).")


def rule_label(rules: Sequence[tuple[str, float]], keep_best: int) -> str:
    """What `reviewed_by` records for an approval by rules, e.g. `rule: mdino>=0.5, best 2`."""
    parts = [f"{metric}>={value:g}" for metric, value in rules] + ([f"best {keep_best}"] if keep_best else [])
    return f"{RULE} {', '.join(parts)}"


def _undecided():
    """Shots no person has decided: pending, and never decided or only by rules."""
    return (Generation.review == ReviewState.pending) & or_(Generation.reviewed_by.is_(None),
                                                            Generation.reviewed_by.startswith(RULE))


def _is_undecided(gen: Generation) -> bool:
    """The same, of a row read."""
    return gen.review == ReviewState.pending and (gen.reviewed_by is None or gen.reviewed_by.startswith(RULE))


def _passes(scores: dict[str, float], rules: Sequence[tuple[str, float]]) -> bool:
    return all(metric in scores and scores[metric] >= value for metric, value in rules)  # a missing score fails


def _rank(generation_id: int, scores: dict[str, float]) -> tuple:
    return (*ranking_key(scores), generation_id)


def auto_approve(platform: Platform, generation_ids: Sequence[int], rules: Sequence[tuple[str, float]],
                 keep_best: int) -> dict:
    """Approve the done shots among `generation_ids` that no person has decided and that pass every rule (a
    missing score fails), at most `keep_best` per product, prompt, aspect and mode (0: no limit), the best
    by the scores' RANKING first (dreamcache.perception.scoring); approved shots of the group, whoever approved them, take their places first. Without
    rules and limit nothing is approved: a person decides. Only ever approves, so running it again changes
    nothing; returns how many shots it approved and how many still await review."""
    label = rule_label(rules, keep_best) if rules or keep_best else None
    with transaction(platform.sessions) as s:
        ids = list(generation_ids)
        rows = [row for start in range(0, len(ids), queries.IDS_PER_QUERY) for row in queries.shots(
            s, Generation.id.in_(ids[start:start + queries.IDS_PER_QUERY]), Generation.status == WorkStatus.done)]
        scores = queries.scores_by_generation(s, [gen.id for gen, _, _ in rows])
        groups: dict[tuple, list[Generation]] = {}
        for gen, subject, _ in rows:
            groups.setdefault((subject.id, gen.prompt_id, gen.aspect, gen.mode), []).append(gen)
        chosen = []
        for members in groups.values() if label else ():
            places = keep_best - sum(g.review == ReviewState.approved for g in members) if keep_best else len(members)
            passing = [g.id for g in members if _is_undecided(g) and _passes(scores.get(g.id, {}), rules)]
            chosen += sorted(passing, key=lambda i: _rank(i, scores.get(i, {})))[:max(places, 0)]
        # A person's decision made since the read is kept: only shots still undecided are approved.
        approved = sum(s.execute(update(Generation).where(Generation.id.in_(chosen[start:start + queries.IDS_PER_QUERY]),
                                                          _undecided())
                                 .values(review=ReviewState.approved, reviewed_by=label, reviewed_at=utcnow())
                                 .execution_options(synchronize_session=False)).rowcount
                       for start in range(0, len(chosen), queries.IDS_PER_QUERY))
        pending = sum(g.review == ReviewState.pending for g, _, _ in rows) - approved
    return dict(approved=approved, pending=pending, rule=label)


def _reviewer(name: str) -> str:
    name = name.strip()
    if not name.isprintable() or len(name) > MAX_REVIEWER_CHARS:
        raise ReviewError(f"reviewer {name[:MAX_REVIEWER_CHARS]!r}: give a name of at most {MAX_REVIEWER_CHARS} "
                          "printable characters")
    return name or DEFAULT_REVIEWER


def _note(note: str) -> str | None:
    note = note.strip()
    if len(note) > MAX_NOTE_CHARS:
        raise ReviewError(f"the note has {len(note)} characters: keep it to {MAX_NOTE_CHARS}")
    return note or None


def decide(platform: Platform, run_id: int, approve: Sequence[int] = (), reject: Sequence[int] = (),
           rest: Rest = "pending", reviewer: str = DEFAULT_REVIEWER, note: str = "") -> dict:
    """A reviewer's decision on the done shots of run `run_id`: those in `approve` approved, those in `reject`
    rejected (whatever was decided before), then the run's shots still pending set by `rest` (pending: left
    as they are). The note goes with the shots listed by id, not with those `rest` decides beside them (a note
    given with `rest` alone goes with those). Ids that are not done shots of this run are ignored and returned:
    a decision never reaches another run's shots. Returns how many shots the decision approved and rejected, how many of them changed
    state, how many of the run's shots still await review, and the ignored ids."""
    both = sorted(set(approve) & set(reject))
    if both:
        raise ReviewError(f"shot{'s' if len(both) > 1 else ''} {', '.join(map(str, both))} "
                          f"{'are' if len(both) > 1 else 'is'} both approved and rejected: give each id once")
    if rest not in ("pending", *_STATE):
        raise ReviewError(f"rest {rest!r}: choose pending, approve or reject")
    reviewer, note = _reviewer(reviewer), _note(note)
    with transaction(platform.sessions) as s:
        if s.get(Run, run_id) is None:
            raise ReviewError(f"run {run_id} does not exist: `dreamcache history` shows the runs' ids")
        shots = {gen.id: gen for gen in s.scalars(select(Generation).where(Generation.run_id == run_id,
                                                                           Generation.status == WorkStatus.done))}
        superseded = [shots[i] for i in approve if i in shots and shots[i].reviewed_by == SUPERSEDED]
        if superseded:
            raise ReviewError(_superseded(s, superseded))
        ignored = sorted(i for i in {*approve, *reject} if i not in shots)
        decisions = {i: ReviewState.approved for i in approve if i in shots}
        # A superseded shot stays superseded (rejected already): a reviewer's rejection would erase the mark that
        # brings it back to pending should its image become current again.
        decisions.update({i: ReviewState.rejected for i in reject if i in shots and shots[i].reviewed_by != SUPERSEDED})
        notes = dict.fromkeys(decisions, note)
        if rest != "pending":
            by_rest = {i: _STATE[rest] for i, gen in shots.items()
                       if i not in decisions and gen.review == ReviewState.pending}
            decisions.update(by_rest)
            notes.update(dict.fromkeys(by_rest, None if notes else note))
        now, changed = utcnow(), 0
        for i, state in decisions.items():
            gen = shots[i]
            if (gen.review, gen.reviewed_by, gen.review_note) != (state, reviewer, notes[i]):  # the same again: kept
                changed += gen.review != state
                gen.review, gen.reviewed_by, gen.reviewed_at, gen.review_note = state, reviewer, now, notes[i]
        pending = sum(gen.review == ReviewState.pending for gen in shots.values())
    counts = Counter(decisions.values())
    return dict(approved=counts[ReviewState.approved], rejected=counts[ReviewState.rejected], changed=changed,
                pending=pending, ignored=ignored)


def _superseded(s: Session, shots: Sequence[Generation]) -> str:
    """Why superseded shots cannot be approved, in one line naming each shot's product."""
    skus = dict(s.execute(select(Generation.id, Subject.sku)
                          .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                          .join(Subject, Subject.id == SubjectCache.subject_id)
                          .where(Generation.id.in_([gen.id for gen in shots]))).all())
    named = ", ".join(f"{gen.id} ({skus[gen.id]})" for gen in shots)
    plural = len(shots) > 1
    return (f"shot{'s' if plural else ''} {named} {'are' if plural else 'is'} superseded and cannot be approved: "
            f"{shots[0].review_note or 'its product image changed since it was made'}; approve the shots of the "
            "current image (`dreamcache review` of the run that made them)")


def pending_shots(session: Session, run_id: int) -> list[dict]:
    """The run's done shots awaiting review, ordered by SKU, prompt and seed, with their scores."""
    rows = queries.shots(session, Generation.run_id == run_id, Generation.status == WorkStatus.done,
                         Generation.review == ReviewState.pending)
    scores = queries.scores_by_generation(session, [gen.id for gen, _, _ in rows])
    return [dict(id=gen.id, sku=subject.sku, prompt=prompt, seed=gen.seed, aspect=gen.aspect,
                 scores=scores.get(gen.id, {}), output_uri=gen.output_uri) for gen, subject, prompt in rows]


def review_markdown(rows: Sequence[dict], run_id: int, picture: Callable[[str], str | None] = lambda uri: None) -> str:
    """The review form's description: how to decide, with this run's own ids, and a table of the shots awaiting
    review (`pending_shots`): a thumbnail of each (`picture(output_uri)`: a URL the browser loads, or None),
    its id, product, prompt (shortened: the table fits the dialog), seed and the scores recorded."""
    if not rows:
        return f"# Review of run {run_id}\n\nNo shots await review."
    ids = [str(row["id"]) for row in rows]
    example = f"*Approve* {', '.join(ids[:2])}" + (f", *Reject* {ids[2]}" if len(ids) > 2 else "")
    recorded = {metric for row in rows for metric in row["scores"]}
    metrics = [m for m in METRICS if m in recorded]
    lines = [f"# Review of run {run_id}", "",
             f"{len(rows)} shots await review. List the ids to approve and to reject (e.g. {example}); `rest` decides "
             "the shots you do not list. Only approved shots are published.", "",
             "| shot | id | sku | prompt | seed |" + "".join(f" {m} |" for m in metrics),
             "|---|---|---|---|---|" + "---|" * len(metrics)]
    for index, row in enumerate(rows[:MAX_FORM_ROWS]):
        url = picture(row["output_uri"]) if index < MAX_THUMBNAILS else None
        thumbnail = f"![shot {row['id']}](<{url}>)" if url else ""
        scores = "".join(f" {_score(row['scores'].get(m))} |" for m in metrics)
        lines.append(f"| {thumbnail} | {row['id']} | {md(row['sku'])} | {md(_short(row['prompt']))} | {row['seed']} |"
                     + scores)
    if len(rows) > MAX_FORM_ROWS:
        lines += ["", f"and {len(rows) - MAX_FORM_ROWS} more: `dreamcache review {run_id}` lists them all."]
    return "\n".join(lines)


def _short(text: str) -> str:
    return text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS - 1].rstrip() + "…"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
