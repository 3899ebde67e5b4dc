"""Object storage behind one small interface: `s3://bucket/prefix` or a local directory.

S3 (or MinIO, or any S3-compatible endpoint) goes through boto3: endpoint, region and credentials
come from the standard AWS environment and config files (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, ...),
never from this project's settings or logs. Throttling, 5xx answers and dropped connections are
retried with exponential backoff by botocore's standard retry mode; large objects go up in
multipart uploads. Every object records its sha256, and reads verify it.

Keys are relative, '/'-separated, and can never leave the store's root or prefix.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import urlparse

SHA256_METADATA = "sha256"  # stored as x-amz-meta-sha256 on S3, a sidecar attribute locally
MULTIPART_THRESHOLD = 16 * 1024 * 1024
# A request whose connection takes longer than this, or whose answer stalls for longer than this, is
# abandoned and retried (botocore's own defaults are 60 s each: a stuck request would hold a worker a
# minute per attempt). Read when a store is opened, so tests and operators can tune them.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
# Temporary files and multipart uploads older than this were left by a writer that died (a write
# in flight takes seconds): cleaned up at the start of each run.
STALE_AFTER_S = 3600
MAX_ATTEMPTS = 8  # per request, first attempt included: the standard mode's backoff caps each wait at 20 s


class ObjectStoreError(RuntimeError):
    """An object is missing, corrupt, or could not be written; the message names its URI."""


class ObjectNotFound(ObjectStoreError, KeyError):
    pass


class ObjectWriteError(ObjectStoreError):
    """A local store's write failed (a full disk, a read-only folder); nothing of it is left behind."""


class CorruptObject(ObjectStoreError):
    pass


# S3 error codes that no retry can fix (the bucket, key, name or credentials are wrong): such a request fails
# at once, and the run's tasks do not retry it (flows/platform/failures.py). Throttling, 5xx and dropped connections
# are retried, by botocore and then by the tasks.
PERMANENT_S3_CODES = frozenset({
    "NoSuchKey", "NoSuchBucket", "NoSuchUpload", "AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden",
    "403", "404", "NotFound", "InvalidBucketName", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidObjectState",
    "InvalidArgument", "InvalidRequest", "InvalidRange", "KeyTooLongError", "MethodNotAllowed", "NoCredentials",
})
# What each kind of request needs in an IAM policy, and how a message names it.
_S3_PERMISSION = {"read": "s3:GetObject", "write": "s3:PutObject", "list": "s3:ListBucket", "delete": "s3:DeleteObject"}
_S3_DOING = {"read": "download of", "write": "upload of", "list": "listing of", "delete": "deletion of"}


class S3Error(ObjectStoreError):
    """An S3 request that failed: the message names s3://bucket/key, S3's error code and what to do;
    `permanent` says whether a retry could help."""

    def __init__(self, message: str, uri: str, code: str, permanent: bool):
        super().__init__(message)
        self.uri, self.code, self.permanent = uri, code, permanent

    def __reduce__(self):  # picklable (a Prefect task's failure travels between processes)
        return type(self), (self.args[0], self.uri, self.code, self.permanent)


class S3ObjectMissing(S3Error, ObjectNotFound):
    """NoSuchKey: the object does not exist (still an ObjectNotFound for the code that handles those)."""

    def __str__(self) -> str:  # not KeyError's quoted form
        return self.args[0]


def _s3_code(exc: BaseException) -> str:
    """S3's error code of a botocore/boto3 error (or one it caused), or '' for a connection-level failure."""
    for error in (exc, exc.__cause__, exc.__context__):
        response = getattr(error, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    found = re.search(r"An error occurred \((\w+)\)", str(exc))  # boto3's upload errors keep only the text
    if found:
        return found[1]
    return "NoCredentials" if type(exc).__name__ == "NoCredentialsError" else ""


def s3_error(exc: BaseException, bucket: str, key: str = "", action: str = "read") -> S3Error:
    """A botocore/boto3 error as an S3Error naming s3://bucket/key, the error code and what to do.

    `action` is the kind of request: read, write, list (key: the prefix) or delete."""
    uri = f"s3://{bucket}/{key}"
    code = _s3_code(exc)
    doing = f"{_S3_DOING.get(action, action)} {uri} failed"
    permanent = code in PERMANENT_S3_CODES
    if code in ("NoSuchKey", "404", "NotFound") and action in ("read", "delete"):
        return S3ObjectMissing(f"{uri} does not exist ({code})", uri, code, True)
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and action == "list"):
        message = f"{doing}: bucket {bucket!r} does not exist ({code}); check the bucket name"
    elif code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
        resource = f"arn:aws:s3:::{bucket}" if action == "list" else f"arn:aws:s3:::{bucket}/{key}"
        message = (f"{doing}: access denied ({code}); the worker's credentials lack "
                   f"{_S3_PERMISSION.get(action, 's3:*')} on {resource}")
    elif code == "InvalidBucketName":
        message = f"{doing}: {bucket!r} is not a valid bucket name ({code}); check the URL"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "NoCredentials"):
        message = (f"{doing}: the credentials were refused or are missing ({code}); check AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) of the worker")
    else:
        response = getattr(exc, "response", None) or {}
        detail = response.get("Error", {}).get("Message") or str(exc)
        message = f"{doing}: " + (f"{code}: {detail}" if code and code not in detail else detail)
    return S3Error(" ".join(message.split()), uri, code, permanent)


@contextmanager
def s3_errors(bucket: str, key: str = "", action: str = "read"):
    """Inside: botocore and boto3 errors become S3Errors naming s3://bucket/key (see `s3_error`)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        raise s3_error(exc, bucket, key, action) from exc


@dataclass(frozen=True)
class StoredObject:
    key: str
    uri: str
    size: int
    sha256: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_if_changed(store: "ObjectStore", key: str, data: bytes,
                   content_type: str = "application/octet-stream") -> StoredObject:
    """Write `data` at `key` unless the store holds those bytes already (a re-run rewrites nothing)."""
    try:
        unchanged = store.get(key) == data
    except ObjectNotFound:
        unchanged = False
    if unchanged:
        return StoredObject(key=clean_key(key), uri=store.uri(key), size=len(data), sha256=sha256_hex(data))
    return store.put(key, data, content_type)


def clean_key(key: str) -> str:
    """The key itself if it is a plain relative path; an error if it could escape the store's root."""
    parts = key.split("/")
    if not key or "\x00" in key or "\\" in key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"invalid object key {key!r}: use a relative '/'-separated path without empty, '.' or '..' parts"
        )
    return key


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject: ...
    def get(self, key: str, expected_sha256: str | None = None) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def sizes(self, prefix: str = "") -> dict[str, int]: ...
    def uri(self, key: str) -> str: ...
    def key_of(self, uri: str) -> str: ...
    def public_url(self, key: str, expires_s: int = 3600) -> str: ...
    def remove_stale_temporaries(self, older_than_s: float = STALE_AFTER_S) -> int: ...


def _verify(uri: str, data: bytes, expected: str | None) -> bytes:
    if expected is not None and sha256_hex(data) != expected:
        raise CorruptObject(f"{uri} is corrupt: sha256 {sha256_hex(data)[:12]}... expected {expected[:12]}...")
    return data


def _write(file, data: bytes) -> None:
    """The bytes of a local write (one place, where a test injects a full disk)."""
    file.write(data)


def _write_failed(path: Path, exc: OSError) -> str:
    """One line naming the object and why its write failed, and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"writing {path.as_uri()} failed: {reason}; free space on the object store's disk and run again "
                "(what was made before is kept)")
    return f"writing {path.as_uri()} failed: {reason}"


class LocalStore:
    """A directory: writes are atomic (temporary file, then rename)."""

    # A write in flight is a dot-file beside its target: `.<name>.<random>`.
    _TEMPORARY = re.compile(r"^\.[^/]+\.[A-Za-z0-9_]{8}$")

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / clean_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink inside the root pointing out of it
            raise ValueError(f"object key {key!r} resolves outside {self.root}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        prefix = self.root.as_uri() + "/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri} is not in the object store {self.url}")
        return clean_key(uri[len(prefix):])

    def public_url(self, key: str, expires_s: int = 3600) -> str:
        return self.uri(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
                _write(tmp, data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp.name, path)
        except BaseException as exc:
            # A write that fails leaves nothing behind: a partial temporary on a full disk holds the very space
            # the next write needs (and the target, replaced only by a whole file, is as it was).
            if tmp is not None:
                Path(tmp.name).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise ObjectWriteError(_write_failed(path, exc)) from exc
            raise
        return StoredObject(clean_key(key), path.as_uri(), len(data), sha256_hex(data))

    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{path.as_uri()} does not exist") from None
        return _verify(path.as_uri(), data, expected_sha256)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def remove_stale_temporaries(self, older_than_s: float = STALE_AFTER_S) -> int:
        """Delete what writes killed mid-way left behind (their temporary files), not writes in flight;
        returns how many."""
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.root.rglob(".*"):
            if path.is_file() and self._TEMPORARY.match(path.name) and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from self.sizes(prefix)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Key -> size in bytes of every object under `prefix` (one walk: what a re-run checks its shots by)."""
        folder = prefix.rpartition("/")[0]
        start = self._path(folder) if folder else self.root
        found = {}
        for path in sorted(start.rglob("*")):
            if path.is_file() and not path.name.startswith("."):  # dot-files are in-flight writes
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found[key] = path.stat().st_size
        return found


class S3Store:
    """`s3://bucket/prefix` through boto3, with retries, multipart uploads and sha256 checks."""

    def __init__(self, url: str, client=None, max_attempts: int | None = None, public_endpoint_url: str | None = None):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if client is None:
            import boto3
            from botocore.config import Config

            # Standard retry mode: throttling (SlowDown), 5xx, timeouts and dropped connections are
            # retried with jittered exponential backoff. AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, where an
            # operator sets them, win over this project's defaults, as for any AWS client.
            retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                       "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", max_attempts or MAX_ATTEMPTS))}
            client = boto3.client(
                "s3",
                config=Config(retries=retries, connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                              tcp_keepalive=True),
            )
        self.client = client
        self.public_endpoint_url = public_endpoint_url

    @cached_property
    def _presigner(self):
        """The client that signs links for browsers: the store's own, or one for the endpoint as browsers reach it
        (`public_endpoint_url`: in the compose stack workers write to http://minio:9000, a name only containers
        know). A signature covers the host, so the link is signed for that endpoint, not rewritten afterwards."""
        if not self.public_endpoint_url:
            return self.client
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.public_endpoint_url, region_name=self.client.meta.region_name,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def key_of(self, uri: str) -> str:
        prefix = f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri} is not in the object store {self.url}")
        return clean_key(uri[len(prefix):])

    def public_url(self, key: str, expires_s: int = 3600) -> str:
        with s3_errors(self.bucket, self._key(key), "read"):
            return self._presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
            )

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        from boto3.s3.transfer import TransferConfig

        digest = sha256_hex(data)
        full_key = self._key(key)
        try:
            self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, full_key,
                ExtraArgs={"ContentType": content_type, "Metadata": {SHA256_METADATA: digest}},
                Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD),
            )
        except Exception as exc:
            raise s3_error(exc, self.bucket, full_key, "write") from exc
        return StoredObject(clean_key(key), f"s3://{self.bucket}/{full_key}", len(data), digest)

    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        uri = self.uri(key)
        attempts = (self.client.meta.config.retries or {}).get("total_max_attempts") or MAX_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except (BotoCoreError, ClientError) as exc:  # botocore retried what a retry can fix already
                raise s3_error(exc, self.bucket, self._key(key), "read") from exc
            try:
                data = response["Body"].read()
                break
            except BotoCoreError as exc:
                # The answer began but its body broke off (dropped connection, stalled stream,
                # fewer bytes than announced): botocore retries requests, not bodies, so do it here.
                if attempt == attempts:
                    raise S3Error(f"download of {uri} failed after {attempts} attempts: {exc}", uri, "",
                                  False) from exc
                time.sleep(random.random() * min(0.05 * 2**attempt, 5))
        recorded = response.get("Metadata", {}).get(SHA256_METADATA)
        _verify(uri, data, recorded)
        return _verify(uri, data, expected_sha256)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise s3_error(exc, self.bucket, self._key(key), "read") from exc

    def delete(self, key: str) -> None:
        with s3_errors(self.bucket, self._key(key), "delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def remove_stale_temporaries(self, older_than_s: float = STALE_AFTER_S) -> int:
        """Abort multipart uploads under the prefix that a killed writer left open (their parts cost
        storage until aborted); returns how many."""
        from datetime import datetime, timezone

        cutoff, removed = datetime.now(timezone.utc).timestamp() - older_than_s, 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        with s3_errors(self.bucket, f"{self.prefix}/" if self.prefix else "", "list"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        removed += 1
        return removed

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from self.sizes(prefix)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Key -> size in bytes of every object under `prefix` (a listing: a thousand objects a request)."""
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        with s3_errors(self.bucket, root + prefix, "list"):
            return {item["Key"][len(root):]: item["Size"]
                    for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix)
                    for item in page.get("Contents", [])}


def open_store(url: str, public_endpoint_url: str | None = None) -> ObjectStore:
    """`s3://bucket/prefix` -> S3Store (its links for browsers signed for `public_endpoint_url` when given);
    `file:///path` or a plain path -> LocalStore."""
    if url.startswith("s3://"):
        return S3Store(url, public_endpoint_url=public_endpoint_url)
    if url.startswith("file://"):
        return LocalStore(urlparse(url).path)
    if "://" in url:
        raise ValueError(f"unsupported object storage URL {url!r}: use s3://bucket/prefix or a local path")
    return LocalStore(url)
