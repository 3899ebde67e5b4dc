"""What the package ships (the bundled model, the example catalogue) holds no path of the machine it was
made on: a JSON value or key, or a safetensors file's metadata, that names an absolute path is a finding."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreamcache.app.config import BUNDLED_DIR
from dreamcache.core.pipeline import DreamCachePipeline
from dreamcache.core.weights import base_identity, read_adapter_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "dreamcache" / "assets", ROOT / "flows" / "examples")
# /tmp/x, ~/x, C:\x, \\server\x, file:/x. A lone "/" or "~" (tokenizer vocabularies hold both) names nothing.
ABSOLUTE = re.compile(r"^(?:~?/|[A-Za-z]:[\\/]|\\\\|file:/+)[\w.\-]")


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def shipped_texts(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return list(strings(f.metadata() or {}))
    return list(strings(json.loads(path.read_text())))


def shipped_files() -> list[Path]:
    return sorted(p for root in SHIPPED for p in root.rglob("*") if p.suffix in (".json", ".safetensors"))


def test_the_pattern_finds_machine_paths_and_nothing_else():
    assert all(ABSOLUTE.match(s) for s in ("/tmp/world/model/base", "~/models/sd", "C:\\models\\sd",
                                           "\\\\server\\models", "file:///x"))
    assert not any(ABSOLUTE.match(s) for s in ("/", "~", "/</w>", "stabilityai/stable-diffusion-2-1-base",
                                               "fingerprint:477b", "bundled:product-world"))


def test_the_bundled_model_is_shipped():
    names = {p.relative_to(ROOT).as_posix() for p in shipped_files()}
    assert "dreamcache/assets/product-world/adapter/adapter_config.json" in names
    assert "dreamcache/assets/product-world/base/unet/diffusion_pytorch_model.safetensors" in names


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_shipped_file_holds_a_machine_path(path):
    found = [text for text in shipped_texts(path) if ABSOLUTE.match(text)]
    assert not found, f"{path.relative_to(ROOT)} names paths of the machine it was made on: {found[:5]}"


def test_the_bundled_adapters_name_the_bundled_base_by_its_weights():
    pipe = DreamCachePipeline.from_pretrained(BUNDLED_DIR / "base", dtype=torch.float32)
    named = read_adapter_config(BUNDLED_DIR / "adapter").base_model
    assert named == base_identity(BUNDLED_DIR / "base", pipe.unet, pipe.vae)
    assert named.startswith("fingerprint:")
