"""Placed shots of held-out products, today's way and the fixed way, measured with the bundled world's instruments
(CPU, the bundled product-world model at its native short side, 16:9 canvas 224x128):

    python bench/placement_quality.py --shots 48 --output bench/results/placement_quality_cpu.json

- **second product**: the world's segmenter on the delivered shot, the placed product's own region taken out;
  a remaining part (against the placed product or apart from it) at least a tenth of the placed product's area is a
  second product, and the world's classifier
  (its family head, on a square crop around the part) says whether it is of the placed product's family. The
  counter is checked first on true renders with and without a second product (`counter_check`).
- **halo**: in the band just outside the product's true outline (4% of the short side), the share of pixels whose
  colour is far (RGB distance > 48) from every colour of the product's edge and of the scene just beyond the band
  (the photo's white pasted with a mask a pixel too wide counts, as does the decoder's smear).
  `halo_strict` measures the delivered shot against the scene beyond alone (the product's edge colours not
  allowed), so a rim of the product's own colours or the photo's white counts too.
- **holes**: for the mugs, the share of the true hole inside the handle that the paste covers (the photo's white).
- **identity / scene**: the world's classifier on the square around the product (identity heads against the
  product's attributes, scene head against the prompt's scene).

Variants (each shot the same product, prompt and seed): `today` (the cache's image guidance everywhere, no
negative prompt, the network's mask, no edge band, no shadow), `fixed` (Placement's defaults: image guidance
within `cache_band` of the product, the product's category as negative prompt, holes kept, edge band, soft
shadow), and two ablations on the first `--ablation-shots` shots (`region only`, `negative only`);
`--variants` runs only those named. The halo is also measured on
the same decoded scenes with and without the edge band. Results are written after each variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamcache.app.config import BUNDLED_DIR, Settings, bundled_part  # noqa: E402
from dreamcache.app.loading import load_pipeline  # noqa: E402
from dreamcache.core.placement import PlacedProduct, Placement  # noqa: E402
from dreamcache.perception.segmentation import keep_holes, subject_on_white  # noqa: E402
from dreamcache.world import scene as world  # noqa: E402
from dreamcache.world.classifier import HEADS, AttributeClassifier  # noqa: E402
from dreamcache.world.segmenter import UNet, to_pixels  # noqa: E402

CANVAS = (224, 128)  # 16:9 at the bundled model's 128 px on the short side (canvas_size(16, 9, 128, 32))
WHERE = dict(x=0.5, y=0.6, scale=0.55)  # bench/shop_pictures.py's placement
TODAY = Placement(**WHERE, edge_band=0.0, cache_band=None, shadow="none")
FIXED = Placement(**WHERE)
IDENTITY = ("color", "pattern", "pattern_color", "glyph", "glyph_place", "proportions")
HALO_BAND, HALO_RING, HALO_DISTANCE = 0.04, 0.10, 48.0
SECOND_SHARE = 0.1  # a part of at least this share of the placed product's area counts


def photo(item: world.Product, seed: int) -> tuple[Image.Image, np.ndarray]:
    """The product on white as the example catalogue has it (128 px), and its true mask."""
    rng = np.random.default_rng([seed, item.index, 2])
    return world.place(item, Image.new("RGB", (128, 128), "white"), rng, scale=0.8)


def segment(unet: UNet, image: Image.Image) -> np.ndarray:
    """The world segmenter's mask at the image's own size (it is fully convolutional: no squashing to a square)."""
    with torch.no_grad():
        return (unet(to_pixels(image))[0, 0] > 0).numpy()


def crop_square(image: Image.Image, box, fill: float = 0.7) -> Image.Image:
    """A square around `box` (the box filling `fill` of it, as products fill world scenes), edges replicated."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top) / fill
    cx, cy = (left + right) / 2, (top + bottom) / 2
    array = np.asarray(image)
    pad = int(side)
    padded = np.pad(array, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    x0, y0 = int(round(cx - side / 2)) + pad, int(round(cy - side / 2)) + pad
    return Image.fromarray(padded[y0:y0 + int(side), x0:x0 + int(side)]).resize((128, 128), Image.Resampling.BILINEAR)


def second_products(unet, classifier, image: Image.Image, placed_mask: np.ndarray, family: str) -> dict:
    """Parts of the segmenter's mask away from the placed product, and how many the classifier calls `family`."""
    # The placed product and a thin rim around it taken out: a second product drawn against it still counts.
    found = segment(unet, image) & ~ndimage.binary_dilation(placed_mask, iterations=3)
    labels, count = ndimage.label(found)
    minimum = max(40, SECOND_SHARE * placed_mask.sum())
    parts, same = 0, 0
    for k, part in enumerate(ndimage.find_objects(labels), start=1):
        if (labels[part] == k).sum() < minimum:
            continue
        parts += 1
        box = (part[1].start, part[0].start, part[1].stop, part[0].stop)
        predicted = classifier.predict(to_pixels(crop_square(image, box)))["family"].item()
        same += HEADS["family"][predicted] == family
    return dict(parts=parts, same_family=same)


def halo(image: Image.Image, placed_mask: np.ndarray, allow_edge: bool = True) -> float:
    """Share of the band outside the product whose colours are far from the product's edge and the scene beyond
    (strict, `allow_edge=False`: from the scene beyond alone, so that a rim of the photo's white or of the
    product's own colours pasted a pixel too wide counts too)."""
    rgb = np.asarray(image, np.float32)
    short = min(placed_mask.shape)
    outside = ndimage.distance_transform_edt(~placed_mask)
    inside = ndimage.distance_transform_edt(placed_mask)
    band = (outside > 0) & (outside <= HALO_BAND * short)
    ring = (outside > HALO_BAND * short) & (outside <= HALO_RING * short)
    edge = (inside > 0) & (inside <= HALO_BAND * short)
    references = (np.concatenate([rgb[ring], rgb[edge]]) if allow_edge else rgb[ring])[:, None, :]  # (R, 1, 3)
    pixels = rgb[band][None]  # (1, B, 3)
    nearest = np.sqrt(((references - pixels) ** 2).sum(-1)).min(0)  # (B,)
    return float((nearest > HALO_DISTANCE).mean())


def on_canvas(product: PlacedProduct, mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """A region of the photo (H, W) bool where the product made from `mask` puts it on the canvas."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    left, top, right, bottom = product.box(CANVAS)
    crop = Image.fromarray(region[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8) * 255)
    placed = np.zeros((CANVAS[1], CANVAS[0]), bool)
    placed[top:bottom, left:right] = np.asarray(crop.resize((right - left, bottom - top), Image.Resampling.NEAREST)) > 0
    return placed


def hole_covered(product: PlacedProduct, mask: np.ndarray, hole: np.ndarray) -> float | None:
    """Share of the handle's true hole (photo coordinates) that the paste covers on the canvas."""
    if not hole.any():
        return None
    placed = ndimage.binary_erosion(on_canvas(product, mask, hole))  # the hole's rim is the product's antialiased edge
    if not placed.any():
        return None
    return float((product.layer(CANVAS).alpha[placed] > 0.5).mean())


def classify(classifier, image: Image.Image, item: world.Product, scene: str, product: PlacedProduct) -> dict:
    left, top, right, bottom = product.box(CANVAS)
    cx = (left + right) // 2
    x0 = min(max(cx - CANVAS[1] // 2, 0), CANVAS[0] - CANVAS[1])
    square = image.crop((x0, 0, x0 + CANVAS[1], CANVAS[1]))
    predicted = {h: HEADS[h][v.item()] for h, v in classifier.predict(to_pixels(square)).items()}
    truth = dict(item.attributes(), scene=scene)
    heads = [h for h in IDENTITY if not (h == "pattern_color" and item.pattern == "plain")]
    return dict(identity=float(np.mean([predicted[h] == truth[h] for h in heads])), scene=predicted["scene"] == scene)


def counter_check(unet, classifier, renders: int = 12) -> dict:
    """The second-product counter on true renders: a product, and in half of them a second of its family."""
    hits, false = [], []
    for k in range(renders):
        items = world.held_out_products(2 * renders + 12)
        a = items[k]
        b = next(i for i in items[k + 1:] if i.family == a.family)
        rng = np.random.default_rng([k, 99])
        scene = list(world.SCENES)[k % len(world.SCENES)]
        backdrop = world.background(scene, CANVAS[0], rng).crop((0, 0, CANVAS[0], CANVAS[1]))
        canvas = Image.new("RGB", CANVAS)
        canvas.paste(backdrop)
        sprite = world.draw_product(a, 80)
        canvas.paste(sprite, (72, 40), sprite)
        mask = np.zeros((CANVAS[1], CANVAS[0]), bool)
        mask[40:120, 72:152] = np.asarray(sprite)[..., 3] > 0
        if k % 2:
            other = world.draw_product(b, 64)
            canvas.paste(other, (160 if k % 4 == 1 else 0, 56), other)
        found = second_products(unet, classifier, canvas, mask, a.family)
        (hits if k % 2 else false).append(found["same_family"] > 0)
    return dict(renders=renders, detected_share=float(np.mean(hits)), false_alarm_share=float(np.mean(false)))


def run_variant(pipe, name, shots, masks, placements, negatives, unet, classifier, batch=8) -> list[dict]:
    references = [subject_on_white(shot["photo"], m, pipe.resolution) for shot, m in zip(shots, masks)]
    caches = pipe.cache_subjects(references)
    products = [PlacedProduct.from_photo(shot["photo"], m, p) for shot, m, p in zip(shots, masks, placements)]
    started = time.perf_counter()
    scenes = pipe([s["prompt"] for s in shots], subject=caches, seed=[s["seed"] for s in shots],
                  placed=products, paste=False, width=CANVAS[0], height=CANVAS[1], batch_size=batch,
                  negative_prompt=negatives, progress=False).images
    seconds = time.perf_counter() - started
    rows = []
    for shot, mask, product, scene in zip(shots, masks, products, scenes):
        delivered = product.composite(scene)
        placed_mask = product.canvas(CANVAS)[1] >= 0.5
        true_mask = on_canvas(product, mask, shot["mask"])  # the halo is measured against the product's true outline
        plain = PlacedProduct(product.cutout, replace(product.placement, edge_band=0.0, shadow="none"))
        banded = PlacedProduct(product.cutout, replace(product.placement, edge_band=FIXED.edge_band, shadow="none"))
        unshaded = PlacedProduct(product.cutout, replace(product.placement, shadow="none"))
        rows.append(dict(
            sku=shot["sku"], family=shot["item"].family, prompt=shot["prompt"], seed=shot["seed"],
            second=second_products(unet, classifier, delivered, placed_mask, shot["item"].family),
            halo_without_band=halo(plain.composite(scene), true_mask),
            halo_with_band=halo(banded.composite(scene), true_mask),
            # Strict: the delivered shot's band against the scene beyond it alone.
            halo_strict=halo(delivered, true_mask, allow_edge=False),
            hole_covered=hole_covered(product, mask, shot["hole"]),
            **classify(classifier, delivered, shot["item"], shot["scene"], product),
            # The same shot without the composited shadow: does the shadow alone move the scene head?
            scene_without_shadow=classify(classifier, unshaded.composite(scene), shot["item"], shot["scene"],
                                          product)["scene"]))
        shot.setdefault("images", {})[name] = delivered
    print(f"{name}: {len(shots)} shots in {seconds:.0f} s", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    holes = [r["hole_covered"] for r in rows if r["hole_covered"] is not None]
    return dict(shots=len(rows),
                second_product_rate=float(np.mean([r["second"]["parts"] > 0 for r in rows])),
                second_same_family_rate=float(np.mean([r["second"]["same_family"] > 0 for r in rows])),
                halo_without_band=float(np.mean([r["halo_without_band"] for r in rows])),
                halo_with_band=float(np.mean([r["halo_with_band"] for r in rows])),
                halo_strict=float(np.mean([r["halo_strict"] for r in rows])),
                mugs=len(holes), hole_covered=float(np.mean(holes)) if holes else None,
                identity_accuracy=float(np.mean([r["identity"] for r in rows])),
                scene_accuracy=float(np.mean([r["scene"] for r in rows])),
                scene_accuracy_without_shadow=float(np.mean([r["scene_without_shadow"] for r in rows])))


def figure(shots, names, path: Path, count: int = 12) -> None:
    from PIL import ImageDraw

    cell = (CANVAS[0], CANVAS[1])
    sheet = Image.new("RGB", (len(names) * (cell[0] + 4) + 4, count * (cell[1] + 4) + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        draw.text((4 + c * (cell[0] + 4), 6), name, fill="black")
    for r, shot in enumerate(shots[:count]):
        for c, name in enumerate(names):
            if name in shot.get("images", {}):
                sheet.paste(shot["images"][name], (4 + c * (cell[0] + 4), 24 + r * (cell[1] + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=48)
    parser.add_argument("--ablation-shots", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", help="run only these variants (default: all)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "placement_quality_cpu.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "placement_quality.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = load_pipeline(Settings())
    unet = UNet.from_pretrained(bundled_part("segmenter"))
    classifier = AttributeClassifier.from_pretrained(BUNDLED_DIR / "classifier")
    scene_names = list(world.SCENES)
    shots = []
    for i, item in enumerate(world.held_out_products(args.shots)):
        image, mask = photo(item, i)
        scene = scene_names[(i + i // len(world.FAMILIES)) % len(scene_names)]
        shots.append(dict(item=item, sku=f"{item.family}-{item.index}", photo=image, mask=mask, scene=scene, seed=i,
                          prompt=world.caption(item.family, scene),
                          hole=ndimage.binary_fill_holes(mask) & ~mask if item.family == "mug" else np.zeros_like(mask)))
    networks = [segment(unet, s["photo"]) for s in shots]  # today's cut-out: the network's mask as it is
    kept = [keep_holes(s["photo"], m) for s, m in zip(shots, networks)]
    categories = [f"a {s['item'].family}" for s in shots]
    record = dict(command="python bench/placement_quality.py --shots %d" % args.shots, canvas=list(CANVAS),
                  placement=WHERE, model="bundled product-world (dreamcache/assets/product-world), its recommended "
                  "settings (UniPC, 10 steps, image scale 5, text scale 7.5)", threads=args.threads,
                  counter_check=counter_check(unet, classifier), variants={})
    print("counter check", record["counter_check"], flush=True)

    def save():
        record["seconds"] = round(time.perf_counter() - started, 1)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")

    n, a = len(shots), args.ablation_shots
    plans = [("today", shots, networks, [TODAY] * n, [""] * n),
             ("fixed", shots, kept, [FIXED] * n, categories),
             ("region only", shots[:a], kept[:a], [FIXED] * a, [""] * a),
             ("negative only", shots[:a], kept[:a], [replace(FIXED, cache_band=None)] * a, categories[:a])]
    plans = [p for p in plans if not args.variants or p[0] in args.variants]
    if a != 6:
        record["command"] += f" --ablation-shots {a}"
    if args.variants:
        record["command"] += " --variants " + " ".join(repr(p[0]) if " " in p[0] else p[0] for p in plans)
    for name, subset, masks, placements, negatives in plans:
        rows = run_variant(pipe, name, subset, masks, placements, negatives, unet, classifier)
        record["variants"][name] = dict(summary=summary(rows), shots=rows)
        save()
        figure(shots, [p[0] for p in plans], args.figure)
    print(json.dumps({k: v["summary"] for k, v in record["variants"].items()}, indent=2))


if __name__ == "__main__":
    main()
