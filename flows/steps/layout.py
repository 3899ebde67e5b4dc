"""Where a run's objects live: every object key the steps write or read, in one place.

A later step (or `verify`) finds an earlier step's objects by these names, so that no step imports
another for a key. Keys are relative to the object store's root; a SKU is made safe for a key by
`safe_key_part` (a hostile SKU cannot climb out of its prefix: tests/reliability/test_security.py).
"""

from __future__ import annotations

from datetime import datetime

from flows.platform.resources import safe_key_part


def product_key(content_sha256: str) -> str:
    """Where ingest keeps its copy of a product image: by content, so one copy serves every SKU that has it."""
    return f"products/{content_sha256[:2]}/{content_sha256}"


def segmentation_folder(content_sha256: str, method: str) -> str:
    """A product image's mask and reference, per segmentation method: shared by every SKU with that image."""
    return f"subjects/{content_sha256}/{safe_key_part(method)}"


def mask_key(folder: str) -> str:
    return f"{folder}/mask.png"


def reference_key(folder: str, resolution: int) -> str:
    """The product cut out on white at the model's resolution: what its features are cached from."""
    return f"{folder}/reference-{resolution}.png"


def sku_folder(prefix: str, sku: str) -> str:
    """A product's folder under a run's output prefix (shots, sheets, cut-outs) or the shop's (published)."""
    return f"{prefix}/{safe_key_part(sku)}"


def output_key(prefix: str, sku: str, identity: str) -> str:
    """A shot, named by (a prefix of) its generation's identity hash: the same shot always has the same key."""
    return f"{sku_folder(prefix, sku)}/{identity[:20]}.png"


def sidecar_key(shot_key: str) -> str:
    """A shot's JSON sidecar: beside the shot."""
    return shot_key.removesuffix(".png") + ".json"


def text_only_key(shot_key: str) -> str:
    """Where a shot's text-only twin (same prompt and seed, no cache) is stored: beside the shot."""
    return shot_key.removesuffix(".png") + ".text-only.png"


def contact_sheet_key(prefix: str, sku: str) -> str:
    return f"{sku_folder(prefix, sku)}/contact_sheet.png"


def cutout_key(prefix: str, sku: str) -> str:
    return f"{sku_folder(prefix, sku)}/cutout.png"


def packshot_key(prefix: str, sku: str, size: tuple[int, int]) -> str:
    return f"{sku_folder(prefix, sku)}/packshot-{size[0]}x{size[1]}.png"


def published_key(prefix: str, sku: str, shot_key: str) -> str:
    """A published copy keeps the shot's file name under the shop's prefix."""
    return f"{sku_folder(prefix, sku)}/{shot_key.rsplit('/', 1)[-1]}"


def manifest_name(prefix: str) -> str:
    """The shop prefix's manifest (`.csv` and `.json` are added): every shot published there now."""
    return f"{prefix}/manifest"


def publication_name(prefix: str, at: datetime, run_id: int) -> str:
    """One publication's own manifest (`.csv`, `.json`): what it added."""
    return f"{prefix}/publications/{at.strftime('%Y%m%dT%H%M%S.%fZ')}-run-{run_id}"
