"""Prompts: prompt files read, templates filled per product."""

from __future__ import annotations

import string
from typing import NamedTuple

from db.models import Subject
from flows.platform.params import CatalogueRunParams, check_prompt, template_fields
from flows.platform.places import InvalidInputs, MissingInput, Places

MAX_PROMPT_FILE_BYTES = 1_000_000


class Prompts(NamedTuple):
    templates: list[str]
    rejected: list[tuple[str, str]]  # (file and line, reason)


def load_prompts(params: CatalogueRunParams, places: Places) -> Prompts:
    """The run's prompt templates, de-duplicated in order: `prompts`, then the prompt file's lines.

    The prompt file must lie in the run's places, be text and hold at most 1 MB; `#` lines and blank
    lines are skipped. A bad line (too long, say) is rejected with its line number and the others are
    used; a missing or unreadable file, or one with no usable line, stops the run before any work.
    """
    templates, rejected = [], []
    templates += params.prompts  # checked by CatalogueRunParams: text, and plain {name} fields
    if params.prompt_file:
        name = f"prompt file {params.prompt_file}"
        try:
            data = places.read(params.prompt_file, name, limit=MAX_PROMPT_FILE_BYTES)
        except FileNotFoundError:
            raise MissingInput(f"{name} does not exist") from None
        except IsADirectoryError:
            raise InvalidInputs(f"{name} is a folder; give a text file with one prompt per line") from None
        try:
            text = data.decode("utf-8-sig")
            if "\x00" in text:
                raise ValueError("NUL byte")
        except (UnicodeDecodeError, ValueError):
            raise InvalidInputs(f"{name} is not text: save it as UTF-8, one prompt per line") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
                 if line.strip() and not line.lstrip().startswith("#")]
        if not lines:
            raise InvalidInputs(f"{name} holds no prompts: write one prompt per line")
        for n, line in lines:
            try:
                template = check_prompt(line, f"line {n}")
                template_fields(template)
            except ValueError as exc:
                rejected.append((f"{params.prompt_file} line {n}", str(exc).removeprefix(f"line {n} ")))
                continue
            templates.append(template)
        if not templates:
            raise InvalidInputs(f"{name} holds no usable prompt: every line was rejected "
                             f"({rejected[0][0]}: {rejected[0][1]})")
    return Prompts(list(dict.fromkeys(templates)), rejected)


class MissingColumn(ValueError):
    """A template names a field (a manifest column) that a product does not have."""


def product_fields(sku: str, category: str | None, attributes: dict | None) -> dict[str, str]:
    """What a template may name for a product: its manifest columns (those with a value), sku and category."""
    return {**{k: str(v) for k, v in (attributes or {}).items() if v not in (None, "")},
            "sku": sku, "category": category or "product"}


def missing_columns(template: str, fields: dict[str, str]) -> list[str]:
    return [name for name in dict.fromkeys(template_fields(template)) if name not in fields]


def render_prompt(template: str, subject: Subject) -> str:
    """The template with {sku}, {category} and manifest columns filled in for a product.

    A field the product has no value for raises MissingColumn naming the product, the template and the
    column: that product is rejected for that template (with the reason), never the run.
    """
    fields = product_fields(subject.sku, subject.category, subject.attributes)
    missing = missing_columns(template, fields)
    if missing:
        raise MissingColumn(missing_reason(template, subject.sku, missing, fields))
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            parts.append(fields[name])
    return check_prompt("".join(parts), f"prompt {template!r} for {subject.sku}")


def missing_reason(template: str, sku: str, missing: list[str], fields: dict[str, str]) -> str:
    columns = ", ".join(sorted(set(fields) - {"sku", "category"})) or "none besides sku and category"
    names = ", ".join(f"'{name}'" for name in missing)
    return (f"prompt template {template!r} names the column {names}, which {sku} has no value for (its columns: "
            f"{columns}); add the column to the manifest or use another template")


def check_templates(items, templates: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Before any work: each product checked against each template it will be given.

    Returns the SKUs that no template can be filled for (the product is rejected: it would make nothing) and a
    rejection (item, reason) per product and template that names a column the product lacks."""
    rejected, unusable = [], []
    for item in items:
        fields = product_fields(item.sku, item.category, item.attributes)
        usable = 0
        for template in templates:
            missing = missing_columns(template, fields)
            if missing:
                rejected.append((f"{item.sku}: {template}", missing_reason(template, item.sku, missing, fields)))
            else:
                usable += 1
        if not usable:
            unusable.append(item.sku)
    return unusable, rejected
