"""Prompts: prompt files read, templates filled per product."""

from __future__ import annotations

import string
from typing import NamedTuple

from db.models import Subject
from flows.params import CatalogueRunParams, check_prompt
from flows.places import InvalidInputs, MissingInput, Places

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
    templates, rejected = list(params.prompts), []
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
                templates.append(check_prompt(line, f"line {n}"))
            except ValueError as exc:
                rejected.append((f"{params.prompt_file} line {n}", str(exc).removeprefix(f"line {n} ")))
        if not templates:
            raise InvalidInputs(f"{name} holds no usable prompt: every line was rejected "
                             f"({rejected[0][0]}: {rejected[0][1]})")
    return Prompts(list(dict.fromkeys(templates)), rejected)


def render_prompt(template: str, subject: Subject) -> str:
    """The template with {sku}, {category} and manifest fields filled in; an unknown {field} stays as written.

    Only plain {name} fields: str.format's {x.attr}, {x[i]} and {x:>999999999} would let a template
    reach object attributes or build enormous strings, so they are refused with the template named.
    """
    fields = {**{k: str(v) for k, v in (subject.attributes or {}).items()},
              "sku": subject.sku, "category": subject.category or "product"}
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt template {template!r} is not valid ({exc}): write a literal brace as {{{{ or }}}}") \
            from None
    parts = []
    for literal, name, spec, conversion in parsed:
        parts.append(literal)
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"prompt template {template!r}: {{{name}}} is not a plain field; use {{sku}}, "
                             "{category} or a manifest column, without '.', '[', '!' or ':'")
        parts.append(fields.get(name, "{" + name + "}"))
    return check_prompt("".join(parts), f"prompt {template!r} for {subject.sku}")
