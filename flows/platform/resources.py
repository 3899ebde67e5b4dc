"""What a catalogue step needs: settings, database, object stores, and models loaded once per process."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import migrate
from db.objects import ObjectStore, open_store
from db.session import make_engine, session_factory
from db.tensors import TensorStore
from dreamcache.core.errors import DreamCacheError
from dreamcache.app.config import BUNDLED_MODEL, Settings, load_settings


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_ESCAPED = re.compile(r"-[0-9a-f]{8}$")  # the suffix an escaped part ends with


def safe_key_part(text: str, limit: int = 80) -> str:
    """A SKU or name made safe for object keys and file names; distinct inputs stay distinct.

    A text that changes when cleaned gets a hash of the original appended. So does a text that
    already ends the way an escaped one does (`a_b-1f2e3d4c`): otherwise the SKU "a b" and the SKU
    that is literally its escaped form would share a folder.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:limit] or "_"
    if cleaned != text or _ESCAPED.search(text):
        cleaned += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return cleaned


@dataclass
class ModelIdentity:
    """How the database names the loaded models (part of the cache and generation keys)."""

    base_model_id: str
    base_model_revision: str
    adapter_id: str
    layer_preset: str
    dtype: str


@dataclass
class Platform:
    settings: Settings
    _models: dict = field(default_factory=dict, repr=False)

    @property
    def lease(self) -> timedelta:
        """How long a claimed item stays this worker's without renewal (the setting `lease_seconds`)."""
        return timedelta(seconds=self.settings.lease_seconds)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory(make_engine(self.settings.resolved_database_url))

    @cached_property
    def objects(self) -> ObjectStore:
        return open_store(self.settings.resolved_objects_url, self.settings.s3_public_endpoint_url)

    @cached_property
    def tensors(self) -> TensorStore:
        return TensorStore(self.objects)

    def migrate(self) -> None:
        migrate.upgrade(self.settings.resolved_database_url)

    # Models: loaded on first use, once per process (a GPU worker keeps them for its lifetime).
    @property
    def pipeline(self):
        if "pipeline" not in self._models:
            from dreamcache.app.loading import load_pipeline

            self._models["pipeline"] = load_pipeline(self.settings)
        return self._models["pipeline"]

    @property
    def segmenter(self):
        if "segmenter" not in self._models:
            from dreamcache.app.loading import load_segmenter

            self._models["segmenter"] = load_segmenter(self.settings)
        return self._models["segmenter"]

    @property
    def scorer(self):
        if "scorer" not in self._models:
            from dreamcache.app.loading import load_scorer

            self._models["scorer"] = load_scorer(self.settings, self.segmenter)
        return self._models["scorer"]

    @cached_property
    def heartbeat(self):
        """This process's heartbeat (started on first use): its leases and runs renewed while it lives."""
        from flows.platform.liveness import Heartbeat

        beat = Heartbeat(self.sessions, worker_id(), self.lease)
        beat.start()
        return beat

    def load(self, *names: str) -> None:
        """Load these models (pipeline, segmenter, scorer) now rather than on first use: before a
        progress bar starts, say, so that their loading notices are not printed across it."""
        for name in names:
            getattr(self, name)

    @cached_property
    def identity(self) -> ModelIdentity:
        from dreamcache.core.cache import model_fingerprint  # torch: only once a model is loaded

        pipe = self.pipeline
        adapter = self.settings.adapter or ("bundled" if self.settings.base_model == BUNDLED_MODEL else "untrained")
        adapter_hash = model_fingerprint(*pipe.dreamcache_adapters.values())[:12]
        return ModelIdentity(
            base_model_id=self.settings.base_model,
            base_model_revision=pipe.base_fingerprint,
            adapter_id=f"{Path(adapter).name}@{adapter_hash}",
            layer_preset=pipe.dreamcache_preset,
            dtype=str(pipe.unet.dtype).removeprefix("torch."),
        )


class EmbeddedDefaults(DreamCacheError, ValueError):
    """Work started by Prefect with no platform database or object store named: refused, never retried."""


def require_named_stores(settings: Settings, who: str) -> None:
    """Refuse to work under Prefect on the embedded defaults (a SQLite file and a folder in this process's own
    home): a worker started without the platform's settings would write a database and objects nobody else
    sees, and say Completed. Setting them, even to a sqlite:/// URL and a local folder, says so on purpose."""
    missing = [f"DREAMCACHE_{name.upper()}" for name in ("database_url", "objects_url")
               if getattr(settings, name) is None]
    if missing:
        raise EmbeddedDefaults(
            f"{who} has no {' and no '.join(missing)}: under Prefect the platform's database and object store must "
            f"be named, not the embedded defaults in {settings.home}; set {' and '.join(missing)} where its process "
            "gets its environment (the worker's, or the deployment's job_variables), to a sqlite:/// URL and a local "
            "folder if that is meant")


_platforms: dict[str, Platform] = {}


def close_platforms() -> None:
    """Stop every platform's heartbeat and forget them (tests do between settings; a process that exits need not)."""
    for platform in _platforms.values():
        if "heartbeat" in platform.__dict__:  # started
            platform.heartbeat.stop()
    _platforms.clear()


def get_platform(settings: Settings | None = None) -> Platform:
    """The process's platform for these settings (so models load once per worker process); without them, the
    settings are loaded (a bad one: SettingsError, one line naming the variable or the config file and line)."""
    settings = settings or load_settings()
    key = settings.model_dump_json()
    if key not in _platforms:
        _platforms[key] = Platform(settings)
    return _platforms[key]
