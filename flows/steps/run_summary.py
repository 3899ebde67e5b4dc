"""What a catalogue run did, typed: `RunSummary` (a run that worked) and `DryRunSummary` (a dry run's plan).

The summary is built once, by the orchestration, when the run's work is done; the review and the publication
after it add their facts to it. Outside Python it is a plain JSON object with the same keys as the fields
(`as_record`): the run's record keeps it (`runs.summary`), the Prefect flow run returns it, and a record
written before this model existed reads back through `RunSummary.model_validate` as well.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Rejection(BaseModel):
    """An input the run refused, where and why (the first 100; every one is in `rejected_items`)."""

    stage: str
    item: str
    reason: str


class RunSummary(BaseModel):
    """A run's figures, what other workers still hold of it, where its outputs are, and after it, its review
    and publication."""

    run_id: int
    # completed, incomplete (work held by other workers); None until `runs.finish_run` records the run
    status: str | None = None
    # Inputs: products listed from the source, ingested (copied and recorded), cached; inputs rejected.
    products_listed: int
    products_ingested: int
    products_cached: int
    rejected: int
    rejections: list[Rejection]
    files_skipped: int = 0  # files of the source that are not product images
    skipped: list[str] = Field(default_factory=list)  # the first 20 of them
    # Images: planned this run (to do), done by earlier runs, generated, failed, still open.
    images_planned: int
    images_already_made: int = 0
    shots_repaired: int = 0  # of those planned: recorded as done, but their image was missing or damaged
    images_generated: int
    images_failed: int
    images_open: int
    caches_open: int
    held: list[dict[str, Any]] = Field(default_factory=list)  # `liveness.held_items`: what other workers hold
    # Outputs.
    output: str  # the URI of the run's output prefix
    contact_sheets: dict[str, str] = Field(default_factory=dict)  # by SKU
    assets: dict[str, list[str]] = Field(default_factory=dict)  # cut-outs and packshots by SKU
    products: list[dict[str, Any]] = Field(default_factory=list)  # `queries.best_scores`: each SKU's best shot
    products_not_found: int = 0  # shots in which the segmenter found no product
    review: dict[str, int] = Field(default_factory=dict)  # shots approved, rejected, pending
    # Added after the run, when they happen (absent from the record otherwise).
    review_decision: dict[str, Any] | None = None  # the reviewer's decision from the paused run's form
    review_error: str | None = None  # why that decision was not applied
    published: dict[str, Any] | None = None  # `publish.publish`'s answer

    @property
    def open_work(self) -> int:
        return self.images_open + self.caches_open

    def as_record(self) -> dict[str, Any]:
        """The summary as the run's record keeps it and the flow run returns it: a JSON object of the fields,
        without the facts that did not happen."""
        return self.model_dump(exclude={name for name in _LATER_FACTS if getattr(self, name) is None})


_LATER_FACTS = ("review_decision", "review_error", "published")


class DryRunSummary(BaseModel):
    """What a run would do: its inputs listed and read, nothing written."""

    dry_run: Literal[True] = True
    products_listed: int
    products_valid: int
    rejected: int
    rejections: list[Rejection]
    files_skipped: int
    skipped: list[str]
    prompts: int
    images_planned: int

    def as_record(self) -> dict[str, Any]:
        return self.model_dump()


def read_summary(record: dict[str, Any]) -> RunSummary | DryRunSummary:
    """A summary from its record (a flow run's result, `runs.summary`)."""
    return DryRunSummary.model_validate(record) if record.get("dry_run") else RunSummary.model_validate(record)
