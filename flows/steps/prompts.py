"""Prompts: prompt files read, templates filled per product."""

from __future__ import annotations

import string

from db.models import Subject
from flows.params import CatalogueRunParams, check_prompt
from flows.sources import read_uri


def load_prompts(params: CatalogueRunParams) -> list[str]:
    templates = list(params.prompts)
    if params.prompt_file:
        try:
            lines = read_uri(params.prompt_file).decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompt file {params.prompt_file} is not UTF-8 text (byte {exc.start}): "
                             "save it as UTF-8, one prompt per line") from None
        templates += [check_prompt(line, f"{params.prompt_file} line {n}")
                      for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]
    return list(dict.fromkeys(templates))


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
