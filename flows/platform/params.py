"""The parameters of a catalogue run: one pydantic model, rendered by the Prefect UI as a validated form."""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dreamcache.core.schedulers import SAMPLERS, TAKES_ETA
from dreamcache.perception.metrics import METRICS
from dreamcache.core.adapter_config import AUTHORS_INFERENCE, Recommended
from dreamcache.core.guidance import (
    COMBINED, DEFAULT_GUIDANCE, DEFAULT_TEXT_SCALE, JOINT, MAX_IMAGE_SCALE, MAX_TEXT_SCALE, Guidance,
)

MAX_PROMPT_CHARS = 1000
MAX_FORMATS = 8
# An object key prefix a run writes or publishes under: plain parts, no '.' or '..' (checked apart).
PREFIX_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,200}"
# Where the platform keeps its own objects (ingest's copies, cut-outs, feature caches): no run writes or publishes there.
RESERVED_PREFIXES = ("products", "subjects", "caches")
PUBLISH_PREFIX = "published"  # where `dreamcache publish` copies a run's approved shots unless told otherwise
MAX_LONG_SIDE = 4096

# The checks below, written again in JSON Schema, travel with the deployment's parameter schema: the Prefect server
# validates a run's parameters against it (the UI's form as well as the API), so a run that these checks would
# refuse is refused before it exists. Python's validators stay the source of the messages; tests/flows/
# test_params_schema.py keeps both in step. Not expressible there, and checked when the run starts: a format's
# aspect ratio (1:4 to 4:1), two formats that are the same once normalised, publish and output prefixes that
# contain one another.
_PRINTABLE = r"[^\s\x00-\x1f\x7f-\x9f]"  # a character a prompt keeps (check_prompt): not space, not control
_TEMPLATE = r"(?:[^{}]|\{\{|\}\}|\{[^\W\d]\w*\})*"  # literal text, {{ }} and plain {name} fields (template_fields)
_SIDE = r"(?:0?[1-9]|[1-9]\d)"
_LONG_SIDE = r"(?:0{1,5}|0{0,3}(?:6[4-9]|[7-9]\d)|0{0,2}[1-9]\d{2}|0?(?:[1-3]\d{3}|40[0-8]\d|409[0-6]))"
_SCORE = r"-?0*(?:0(?:\.\d+)?|1(?:\.0+)?)"  # -1 to 1, as parse_rule reads it
_END = r"$(?!\n)"  # the very end: Python's `$` also matches before a final newline
_PREFIX = (r"(?!(?:" + "|".join(RESERVED_PREFIXES) + r")(?:/|$))(?!.*(?:^|/)\.{1,2}(?:/|$))(?!.*//)(?!.*/$)"
           + PREFIX_PATTERN)


class Format(NamedTuple):
    """A shop's image format: an aspect ratio, and the long side of the delivered image in pixels (0: the
    generated canvas as it is). Written `W:H` or `W:H@long side`, e.g. `4:5@1080`, `16:9@1920`."""

    width: int
    height: int
    long_side: int = 0

    @classmethod
    def parse(cls, text: str) -> "Format":
        match = re.fullmatch(r"\s*(\d{1,2})\s*[:x]\s*(\d{1,2})\s*(?:@\s*(\d{1,5}))?\s*", text)
        if not match:
            raise ValueError(f"format {text!r} is not W:H or W:H@long side, e.g. 4:5@1080 or 16:9")
        width, height, long_side = int(match[1]), int(match[2]), int(match[3] or 0)
        if not (width and height) or max(width, height) > 4 * min(width, height):
            raise ValueError(f"format {text!r}: the aspect ratio must lie between 1:4 and 4:1")
        if long_side and not 64 <= long_side <= MAX_LONG_SIDE:
            raise ValueError(f"format {text!r}: the long side must be 64 to {MAX_LONG_SIDE} pixels")
        return cls(width, height, long_side)

    @property
    def aspect(self) -> str:
        return f"{self.width}:{self.height}"

    def __str__(self) -> str:
        return self.aspect + (f"@{self.long_side}" if self.long_side else "")

    def size(self, canvas: tuple[int, int]) -> tuple[int, int]:
        """The delivered image's (width, height): the long side given, the aspect exact; else the canvas's."""
        if not self.long_side:
            return canvas
        if self.width >= self.height:
            return self.long_side, max(1, round(self.long_side * self.height / self.width))
        return max(1, round(self.long_side * self.width / self.height)), self.long_side


SQUARE = Format(1, 1)  # the default format: the model's square canvas, delivered as generated


def shop_formats(texts: list[str]) -> list[Format]:
    """Formats as written in a run's parameters, parsed; the square default when none is given."""
    return [Format.parse(text) for text in texts] or [SQUARE]


def parse_rule(text: str) -> tuple[str, float]:
    """A review rule, `metric>=value` (e.g. `mdino>=0.5`), as (metric, value)."""
    match = re.fullmatch(r"\s*([a-z_]+)\s*>=\s*(-?\d+(?:\.\d+)?)\s*", text)
    if not match:
        raise ValueError(f"review rule {text!r} is not metric>=value, e.g. mdino>=0.5")
    metric, value = match[1], float(match[2])
    if metric not in METRICS:
        raise ValueError(f"review rule {text!r}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"review rule {text!r}: scores lie between -1 and 1")
    return metric, value


def in_reading_order(schema: dict) -> None:
    """Number a form's fields in the order they are declared (`position`, which the Prefect UI sorts by).

    The schema's key order is not enough: a Prefect server whose database is PostgreSQL keeps the schema as
    JSONB, which stores an object's keys by length, and the form would read eta, mode, seed, steps, ...
    """
    for position, field in enumerate(schema.get("properties", {}).values()):
        field["position"] = position


def _run_schema(schema: dict) -> None:
    """The run form's schema: in reading order, with the model validator's checks (`_some_prompts`) that JSON
    Schema can say, as `if`/`then` (which the UI's form passes by, and the server checks)."""
    in_reading_order(schema)
    # No prompt file: prompts are needed.
    schema["if"] = {"not": {"required": ["prompt_file"], "properties": {"prompt_file": {"minLength": 1}}}}
    schema["then"] = {"required": ["prompts"], "properties": {"prompts": {"minItems": 1}}}
    # An eta above 0: the sampler is ddim, or the preset's.
    schema["dependentSchemas"] = {"eta": {"if": {"properties": {"eta": {"exclusiveMinimum": 0}}},
                                          "then": {"properties": {"sampler": {"enum": [*TAKES_ETA, "preset"]}}}}}


class CatalogueRunParams(BaseModel):
    """A catalogue run: which products, which prompts, how many shots, with which sampler settings.

    The fields are in the order a person fills the Prefect form: what, how many, how, where. A 0 in
    steps, images per prompt, text scale, image scale or resolution, the sampler 'preset' and an empty
    negative prompt mean "the model's": the model records what it is meant to be sampled with (its adapter
    config's `recommended`; docs/models.md), and the run takes it (`with_recommended`), as the library
    takes it for an argument left None. (The form cannot show None: an optional field renders as a
    'None' widget in the Prefect UI, so the run spells "unset" as 0.)
    """

    model_config = ConfigDict(json_schema_extra=_run_schema)

    # What
    source: str = Field(
        description="Products: an S3 prefix (s3://bucket/catalogue/), a local folder (category sub-folders "
        "optional; the file name is the SKU), or a manifest (.csv or .jsonl with sku, category, image_uri). "
        "It must lie in a place the operator allows (DREAMCACHE_ALLOWED_SOURCES).",
        min_length=1,
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompt templates; {category}, {sku} and manifest fields are filled in per product.",
        json_schema_extra={"items": {"type": "string", "maxLength": MAX_PROMPT_CHARS,
                                     "pattern": f"^(?=[\\s\\S]*{_PRINTABLE}){_TEMPLATE}{_END}"}},
    )
    prompt_file: str = Field(
        default="", description="A text file or URI with one prompt template per line, used after `prompts` "
        "(in an allowed place, at most 1 MB)."
    )
    # How many
    images_per_prompt: int = Field(default=0, ge=0, le=64, description="Shots per product and prompt; 0: the model's.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="First seed.")
    seed_policy: Literal["fixed", "per-product"] = Field(
        default="fixed",
        description="fixed: every product uses seeds seed, seed+1, ...; per-product: offset by a hash of the SKU.",
    )
    # What the shop gets
    mode: Literal["generate", "place"] = Field(
        default="generate",
        description="generate: the product drawn by the model in the scene, free to turn and move; place: the product "
        "photo kept pixel-exact at placement_x/y and placement_scale, the scene generated around it.")
    placement_x: float = Field(default=0.5, ge=0.0, le=1.0,
                               description="place: the product's centre, as a fraction of the image width.")
    placement_y: float = Field(default=0.55, ge=0.0, le=1.0,
                               description="place: the product's centre, as a fraction of the image height.")
    placement_scale: float = Field(
        default=0.6, gt=0.0, le=1.0,
        description="place: the product's size, as a fraction of the largest size that fits the image (never cropped).")
    shadow: Literal["none", "soft"] = Field(
        default="soft", description="place: a soft contact shadow under the product (composited), or none.")
    formats: list[str] = Field(
        default_factory=list, max_length=MAX_FORMATS,
        description="Aspect ratios and sizes, each W:H or W:H@long side in pixels, e.g. 1:1@1024, 4:5@1080, 16:9@1920: "
        "each is generated at the model's resolution on its short side and resized (never cropped). Empty: square "
        "at the model's resolution.",
        json_schema_extra={"uniqueItems": True, "items": {
            "type": "string", "pattern": f"^\\s*{_SIDE}\\s*[:x]\\s*{_SIDE}\\s*(?:@\\s*{_LONG_SIDE})?\\s*{_END}"}})
    cutout: bool = Field(default=False, description="Also write each product's transparent cut-out (PNG).")
    packshot: bool = Field(default=False, description="Also write each product on white in each format (PNG).")
    # How
    preset: Literal["model", "authors"] = Field(
        default="model",
        description="Where the settings left at 0 or 'preset' come from: the model's recommended ones, or the authors' "
        f"released inference ({AUTHORS_INFERENCE.sampler.upper()} {AUTHORS_INFERENCE.steps} steps, eta "
        f"{AUTHORS_INFERENCE.eta:g}, image scale {AUTHORS_INFERENCE.image_scale:g}, their negative prompt for the "
        "unconditional passes and the cache, the reference photo stretched to the square, the VAE posterior sampled; "
        "docs/models.md).",
    )
    sampler: Literal["preset", *SAMPLERS] = Field(
        default="preset", description="The scheduler: " + ", ".join(SAMPLERS) + " (model: the base model's own); "
        "preset: the preset's (for the bundled model UniPC, 10 steps).")
    eta: float = Field(default=0.0, ge=0.0, le=1.0,
                       description="DDIM's noise: 0 deterministic (DDIM only); with the preset's sampler, 0 takes the "
                       "preset's eta.")
    negative_prompt: str = Field(
        default="", max_length=MAX_PROMPT_CHARS,
        description="Text of the unconditional passes and of the cache; empty: the preset's (none for the model "
        "preset unless the model recommends one). Caches are made once per text.",
        json_schema_extra={"pattern": f"^(?:\\s*|[\\s\\S]*{_PRINTABLE}[\\s\\S]*){_END}"})
    guidance: Guidance = Field(
        default=DEFAULT_GUIDANCE,
        description=f"{COMBINED}: 3 UNet passes a step, separate image and text scales; {JOINT}: 2, one scale.",
    )
    text_scale: float = Field(
        default=0.0, ge=0.0, le=MAX_TEXT_SCALE,
        description=f"Text guidance scale; 0: the model's ({DEFAULT_TEXT_SCALE:g} unless it recommends another).")
    image_scale: float = Field(
        default=0.0, ge=0.0, le=MAX_IMAGE_SCALE,
        description=f"Image guidance scale ({COMBINED} only): higher keeps more of the product; 0: the model's "
        f"working point (the authors' {AUTHORS_INFERENCE.image_scale:g} on Stable Diffusion, 5 for the bundled model).")
    steps: int = Field(default=0, ge=0, le=500, description="Denoising steps per image; 0: the model's.")
    deep_reuse_interval: int = Field(
        default=0, ge=0, le=10,
        description="Reuse the UNet's deep features across steps: its deep path every N steps, the shallow path and "
        "the cache every step (fewer FLOPs, lower fidelity at few steps: BENCHMARKS.md). 1: no reuse; 0: the model's "
        "(no reuse for the bundled model).")
    resolution: int = Field(
        default=0, ge=0, le=2048, multiple_of=8, description="Image side in pixels (at least 64); 0: the model's native.",
        json_schema_extra={"not": {"exclusiveMinimum": 0, "exclusiveMaximum": 64}},
    )
    # Where
    output_prefix: str = Field(
        default="shots", pattern=f"^{PREFIX_PATTERN}$",
        description="Key prefix of the images, sidecars and contact sheets in the object store.",
        json_schema_extra={"pattern": f"^{_PREFIX}{_END}"},
    )
    execution: Literal["in-process", "task-workers"] = Field(
        default="in-process",
        description="in-process: this flow run generates; task-workers: batches go to long-lived GPU workers "
        "(`dreamcache worker`), one per GPU, each loading the model once.",
    )
    batch_size: int = Field(default=16, ge=1, le=64, description="Images per generation task.")
    shard_size: int = Field(
        default=2048, ge=1, le=100_000, description="Images per child run; larger catalogues are sharded."
    )
    compare_text_only: bool = Field(
        default=False,
        description="Also generate, beside each shot, the text-only shot of its prompt and seed (no cache), and "
        "show the pairs on the contact sheets. Not part of a shot's identity: turning it on regenerates nothing, "
        "and shots made without it stay without.",
    )
    # Review and publishing
    approve_if: list[str] = Field(
        default_factory=list, max_length=len(METRICS),
        description="Score rules a shot must pass to be approved without a reviewer, e.g. mdino>=0.5, clip_t>=0.25 "
        f"(metrics: {', '.join(METRICS)}). The rest waits for review.",
        json_schema_extra={
            "items": {"type": "string", "pattern": f"^\\s*(?:{'|'.join(METRICS)})\\s*>=\\s*{_SCORE}\\s*{_END}"},
            # one rule per metric (`not`, which the UI's form passes by: it renders allOf and anyOf as fields)
            "not": {"anyOf": [{"contains": {"pattern": f"^\\s*{metric}\\s*>="}, "minContains": 2}
                              for metric in METRICS]}})
    keep_best: int = Field(
        default=0, ge=0, le=64,
        description="Approve at most this many shots per product, prompt and format: the best (by masked DINO, else "
        "DINO, else masked CLIP-I, else CLIP-I) among those that pass approve_if (0: every shot that passes; with no "
        "rule and 0, a reviewer decides everything).")
    review: Literal["later", "pause"] = Field(
        default="later",
        description="later: shots wait for `dreamcache review`; pause: the flow run pauses for a reviewer's decision in "
        "the Prefect UI (Prefect runs only), then publishes.")
    review_timeout_minutes: int = Field(
        default=60, ge=1, le=7 * 24 * 60,
        description="pause: how long the run waits for the decision; then it ends and the shots wait for review.")
    publish_prefix: str = Field(
        default="", pattern=f"^$|^{PREFIX_PATTERN}$",
        description="After review, copy the approved shots to this prefix with a CSV and JSON manifest (as "
        "`dreamcache publish`); empty: do not publish.",
        json_schema_extra={"pattern": f"^(?:{_PREFIX})?{_END}"})
    dry_run: bool = Field(default=False, description="List and validate inputs and plan the work; write nothing.")

    @property
    def shop_formats(self) -> list[Format]:
        return shop_formats(self.formats)

    @property
    def approval_rules(self) -> list[tuple[str, float]]:
        return [parse_rule(text) for text in self.approve_if]

    def with_recommended(self, recommended: Recommended) -> "CatalogueRunParams":
        """These parameters with every setting left to the model (`LEFT_TO_MODEL`, at its default) replaced by
        the model's value, filled by `Recommended.resolve` as a library call's None is (resolution stays 0 until
        the model is loaded: its native size is the pipeline's). A ValueError names a setting the model's
        sampler does not take."""
        given = {name: None if getattr(self, name) == CatalogueRunParams.model_fields[name].default
                 else getattr(self, name) for name in LEFT_TO_MODEL}
        settings = recommended.resolve(**given)
        filled = {name: getattr(settings, name) for name in LEFT_TO_MODEL}
        filled["deep_reuse_interval"] = settings.deep_reuse_interval or 1  # the library's None (no reuse) is 1 here
        return self.model_copy(update=filled)

    def recommended(self, model: Recommended) -> Recommended:
        """The settings this run's preset stands for: the model's, or the authors' released inference."""
        return AUTHORS_INFERENCE if self.preset == "authors" else model

    @field_validator("prompt_file", mode="before")
    @classmethod
    def _no_prompt_file(cls, value):
        return "" if value is None else value  # runs recorded before 0.2 wrote None

    @field_validator("negative_prompt")
    @classmethod
    def _clean_negative(cls, text: str) -> str:
        return check_prompt(text, "negative_prompt") if text.strip() else ""

    @field_validator("prompts")
    @classmethod
    def _clean_prompts(cls, prompts: list[str]) -> list[str]:
        cleaned = [check_prompt(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
        for i, template in enumerate(cleaned):
            try:
                template_fields(template)
            except ValueError as exc:
                raise ValueError(f"prompt {i + 1}: {exc}") from None
        return cleaned

    @field_validator("output_prefix", "publish_prefix")
    @classmethod
    def _plain_prefix(cls, prefix: str, info) -> str:
        return check_prefix(prefix, info.field_name) if prefix else prefix

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        parsed = [str(Format.parse(text)) for text in formats]
        repeated = sorted({f for f in parsed if parsed.count(f) > 1})
        if repeated:
            raise ValueError(f"format {repeated[0]} is given twice")
        return parsed

    @field_validator("approve_if")
    @classmethod
    def _rules(cls, rules: list[str]) -> list[str]:
        parsed = [parse_rule(text) for text in rules]
        metrics = [metric for metric, _ in parsed]
        if len(set(metrics)) != len(metrics):
            raise ValueError("give each metric one rule")
        return [f"{metric}>={value:g}" for metric, value in parsed]

    @field_validator("resolution")
    @classmethod
    def _usable_resolution(cls, resolution: int) -> int:
        if 0 < resolution < 64:
            raise ValueError(f"resolution {resolution} is below 64 pixels; give 64 or more, or 0 for the model's")
        return resolution

    @model_validator(mode="after")
    def _some_prompts(self) -> "CatalogueRunParams":
        if not self.prompts and not self.prompt_file:
            raise ValueError("give prompts, a prompt_file, or both")
        if self.publish_prefix and prefix_overlap(self.publish_prefix, self.output_prefix):
            raise ValueError(f"publish_prefix {self.publish_prefix!r} and output_prefix {self.output_prefix!r} must not "
                             "contain one another: the shop's folder holds approved shots only")
        if self.eta and self.sampler not in (*TAKES_ETA, "preset"):  # the preset's sampler: checked once resolved
            raise ValueError(f"eta {self.eta} applies to the {' or '.join(TAKES_ETA)} sampler only, not "
                             f"{self.sampler!r}: set eta to 0")
        return self


# The settings a run may leave to the model: the recommended ones (`Recommended`'s fields) that are run parameters
# too. Each is left by its default (0, the sampler 'preset', an empty negative prompt), the one "unset" of the
# run's parameters; the reference mode and the latent are not parameters: they are always the preset's.
LEFT_TO_MODEL = tuple(field.name for field in dataclasses.fields(Recommended)
                      if field.name in CatalogueRunParams.model_fields)


def check_prefix(prefix: str, name: str) -> str:
    """An object key prefix of plain parts, outside the platform's own; or an error naming it."""
    if any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{name} {prefix!r} must not have empty, '.' or '..' parts")
    if prefix.split("/")[0] in RESERVED_PREFIXES:
        raise ValueError(f"{name} {prefix!r} lies in the platform's own {prefix.split('/')[0]}/: choose another prefix")
    return prefix


def prefix_overlap(a: str, b: str) -> bool:
    """Whether one key prefix contains the other (or they are the same)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def template_fields(template: str) -> list[str]:
    """The fields a template names, in order; a template that is not valid, or names a field other than a plain
    {name}, is refused with the template named.

    Only plain {name} fields: str.format's {x.attr}, {x[i]} and {x:>999999999} would let a template reach
    object attributes or build enormous strings.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt template {template!r} is not valid ({exc}): write a literal brace as {{{{ or }}}}") \
            from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"prompt template {template!r}: {{{name}}} is not a plain field; use {{sku}}, "
                             "{category} or a manifest column, without '.', '[', '!' or ':'")
        names.append(name)
    return names


def check_prompt(prompt: str, name: str) -> str:
    """A prompt without control characters, not empty, not enormous; or an error naming it."""
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in prompt).split())
    if not cleaned:
        raise ValueError(f"{name} is empty")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} has {len(cleaned)} characters, more than {MAX_PROMPT_CHARS}")
    return cleaned
