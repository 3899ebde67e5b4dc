"""Text shown in Prefect's markdown (run artifacts, a paused run's review form) as itself."""

from __future__ import annotations

import re


def md(text: str) -> str:
    """Text (a SKU, a URI, a reason) shown as itself in markdown: no emphasis, link, HTML or table cell break."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|~])", r"\\\1", " ".join(str(text).split()))


def plain(text: str) -> str:
    """Text for a link's or picture's label, where the UI shows escapes as typed: only what would end it removed."""
    return re.sub(r"[\\\[\]<>]", "", " ".join(str(text).split()))
