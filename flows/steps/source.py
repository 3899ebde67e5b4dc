"""Where products come from: an S3 prefix, a local folder, or a manifest; and reading any URI."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from flows.platform.places import (MANIFEST_SUFFIXES, InvalidInputs, MissingInput, OutsidePlaces, Places, locate, open_resolved,
                          read_s3)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Photo formats a catalogue may hold that the platform does not read: rejected by name, not passed over.
UNREAD_IMAGE_SUFFIXES = {".avif", ".heic", ".heif", ".jxl", ".jp2", ".svg", ".psd", ".raw", ".cr2", ".nef", ".dng"}
REQUIRED_COLUMNS = ("sku", "image_uri")
# A manifest is read whole; 100 MB holds about a million rows.
MAX_MANIFEST_BYTES = 100_000_000
# Far above any catalogue photo (a 100-megapixel PNG is ~300 MB raw, far less compressed); a larger file
# is refused before it is read whole.
MAX_IMAGE_BYTES = 200_000_000
# The database's column sizes (db/models.py): longer values would fail a whole batch's insert.
MAX_SKU_CHARS, MAX_CATEGORY_CHARS, MAX_URI_CHARS = 255, 255, 1024


@dataclass(frozen=True)
class SourceItem:
    sku: str
    uri: str
    category: str | None = None
    attributes: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Listing:
    items: list[SourceItem]
    rejected: list[tuple[str, str]]  # (item, reason)
    skipped: list[str] = field(default_factory=list)  # files of a folder or prefix that are not images


def read_uri(uri: str) -> bytes:
    """Bytes of an s3:// URI, a file:// URI or a local path, unconfined: for what the operator names (a
    training config's data, a product's recorded source). What a run's parameters name goes through
    `Places.read` instead."""
    location = locate(uri)
    if location.is_s3:
        return read_s3(location.bucket, location.key)
    return Path(urlparse(uri).path if uri.startswith("file://") else uri).read_bytes()


def list_source(source: str, places: Places | None = None) -> Listing:
    """Every product of a source; items that cannot be used (or lie outside the run's places) are rejected
    with their reason. Without `places`, the source's own folder or prefix is the only place."""
    places = places or Places.for_run(source, [])
    places.check(source, f"source {source}")
    if Path(urlparse(source).path).suffix.lower() in MANIFEST_SUFFIXES:
        return _manifest(source, places)
    if source.startswith("s3://"):
        images, skipped = _s3_images(source)
        listing = _unique(images)
        listing.skipped = skipped
        return listing
    folder = Path(urlparse(source).path if source.startswith("file://") else source).expanduser().absolute()
    if not folder.is_dir():
        raise MissingInput(f"source {source} is neither a folder, an s3:// prefix nor a .csv/.jsonl manifest")
    found, unlisted, skipped = _folder_images(places.check(str(folder), f"source {source}").path, f"source {source}")
    images, outside = [], []
    for relative in found:
        try:
            places.check(str(folder / relative), f"{relative} (a link)")
        except OutsidePlaces as exc:  # a symlink out of the catalogue: refused, and not followed
            outside.append((relative, str(exc)))
            continue
        images.append(_item(relative, str(folder / relative)))
    listing = _unique(images)
    listing.rejected[:0] = unlisted + outside
    listing.skipped = skipped
    return listing


# Deeper than any catalogue's categories; a deeper tree is refused folder by folder, not walked.
MAX_FOLDER_DEPTH = 32


def _folder_images(path: str, what: str) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """The image files under the folder at the resolved `path` (relative, sorted), and the folders that could
    not be listed with their reason. The walk goes from each folder's descriptor and never follows a link:
    a link with an image's name is listed (where it points is checked later, as for any item, whether or
    not its target exists); a link to a folder is not entered."""
    found, unlisted, skipped = [], [], []

    def walk(fd: int, prefix: str, depth: int) -> None:
        try:
            with os.scandir(fd) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            unlisted.append((prefix or ".", f"folder cannot be listed ({exc.strerror}); it is skipped"))
            return
        for entry in entries:
            relative = prefix + entry.name
            image = Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
            if Path(entry.name).suffix.lower() in UNREAD_IMAGE_SUFFIXES:
                unlisted.append((relative, f"{Path(entry.name).suffix.lower()} images are not read; convert it to "
                                           "PNG, JPEG or WebP"))
                continue
            try:
                if entry.is_symlink() or (image and entry.is_file(follow_symlinks=False)):
                    if image:
                        found.append(relative)
                elif entry.is_file(follow_symlinks=False):
                    if not _hidden(Path(relative)):  # not an image: counted and named in the summary
                        skipped.append(relative)
                elif entry.is_dir(follow_symlinks=False):
                    if depth >= MAX_FOLDER_DEPTH:
                        unlisted.append((relative, f"folder is deeper than {MAX_FOLDER_DEPTH} levels; it is skipped"))
                        continue
                    child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        walk(child, relative + "/", depth + 1)
                    finally:
                        os.close(child)
            except OSError as exc:  # replaced or removed while listed
                unlisted.append((relative, f"changed while the folder was listed ({exc.strerror}); it is skipped"))

    root = open_resolved(path, what, folder=True)
    try:
        walk(root, "", 0)
    finally:
        os.close(root)
    return sorted(found, key=lambda relative: relative.split("/")), unlisted, sorted(skipped)


def _hidden(relative: Path) -> bool:
    """A dot file or folder (.DS_Store, .git): not the catalogue's, not counted as skipped."""
    return any(part.startswith(".") for part in relative.parts)


def _problem(sku: str, uri: str, category: str | None) -> str | None:
    """Why an item cannot be recorded (the database would refuse it, or it would be ambiguous), or None."""
    if any(not ch.isprintable() for ch in sku):
        return f"SKU {sku!r} contains control characters; use printable characters only"
    if len(sku) > MAX_SKU_CHARS:
        return f"SKU {sku[:40]!r}... has {len(sku)} characters, more than {MAX_SKU_CHARS}"
    if category is not None and len(category) > MAX_CATEGORY_CHARS:
        return f"category of {sku!r} has {len(category)} characters, more than {MAX_CATEGORY_CHARS}"
    if len(uri) > MAX_URI_CHARS or "\x00" in uri:
        return f"image URI of {sku!r} is longer than {MAX_URI_CHARS} characters or contains a NUL byte"
    return None


def _unique(items: list[SourceItem]) -> Listing:
    """A folder or prefix listing with unusable items rejected, and one image per SKU (the first)."""
    kept, rejected, first = [], [], {}
    for item in items:
        problem = _problem(item.sku, item.uri, item.category)
        if problem is None and item.sku in first:
            problem = f"duplicate SKU {item.sku!r}: {first[item.sku]} has it already; rename one of them"
        if problem:
            rejected.append((item.uri, problem))
            continue
        first[item.sku] = item.uri
        kept.append(item)
    return Listing(kept, rejected)


def _item(relative: str, uri: str) -> SourceItem:
    """SKU from the file name; category from the folder it sits in, if any."""
    parts = relative.split("/")
    return SourceItem(sku=Path(parts[-1]).stem, uri=uri, category=parts[-2] if len(parts) > 1 else None)


def _s3_images(source: str) -> tuple[list[SourceItem], list[str]]:
    """The images under an S3 prefix, and the other keys (skipped)."""
    import boto3

    parsed = urlparse(source)
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):  # a prefix is a folder: s3://shop/catalogue never lists catalogue-private/
        prefix += "/"
    items, skipped = [], []
    from db.objects import s3_errors  # S3's errors as one line naming the bucket, prefix, code and what to do

    with s3_errors(parsed.netloc, prefix, "list"):
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc, Prefix=prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix):].lstrip("/")
                if Path(obj["Key"]).suffix.lower() in IMAGE_SUFFIXES:
                    items.append(_item(relative, f"s3://{parsed.netloc}/{obj['Key']}"))
                elif relative and not obj["Key"].endswith("/") and not _hidden(Path(relative)):
                    skipped.append(relative)
    return sorted(items, key=lambda i: i.uri), sorted(skipped)


def _manifest(source: str, places: Places) -> Listing:
    try:
        text = places.read(source, f"manifest {source}", limit=MAX_MANIFEST_BYTES).decode("utf-8-sig")
    except FileNotFoundError:
        raise MissingInput(f"manifest {source} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputs(f"manifest {source} is not UTF-8 text (byte {exc.start}): save it as UTF-8 CSV or JSON "
                         "lines") from None
    # One row is one item: a row that cannot be read is rejected with its line, and the run goes on.
    if source.lower().endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    row = {"__error__": f"not valid JSON ({exc.msg})"}
                except RecursionError:
                    row = {"__error__": "nested too deeply to read; give one flat JSON object a line"}
                if not isinstance(row, dict):
                    kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(row), "a number")
                    row = {"__error__": f"{kind}, not a JSON object; give one JSON object a line"}
                rows.append((n, row))
        columns = set().union(*(r.keys() for _, r in rows if "__error__" not in r)) if rows else set()
    else:
        reader = csv.DictReader(io.StringIO(text))
        try:
            header = reader.fieldnames or []
        except csv.Error as exc:
            raise InvalidInputs(f"manifest {source} line 1 (its header) cannot be read ({exc})") from None
        columns = set(header)
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise InvalidInputs(f"manifest {source} names the column(s) {', '.join(map(repr, twice))} twice; "
                                "keep one of each")
        rows = []
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # a field over the csv module's limit, a NUL byte, ...
                row = {"__error__": f"not a readable CSV row ({exc})"}
            if None in row:  # more fields than the header has columns
                row = {"__error__": f"{len(row[None])} more field(s) than the header's {len(header)} columns; "
                                    "quote values that hold commas"}
            rows.append((line, row))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InvalidInputs(f"manifest {source} lacks the column(s) {', '.join(missing)} (it has: {sorted(columns)})")
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    items, rejected, skus = [], [], {}  # sku -> (line, image URI) of its first row
    for line, row in rows:
        label = f"{source} line {line}"
        if "__error__" in row:
            rejected.append((label, row["__error__"]))
            continue
        sku, uri = str(row.get("sku") or "").strip(), str(row.get("image_uri") or "").strip()
        if not sku or not uri:
            rejected.append((label, "empty sku or image_uri"))
            continue
        if "://" not in uri and not uri.startswith("/"):
            uri = f"{base}/{uri}"  # relative to the manifest (other schemes are refused when read)
        try:
            places.check(uri, "its image_uri")
        except (OutsidePlaces, ValueError) as exc:
            rejected.append((label, str(exc)))
            continue
        if skus.get(sku, (None, None))[1] == uri:
            rejected.append((label, f"duplicate of line {skus[sku][0]} (same SKU and image)"))
            continue
        category = str(row.get("category") or "").strip() or None
        problem = _problem(sku, uri, category)
        if problem is None and sku in skus:
            problem = (f"duplicate SKU {sku!r}: line {skus[sku][0]} gives it another image; "
                       "one image per SKU, give this one its own SKU")
        if problem:
            rejected.append((label, problem))
            continue
        skus[sku] = (line, uri)
        extra = {k: v for k, v in row.items() if k not in ("sku", "image_uri", "category") and v not in (None, "")}
        items.append(SourceItem(sku=sku, uri=uri, category=category, attributes=extra))
    return Listing(items, rejected)
