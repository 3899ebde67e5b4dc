"""The tensor store: feature caches as safetensors under content-addressed keys.

A cache's key is derived from the sha256 of its bytes, so the same cache is stored once however
many rows point at it, and a key always names the same bytes. The database row records URI,
size and sha256; every read verifies the hash. A missing or corrupt cache is reported and its
row put back to pending, so the next run recomputes it.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import SubjectCache, WorkStatus
from db.objects import CorruptObject, ObjectNotFound, ObjectStore, StoredObject, sha256_hex

CONTENT_TYPE = "application/vnd.safetensors"


class TensorStore:
    def __init__(self, objects: ObjectStore, prefix: str = "caches"):
        self.objects = objects
        self.prefix = prefix.strip("/")

    def key(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return f"{self.prefix}/{sha256[:2]}/{sha256}.safetensors"

    def put(self, data: bytes) -> StoredObject:
        """Store cache bytes (safetensors) under their content hash.

        If the key already holds these bytes nothing is written; if it holds anything else (a
        corrupt or truncated copy) it is overwritten, which is how a damaged cache gets repaired.
        """
        digest = sha256_hex(data)
        key = self.key(digest)
        try:
            self.objects.get(key, expected_sha256=digest)
            return StoredObject(key, self.objects.uri(key), len(data), digest)
        except (ObjectNotFound, CorruptObject):
            return self.objects.put(key, data, content_type=CONTENT_TYPE)

    def get(self, sha256: str) -> bytes:
        """The cache bytes, verified against their hash (raises ObjectNotFound or CorruptObject)."""
        return self.objects.get(self.key(sha256), expected_sha256=sha256)


def requeue_cache(session: Session, cache_id: int, reason: str) -> None:
    """Forget a cache whose object is missing or corrupt, so that it is computed again."""
    session.execute(
        update(SubjectCache)
        .where(SubjectCache.id == cache_id)
        .values(status=WorkStatus.pending, tensor_uri=None, sha256=None, bytes=None, claimed_by=None,
                lease_expires_at=None, error=reason[:4000])
        .execution_options(synchronize_session=False)
    )
