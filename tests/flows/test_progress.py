"""What a person watching `dreamcache run` sees: the bar moves per image as shots are recorded (not once per
task batch, which on CPU sat at 0% for minutes), and a re-run says how much was made already."""

from typer.testing import CliRunner

from flows.runs import catalogue as catalogue_module
from flows.runs.catalogue import run_embedded
from flows.cli import app
from flows.platform.params import CatalogueRunParams


def test_the_bar_moves_as_each_image_is_recorded_and_names_the_step(platform_env, catalogue, monkeypatch):
    told = []  # what the run's bar was told, in order (the bar itself is tqdm's, unchanged)
    real_update, real_postfix = catalogue_module.tqdm.update, catalogue_module.tqdm.set_postfix_str

    def recording_update(self, n=1):
        if getattr(self, "desc", None) == "generating":  # the run's bar, not the pipeline's (disabled) one
            told.append(n)
        return real_update(self, n)

    def recording_postfix(self, text="", refresh=True):
        told.append(text)
        return real_postfix(self, text, refresh)

    monkeypatch.setattr(catalogue_module.tqdm, "update", recording_update)
    monkeypatch.setattr(catalogue_module.tqdm, "set_postfix_str", recording_postfix)
    # Six images in one task of three pipeline batches of two, two steps each.
    summary = run_embedded(CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a beach"],
                                              images_per_prompt=2, steps=2, batch_size=2))
    assert summary["images_generated"] == 6 and catalogue_module.TASK_BATCHES >= 3
    assert [n for n in told if isinstance(n, int)] == [1] * 6
    steps = [text for text in told if isinstance(text, str)]
    assert steps == ["batch of 2: step 1/2", "batch of 2: step 2/2"] * 3
    # Each batch's steps are shown before its images are counted: the first image after the first batch's steps.
    assert told.index(1) > told.index("batch of 2: step 2/2")


def test_a_rerun_says_how_many_are_already_made(platform_env, catalogue):
    command = ["run", "--source", str(catalogue), "-p", "a {category} at dusk", "--images-per-prompt", "2",
               "--steps", "2"]
    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    assert "images: 0 already made, 6 to do" in first.output
    assert "6 images generated, 0 failed (6 to do this run)" in first.output

    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "images: 6 already made, 0 to do" in again.output
    assert "0 images generated, 0 failed (6 already made, 0 to do this run)" in again.output
