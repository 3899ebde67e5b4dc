"""The library with a model's own settings makes the shots `dreamcache run` makes (issue 39).

On the bundled model, at its own settings (UniPC, 10 steps, image scale 5: the adapter's `recommended`),
with no sampling argument given to the library: `from_pretrained` + `load_dreamcache` + `pipe(prompts,
subject=...)` against a catalogue run of the same product, prompt and seeds. At 64 px rather than the
model's 128 to keep it quick on a CPU (the size is no recommended setting; the cache stays at 128, as the
run makes it). Pixel-equal:
both run the same float32 arithmetic on the same CPU in batches of the same shape, and the run writes PNG
(lossless), so any difference is a setting that differs, not rounding.
"""

import shutil

import numpy as np
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner

from dreamcache.app.config import BUNDLED_DIR
from dreamcache.core.images import open_image
from dreamcache.core.pipeline import DreamCachePipeline
from dreamcache.world.segmenter import WorldSegmenter
from flows.cli import EXAMPLES, app
from tests.helpers import home_database

PRODUCT = EXAMPLES / "catalogue" / "mug" / "MUG-TEAL-DOTS.png"
SEEDS = [3, 4]


def test_the_library_at_the_models_defaults_makes_the_shots_of_dreamcache_run(platform_env, tmp_path):
    for name in ("DREAMCACHE_BASE_MODEL", "DREAMCACHE_ADAPTER"):  # the bundled model, as a user's first run
        platform_env.delenv(name, raising=False)
    (tmp_path / "catalogue" / "mug").mkdir(parents=True)
    shutil.copy(PRODUCT, tmp_path / "catalogue" / "mug" / PRODUCT.name)
    result = CliRunner().invoke(app, ["run", "--source", str(tmp_path / "catalogue"), "-p", "a {category} on a sandy "
                                      "beach", "--images-per-prompt", str(len(SEEDS)), "--seed", str(SEEDS[0]),
                                      "--resolution", "64"])
    assert result.exit_code == 0, result.output
    engine = home_database(tmp_path / "home")
    with engine.connect() as db:
        rows = db.execute(text("SELECT seed, prompt, sampler, steps, image_scale, text_scale, output_uri "
                               "FROM generation_history ORDER BY seed")).all()
    engine.dispose()
    assert [(r.seed, r.sampler, r.steps, r.image_scale, r.text_scale) for r in rows] == [
        (seed, "unipc", 10, 5.0, 7.5) for seed in SEEDS]  # the run took the model's settings

    pipe = DreamCachePipeline.from_pretrained(BUNDLED_DIR / "base")
    pipe.load_dreamcache(BUNDLED_DIR / "adapter")
    assert (pipe.dreamcache_defaults.sampler, pipe.dreamcache_defaults.steps) == ("unipc", 10)
    photo = open_image(PRODUCT)
    cut = WorldSegmenter.from_pretrained(BUNDLED_DIR / "segmenter").segment(photo, "mug")
    subject = pipe.cache_subject(cut.subject_on_white(photo, pipe.resolution))
    images = pipe([rows[0].prompt] * len(SEEDS), subject=subject, seed=SEEDS, resolution=64, progress=False).images

    for row, image in zip(rows, images):
        shot = np.asarray(Image.open(row.output_uri.removeprefix("file://")).convert("RGB"))
        assert shot.shape == (64, 64, 3)
        assert np.array_equal(np.asarray(image), shot), f"seed {row.seed}: the library's shot is not the run's"
