"""The platform's tables. Users query these (and the views in the migrations) in SQL: the names
are a product surface, documented in docs/sql.md.

Idempotency is built into unique keys: a subject is cached once per (subject, base model,
adapter, layer preset, resolution, timestep), and a generation exists once per (cache, prompt,
seed, parameters hash). Work items (caches, generations) carry a status and a lease so that
concurrent workers never hold the same item, and a worker that dies gives its items back when
the lease expires.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Enum, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp with time zone, stored in UTC and always read back aware. PostgreSQL keeps the zone;
    SQLite keeps none and returns naive values, which Python refuses to compare with `utcnow()`."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(timezone.utc) if value is not None and value.tzinfo is not None else value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        str: String(255),
    }


class Timestamped:
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.current_timestamp())
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, server_default=func.current_timestamp())


class WorkStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


class WorkItem(Timestamped):
    """Status and lease of an item that workers claim (see db.claims)."""

    status: Mapped[WorkStatus] = mapped_column(
        Enum(WorkStatus, name="work_status", native_enum=False, length=16, validate_strings=True),
        default=WorkStatus.pending, server_default=WorkStatus.pending.value, index=True,
    )
    claimed_by: Mapped[str | None]
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Subject(Timestamped, Base):
    """A product image as ingested: one row per (SKU, image content)."""

    __tablename__ = "subjects"
    __table_args__ = (UniqueConstraint("sku", "content_sha256"),)
    sku: Mapped[str] = mapped_column(index=True)
    category: Mapped[str | None] = mapped_column(index=True)
    source_uri: Mapped[str] = mapped_column(String(1024))
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Segmentation(Timestamped, Base):
    """A subject's cut-out: mask and subject-on-white, with quality figures."""

    __tablename__ = "segmentations"
    __table_args__ = (UniqueConstraint("subject_id", "method"),)
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(64))  # e.g. "sam-vit_h+box:border", "white-background"
    mask_uri: Mapped[str | None] = mapped_column(String(1024))
    reference_uri: Mapped[str | None] = mapped_column(String(1024))
    area_fraction: Mapped[float | None]
    largest_component_share: Mapped[float | None]
    touches_border: Mapped[bool | None]
    quality: Mapped[str] = mapped_column(String(16), default="ok")  # "ok", "warning", "rejected"
    message: Mapped[str | None] = mapped_column(Text)
    mask_sha256: Mapped[str | None] = mapped_column(String(64))
    reference_sha256: Mapped[str | None] = mapped_column(String(64))

    subject: Mapped[Subject] = relationship(lazy="raise")


class SubjectCache(WorkItem, Base):
    """A subject's DreamCache feature cache in the tensor store, once per model configuration."""

    __tablename__ = "subject_caches"
    __table_args__ = (
        UniqueConstraint("subject_id", "base_model_id", "base_model_revision", "adapter_id", "layer_preset",
                         "resolution", "timestep", "preparation", name="uq_subject_caches_identity"),
    )
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"))
    segmentation_id: Mapped[int | None] = mapped_column(ForeignKey("segmentations.id", ondelete="SET NULL"))
    base_model_id: Mapped[str]
    base_model_revision: Mapped[str] = mapped_column(String(64))  # weights fingerprint or hub revision
    adapter_id: Mapped[str]
    layer_preset: Mapped[str] = mapped_column(String(32))
    timestep: Mapped[int] = mapped_column(default=1)
    resolution: Mapped[int]
    # How the cached pass was prepared when not the method's way ("": empty text, reference letterboxed on
    # white, the latent's mode); else JSON of the text, reference mode and latent (the authors' inference).
    preparation: Mapped[str] = mapped_column(Text, default="", server_default="")
    dtype: Mapped[str] = mapped_column(String(16))
    tensor_uri: Mapped[str | None] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)

    subject: Mapped[Subject] = relationship(lazy="raise")


class Prompt(Timestamped, Base):
    """A rendered prompt, exactly as given to the model; one row per distinct text."""

    __tablename__ = "prompts"
    text: Mapped[str] = mapped_column(Text)
    text_sha256: Mapped[str] = mapped_column(String(64), unique=True)


class RunStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    completed = "completed"  # everything it planned is done, or failed with a reason
    incomplete = "incomplete"  # it ended with planned work still open (held by other workers)
    failed = "failed"  # it stopped on an error (recorded in `error`)
    cancelled = "cancelled"  # stopped by SIGTERM or SIGINT; its claims were given back
    crashed = "crashed"  # its process died (found by a later run: no heartbeat, or the process gone)


class Run(Timestamped, Base):
    """One catalogue run (a Prefect flow run, or an embedded run)."""

    __tablename__ = "runs"
    flow_run_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    name: Mapped[str | None]
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, name="run_status", native_enum=False, length=16, validate_strings=True),
        default=RunStatus.pending, server_default=RunStatus.pending.value,
    )
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None]  # the process running it, "host:pid" (as claims name their worker)
    heartbeat_at: Mapped[datetime | None]  # renewed while the owner lives


class ReviewState(str, enum.Enum):
    pending = "pending"  # waits for a reviewer (or was never judged by a rule)
    approved = "approved"  # by a reviewer, or by the run's thresholds (`reviewed_by` says which)
    rejected = "rejected"


# `reviewed_by` of a shot whose product image has changed since it was made (flows/steps/ingest.py, `supersede`):
# rejected, and never approved again while its image is not the product's current one.
SUPERSEDED = "superseded"


class Generation(WorkItem, Base):
    """One personalised shot: which cache, prompt, seed and parameters, and where the image is."""

    __tablename__ = "generations"
    __table_args__ = (
        UniqueConstraint("subject_cache_id", "prompt_id", "seed", "params_sha256", name="uq_generations_identity"),
        Index("ix_generations_run_id_status", "run_id", "status"),
    )
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    subject_cache_id: Mapped[int] = mapped_column(ForeignKey("subject_caches.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    seed: Mapped[int] = mapped_column(BigInteger)
    params_sha256: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the full, hashed parameter set
    sampler: Mapped[str] = mapped_column(String(64))  # a `schedulers.SAMPLERS` name, or the model's own class
    eta: Mapped[float] = mapped_column(default=0.0, server_default="0")
    negative_prompt: Mapped[str] = mapped_column(Text, default="", server_default="")
    guidance: Mapped[str] = mapped_column(String(16))
    text_scale: Mapped[float]
    image_scale: Mapped[float | None]
    steps: Mapped[int]
    resolution: Mapped[int]
    base_model_id: Mapped[str]
    adapter_id: Mapped[str]
    output_uri: Mapped[str | None] = mapped_column(String(1024))
    # The image as written (its sidecar is derived from the row and its scores): checked by every re-run
    # (size) and by `dreamcache verify` (sha256).
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    output_bytes: Mapped[int | None] = mapped_column(BigInteger)
    duration_s: Mapped[float | None]
    # What the shop gets: a shot drawn by the model ("generate") or the product photo placed in a generated
    # scene ("place"); its aspect ratio and the delivered image's size in pixels.
    mode: Mapped[str] = mapped_column(String(16), default="generate", server_default="generate")
    aspect: Mapped[str] = mapped_column(String(16), default="1:1", server_default="1:1")
    width: Mapped[int | None]
    height: Mapped[int | None]
    # The review gate: nothing is published unless approved (flows/steps/review.py, flows/steps/publish.py).
    review: Mapped[ReviewState] = mapped_column(
        Enum(ReviewState, name="review_state", native_enum=False, length=16, validate_strings=True),
        default=ReviewState.pending, server_default=ReviewState.pending.value, index=True,
    )
    reviewed_by: Mapped[str | None]  # a reviewer's name, or "rule: ..." for the run's thresholds
    reviewed_at: Mapped[datetime | None]
    review_note: Mapped[str | None] = mapped_column(Text)
    published_uri: Mapped[str | None] = mapped_column(String(1024))
    published_at: Mapped[datetime | None]

    subject_cache: Mapped[SubjectCache] = relationship(lazy="raise")
    prompt: Mapped[Prompt] = relationship(lazy="raise")
    run: Mapped[Run | None] = relationship(lazy="raise")


class Score(Timestamped, Base):
    """A metric of a generation: DINO, CLIP-I, CLIP-T, masked or not, by a named scorer model."""

    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("generation_id", "metric", "masked", "scorer_model_id"),)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"), index=True)
    metric: Mapped[str] = mapped_column(String(16))  # "dino", "clip_i", "clip_t"
    masked: Mapped[bool] = mapped_column(default=False)
    value: Mapped[float]
    scorer_model_id: Mapped[str]

    generation: Mapped[Generation] = relationship(lazy="raise")


class ProductAsset(Timestamped, Base):
    """A per-product output besides the shots: the transparent cut-out, a white packshot in a format."""

    __tablename__ = "product_assets"
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "cutout", "packshot"
    aspect: Mapped[str | None] = mapped_column(String(16))  # a packshot's format; None for a cut-out
    width: Mapped[int]
    height: Mapped[int]
    uri: Mapped[str] = mapped_column(String(1024), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)


class RejectedItem(Timestamped, Base):
    """An input a run could not use (a corrupt image, an unsegmentable product, a bad manifest row)."""

    __tablename__ = "rejected_items"
    __table_args__ = (Index("ix_rejected_items_run_id_stage", "run_id", "stage"),)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(16))  # "ingest", "segment", "cache", "plan"
    item: Mapped[str] = mapped_column(String(1024))  # the SKU, URI or manifest row that was rejected
    reason: Mapped[str] = mapped_column(Text)
