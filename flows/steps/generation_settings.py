"""A shot's settings: the one record, hashed into its identity, from which its typed columns are derived."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dreamcache.core.schedulers import SAMPLERS
from flows.steps.shared import sha256

# A number as the run gave it: an int stays an int (`5`, not `5.0`), since the record's JSON is hashed and the
# shots made so far were hashed that way.
Number = int | float


class GenerationSettings(BaseModel):
    """Everything besides cache, prompt and seed that decides a shot (`plan.generation_settings` makes it).

    Its `record` is what `generations.parameters` keeps and `params_sha256` hashes; the typed columns that SQL
    reads (`generation_history`) are derived from it (`columns`), and the generation step reads a shot's
    settings from it, not from the columns. A setting added after the first shots were made is left out of
    the record at its default, so that every shot made before it keeps its identity (and is not made again).
    """

    model_config = ConfigDict(frozen=True)

    guidance: str
    text_scale: Number
    image_scale: Number | None  # None: joint guidance, which has no image scale
    steps: int
    # A `schedulers.SAMPLERS` name, or for the model's own scheduler its class name: the shots made with it
    # were recorded (and hashed) so. `scheduler` is the name to sample with.
    sampler: str
    resolution: int
    base_model_id: str
    adapter_id: str
    base_model_revision: str | None = None  # None: a shot recorded before revisions were
    # Left out of the record at these defaults (see above).
    eta: Number = 0.0
    negative_prompt: str = ""
    deep_reuse_interval: int | None = None  # None or 1: the deep path at every step
    mode: Literal["generate", "place"] = "generate"
    placement: dict[str, Any] | None = None  # place: `dataclasses.asdict(Placement)`, the blend's settings
    negative_category: bool = False  # place: the product's category is part of the negative prompt
    aspect: str | None = None  # a shop format's aspect ratio; None: the square canvas, delivered as generated
    canvas: tuple[int, int] | None = None  # the size it is generated at; None: resolution x resolution
    size: tuple[int, int] | None = None  # the size it is delivered at; None: the canvas

    @property
    def scheduler(self) -> str:
        """The sampler to sample with: a recorded class name is the model's own scheduler."""
        return self.sampler if self.sampler in SAMPLERS else "model"

    @property
    def canvas_size(self) -> tuple[int, int]:
        return self.canvas or (self.resolution, self.resolution)

    @property
    def delivered_size(self) -> tuple[int, int]:
        return self.size or self.canvas_size

    def record(self) -> dict[str, Any]:
        """The settings as `generations.parameters` keeps them: every field that is not at its default."""
        record = self.model_dump(exclude_defaults=True)
        for name in ("canvas", "size"):  # lists, as JSON gives them back
            if name in record:
                record[name] = list(record[name])
        return record

    @property
    def sha256(self) -> str:
        """The settings' part of a shot's identity (`generations.params_sha256`)."""
        return sha256(json.dumps(self.record(), sort_keys=True))

    def columns(self) -> dict[str, Any]:
        """The typed columns of `generations` that these settings set."""
        width, height = self.delivered_size
        return dict(guidance=self.guidance, text_scale=self.text_scale, image_scale=self.image_scale,
                    steps=self.steps, sampler=self.sampler, resolution=self.resolution,
                    base_model_id=self.base_model_id, adapter_id=self.adapter_id, eta=self.eta,
                    negative_prompt=self.negative_prompt, mode=self.mode, aspect=self.aspect or "1:1", width=width,
                    height=height)

    @classmethod
    def of(cls, generation) -> "GenerationSettings":
        """A recorded shot's settings: its record, and for a setting an old record lacks, its column."""
        fallback = dict(guidance=generation.guidance, text_scale=generation.text_scale,
                        image_scale=generation.image_scale, steps=generation.steps, sampler=generation.sampler,
                        resolution=generation.resolution, base_model_id=generation.base_model_id,
                        adapter_id=generation.adapter_id, eta=generation.eta or 0.0,
                        negative_prompt=generation.negative_prompt or "", mode=generation.mode or "generate")
        return cls.model_validate({**fallback, **(generation.parameters or {})})
