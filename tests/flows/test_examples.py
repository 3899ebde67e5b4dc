"""The bundled example catalogue and prompts fit the bundled model: held-out world products, world captions."""

from PIL import Image

from db.models import Subject
from dreamcache.world import scene as world
from flows.cli import EXAMPLES
from flows.platform.params import CatalogueRunParams
from flows.platform.places import Places
from flows.steps.prompts import load_prompts, render_prompt


def test_one_held_out_product_of_each_family_named_by_its_attributes():
    held_out = {(p.family, p.color, p.pattern) for p in world.held_out_products(60)}
    images = sorted((EXAMPLES / "catalogue").rglob("*.png"))
    assert sorted(path.parent.name for path in images) == sorted(world.FAMILIES)
    for path in images:
        family, color, pattern = path.stem.lower().split("-")
        assert family == path.parent.name and (family, color, pattern) in held_out, path
        assert Image.open(path).size == (128, 128)


def test_every_example_prompt_renders_to_a_world_caption():
    prompts = load_prompts(CatalogueRunParams(source="unused", prompt_file=str(EXAMPLES / "prompts.txt")),
                           Places.for_run(str(EXAMPLES), [])).templates
    assert len(prompts) == 3
    for family in world.FAMILIES:
        subject = Subject(sku=f"{family.upper()}-X", category=family, attributes={})
        assert all(render_prompt(p, subject) in world.CAPTIONS for p in prompts), family
