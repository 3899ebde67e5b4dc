"""Subject and prompt fidelity, as the paper measures them, with masked variants.

- CLIP-I: cosine of CLIP ViT-B/32 image embeddings, generated vs reference.
- CLIP-T: cosine of the generated image's CLIP embedding and its prompt's CLIP text embedding.
- DINO: cosine of DINO ViT-S/16 global embeddings (the CLS token of the last layer), generated vs reference.
- MCLIP-I, MDINO: the same on segmented subjects: the generated image is segmented with the
  platform's segmenter (prompted with the subject's category), the reference likewise, and each
  subject is put on white, cropped to its box and padded square before embedding.

Values are raw cosines in [-1, 1] (the paper's tables print them as such, not x100), computed in float32.
Preprocessing is each model's own image processor, loaded with it: for the public checkpoints,
CLIP resizes the short side to 224 (bicubic), centre-crops 224 and normalises with CLIP's mean and
std; DINO resizes to 224 and normalises with ImageNet's. Models load from a local directory or a hub
id; a metric whose model is not configured is not computed, never filled with a placeholder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from dreamcache.perception.metrics import METRICS, RANKING, canonical_name, metric_name, ranking_key  # noqa: F401
from dreamcache.perception.segmentation import Segmenter, SegmentationError, doubts_logged_at_info

logger = logging.getLogger(__name__)

MASKED_SIZE = 224  # side of the square a segmented subject is padded to before embedding


@dataclass(frozen=True)
class Score:
    metric: str  # "dino", "clip_i", "clip_t"
    masked: bool
    value: float
    scorer_model_id: str

    @property
    def name(self) -> str:
        return metric_name(self.metric, self.masked)


class ClipEmbedder:
    def __init__(self, model: str, device: torch.device):
        from transformers import AutoProcessor, CLIPModel

        self.model_id = model
        # float32 whatever the checkpoint holds (the bundled CLIP is saved in float16): scores are
        # compared across runs and machines, and CPUs run half precision slowly if at all.
        self.model = CLIPModel.from_pretrained(model, dtype=torch.float32).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)


class DinoEmbedder:
    def __init__(self, model: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel

        self.model_id = model
        self.model = AutoModel.from_pretrained(model, add_pooling_layer=False, dtype=torch.float32).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        hidden = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state
        return F.normalize(hidden[:, 0].float(), dim=-1)  # the CLS token: DINO's global embedding


class Scorer:
    """Scores batches of generated images against their references and prompts."""

    def __init__(self, clip_model: str | None = None, dino_model: str | None = None,
                 segmenter: Segmenter | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
        device = torch.device(device)
        self.clip = ClipEmbedder(clip_model, device) if clip_model else None
        self.dino = DinoEmbedder(dino_model, device) if dino_model else None
        self.segmenter = segmenter
        self.batch_size = batch_size
        missing = [name for name, m in (("CLIP (DREAMCACHE_CLIP_MODEL)", self.clip),
                                        ("DINO (DREAMCACHE_DINO_MODEL)", self.dino)) if m is None]
        if missing:
            logger.warning("no %s model configured: those scores are not recorded", " or ".join(missing))
        if segmenter is None:
            logger.warning("no segmenter given: masked scores (MDINO, MCLIP-I) are not recorded")

    @property
    def available(self) -> bool:
        return self.clip is not None or self.dino is not None

    def masked_subject(self, image: Image.Image, category: str | None, name: str) -> Image.Image | None:
        """The subject cut out on white, or None when it cannot be segmented.

        Logged at info, not as a warning: a shot without its product is the generator's miss, not a fault,
        and the shot simply has no masked scores (a catalogue run counts them in its summary)."""
        try:
            with doubts_logged_at_info():  # a fragmented or small mask on a shot still scores; no warning each
                return self.segmenter.segment(image, category, name).subject_on_white(image, MASKED_SIZE)
        except SegmentationError as exc:
            logger.info("masked scores skipped: %s", exc)
            return None

    def score(
        self,
        generated: Sequence[Image.Image],
        references: Sequence[Image.Image],
        prompts: Sequence[str],
        categories: Sequence[str | None] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[list[Score]]:
        """Scores per generated image; each reference and prompt is the one of the same index."""
        n = len(generated)
        if not (len(references) == len(prompts) == n):
            raise ValueError(f"got {n} images, {len(references)} references and {len(prompts)} prompts")
        categories = list(categories or [None] * n)
        names = list(names or [f"image {i}" for i in range(n)])
        scores: list[list[Score]] = [[] for _ in range(n)]
        for start in range(0, n, self.batch_size):
            part = slice(start, start + self.batch_size)
            self._score_batch(generated[part], references[part], prompts[part], categories[part], names[part],
                              scores[part])
        return scores

    def _score_batch(self, generated, references, prompts, categories, names, out) -> None:
        def record(metric, masked, model, values, rows):
            for row, value in zip(rows, values.tolist()):
                out[row].append(Score(metric, masked, float(value), model.model_id))

        everyone = range(len(generated))
        if self.clip:
            gen = self.clip.images(generated)
            record("clip_i", False, self.clip, (gen * self.clip.images(references)).sum(-1), everyone)
            record("clip_t", False, self.clip, (gen * self.clip.texts(prompts)).sum(-1), everyone)
        if self.dino:
            record("dino", False, self.dino, (self.dino.images(generated) * self.dino.images(references)).sum(-1),
                   everyone)
        if self.segmenter is None or not (self.clip or self.dino):
            return
        pairs = []
        for i, (g, r, c, name) in enumerate(zip(generated, references, categories, names)):
            masked_g = self.masked_subject(g, c, f"{name} (generated)")
            masked_r = self.masked_subject(r, c, f"{name} (reference)") if masked_g is not None else None
            if masked_r is not None:
                pairs.append((i, masked_g, masked_r))
        if not pairs:
            return
        rows, gen_masked, ref_masked = zip(*pairs)
        for metric, model in (("clip_i", self.clip), ("dino", self.dino)):
            if model is not None:
                record(metric, True, model, (model.images(gen_masked) * model.images(ref_masked)).sum(-1), rows)
