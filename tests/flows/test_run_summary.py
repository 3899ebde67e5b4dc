"""The run summary is a typed record (flows/steps/run_summary.py): the keys it writes are those the runs table, the flow
run's result and `dreamcache run` have always had, and a record written before the model reads back."""

import pytest
from pydantic import ValidationError

from flows.steps.run_summary import DryRunSummary, RunSummary, read_summary

# A completed run's record as the code wrote it before RunSummary (the keys of orchestrate's dict, the review's
# and the publication's facts added after).
OLD_RECORD = {
    "products_listed": 3, "products_ingested": 3, "products_cached": 3, "rejected": 1,
    "rejections": [{"stage": "prompts", "item": "prompts.txt line 2", "reason": "has 5000 characters"}],
    "images_planned": 6, "images_generated": 6, "images_failed": 0, "images_open": 0, "caches_open": 0, "held": [],
    "contact_sheets": {"MUG-1": "file:///x/shots/MUG-1/sheet.png"}, "output": "file:///x/shots", "run_id": 7,
    "shots_repaired": 0, "images_already_made": 0, "assets": {}, "files_skipped": 1, "skipped": ["notes.txt"],
    "products": [{"sku": "MUG-1", "images": 2, "mdino": 0.61}], "review": {"approved": 2, "rejected": 0, "pending": 4},
    "products_not_found": 0, "status": "completed",
    "published": {"added": 2, "withdrawn": 0, "total": 2, "manifest_csv": "file:///x/published/manifest.csv"},
}


def test_an_old_record_reads_back_and_is_written_with_the_same_keys_and_values():
    summary = read_summary(OLD_RECORD)
    assert isinstance(summary, RunSummary) and summary.run_id == 7 and summary.rejections[0].stage == "prompts"
    assert summary.as_record() == OLD_RECORD


def test_facts_that_did_not_happen_are_not_in_the_record():
    record = RunSummary.model_validate({**OLD_RECORD, "published": None}).as_record()
    assert not {"published", "review_decision", "review_error"} & set(record)
    assert RunSummary.model_validate({**OLD_RECORD, "review_error": "no shot 9"}).as_record()["review_error"] == \
        "no shot 9"


def test_a_summary_missing_a_figure_is_refused_naming_it():
    with pytest.raises(ValidationError, match="images_generated"):
        RunSummary.model_validate({k: v for k, v in OLD_RECORD.items() if k != "images_generated"})


def test_open_work_is_images_and_caches_still_open():
    assert RunSummary.model_validate({**OLD_RECORD, "images_open": 2, "caches_open": 1}).open_work == 3


def test_a_dry_runs_record_reads_as_a_dry_run():
    record = dict(dry_run=True, products_listed=2, products_valid=2, rejected=0, rejections=[], files_skipped=0,
                  skipped=[], prompts=1, images_planned=4)
    summary = read_summary(record)
    assert isinstance(summary, DryRunSummary) and summary.as_record() == record
