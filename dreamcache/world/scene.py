"""The procedural product world: products with identities that captions never mention, in scenes.

Six families (mug, bottle, box, sneaker, lamp, backpack); each instance has a base colour, a
pattern (kind and colour), a logo glyph and its place, and proportions. Scenes (beach, snow, forest,
kitchen counter, city at night, studio, grass, desert) vary placement, scale and lighting. Captions
name only the family and the scene ("a mug on a snowy mountain"), so whatever of the identity a
model reproduces came from the reference, never from the text. Masks are exact, because the
renderer knows every pixel it drew.

Everything is a pure function of integer seeds: `product(i)` is instance i, `triplet(seed)` a
training triplet (the target scene, the same instance on white in another pose, the caption).
One instance in HOLDOUT of every family is held out of training for evaluation (`held_out_products`).

Sizes are fractions of the canvas, so the world renders at any resolution; it is drawn for 128 px,
where a logo glyph spans about 12 pixels (three latent pixels of a 4x VAE) and carries an outline
that keeps it readable on any pattern.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

FAMILIES = ("mug", "bottle", "box", "sneaker", "lamp", "backpack")
COLORS = {"red": (200, 40, 45), "orange": (235, 130, 30), "yellow": (235, 205, 50), "green": (60, 160, 70),
          "teal": (30, 150, 150), "blue": (45, 85, 200), "purple": (130, 60, 170), "pink": (235, 120, 170),
          "black": (35, 35, 40), "white": (238, 238, 232)}
PATTERNS = ("plain", "stripes", "dots", "checks")
GLYPHS = ("star", "circle", "triangle", "cross")
PLACES = ("upper", "middle", "lower")
PROPORTIONS = {"slim": (0.8, 1.1), "regular": (1.0, 1.0), "wide": (1.2, 0.9)}
SCENES = {
    "beach": "on a sandy beach", "snow": "on a snowy mountain", "forest": "in a forest",
    "kitchen": "on a kitchen counter", "city": "in a city at night", "studio": "in a photo studio",
    "grass": "on a lawn", "desert": "in a desert",
}
ATTRIBUTES = ("color", "pattern", "pattern_color", "glyph", "glyph_place", "proportions")
HOLDOUT = 10


@dataclass(frozen=True)
class Product:
    index: int
    family: str
    color: str
    pattern: str
    pattern_color: str
    glyph: str
    glyph_place: str
    proportions: str

    def attributes(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if k in ATTRIBUTES}


def product(index: int) -> Product:
    """Instance `index` of the world (deterministic)."""
    rng = random.Random(f"product-{index}")
    color = rng.choice(list(COLORS))
    pattern_color = rng.choice([c for c in COLORS if c != color])
    return Product(index, FAMILIES[index % len(FAMILIES)], color, rng.choice(PATTERNS), pattern_color,
                   rng.choice(GLYPHS), rng.choice(PLACES), rng.choice(list(PROPORTIONS)))


def is_held_out(index: int) -> bool:
    # Counted within the family (instance i is family i % 6), so every family has held-out instances.
    return (index // len(FAMILIES)) % HOLDOUT == 0


def held_out_products(count: int) -> list[Product]:
    """The first `count` held-out instances: the families in turn."""
    indices = (i for i in range(10**9) if is_held_out(i))
    return [product(next(indices)) for _ in range(count)]


def caption(family: str, scene: str) -> str:
    return f"a {family} {SCENES[scene]}"


# Every caption the world can write, in (family, scene) order: only 48 distinct texts.
CAPTIONS = tuple(caption(family, scene) for family in FAMILIES for scene in SCENES)


# --- drawing a product ---------------------------------------------------------------------------

def _shade(rgb, factor: float):
    return tuple(max(0, min(255, int(c * factor))) for c in rgb)


def _body_and_parts(family: str, w: float, h: float, draw_parts: ImageDraw.ImageDraw, body: ImageDraw.ImageDraw,
                    color, size: int):
    """Draw the family's body (into `body`, a mask) and its other parts (into `draw_parts`); returns the body box."""
    s = size
    cx, cy = s / 2, s / 2
    bw, bh = 0.42 * s * w, 0.55 * s * h
    x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    dark, grey = _shade(color, 0.6), (90, 90, 95)
    if family == "mug":
        draw_parts.ellipse((x1 - 0.08 * s, cy - 0.15 * s, x1 + 0.16 * s, cy + 0.15 * s), outline=dark, width=int(0.05 * s))
        body.rectangle((x0, y0, x1, y1), fill=255)
        draw_parts.ellipse((x0, y0 - 0.05 * s, x1, y0 + 0.05 * s), fill=dark)
    elif family == "bottle":
        body.rectangle((x0, y0 + 0.12 * s, x1, y1), fill=255)
        body.polygon([(x0, y0 + 0.12 * s), (cx - 0.06 * s, y0 - 0.02 * s), (cx + 0.06 * s, y0 - 0.02 * s),
                      (x1, y0 + 0.12 * s)], fill=255)
        draw_parts.rectangle((cx - 0.05 * s, y0 - 0.14 * s, cx + 0.05 * s, y0 - 0.02 * s), fill=grey)
    elif family == "box":
        depth = 0.1 * s
        draw_parts.polygon([(x0, y0), (x1, y0), (x1 + depth, y0 - depth), (x0 + depth, y0 - depth)], fill=_shade(color, 1.2))
        draw_parts.polygon([(x1, y0), (x1 + depth, y0 - depth), (x1 + depth, y1 - depth), (x1, y1)], fill=dark)
        body.rectangle((x0, y0, x1, y1), fill=255)
    elif family == "sneaker":
        y0, y1 = cy - 0.12 * s * h, cy + 0.16 * s * h
        x0, x1 = cx - 0.34 * s * w, cx + 0.34 * s * w
        body.polygon([(x0, y1), (x0, cy), (cx - 0.1 * s, y0), (cx + 0.05 * s, y0 + 0.02 * s), (x1, cy + 0.04 * s),
                      (x1, y1)], fill=255)
        draw_parts.rectangle((x0 - 0.01 * s, y1, x1 + 0.01 * s, y1 + 0.06 * s), fill=(240, 240, 240))
    elif family == "lamp":
        y0, y1 = cy - 0.32 * s * h, cy - 0.02 * s
        body.polygon([(cx - 0.14 * s * w, y0), (cx + 0.14 * s * w, y0), (cx + 0.26 * s * w, y1),
                      (cx - 0.26 * s * w, y1)], fill=255)
        x0, x1 = cx - 0.26 * s * w, cx + 0.26 * s * w
        draw_parts.rectangle((cx - 0.02 * s, y1, cx + 0.02 * s, cy + 0.26 * s), fill=grey)
        draw_parts.ellipse((cx - 0.14 * s, cy + 0.23 * s, cx + 0.14 * s, cy + 0.31 * s), fill=grey)
    elif family == "backpack":
        draw_parts.rounded_rectangle((cx - 0.12 * s, y0 - 0.08 * s, cx + 0.12 * s, y0 + 0.04 * s), radius=0.05 * s,
                                     outline=dark, width=int(0.03 * s))
        body.rounded_rectangle((x0, y0, x1, y1), radius=0.1 * s, fill=255)
    return x0, y0, x1, y1


def _pattern(kind: str, size: int, box) -> Image.Image:
    """A mask of the pattern's marks over the body's box."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    step = max(3, int(0.08 * size))
    if kind == "stripes":
        for y in range(int(y0), int(y1), 2 * step):
            draw.rectangle((x0, y, x1, y + step * 0.8), fill=255)
    elif kind == "dots":
        for y in range(int(y0) + step // 2, int(y1), 2 * step):
            for x in range(int(x0) + step // 2, int(x1), 2 * step):
                draw.ellipse((x - step * 0.5, y - step * 0.5, x + step * 0.5, y + step * 0.5), fill=255)
    elif kind == "checks":
        for i, y in enumerate(range(int(y0), int(y1), step)):
            for j, x in enumerate(range(int(x0), int(x1), step)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + step, y + step), fill=255)
    return mask


def _glyph(draw: ImageDraw.ImageDraw, glyph: str, cx: float, cy: float, r: float, fill) -> None:
    if glyph == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif glyph == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif glyph == "cross":
        draw.rectangle((cx - r, cy - r * 0.3, cx + r, cy + r * 0.3), fill=fill)
        draw.rectangle((cx - r * 0.3, cy - r, cx + r * 0.3, cy + r), fill=fill)
    else:  # star
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = np.pi / 2 + k * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
        draw.polygon(points, fill=fill)


def draw_product(item: Product, size: int) -> Image.Image:
    """The product as RGBA on a transparent square canvas of `size` (drawn at 4x, downsampled)."""
    big = 4 * size
    color, pattern_rgb = COLORS[item.color], COLORS[item.pattern_color]
    w, h = PROPORTIONS[item.proportions]
    parts = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    body_mask = Image.new("L", (big, big), 0)
    box = _body_and_parts(item.family, w, h, ImageDraw.Draw(parts), ImageDraw.Draw(body_mask), color, big)
    body = Image.new("RGBA", (big, big), color + (255,))
    if item.pattern != "plain":
        body.paste(pattern_rgb + (255,), mask=_pattern(item.pattern, big, box))
    x0, y0, x1, y1 = box
    glyph_y = {"upper": y0 + 0.25 * (y1 - y0), "middle": (y0 + y1) / 2, "lower": y0 + 0.75 * (y1 - y0)}[item.glyph_place]
    dark_glyph = sum(color) > 450
    glyph_fill, outline = ((20, 20, 20), (250, 250, 250)) if dark_glyph else ((250, 250, 250), (20, 20, 20))
    # The outline keeps the glyph's shape readable on stripes, dots and checks of any colour.
    radius = 0.17 * min(x1 - x0, y1 - y0) + 0.02 * big
    draw = ImageDraw.Draw(body)
    _glyph(draw, item.glyph, (x0 + x1) / 2, glyph_y, radius * 1.3, outline + (255,))
    _glyph(draw, item.glyph, (x0 + x1) / 2, glyph_y, radius, glyph_fill + (255,))
    parts.paste(body, mask=body_mask)
    return parts.resize((size, size), Image.Resampling.LANCZOS)


# --- scenes ----------------------------------------------------------------------------------

def _gradient(rows: int, width: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, rows)[:, None, None]
    return (np.array(top) * (1 - t) + np.array(bottom) * t) * np.ones((1, width, 1))


def background(scene: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A scene's backdrop: sky and ground with texture noise, varied per draw."""
    horizon = int(size * rng.uniform(0.35, 0.6))
    looks = {
        "beach": ((120, 180, 235), (225, 200, 140)), "snow": ((150, 180, 215), (240, 242, 248)),
        "forest": ((60, 100, 60), (70, 55, 35)), "kitchen": ((215, 205, 190), (150, 110, 80)),
        "city": ((15, 20, 45), (45, 45, 55)), "studio": ((205, 205, 210), (185, 185, 190)),
        "grass": ((140, 195, 240), (70, 150, 60)), "desert": ((230, 190, 140), (210, 160, 95)),
    }
    sky, ground = looks[scene]
    image = np.concatenate([_gradient(horizon, size, sky, _shade(sky, 1.1)),
                            _gradient(size - horizon, size, ground, _shade(ground, 0.8))])
    image += rng.normal(0, {"forest": 18, "grass": 14, "beach": 8, "desert": 8, "snow": 4}.get(scene, 3), image.shape)
    if scene == "city":  # lit windows
        for _ in range(int(size * 0.6)):
            x, y = rng.integers(0, size), rng.integers(0, horizon)
            image[y : y + 2, x : x + 2] = (250, 220, 120)
    if scene == "forest":  # trunks
        for _ in range(6):
            x = rng.integers(0, size)
            image[:horizon, max(0, x - 2) : x + 2] = (60, 40, 25)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


# --- triplets --------------------------------------------------------------------------------

def place(item: Product, canvas: Image.Image, rng: np.random.Generator, scale: float,
          light: float = 1.0) -> tuple[Image.Image, np.ndarray]:
    """Paste the product at a random position and scale; returns the image and its exact mask."""
    size = canvas.width
    side = max(8, int(size * scale))
    sprite = draw_product(item, side)
    if rng.uniform() < 0.5:
        sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if light != 1.0:
        rgb = np.asarray(sprite, dtype=np.float32)
        rgb[..., :3] *= light
        sprite = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGBA")
    free = max(1, size - side + 1)
    x = int(rng.integers(0, free))
    y = int(rng.integers(free // 3, free)) if free > 3 else 0  # standing in the lower part of the frame
    out = canvas.copy()
    out.paste(sprite, (x, y), sprite)
    mask = np.zeros((size, size), dtype=bool)
    alpha = np.asarray(sprite)[..., 3] > 0  # every pixel the product touches, edges included
    mask[y : y + side, x : x + side] = alpha[: size - y, : size - x]
    return out, mask


def scene_image(item: Product, scene: str, size: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng([seed, item.index, 1])
    backdrop = background(scene, size, rng)
    light = {"city": 0.7, "forest": 0.85}.get(scene, 1.0) * rng.uniform(0.9, 1.1)
    return place(item, backdrop, rng, scale=rng.uniform(0.5, 0.85), light=light)


def reference_image(item: Product, size: int, seed: int) -> Image.Image:
    """The instance on white, in a pose and scale of its own (never the target's)."""
    rng = np.random.default_rng([seed, item.index, 2])
    return place(item, Image.new("RGB", (size, size), "white"), rng, scale=rng.uniform(0.7, 0.95))[0]


@dataclass
class WorldTriplet:
    target: Image.Image
    mask: np.ndarray
    reference: Image.Image
    caption: str
    product: Product
    scene: str


def triplet(seed: int, size: int, held_out: bool = False) -> WorldTriplet:
    """A training triplet from a training instance (or, with held_out, from a held-out one)."""
    rng = random.Random(f"triplet-{seed}")
    index = rng.randrange(1_000_000)
    while is_held_out(index) != held_out:  # redraw, not step: stepping lands on a block's first family
        index = rng.randrange(1_000_000)
    item = product(index)
    scene = rng.choice(list(SCENES))
    target, mask = scene_image(item, scene, size, seed)
    return WorldTriplet(target, mask, reference_image(item, size, seed), caption(item.family, scene), item, scene)
