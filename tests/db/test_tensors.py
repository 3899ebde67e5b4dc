from datetime import timedelta

import pytest
from sqlalchemy import select

from db.claims import claim, complete
from db.models import SubjectCache, WorkStatus
from db.objects import CorruptObject, LocalStore, ObjectNotFound, open_store
from db.session import transaction
from db.tensors import TensorStore, requeue_cache
from dreamcache.core.cache import FeatureCache
from tests.db import factories as f
from tests.helpers import product_image


@pytest.fixture(scope="module")
def cache_bytes():
    from tests.helpers import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    pipe.load_dreamcache()
    return pipe.cache_subject(product_image()).to_bytes()


@pytest.fixture(params=["local", "s3"])
def tensors(request, tmp_path):
    if request.param == "local":
        return TensorStore(LocalStore(tmp_path / "objects"))
    return TensorStore(open_store(f"s3://{request.getfixturevalue('s3_bucket')}/store"))


def test_caches_are_stored_once_under_their_content_hash(tensors, cache_bytes):
    stored = tensors.put(cache_bytes)
    assert stored.key == f"caches/{stored.sha256[:2]}/{stored.sha256}.safetensors"
    assert tensors.put(cache_bytes) == stored
    assert list(tensors.objects.list("caches/")) == [stored.key]
    loaded = FeatureCache.from_bytes(tensors.get(stored.sha256))
    assert loaded.content_hash == FeatureCache.from_bytes(cache_bytes).content_hash


def test_corrupt_and_missing_caches_are_detected(tensors, cache_bytes):
    stored = tensors.put(cache_bytes)
    damaged = bytearray(cache_bytes)
    damaged[-10] ^= 0xFF
    tensors.objects.put(stored.key, bytes(damaged))  # a bad copy, written under the cache's key
    with pytest.raises(CorruptObject, match=stored.sha256):
        tensors.get(stored.sha256)
    tensors.objects.delete(stored.key)
    with pytest.raises(ObjectNotFound, match=stored.sha256):
        tensors.get(stored.sha256)


def test_a_bad_cache_is_requeued_for_recomputation(sessions, tmp_path, cache_bytes):
    tensors = TensorStore(LocalStore(tmp_path / "objects"))
    stored = tensors.put(cache_bytes)
    with transaction(sessions) as s:
        row = f.cache(s, f.subject(s, "MUG-1"), status=WorkStatus.pending)
        (cache_id,) = claim(s, SubjectCache, "w1", 1, timedelta(minutes=10))
        complete(s, SubjectCache, cache_id, "w1", tensor_uri=stored.uri, sha256=stored.sha256, bytes=stored.size)
    tensors.objects.delete(stored.key)
    with transaction(sessions) as s:
        row = s.get(SubjectCache, cache_id)
        with pytest.raises(ObjectNotFound) as error:
            tensors.get(row.sha256)
        requeue_cache(s, row.id, f"cache object missing: {error.value}")
    with transaction(sessions) as s:
        row = s.scalars(select(SubjectCache)).one()
        assert (row.status, row.tensor_uri, row.sha256) == (WorkStatus.pending, None, None)
        assert "cache object missing" in row.error
        assert claim(s, SubjectCache, "w2", 1, timedelta(minutes=10)) == [row.id]


def test_keys_need_a_real_digest(tensors):
    with pytest.raises(ValueError, match="not a sha256"):
        tensors.get("../../etc/passwd")
