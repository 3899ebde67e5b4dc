import os
import urllib.request

import boto3
import pytest

from db import objects
from db.objects import CorruptObject, LocalStore, ObjectNotFound, S3Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/runs/2026")


def test_put_get_list_delete(store):
    stored = store.put("shots/MUG-1/0.png", b"\x89PNG data", content_type="image/png")
    assert stored.size == 9 and stored.sha256 == objects.sha256_hex(b"\x89PNG data")
    assert stored.uri == store.uri("shots/MUG-1/0.png")
    store.put("shots/MUG-1/1.png", b"two")
    store.put("caches/ab/cd.safetensors", b"three")
    assert store.get("shots/MUG-1/0.png", expected_sha256=stored.sha256) == b"\x89PNG data"
    assert list(store.list("shots/")) == ["shots/MUG-1/0.png", "shots/MUG-1/1.png"]
    assert store.exists("caches/ab/cd.safetensors") and not store.exists("caches/ab/none")
    store.delete("shots/MUG-1/1.png")
    assert list(store.list("shots/")) == ["shots/MUG-1/0.png"]
    with pytest.raises(ObjectNotFound, match="shots/MUG-1/1.png does not exist"):
        store.get("shots/MUG-1/1.png")


def test_a_wrong_hash_is_reported(store):
    store.put("a.bin", b"payload")
    with pytest.raises(CorruptObject, match="a.bin is corrupt"):
        store.get("a.bin", expected_sha256=objects.sha256_hex(b"something else"))


@pytest.mark.parametrize("key", ["../escape.png", "/etc/passwd", "a/../../b", "a/./b", "", "a\\b", "dir/"])
def test_keys_cannot_escape_the_root(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_local_symlinks_out_of_the_root_are_refused(tmp_path):
    store = LocalStore(tmp_path / "objects")
    store.put("inside.txt", b"x")
    (tmp_path / "objects" / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="resolves outside"):
        store.put("link/outside.txt", b"x")


def test_s3_objects_changed_behind_our_back_are_detected(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/p")
    store.put("cache.safetensors", b"original")
    # Overwrite the bytes but keep the recorded hash, as a bad copy or a partial write would.
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/cache.safetensors", Body=b"tampered",
                                  Metadata={"sha256": objects.sha256_hex(b"original")})
    with pytest.raises(CorruptObject, match=f"s3://{s3_bucket}/p/cache.safetensors is corrupt"):
        store.get("cache.safetensors")


def test_large_objects_go_up_in_parts(s3_bucket, monkeypatch):
    monkeypatch.setattr(objects, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    store = S3Store(f"s3://{s3_bucket}")
    data = os.urandom(12 * 1024 * 1024)
    store.put("big.bin", data)
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag names its part count
    assert store.get("big.bin") == data


def test_throttling_and_server_errors_are_retried(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}")
    failures = {"left": 3}

    def inject(**kwargs):  # answer the first attempts with 503 SlowDown before they reach the server
        if failures["left"]:
            failures["left"] -= 1
            from botocore.awsrequest import AWSResponse

            class Raw:
                def stream(self, **_):
                    yield b"<Error><Code>SlowDown</Code><Message>Reduce your request rate</Message></Error>"

            return AWSResponse(kwargs["request"].url, 503, {}, Raw())
        return None

    store.client.meta.events.register("before-send.s3.PutObject", inject)
    store.put("retried.txt", b"made it")
    assert failures["left"] == 0 and store.get("retried.txt") == b"made it"


def test_presigned_urls_serve_the_object(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/sheets")
    store.put("MUG-1.png", b"contact sheet", content_type="image/png")
    with urllib.request.urlopen(store.public_url("MUG-1.png", expires_s=60)) as response:
        assert response.read() == b"contact sheet"


def test_presigned_urls_are_signed_for_the_public_endpoint(s3_bucket, s3_endpoint):
    """The store writes through its endpoint (AWS_ENDPOINT_URL, 127.0.0.1 here) and signs links for the one a
    browser reaches (localhost here: the same server under another name, as minio:9000 and localhost:9000)."""
    public = s3_endpoint.replace("127.0.0.1", "localhost")
    store = open_store(f"s3://{s3_bucket}/sheets", public_endpoint_url=public)
    store.put("MUG-1.png", b"contact sheet", content_type="image/png")
    url = store.public_url("MUG-1.png", expires_s=60)
    assert url.startswith(f"{public}/{s3_bucket}/sheets/MUG-1.png?"), url
    assert store.client.meta.endpoint_url == s3_endpoint  # the platform's own reads and writes stay where they were
    with urllib.request.urlopen(url) as response:  # the signature holds for the public host
        assert response.read() == b"contact sheet"


def test_open_store_understands_the_urls(tmp_path, s3_endpoint):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(tmp_path.as_uri()), LocalStore)
    assert open_store("s3://bucket/a/b/").url == "s3://bucket/a/b"
    with pytest.raises(ValueError, match="unsupported object storage URL 'gs://x'"):
        open_store("gs://x")


def test_temporaries_left_by_dead_writers_are_removed_and_writes_in_flight_kept(tmp_path):
    store = LocalStore(tmp_path / "objects")
    store.put("shots/MUG-1/0.png", b"done")
    folder = tmp_path / "objects" / "shots" / "MUG-1"
    stale, in_flight = folder / ".1.png.k3j2h1g0", folder / ".2.png.a1b2c3d4"
    stale.write_bytes(b"half a png")
    in_flight.write_bytes(b"being written")
    hour_ago = os.path.getmtime(stale) - 2 * objects.STALE_AFTER_S
    os.utime(stale, (hour_ago, hour_ago))
    assert store.remove_stale_temporaries() == 1
    assert not stale.exists() and in_flight.exists() and store.get("shots/MUG-1/0.png") == b"done"


def test_multipart_uploads_left_open_by_dead_writers_are_aborted(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/runs")
    client = boto3.client("s3")
    client.create_multipart_upload(Bucket=s3_bucket, Key="runs/shots/big.png")
    client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/not-ours.bin")
    # moto dates every upload's Initiated in 2010, so here each one is stale; the age rule itself is
    # the local store's test above, the same comparison.
    assert store.remove_stale_temporaries() == 1
    open_keys = [u["Key"] for u in client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])]
    assert open_keys == ["elsewhere/not-ours.bin"]  # outside the store's prefix: not ours to abort


def full_disk_after(limit: int):
    """An injected fault: a local write that puts `limit` bytes on the disk, then fails as a full disk does."""
    import errno

    def write(file, data):
        file.write(data[:limit])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_a_write_on_a_full_disk_leaves_nothing_behind_and_says_so(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "objects")
    store.put("shots/MUG-1/0.png", b"the shot as first written")
    monkeypatch.setattr(objects, "_write", full_disk_after(5))
    with pytest.raises(objects.ObjectWriteError) as failed:
        store.put("shots/MUG-1/0.png", b"a shot made again, longer than the first")
    with pytest.raises(objects.ObjectWriteError):
        store.put("shots/MUG-2/0.png", b"a new shot")
    assert str(failed.value) == (f"writing {store.uri('shots/MUG-1/0.png')} failed: No space left on device; free "
                                 "space on the object store's disk and run again (what was made before is kept)")
    files = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    assert files == ["shots/MUG-1/0.png"]  # no temporary, no partial object
    assert store.get("shots/MUG-1/0.png") == b"the shot as first written"  # what was there is kept whole
