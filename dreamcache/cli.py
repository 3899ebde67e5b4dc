"""The `dreamcache` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from dreamcache.errors import DreamCacheError

app = typer.Typer(
    help="DreamCache: personalised product shots from cached reference features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def demo(
    output: Optional[Path] = typer.Option(None, help="Where to write the shots (default: $DREAMCACHE_HOME/outputs/demo)."),
    steps: int = typer.Option(25, min=1, max=1000, help="Denoising steps per image."),
    seed: int = typer.Option(0, help="Seed of the first image; the others follow."),
) -> None:
    """Cache the bundled example product and generate a few personalised shots."""
    from dreamcache.config import Settings
    from dreamcache.demo import run_demo

    settings = Settings()
    typer.echo(f"model: {settings.base_model}  device: {settings.torch_device}  home: {settings.home}")
    try:
        result = run_demo(settings, output_dir=output, steps=steps, seed=seed)
    except DreamCacheError as exc:
        _fail(str(exc))
    typer.echo(f"\nwrote {len(result.images)} shots to {result.output_dir}")
    typer.echo(f"contact sheet: {result.contact_sheet}")
    if result.untrained:
        typer.secho(
            "note: the bundled model is a tiny, randomly initialised Stable Diffusion: its images are noise.\n"
            "      Point DREAMCACHE_BASE_MODEL and DREAMCACHE_ADAPTER at a real base model and trained adapters.",
            fg=typer.colors.YELLOW,
        )


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
    from dreamcache import inspection

    if (architecture is None) == (base is None):
        _fail("give exactly one of --architecture or --base")
    if dtype not in ("float16", "bfloat16", "float32"):
        _fail(f"--dtype {dtype!r}: choose float16, bfloat16 or float32")
    try:
        if architecture is not None:
            report = inspection.inspect_architecture(architecture, preset=preset, resolution=resolution, dtype=dtype)
        else:
            unet = inspection.unet_from_base(base)
            report = inspection.inspect_unet(unet, str(base), preset=preset, resolution=resolution, dtype=dtype)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(inspection.to_json(report) if json_output else inspection.to_text(report))


@app.command("convert-checkpoint")
def convert_checkpoint(
    src: Path = typer.Argument(..., help="The authors' checkpoint, e.g. cross_attention-200000.pt."),
    dst: Path = typer.Argument(..., help="Adapter directory to write (adapter_config.json + adapter_model.safetensors)."),
    architecture: str = typer.Option("sd21", help="Base architecture the checkpoint was trained on (sd15 or sd21)."),
) -> None:
    """Convert the authors' released adapter checkpoint into this project's safetensors format."""
    from dreamcache.weights import convert_original_checkpoint

    try:
        config = convert_original_checkpoint(src, dst, architecture=architecture)
    except (DreamCacheError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"converted {len(config.layers)} layers (preset {config.preset!r}) to {dst}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Loading bars and notices from diffusers/transformers drown the command's own output.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    app()
