"""Settings, in one typed object, read from `DREAMCACHE_*` environment variables and a TOML file.

Precedence: explicit arguments, then environment variables, then the file named by
`DREAMCACHE_CONFIG` (TOML, same field names without the prefix), then the defaults below.
The CLI, the flows and the tests all build their settings here.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource,
)

from dreamcache.core.errors import DreamCacheError
from dreamcache.core.adapter_config import Recommended, read_adapter_config

if TYPE_CHECKING:  # torch is imported where a device or dtype is asked for, never by reading the settings
    import torch

BUNDLED_MODEL = "bundled:product-world"
# The project's own model of the procedural product world (docs/toy-world.md), shipped in the package
# and read in place: a Stable Diffusion directory, its DreamCache adapters, the world's CLIP and DINO
# scorers and its segmenter.
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "assets" / "product-world"
# Each part of the bundled model and the file that shows it is there.
BUNDLED_PARTS = {"base": "model_index.json", "adapter": "adapter_config.json", "clip": "config.json",
                 "dino": "config.json", "segmenter": "segmenter_config.json"}


class SettingsError(DreamCacheError, ValueError):
    """A setting or the config file is wrong: one line naming the variable (or the file and line) and the problem."""


def _looks_local(value: str) -> bool:
    """Whether a model setting names a local path rather than a hub id ("org/name"): absolute, ./, ../ or ~."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


class BundledModelMissing(DreamCacheError, FileNotFoundError):
    """A part of the bundled model is not in the installed package."""


def bundled_part(name: str) -> Path:
    """The folder of one part of the bundled model (BUNDLED_PARTS), or an error naming what is missing."""
    folder = BUNDLED_DIR / name
    marker = folder / BUNDLED_PARTS[name]
    if not marker.is_file():
        raise BundledModelMissing(
            f"the bundled model's {name}/ is incomplete: {marker} is missing. Reinstall the package "
            "(a checkout needs the committed dreamcache/assets/product-world/), or set DREAMCACHE_BASE_MODEL "
            "(and DREAMCACHE_ADAPTER, DREAMCACHE_CLIP_MODEL, DREAMCACHE_DINO_MODEL) to a model of your own")
    return folder


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DREAMCACHE_", extra="forbid", validate_default=True)

    home: Path = Field(
        default=Path("~/.dreamcache"),
        description="Data directory of the embedded default: the database, objects (caches, shots) and outputs.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the platform database; default: a SQLite file in `home`. "
        "Production: postgresql+psycopg://user@host/db (password from the URL or PGPASSWORD).",
    )
    objects_url: str | None = Field(
        default=None,
        description="Object storage root: s3://bucket/prefix, or a local directory; default: `home`/objects. "
        "S3 endpoint and credentials come from the standard AWS environment and config.",
    )
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint as a browser reaches it, for the links in run artifacts and the review form "
        "(presigned URLs), when it is not the one the platform uses (AWS_ENDPOINT_URL): in the compose stack "
        "workers use http://minio:9000 and a browser http://localhost:9000. Unset: the platform's own.",
    )
    lease_seconds: int = Field(
        default=60, ge=5, le=86_400, description="How long a claimed item and a run stay a worker's without a heartbeat (renewed "
        "every quarter of it while the worker lives); then others may take the items, and the run counts as crashed.",
    )
    allowed_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Where runs may read products, manifests and prompt files: local folders and s3://bucket/prefix "
        "places, comma-separated (or a JSON list). Unset: each run only its own catalogue's folder or prefix and "
        "the project's examples. Set it wherever people you do not fully trust start runs (the Prefect UI).",
    )
    base_model: str = Field(
        default=BUNDLED_MODEL,
        description="Base Stable Diffusion pipeline: a local diffusers directory, a hub id, or the bundled model "
        f"({BUNDLED_MODEL!r}, the product-world model).",
    )
    adapter: str | None = Field(
        default=None,
        description="DreamCache adapter directory (adapter_config.json + adapter_model.safetensors); "
        "None uses the bundled model's adapters.",
    )
    preset: str = Field(default="default", description="Layer preset for freshly initialised adapters.")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="'auto' is float16 on CUDA and float32 on CPU."
    )
    fast_paths: Literal["auto", "off"] = Field(
        default="auto",
        description="'auto': on CUDA, compiled UNet halves, CUDA graphs and padded static batches (the first "
        "batch of a shape compiles, about a minute); everywhere, combined guidance shares its encoder half. "
        "'off': eager passes, as plain diffusers runs them.",
    )
    sam_checkpoint: Path | None = Field(
        default=None, description="Segment Anything checkpoint (.pth or .safetensors); unset: the bundled model's "
        "segmenter with the bundled model, else the border-colour segmenter."
    )
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] | None = Field(
        default=None, description="SAM size; unset: read from the checkpoint's file name."
    )
    detector_model: str | None = Field(
        default=None, description="Text-grounded detector for SAM's box (OWL-ViT, OWLv2, Grounding DINO): directory or hub id."
    )
    clip_model: str | None = Field(
        default=None, description="CLIP ViT-B/32 scorer: local directory or hub id; unset with the bundled model: "
        "the product world's CLIP.")
    dino_model: str | None = Field(
        default=None, description="DINO ViT-S/16 scorer: local directory or hub id; unset with the bundled model: "
        "the product world's DINO.")

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _split_places(cls, value):
        if isinstance(value, str):  # from the environment: a JSON list or comma-separated
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        if not isinstance(value, list) or not all(isinstance(place, str) for place in value):
            raise ValueError("give the places as text: comma-separated, or a list of strings")
        return [place.strip() for place in value if place.strip()]

    @field_validator("device", mode="after")
    @classmethod
    def _a_device(cls, value: str) -> str:
        # The usual names pass without torch (settings are read by commands that never load a model); others
        # are torch's to judge.
        if value != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
            import torch

            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError("not a device: use auto, cpu, cuda or cuda:N") from None
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _a_database_url(cls, value: str | None) -> str | None:
        # Checked here, so that a typo is one line now rather than the driver's traceback later; the URL is
        # never repeated in the message (it may hold a password).
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme.split("+")[0] not in ("sqlite", "postgresql"):
                raise ValueError("the URL's scheme is neither sqlite:// nor postgresql+psycopg://")
            try:
                parts.port
            except ValueError:
                raise ValueError("the URL's port is not a number from 1 to 65535") from None
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("base_model", "adapter", "clip_model", "dino_model", "detector_model", mode="after")
    @classmethod
    def _local_folders_exist(cls, value: str | None) -> str | None:
        # A hub id ("org/name") is looked up when loaded; a local path is checked now, so that a typo is
        # named here rather than as the hub's complaint about an invalid repo id.
        if value and _looks_local(value):
            folder = Path(value).expanduser()
            if not folder.exists():
                raise ValueError(f"folder {value} does not exist")
            if not folder.is_dir():
                raise ValueError(f"{value} is a file; give the model's folder")
        return value

    @field_validator("sam_checkpoint", mode="after")
    @classmethod
    def _checkpoint_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get("DREAMCACHE_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"DREAMCACHE_CONFIG names {config_file}, which is not a file")
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
        return sources

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.float16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'dreamcache.db'}"

    @property
    def resolved_objects_url(self) -> str:
        return self.objects_url or str(self.home / "objects")

    # The bundled model's parts stand in wherever a setting is unset and the base is the bundled model.
    @property
    def resolved_base_model(self) -> str:
        return str(bundled_part("base")) if self.base_model == BUNDLED_MODEL else self.base_model

    @property
    def resolved_adapter(self) -> str | None:
        if self.adapter or self.base_model != BUNDLED_MODEL:
            return self.adapter
        return str(bundled_part("adapter"))

    @property
    def resolved_clip_model(self) -> str | None:
        if self.clip_model or self.base_model != BUNDLED_MODEL:
            return self.clip_model
        return str(bundled_part("clip"))

    @property
    def resolved_dino_model(self) -> str | None:
        if self.dino_model or self.base_model != BUNDLED_MODEL:
            return self.dino_model
        return str(bundled_part("dino"))

    @property
    def resolved_world_segmenter(self) -> Path | None:
        """The bundled world's segmenter: with the bundled model, unless a SAM checkpoint is configured."""
        if self.sam_checkpoint or self.base_model != BUNDLED_MODEL:
            return None
        return bundled_part("segmenter")

    @property
    def recommended(self) -> Recommended:
        """The model's recommended sampling settings (from its adapter config), read without loading the model."""
        adapter = self.resolved_adapter
        return read_adapter_config(adapter).recommended if adapter and Path(adapter).is_dir() else Recommended()

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"


def load_settings(**overrides) -> Settings:
    """The settings (`overrides`, then the environment, then the config file, then the defaults), or a
    SettingsError whose message is one line naming the variable, or the config file and line, at fault."""
    config_file = os.environ.get("DREAMCACHE_CONFIG") or None
    unknown = _unknown_variables()
    if unknown:
        raise SettingsError("; ".join(unknown))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, overrides, config_file)) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        where = f" line {found[1]}" if found else ""
        if found:
            message = f"{message[:found.start()]} (column {found[2]})"
        raise SettingsError(f"config file {config_file}{where}: {message[:1].lower()}{message[1:]}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"config file {config_file}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:  # DREAMCACHE_CONFIG names no file, or one that cannot be read
        if config_file and not Path(config_file).is_file():
            raise SettingsError(f"DREAMCACHE_CONFIG: {config_file} is not a file") from None
        raise SettingsError(f"config file {config_file}: cannot be read ({exc.strerror or exc})") from None


# DREAMCACHE_ names that are not settings: the config file's name, and the deployment's (infra/).
OTHER_VARIABLES = ("DREAMCACHE_CONFIG", "DREAMCACHE_DB_PASSWORD", "DREAMCACHE_CODE_DIR", "DREAMCACHE_IMAGE",
                   "DREAMCACHE_TAG")


def _unknown_variables() -> list[str]:
    """A problem for each DREAMCACHE_ variable that is no setting (a typo would otherwise be ignored), with the
    nearest known name; never its value."""
    known = [f"DREAMCACHE_{name.upper()}" for name in Settings.model_fields]
    problems = []
    for name in sorted(os.environ):
        upper = name.upper()
        if upper.startswith("DREAMCACHE_") and upper not in known and upper not in OTHER_VARIABLES:
            close = difflib.get_close_matches(upper, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
            problems.append(f"unknown setting {name} ({hint}); unset it")
    return problems


def _describe(exc: ValidationError, overrides: dict, config_file: str | None) -> str:
    """A ValidationError of Settings in one line: each problem with where its value came from."""
    environment = {name.upper(): name for name in os.environ}
    file_text = _read_text(config_file)
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        variable = f"DREAMCACHE_{field.upper()}"
        message = error["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, Settings.model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(Settings.model_fields)})"
            if field in overrides or not config_file:
                problems.append(f"unknown setting {field!r}{hint}")
            else:
                problems.append(f"config file {config_file}{_line_of(file_text, field) or ''}: unknown setting "
                                f"{field!r}{hint}")
            continue
        if field in overrides:
            where = field
        elif variable in environment:
            where = variable
        elif config_file and _line_of(file_text, field) is not None:
            where = f"config file {config_file}{_line_of(file_text, field)}: {field}"
        else:
            where = variable
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def _read_text(path: str | None) -> str:
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


def _line_of(text: str, key: str) -> str | None:
    """' line N' where the TOML text sets `key` at the top level, or None."""
    pattern = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("["):
            break  # a table: the keys below are not settings
        if pattern.match(line):
            return f" line {number}"
    return None
