"""The synthetic triplet pipeline as a sharded Prefect flow (and in-process for the CLI).

Captions are made and filtered once; the items are split into shards, each a child flow run that
renders its targets and segments them, then appends its triplets to the manifest. Every stage skips
finished items, so a re-run or a retried shard does only the missing work.
"""

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from dreamcache.training import synthetic
from dreamcache.app.config import load_settings


class SyntheticParams(BaseModel):
    output: str = Field(description="Folder for targets/, masks/, references/ and triplets.jsonl.")
    count: int = Field(default=1000, ge=1, le=10_000_000, description="Captions to draw (before filtering).")
    seed: int = Field(default=0, ge=0)
    text_to_image: str | None = Field(default=None, description="Diffusers text-to-image pipeline; default: the base model.")
    captioner: str | None = Field(default=None, description="Text-generation model; default: the template grammar.")
    max_similarity: float = Field(default=0.8, gt=0, le=1, description="Near-duplicate threshold (token Jaccard).")
    steps: int = Field(default=30, ge=1, le=500)
    resolution: int = Field(default=512, ge=16, description="Side of the references written.")
    shard_size: int = Field(default=256, ge=1, description="Items per child run.")
    batch_size: int = Field(default=4, ge=1, description="Images per text-to-image call.")


_models: dict = {}


def _text_to_image(params: SyntheticParams):
    key = params.text_to_image or "base"
    if key not in _models:
        from diffusers import DiffusionPipeline

        from dreamcache.app.loading import load_pipeline

        settings = load_settings()
        if params.text_to_image:
            pipe = DiffusionPipeline.from_pretrained(params.text_to_image, dtype=settings.torch_dtype)
            pipe = pipe.to(settings.torch_device)
        else:
            pipe = load_pipeline(settings)
        pipe.set_progress_bar_config(disable=True)
        _models[key] = pipe
    return _models[key]


def _segmenter():
    if "segmenter" not in _models:
        from dreamcache.app.loading import load_segmenter

        _models["segmenter"] = load_segmenter(load_settings())
    return _models["segmenter"]


def plan_items(params: SyntheticParams) -> list[synthetic.SyntheticItem]:
    captions = (synthetic.language_model_captions(params.captioner, params.count, params.seed) if params.captioner
                else synthetic.grammar_captions(params.count, params.seed))
    kept = synthetic.filter_captions(captions, params.max_similarity)
    return [synthetic.item_for(caption, category, params.seed + i) for i, (caption, category) in enumerate(kept)]


def run_shard(params: SyntheticParams, items: list[synthetic.SyntheticItem], segmenter=None) -> dict:
    folder = Path(params.output)
    synthetic.render_targets(_text_to_image(params), items, folder, params.steps, params.batch_size)
    triplets, rejected = synthetic.segment_targets(segmenter or _segmenter(), items, folder, params.resolution)
    written = synthetic.write_manifest(triplets, folder / "triplets.jsonl")
    return dict(items=len(items), triplets=len(triplets), written=written, rejected=[list(r) for r in rejected])


@task(retries=1, cache_policy=NO_CACHE)
def shard_task(params: SyntheticParams, items: list[synthetic.SyntheticItem]) -> dict:
    return run_shard(params, items)


@flow(name="synthetic-shard", persist_result=False)
def synthetic_shard(params: SyntheticParams, items: list[synthetic.SyntheticItem]) -> dict:
    return shard_task(params, items)


@flow(name="synthesize-triplets", persist_result=False)
def synthesize_triplets(params: SyntheticParams) -> dict:
    """Captions, target images, masks and references, written as a triplet manifest for training."""
    items = plan_items(params)
    shards = [items[i : i + params.shard_size] for i in range(0, len(items), params.shard_size)]
    results = [synthetic_shard.with_options(flow_run_name=f"shard-{k + 1}-of-{len(shards)}")(params, shard)
               for k, shard in enumerate(shards)]
    return summarise(params, len(items), results)


def run_embedded(params: SyntheticParams, segmenter=None) -> dict:
    """The same pipeline in this process, shard after shard, without a Prefect server."""
    items = plan_items(params)
    shards = [items[i : i + params.shard_size] for i in range(0, len(items), params.shard_size)]
    return summarise(params, len(items), [run_shard(params, shard, segmenter) for shard in shards])


def summarise(params: SyntheticParams, items: int, results: list[dict]) -> dict:
    return dict(captions_drawn=params.count, items=items, triplets=sum(r["triplets"] for r in results),
                rejected=[r for result in results for r in result["rejected"]],
                manifest=str(Path(params.output) / "triplets.jsonl"))
