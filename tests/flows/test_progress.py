"""What a person watching `dreamcache run` sees: the bar moves per image as shots are recorded (not once per
task batch, which on CPU sat at 0% for minutes), and a re-run says how much was made already."""

from typer.testing import CliRunner

from flows import catalogue as catalogue_module
from flows.catalogue import run_embedded
from flows.cli import app
from flows.params import CatalogueRunParams


def test_the_bar_moves_as_each_image_is_recorded(platform_env, catalogue, monkeypatch):
    updates = []  # what the bar was told, in order (the bar itself is tqdm's, unchanged)
    real_update = catalogue_module.tqdm.update

    def recording_update(self, n=1):
        if getattr(self, "desc", None) == "generating":  # the run's bar, not the pipeline's (disabled) one
            updates.append(n)
        return real_update(self, n)

    monkeypatch.setattr(catalogue_module.tqdm, "update", recording_update)
    # Six images in one task of three pipeline batches of two.
    summary = run_embedded(CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a beach"],
                                              images_per_prompt=2, steps=2, batch_size=2))
    assert summary["images_generated"] == 6 and catalogue_module.TASK_BATCHES >= 3
    assert updates == [1] * 6


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
