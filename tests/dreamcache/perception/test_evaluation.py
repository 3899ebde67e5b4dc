import csv

import pytest
from typer.testing import CliRunner

from dreamcache.app.cli import app
from dreamcache.perception.evaluation import EvalSettings, load_dreambench, render, run_eval
from dreamcache.perception.scoring import Scorer
from dreamcache.perception.segmentation import BorderColourSegmenter
from tests.helpers import save_tiny_scorers, scene

PROMPTS_AND_CLASSES = """Classes

subject_name,class
red_mug,mug
corgi,dog

Prompts

Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
]

Live Subject Prompts
prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


@pytest.fixture
def dreambench(tmp_path):
    root = tmp_path / "dataset"
    for name, color in (("red_mug", (200, 30, 40)), ("corgi", (210, 150, 60))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            scene(product_color=color, background=(245, 245, 245), box=(30 + 5 * i, 20, 90, 80))[0].save(
                root / name / f"{i:02d}.jpg")
    (root / "prompts_and_classes.txt").write_text(PROMPTS_AND_CLASSES)
    return root


def test_reads_the_dreambench_layout(dreambench):
    subjects, prompts = load_dreambench(dreambench)
    assert [(s.name, s.class_name, s.live, len(s.images)) for s in subjects] == [
        ("corgi", "dog", True, 2), ("red_mug", "mug", False, 2)
    ]
    assert [render(t, "mug") for t in prompts["object"]] == ["a mug in the jungle", "a mug in the snow"]
    assert [render(t, "dog") for t in prompts["live"]] == ["a dog wearing a red hat"]


def test_eval_writes_a_complete_table(dreambench, tmp_path, tiny_pipe):
    clip, dino = save_tiny_scorers(tmp_path / "scorers")
    segmenter = BorderColourSegmenter()
    result = run_eval(tiny_pipe, Scorer(clip, dino, segmenter), segmenter, dreambench, tmp_path / "out",
                      EvalSettings(images_per_prompt=2, steps=2), progress=False)
    # corgi: 1 live prompt x 2 images; red_mug: 2 object prompts x 2 images
    assert len(result.rows) == 6
    assert all(result.rows[i][m] is not None for i in range(6) for m in ("dino", "clip_i", "clip_t"))
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| Method | DINO | CLIP-I | CLIP-T |" in table and "| Method | MCLIP-I | MDINO |" in table
    assert "| images_per_prompt | 2 |" in table
    with open(tmp_path / "out" / "table.csv") as f:
        header, row = list(csv.reader(f))
    assert header[:4] == ["method", "DINO", "CLIP-I", "CLIP-T"] and row[-1] == "6"
    assert all(value != "" for value in row[1:4])
    with open(tmp_path / "out" / "per_image.csv") as f:
        images = list(csv.DictReader(f))
    assert {r["prompt"] for r in images} == {"a dog wearing a red hat", "a mug in the jungle", "a mug in the snow"}
    assert all((tmp_path / "out" / r["image"]).is_file() for r in images)


def test_eval_needs_scorer_models(dreambench, tmp_path, monkeypatch):
    monkeypatch.delenv("DREAMCACHE_CLIP_MODEL", raising=False)
    monkeypatch.delenv("DREAMCACHE_DINO_MODEL", raising=False)
    # A base model of one's own: the bundled model would bring its own (world) CLIP.
    monkeypatch.setenv("DREAMCACHE_BASE_MODEL", str(tmp_path / "stable-diffusion"))
    (tmp_path / "stable-diffusion").mkdir()  # a local base model must exist (it is not loaded here)
    result = CliRunner().invoke(app, ["eval", str(dreambench), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no scorer models configured" in result.output


def test_a_missing_prompts_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts_and_classes.txt not found"):
        load_dreambench(tmp_path)
