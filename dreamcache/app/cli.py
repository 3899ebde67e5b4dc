"""The `dreamcache` command."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import enum

import typer

from dreamcache.core.errors import DreamCacheError
from dreamcache.core.guidance import (
    COMBINED, DEFAULT_GUIDANCE, DEFAULT_IMAGE_SCALE, DEFAULT_TEXT_SCALE, GUIDANCE_MODES, JOINT, MAX_IMAGE_SCALE,
    MAX_TEXT_SCALE,
)

# The guidance modes as the command line's choices (typer offers choices through enums).
GuidanceChoice = enum.Enum("GuidanceChoice", {mode: mode for mode in GUIDANCE_MODES}, type=str)

app = typer.Typer(
    help="DreamCache: personalised product shots from cached reference features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _quiet_third_parties() -> None:
    """Personalised product shots from cached reference features."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Loading bars and notices from diffusers/transformers drown the command's own output. The
    # variables take effect when those libraries are imported (commands import them lazily, so
    # `dreamcache db ...` never pays for torch); already imported ones are told directly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            library_logging = importlib.import_module(f"{name}.utils.logging")
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def settings_or_fail(**overrides):
    """The settings; a bad one is `error: <one line naming the variable, or the config file and line>`, exit 1."""
    from dreamcache.app.config import SettingsError, load_settings

    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        fail(str(exc))


@app.command()
def demo(
    output: Optional[Path] = typer.Option(None, help="Where to write the shots (default: $DREAMCACHE_HOME/outputs/demo)."),
    steps: Optional[int] = typer.Option(None, min=1, max=1000,
                                        help="Denoising steps per image; default: the model's recommended ones."),
    seed: int = typer.Option(0, help="Seed of the first image; the others follow."),
    image_scale: Optional[float] = typer.Option(
        None, min=0, max=MAX_IMAGE_SCALE, help="Image guidance scale; default: the model's working point (its adapter "
        "config's recommended scale: 5 for the bundled model; the authors use 0.35 on Stable Diffusion)."),
) -> None:
    """Cache the bundled example product; generate a few shots with its cache and the same without."""
    from dreamcache.app.demo import run_demo

    settings = settings_or_fail()
    typer.echo(f"model: {settings.base_model}  device: {settings.torch_device}  home: {settings.home}")
    try:
        result = run_demo(settings, output_dir=output, steps=steps, seed=seed, image_scale=image_scale)
    except DreamCacheError as exc:
        fail(str(exc))
    typer.echo(f"\nwrote {len(result.images)} shots and their text-only twins to {result.output_dir}")
    typer.echo(f"contact sheet: {result.contact_sheet}")


@app.command()
def inspect(
    architecture: Optional[str] = typer.Option(None, help="sd15, sd21 or sdxl (public configs, random weights)."),
    base: Optional[Path] = typer.Option(None, help="A diffusers model directory (only its UNet config is read)."),
    resolution: Optional[int] = typer.Option(None, min=8, help="Image side in pixels (default: the model's)."),
    preset: str = typer.Option("default", help="Layer preset: default, middle, decoder, encoder, all."),
    dtype: str = typer.Option("float16", help="Cache dtype for the byte count."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Adapter parameters, cached tokens x channels per layer, and cache bytes per subject."""
    from dreamcache.app import inspection
    if (architecture is None) == (base is None):
        fail("give exactly one of --architecture or --base")
    if dtype not in ("float16", "bfloat16", "float32"):
        fail(f"--dtype {dtype!r}: choose float16, bfloat16 or float32")
    try:
        if architecture is not None:
            report = inspection.inspect_architecture(architecture, preset=preset, resolution=resolution, dtype=dtype)
        else:
            unet = inspection.unet_from_base(base)
            report = inspection.inspect_unet(unet, str(base), preset=preset, resolution=resolution, dtype=dtype)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(inspection.to_json(report) if json_output else inspection.to_text(report))


@app.command("convert-checkpoint")
def convert_checkpoint(
    src: Path = typer.Argument(..., help="The authors' checkpoint, e.g. cross_attention-200000.pt."),
    dst: Path = typer.Argument(..., help="Adapter directory to write (adapter_config.json + adapter_model.safetensors)."),
    architecture: str = typer.Option("sd21", help="Base architecture the checkpoint was trained on (sd15 or sd21)."),
) -> None:
    """Convert the authors' released adapter checkpoint into this project's safetensors format."""
    from dreamcache.core.weights import convert_original_checkpoint

    try:
        config = convert_original_checkpoint(src, dst, architecture=architecture)
    except (DreamCacheError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"converted {len(config.layers)} layers (preset {config.preset!r}) to {dst}")


@app.command()
def segment(
    images: list[Path] = typer.Argument(..., help="Product photos."),
    output: Path = typer.Option(Path("segmented"), help="Folder for <name>.mask.png and <name>.subject.png."),
    category: Optional[str] = typer.Option(None, help="Product category, for the text-grounded detector."),
    resolution: int = typer.Option(512, min=16, help="Side of the subject-on-white image."),
) -> None:
    """Cut products out: mask, quality figures and the subject on white (bad items are reported, not fatal)."""
    from PIL import Image

    from dreamcache.core.images import open_image
    from dreamcache.app.loading import load_segmenter

    segmenter = load_segmenter(settings_or_fail())
    output.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in images:
        try:
            image = open_image(path)
            result = segmenter.segment(image, category, name=str(path))
        except DreamCacheError as exc:
            failed += 1
            typer.secho(f"rejected {exc}", fg=typer.colors.RED, err=True)
            continue
        Image.fromarray(result.mask).save(output / f"{path.stem}.mask.png")
        result.subject_on_white(image, resolution).save(output / f"{path.stem}.subject.png")
        notes = "; ".join(result.warnings) or "ok"
        typer.echo(f"{path}: {result.method}, area {result.area_fraction:.1%}, "
                   f"largest part {result.largest_component_share:.0%}: {notes}")
    typer.echo(f"{len(images) - failed} segmented, {failed} rejected; written to {output}")


@app.command()
def score(
    generated: Path = typer.Argument(..., help="A generated image."),
    reference: Path = typer.Argument(..., help="The reference image of its subject."),
    prompt: str = typer.Option(..., help="The prompt it was generated from."),
    category: Optional[str] = typer.Option(None, help="Subject category, for the masked metrics."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """DINO, CLIP-I, CLIP-T and the masked MDINO, MCLIP-I of one image (models from the settings)."""
    import json

    from dreamcache.core.images import open_image
    from dreamcache.app.loading import load_scorer

    scorer = load_scorer(settings_or_fail())
    if not scorer.available:
        fail("no scorer models configured: set DREAMCACHE_CLIP_MODEL and/or DREAMCACHE_DINO_MODEL (see docs/models.md)")
    try:
        (scores,) = scorer.score([open_image(generated)], [open_image(reference)], [prompt], [category],
                                 names=[str(generated)])
    except DreamCacheError as exc:
        fail(str(exc))
    values = {s.name: round(s.value, 4) for s in scores}
    typer.echo(json.dumps(values) if json_output else "  ".join(f"{k} {v:.3f}" for k, v in values.items()))


@app.command("eval")
def evaluate(
    dataset: Path = typer.Argument(..., help="DreamBench folder: one folder per subject + prompts_and_classes.txt."),
    output: Path = typer.Option(Path("eval"), help="Where the images, CSVs and table.md go."),
    images_per_prompt: int = typer.Option(4, min=1, help="Images per subject-prompt pair (the paper: 4)."),
    steps: int = typer.Option(50, min=1, max=1000, help="Denoising steps."),
    guidance: GuidanceChoice = typer.Option(DEFAULT_GUIDANCE, help=f"{COMBINED} (3 evaluations a step) or {JOINT} (2)."),
    text_scale: float = typer.Option(DEFAULT_TEXT_SCALE, min=0, max=MAX_TEXT_SCALE, help="Text guidance scale."),
    image_scale: Optional[float] = typer.Option(None, min=0, max=MAX_IMAGE_SCALE,
                                                help=f"Image guidance scale ({COMBINED}; default {DEFAULT_IMAGE_SCALE})."),
    seed: int = typer.Option(0, help="First seed."),
    max_subjects: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N subjects."),
    max_prompts: Optional[int] = typer.Option(None, min=1, help="Use only the first N prompts of each kind."),
    batch_size: int = typer.Option(8, min=1, help="Images per generation batch."),
) -> None:
    """Generate and score DreamBench: writes Table 2 (DINO, CLIP-I, CLIP-T) and the masked table."""
    from dreamcache.perception.evaluation import EvalSettings, run_eval
    from dreamcache.app.loading import load_pipeline, load_scorer, load_segmenter

    settings = settings_or_fail()
    segmenter = load_segmenter(settings)
    scorer = load_scorer(settings, segmenter)
    if not scorer.available:
        fail("no scorer models configured: set DREAMCACHE_CLIP_MODEL and DREAMCACHE_DINO_MODEL (see docs/models.md)")
    pipe = load_pipeline(settings)
    options = EvalSettings(images_per_prompt, steps, guidance.value, text_scale, image_scale, seed, 0, batch_size,
                           max_subjects, max_prompts)
    try:
        result = run_eval(pipe, scorer, segmenter, dataset, output, options, model_label=f"DreamCache ({settings.base_model})")
    except (DreamCacheError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo((result.output_dir / "table.md").read_text())
    typer.echo(f"written to {result.output_dir}")


def one_line(message: str) -> str:
    """A message on one line: its lines joined with '; ' (a traceback or a multi-line error never reaches users)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main() -> None:
    try:
        app()
    except DreamCacheError as exc:  # raised on purpose, its message names the thing: no traceback
        typer.secho(f"error: {one_line(exc.args[0] if len(exc.args) == 1 else exc)}", fg=typer.colors.RED, err=True)
        sys.exit(1)
