"""Where a run may read: the places the operator allows, and reading inside them only.

A run's parameters come from whoever can start a run (the Prefect form, a schedule, the CLI), and what
it reads can end up in outputs (a prompt file's lines become prompts, sidecars and contact-sheet text;
an image becomes a product). So every source, manifest image and prompt file is checked against the
allowed places before it is read:

- the setting `allowed_sources` (`DREAMCACHE_ALLOWED_SOURCES`: local folders and `s3://bucket/prefix`),
  when the operator sets it; the run's source must lie in one of them;
- otherwise the catalogue's own folder or prefix (a manifest's folder) and the project's examples.

Local paths are resolved (symlinks, `..`) before the check, so no link leads out of a place; S3 keys
with `.` or `..` parts are refused outright (S3 does not resolve them, but proxies and SDKs may).
A checked local file is then opened once, along its resolved path, one component at a time from `/`
without following any link (`O_NOFOLLOW` from each folder's descriptor), and what was opened is
checked with `fstat`: a folder swapped for a link between the check and the read (a race) is refused,
never followed, and no path is looked up twice.
Refusals name the rule and the item as given, never the resolved target: whether a file exists
outside the allowed places is not something a run can find out.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from dreamcache.core.errors import DreamCacheError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # flows/examples
MANIFEST_SUFFIXES = (".csv", ".jsonl")
URI_SCHEMES = ("s3://", "file://")
RULE_SETTING = "DREAMCACHE_ALLOWED_SOURCES"
RULE_DEFAULT = (f"a run reads only its catalogue's own folder or prefix and the project's examples; the operator "
                f"allows more with {RULE_SETTING}")

CHANGED = ("changed while it was read (a link appeared in its path): it is not read; run again once the catalogue "
           "is not being changed")


class OutsidePlaces(DreamCacheError, PermissionError):
    """A source, image or prompt file outside the places the operator allows."""


class InvalidInputs(DreamCacheError, ValueError):
    """A run's inputs that leave it nothing to do: a source or prompt file missing, empty or unreadable.
    Found before any work; the message names the input and says what to do."""


class MissingInput(InvalidInputs, FileNotFoundError):
    """A source or prompt file that does not exist."""


@dataclass(frozen=True)
class Location:
    """A parsed URI: an S3 object or prefix (`bucket`, `key`), or a resolved local path (`path`)."""

    bucket: str = ""
    key: str = ""
    path: str = ""

    @property
    def is_s3(self) -> bool:
        return bool(self.bucket)

    def within(self, root: "Location") -> bool:
        if self.is_s3 != root.is_s3:
            return False
        if self.is_s3:
            prefix = root.key.rstrip("/")
            return self.bucket == root.bucket and (
                not prefix or self.key == prefix or self.key.startswith(prefix + "/"))
        return self.path == root.path or self.path.startswith(root.path.rstrip(os.sep) + os.sep)


def locate(uri: str) -> Location:
    """Where a URI points: S3 bucket and key, or a local path with symlinks and `..` resolved."""
    scheme = urlparse(uri).scheme
    if len(scheme) > 1 and not uri.startswith(URI_SCHEMES):  # (one letter: a Windows drive, a path)
        raise ValueError(f"{uri}: unsupported URI scheme {scheme}://; use s3://, file:// or a local path")
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        key = parsed.path.lstrip("/")
        if not parsed.netloc:
            raise ValueError(f"{uri}: an S3 URI needs a bucket (s3://bucket/key)")
        if any(part in (".", "..") for part in key.split("/")):
            raise ValueError(f"{uri}: S3 keys with '.' or '..' parts are refused; give the key as stored")
        return Location(bucket=parsed.netloc, key=key)
    path = urlparse(uri).path if uri.startswith("file://") else uri
    return Location(path=os.path.realpath(os.path.expanduser(path)))


def _folder_of(source: str) -> str:
    """A source's own place: the folder or prefix itself, or a manifest's folder."""
    if Path(urlparse(source).path).suffix.lower() in MANIFEST_SUFFIXES:
        return source.rsplit("/", 1)[0] + "/" if "/" in source else "."
    return source


@dataclass(frozen=True)
class Places:
    """The places one run may read, and the rule they come from (said in every refusal)."""

    roots: tuple[Location, ...]
    rule: str

    @classmethod
    def for_run(cls, source: str, allowed: Sequence[str]) -> "Places":
        """The operator's places when set (the source must lie in one); else the source's own and the examples."""
        if allowed:
            places = cls(tuple(locate(root) for root in allowed),
                         f"a run reads only the places in {RULE_SETTING}; ask the operator to add it there")
            places.check(source, f"source {source}")
            return places
        return cls((locate(_folder_of(source)), locate(str(EXAMPLES))), RULE_DEFAULT)

    def check(self, uri: str, what: str) -> Location:
        """Where `uri` points, if that is inside an allowed place; else OutsidePlaces naming `what` and the rule."""
        try:
            location = locate(uri)
        except OSError:  # a link in the path replaced while it was resolved
            raise OutsidePlaces(f"{what} {CHANGED}") from None
        if not any(location.within(root) for root in self.roots):
            raise OutsidePlaces(f"{what} is outside the places this run may read: {self.rule}")
        return location

    def read(self, uri: str, what: str, limit: int | None = None) -> bytes:
        """The bytes at `uri`, checked first; with `limit`, more bytes than that is an error naming `what`."""
        location = self.check(uri, what)
        if location.is_s3:
            data = read_s3(location.bucket, location.key, limit)
        else:
            with os.fdopen(open_resolved(location.path, what), "rb") as f:
                data = f.read(limit + 1 if limit else -1)
        if limit is not None and len(data) > limit:
            raise InvalidInputs(f"{what} is larger than {limit:,} bytes")
        return data


def open_resolved(path: str, what: str, folder: bool = False) -> int:
    """A read-only descriptor of the regular file (or with `folder`, the folder) at the resolved `path`, opened
    one component at a time from `/` without following links: a component that is (or has just become) a
    link is refused, not followed. Errors name `what`, never the resolved path; a missing file is
    FileNotFoundError, as open() gives."""
    parts = [part for part in path.split(os.sep) if part]
    fd = os.open(os.sep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last and not folder else os.O_DIRECTORY)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), what) from None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise OutsidePlaces(f"{what} {CHANGED}") from None
                raise OSError(exc.errno, os.strerror(exc.errno), what) from None
            os.close(fd)
            fd = child
        if not (stat.S_ISDIR if folder else stat.S_ISREG)(os.fstat(fd).st_mode):
            raise InvalidInputs(f"{what} is not a {'folder' if folder else 'regular file'}")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_s3(bucket: str, key: str, limit: int | None = None) -> bytes:
    """An S3 object's bytes (with `limit`, at most limit + 1 of them: enough to tell it is too large)."""
    import boto3

    from db.objects import s3_errors  # S3's errors as one line naming s3://bucket/key, the code and what to do

    extra = {"Range": f"bytes=0-{limit}"} if limit else {}
    with s3_errors(bucket, key, "read"):
        return boto3.client("s3").get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
