"""The review gate: score rules approve what passes (at most keep_best per group), people decide the rest."""

import re
from typing import NamedTuple

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from db import queries
from db.models import Generation, ReviewState, Score, Subject, SubjectCache
from db.session import transaction
from flows.runs.catalogue import run_embedded
from flows.cli import app
from flows.platform.params import CatalogueRunParams
from flows.platform.resources import Platform, get_platform
from flows.steps.review import ReviewDecision, ReviewError, auto_approve, decide, pending_shots, review_markdown
from tests.helpers import save_tiny_scorers

# The masked DINO scores the tests give MUG-1's three shots (by seed): masking finds no product in the tiny
# model's images, so no shot gets one of its own; the other products keep none.
MUG_MDINO = {0: 0.9, 1: 0.6, 2: 0.3}


class Run(NamedTuple):
    platform: Platform
    run_id: int
    shots: dict[tuple[str, int], int]  # (SKU, seed) -> generation id
    source: str


def _run(source, prompt: str) -> int:
    params = CatalogueRunParams(source=str(source), prompts=[prompt], images_per_prompt=3, steps=2)
    return run_embedded(params, progress=False)["run_id"]


@pytest.fixture
def run(platform_env, catalogue, tmp_path) -> Run:
    """A scored run: three products, one prompt, three shots each; MUG-1's shots with masked DINO scores."""
    clip, dino = save_tiny_scorers(tmp_path / "scorers")
    platform_env.setenv("DREAMCACHE_CLIP_MODEL", clip)
    platform_env.setenv("DREAMCACHE_DINO_MODEL", dino)
    run_id = _run(catalogue, "a {category} on a beach")
    platform = get_platform()
    with transaction(platform.sessions) as s:
        shots = _shots(s, run_id)
        s.add_all(Score(generation_id=shots["MUG-1", seed], metric="dino", masked=True, value=value,
                        scorer_model_id=dino) for seed, value in MUG_MDINO.items())
    return Run(platform, run_id, shots, str(catalogue))


def _shots(session, run_id) -> dict[tuple[str, int], int]:
    """(SKU, seed) -> generation id of the run's shots."""
    rows = session.execute(select(Subject.sku, Generation.seed, Generation.id)
                           .join(SubjectCache, SubjectCache.subject_id == Subject.id)
                           .join(Generation, Generation.subject_cache_id == SubjectCache.id)
                           .where(Generation.run_id == run_id)).all()
    return {(sku, seed): generation_id for sku, seed, generation_id in rows}


def _reviews(platform, ids) -> dict[int, tuple[str, str | None]]:
    with transaction(platform.sessions) as s:
        rows = s.execute(select(Generation.id, Generation.review, Generation.reviewed_by)
                         .where(Generation.id.in_(list(ids)))).all()
    return {i: (review.value, by) for i, review, by in rows}


def _approved(platform, ids) -> set[int]:
    return {i for i, (review, _) in _reviews(platform, ids).items() if review == "approved"}


def _undo(platform) -> None:
    with transaction(platform.sessions) as s:
        s.execute(update(Generation).values(review=ReviewState.pending, reviewed_by=None, reviewed_at=None))


def test_rules_approve_exactly_the_shots_that_pass_and_at_most_keep_best_per_group(run):
    platform, _, shots, _ = run
    ids = list(shots.values())
    with transaction(platform.sessions) as s:
        dino = {i: v["dino"] for i, v in queries.scores_by_generation(s, ids).items()}
    assert len(ids) == 9 and len(dino) == 9  # every shot has its (unmasked) DINO score from the scorer

    # A missing score fails: only MUG-1 has masked DINO scores, and only two of them pass.
    result = auto_approve(platform, ids, [("mdino", 0.5)], 0)
    assert _approved(platform, ids) == {shots["MUG-1", 0], shots["MUG-1", 1]}
    assert (result["approved"], result["pending"]) == (2, 7)
    assert _reviews(platform, [shots["MUG-1", 0]])[shots["MUG-1", 0]] == ("approved", "rule: mdino>=0.5")
    assert auto_approve(platform, ids, [("mdino", 0.5)], 0)["approved"] == 0  # again: nothing more

    # The best one per product and prompt: by masked DINO, else by DINO; a rule on a real score narrows it.
    _undo(platform)
    result = auto_approve(platform, ids, [], 1)
    best = {sku: max((shots[sku, seed] for seed in range(3)), key=dino.get) for sku in ("MUG-2", "LAMP-1")}
    assert _approved(platform, ids) == {shots["MUG-1", 0], *best.values()}
    assert result["approved"] == 3 and result["rule"] == "rule: best 1"
    assert auto_approve(platform, ids, [], 1)["approved"] == 0 and auto_approve(platform, ids, [], 2)["approved"] == 3

    _undo(platform)
    threshold = sorted(dino.values())[4]  # the median: some shots pass, some do not
    auto_approve(platform, ids, [("dino", threshold)], 2)
    passing = [i for i in ids if dino[i] >= threshold]
    mdino = {shots["MUG-1", seed]: value for seed, value in MUG_MDINO.items()}
    for sku in ("MUG-1", "MUG-2", "LAMP-1"):
        group = [shots[sku, seed] for seed in range(3)]
        ranked = sorted((i for i in group if i in passing), key=lambda i: (-mdino.get(i, 0), -dino[i], i))
        assert _approved(platform, group) == set(ranked[:2]), sku

    # No rule and no limit: a person decides everything.
    _undo(platform)
    assert auto_approve(platform, ids, [], 0) == dict(approved=0, pending=9, rule=None)
    assert not _approved(platform, ids)


def test_a_persons_decision_is_never_overwritten_by_rules(run):
    platform, run_id, shots, _ = run
    ids = list(shots.values())
    decide(platform, run_id, approve=[shots["LAMP-1", 2]], reject=[shots["MUG-1", 0]], reviewer="ana")
    result = auto_approve(platform, ids, [("mdino", 0.5)], 1)
    reviews = _reviews(platform, ids)
    assert reviews[shots["MUG-1", 0]] == ("rejected", "ana")  # the best by the rules, but rejected by a person
    assert reviews[shots["MUG-1", 1]] == ("approved", "rule: mdino>=0.5, best 1")  # the next best takes its place
    assert reviews[shots["LAMP-1", 2]] == ("approved", "ana")
    assert result["approved"] == 1
    # A person's approval takes the group's place: the rules approve no other LAMP-1 shot.
    auto_approve(platform, ids, [], 1)
    assert {shots["LAMP-1", s] for s in range(3)} & _approved(platform, ids) == {shots["LAMP-1", 2]}
    assert _reviews(platform, [shots["MUG-1", 0]])[shots["MUG-1", 0]] == ("rejected", "ana")


def test_decide_reaches_only_the_runs_shots_and_refuses_conflicts(run):
    platform, first, shots, source = run
    second = _run(source, "a {category} in the snow")
    with transaction(platform.sessions) as s:
        others = _shots(s, second)
    assert second != first and not set(others.values()) & set(shots.values())
    mine, theirs = shots["MUG-1", 0], others["MUG-1", 0]

    result = decide(platform, first, approve=[mine, theirs, 99_999], note="  crisp  ")
    assert result["ignored"] == [theirs, 99_999] and (result["approved"], result["changed"]) == (1, 1)
    assert _reviews(platform, [mine, theirs]) == {mine: ("approved", "reviewer"), theirs: ("pending", None)}
    with transaction(platform.sessions) as s:
        assert s.get(Generation, mine).review_note == "crisp"

    with pytest.raises(ReviewError, match=f"shot {mine} is both approved and rejected"):
        decide(platform, first, approve=[mine], reject=[mine, shots["MUG-1", 1]])
    with pytest.raises(ReviewError, match="run 12345 does not exist"):
        decide(platform, 12345, approve=[mine])
    with pytest.raises(ReviewError, match="printable"):
        decide(platform, first, approve=[mine], reviewer="ana\x1b[31m")
    with pytest.raises(ReviewError, match="at most 100"):
        decide(platform, first, approve=[mine], reviewer="a" * 101)
    with pytest.raises(ReviewError, match="1000"):
        decide(platform, first, approve=[mine], note="n" * 1001)
    assert _reviews(platform, [shots["MUG-1", 1]]) == {shots["MUG-1", 1]: ("pending", None)}  # refused: no change

    # The rest: the run's shots still pending after the lists; a decision made before stays.
    result = decide(platform, first, reject=[shots["MUG-1", 1]], rest="approve", reviewer="  ana  ")
    assert (result["approved"], result["rejected"], result["pending"]) == (7, 1, 0)
    reviews = _reviews(platform, shots.values())
    assert reviews[mine] == ("approved", "reviewer") and reviews[shots["MUG-1", 1]] == ("rejected", "ana")
    assert sum(review == ("approved", "ana") for review in reviews.values()) == 7
    assert set(_reviews(platform, others.values()).values()) == {("pending", None)}  # the other run untouched
    # A reviewer changes their mind.
    assert decide(platform, first, reject=[mine], reviewer="ana")["changed"] == 1
    assert _reviews(platform, [mine])[mine] == ("rejected", "ana")


def test_the_review_form_and_its_decision(run):
    platform, run_id, shots, _ = run
    with transaction(platform.sessions) as s:
        rows = pending_shots(s, run_id)
    assert [r["id"] for r in rows] == [shots[sku, seed] for sku in ("LAMP-1", "MUG-1", "MUG-2") for seed in range(3)]
    mug = next(r for r in rows if r["id"] == shots["MUG-1", 0])
    assert mug["scores"]["mdino"] == 0.9 and mug["output_uri"].endswith(".png") and mug["aspect"] == "1:1"

    markdown = review_markdown(rows, run_id, picture=lambda uri: "https://pictures/" + uri.rsplit("/", 1)[-1])
    mug_0 = shots["MUG-1", 0]
    picture = f"![shot {mug_0}](<https://pictures/{mug['output_uri'].rsplit('/', 1)[-1]}>)"
    assert f"| {picture} | {mug_0} | MUG-1 | a mug on a beach | 0 | 0.900 |" in markdown  # mdino first
    # A column for each score the shots have, and none for a score they do not have.
    recorded = [m for m in ("mdino", "mclip_i", "clip_t", "dino", "clip_i") if any(m in r["scores"] for r in rows)]
    assert "mdino" in recorded and "clip_t" in recorded
    assert "| shot | id | sku | prompt | seed |" + "".join(f" {m} |" for m in recorded) in markdown.splitlines()
    ids = [r["id"] for r in rows]  # the hint names this run's own ids
    assert f"*Approve* {ids[0]}, {ids[1]}, *Reject* {ids[2]}" in markdown
    many = [dict(rows[0], id=i, sku="A|B", prompt="a mug " * 20) for i in range(250)]
    listed = review_markdown(many, run_id, picture=lambda uri: "https://pictures/shot.png")
    assert "| 199 | A\\|B |" in listed and "| 200 |" not in listed and "and 50 more" in listed
    assert listed.count("![shot") == 48 and f"| {('a mug ' * 20)[:39]}… |" in listed  # shortened: the table fits

    form = ReviewDecision.with_initial_data(description=markdown)
    schema = form.model_json_schema()
    assert form._description == markdown
    assert all(schema["properties"][name].get("description") for name in ("approve", "reject", "rest", "reviewer"))
    decision = form(approve=[shots["MUG-1", 0]], rest="reject", reviewer="ana")
    result = decide(platform, run_id, **decision.model_dump())
    assert (result["approved"], result["rejected"]) == (1, 8)


def test_a_note_goes_with_the_shots_it_was_given_with(run):
    """A note given with listed ids is theirs, not that of the shots `rest` decides beside them; a note given
    with `rest` alone is the rest's."""
    platform, run_id, shots, _ = run
    hero, dull = shots["MUG-1", 0], shots["MUG-1", 1]
    decide(platform, run_id, approve=[hero], reject=[dull], rest="reject", reviewer="ana", note="hero shot")
    with transaction(platform.sessions) as s:
        notes = dict(s.execute(select(Generation.id, Generation.review_note)
                               .where(Generation.id.in_(shots.values()))).all())
    assert notes.pop(hero) == "hero shot" and notes.pop(dull) == "hero shot"
    assert set(notes.values()) == {None}, notes  # rejected by `rest`, without the note

    second = _run(run.source, "a {category} in the snow")
    with transaction(platform.sessions) as s:
        others = _shots(s, second)
    decide(platform, second, rest="reject", note="off brand, all of them")
    with transaction(platform.sessions) as s:
        assert set(s.scalars(select(Generation.review_note).where(Generation.id.in_(others.values())))) == {
            "off brand, all of them"}


def test_the_cli_lists_the_shots_awaiting_review_and_decides(run):
    platform, run_id, shots, _ = run
    cli = CliRunner()
    listed = cli.invoke(app, ["review", str(run_id)])
    assert listed.exit_code == 0, listed.output
    assert "9 shots await review" in listed.output and "a lamp on a beach" in listed.output
    assert f"{shots['MUG-1', 0]:>6} MUG-1" in listed.output and " 0.900 " in listed.output
    hint = re.search(rf"dreamcache review {run_id} --approve (\d+),(\d+) --reject (\d+)`", listed.output)
    assert hint and {int(i) for i in hint.groups()} <= set(shots.values()), listed.output  # this run's own ids

    a, b, c, d = shots["MUG-1", 0], shots["MUG-1", 1], shots["LAMP-1", 0], shots["LAMP-1", 1]
    decided = cli.invoke(app, ["review", str(run_id), "--approve", f"{a},{b}", "--approve", str(c), "--reject", str(d),
                               "--approve", "424242", "--by", "ana", "--note", "on brand"])
    assert decided.exit_code == 0, decided.output
    assert "3 approved, 1 rejected" in decided.output and "5 still await review" in decided.output
    assert "ignored (not done shots of run" in decided.output and "424242" in decided.output
    assert _reviews(platform, [a, d]) == {a: ("approved", "ana"), d: ("rejected", "ana")}

    again = cli.invoke(app, ["review", str(run_id)])
    assert "5 shots await review" in again.output and f"{a:>6} MUG-1" not in again.output

    bad = cli.invoke(app, ["review", str(run_id), "--approve", "1,x"])
    assert bad.exit_code == 1 and "--approve: 'x' is not a shot id" in bad.output
    both = cli.invoke(app, ["review", str(run_id), "--approve", str(a), "--reject", str(a)])
    assert both.exit_code == 1 and f"shot {a} is both approved and rejected" in both.output
    rest = cli.invoke(app, ["review", str(run_id), "--rest", "maybe"])
    assert rest.exit_code == 1 and "choose pending, approve or reject" in rest.output
    missing = cli.invoke(app, ["review", "777"])
    assert missing.exit_code == 1 and "run 777 does not exist" in missing.output
    assert _approved(platform, shots.values()) == {a, b, c}  # the refused commands changed nothing


def test_a_decision_the_form_cannot_apply_leaves_the_shots_waiting_and_says_why(run, monkeypatch):
    """The paused run's answer names a shot both approved and rejected: the run does not fail (its shots are made),
    the decision is not applied, and the summary says why. (The pause itself is Prefect's: test_review_pause.py.)"""
    from db.models import Run as RunRecord
    from flows.runs import catalogue
    from flows.steps.run_summary import RunSummary

    shot = run.shots["MUG-1", 0]
    with transaction(run.platform.sessions) as s:
        recorded = RunSummary.model_validate(s.get(RunRecord, run.run_id).summary)
    monkeypatch.setattr(catalogue, "wait_for_review",
                        lambda run_id, pending, minutes: ReviewDecision(approve=[shot], reject=[shot], reviewer="ana"))
    params = CatalogueRunParams(source=run.source, prompts=["a {category} on a beach"], review="pause")
    summary = catalogue.review_and_publish(params, recorded.model_copy(update=dict(review=dict(pending=9))),
                                           on_prefect=True)
    assert f"shot {shot} is both approved and rejected" in summary.review_error
    assert set(_reviews(run.platform, run.shots.values()).values()) == {("pending", None)}
