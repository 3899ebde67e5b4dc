"""The procedural world's attribute classifier: reads what captions never say from a scene image.

One small CNN with a head per attribute: the family and the scene (what the prompt asks for) and
the identity details (colour, pattern, pattern colour, glyph, glyph place, proportions) that only a
reference can supply. It is trained on the generator's own scenes, where every label is known, and
is the toy world's measuring instrument for personalisation: run on generated images, it says
whether the product in the shot is the product in the reference.

Weights are one safetensors file next to a JSON config (`save_pretrained` / `from_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dreamcache.world import scene as world

# Head name -> class names, in label order.
HEADS: dict[str, tuple[str, ...]] = {
    "family": world.FAMILIES,
    "scene": tuple(world.SCENES),
    "color": tuple(world.COLORS),
    "pattern": world.PATTERNS,
    "pattern_color": tuple(world.COLORS),
    "glyph": world.GLYPHS,
    "glyph_place": world.PLACES,
    "proportions": tuple(world.PROPORTIONS),
}
IGNORE = -100  # label of an attribute that is not visible (the pattern colour of a plain product)
WEIGHTS, CONFIG = "classifier.safetensors", "classifier_config.json"


def labels(item: world.Product, scene: str) -> dict[str, int]:
    """Every head's label for `item` shown in `scene`."""
    values = dict(item.attributes(), family=item.family, scene=scene)
    out = {head: classes.index(values[head]) for head, classes in HEADS.items()}
    if item.pattern == "plain":
        out["pattern_color"] = IGNORE
    return out


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class AttributeClassifier(nn.Module):
    """(B, 3, R, R) images in [-1, 1] -> {head: (B, classes) logits}."""

    def __init__(self, resolution: int = 128, width: int = 48):
        super().__init__()
        self.resolution, self.width = resolution, width
        # Halve the side down to 4x4 (five blocks at 128 px), widening up to 4x.
        blocks = max(1, (resolution // 4).bit_length() - 1)
        channels = tuple(width * min(4, 2**k) for k in range(blocks))
        self.features = nn.Sequential(*(_block(cin, cout) for cin, cout in zip((3,) + channels[:-1], channels)))
        side = resolution // 2**blocks
        # Flattened, not pooled: where the glyph sits on the body is a question of position.
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, 512), nn.GELU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({head: nn.Linear(512, len(classes)) for head, classes in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = nn.functional.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                               antialias=True, align_corners=False)
        hidden = self.trunk(self.features(images))
        return {head: layer(hidden) for head, layer in self.heads.items()}

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(images)
        return sum(nn.functional.cross_entropy(logits[h], targets[h], ignore_index=IGNORE) for h in HEADS) / len(HEADS)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted class index per head, (B,) each."""
        return {head: logits.argmax(-1) for head, logits in self(images).items()}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.state_dict().items()},
                  directory / WEIGHTS)
        config = dict(resolution=self.resolution, width=self.width, heads={h: list(c) for h, c in HEADS.items()})
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "AttributeClassifier":
        directory = Path(directory)
        config = json.loads((directory / CONFIG).read_text())
        if config["heads"] != {h: list(c) for h, c in HEADS.items()}:
            raise ValueError(f"the classifier in {directory} was trained for other attribute classes than "
                             "this version of the world has: retrain it (python -m dreamcache.world.model)")
        model = cls(config["resolution"], config["width"])
        state = {k: v.float() for k, v in load_file(directory / WEIGHTS).items()}
        model.load_state_dict(state)
        return model.eval()
