"""Does masked DINO (and MCLIP-I) rank each personalised shot of a finished `dreamcache run
--compare-text-only` above its text-only twin? Issue 32's gate, on the demo's pairs (docs/models.md).

    DREAMCACHE_HOME=HOME python bench/demo_twins.py [--output bench/results/demo_twins.json]

Scores both images of every pair against the product's reference with the platform's scorer (the
bundled CLIP, DINO and segmenter unless the settings name others), and reports pairs and products
(the mean over a product's prompts) where the personalised shot scores higher.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote, urlparse

from sqlalchemy import select

from dreamcache.app.config import Settings
from dreamcache.app.loading import load_scorer
from dreamcache.core.images import open_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from db.models import Generation, Prompt, Segmentation, Subject, SubjectCache
    from flows.platform.resources import Platform

    settings = Settings()
    platform = Platform(settings)
    scorer = load_scorer(settings)
    rows = []
    with platform.sessions() as s:  # a local object store (the demo's): its URIs are file:// paths
        shots = s.execute(select(Generation, Prompt.text, Subject, Segmentation.reference_uri)
                          .join(Prompt, Prompt.id == Generation.prompt_id)
                          .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                          .join(Subject, Subject.id == SubjectCache.subject_id)
                          .join(Segmentation, Segmentation.id == SubjectCache.segmentation_id)
                          .where(Generation.output_uri.is_not(None))).all()
        for gen, prompt, subject, reference_uri in shots:
            shot = Path(unquote(urlparse(gen.output_uri).path))
            twin = shot.with_name(shot.stem + ".text-only.png")
            if not twin.exists():
                continue
            reference = open_image(Path(unquote(urlparse(reference_uri).path)))
            scored = scorer.score([open_image(shot), open_image(twin)], [reference] * 2, [prompt] * 2,
                                  [subject.category] * 2, names=[str(shot), str(twin)])
            values = [{sc.name: sc.value for sc in scores} for scores in scored]
            rows.append(dict(sku=subject.sku, prompt=prompt, personalised=values[0], text_only=values[1]))
    report = dict(pairs=len(rows))
    for metric in ("mdino", "mclip_i", "dino", "clip_i"):
        pairs = [r for r in rows if metric in r["personalised"] and metric in r["text_only"]]
        by_product = defaultdict(list)
        for r in pairs:
            by_product[r["sku"]].append(r["personalised"][metric] - r["text_only"][metric])
        report[metric] = dict(
            pairs_above=sum(r["personalised"][metric] > r["text_only"][metric] for r in pairs), pairs=len(pairs),
            products_above=sum(statistics.mean(d) > 0 for d in by_product.values()), products=len(by_product),
            mean_margin=round(statistics.mean(d for ds in by_product.values() for d in ds), 4) if pairs else None)
    report["rows"] = rows
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
