import pytest
import torch
from pydantic import ValidationError

from dreamcache.app import config
from dreamcache.app.config import BUNDLED_MODEL, BundledModelMissing, Settings

SETTINGS_VARIABLES = ("DREAMCACHE_CONFIG", "DREAMCACHE_BASE_MODEL", "DREAMCACHE_ADAPTER", "DREAMCACHE_CLIP_MODEL")


def test_defaults(monkeypatch):
    for name in ("DREAMCACHE_HOME", "DREAMCACHE_CONFIG", "DREAMCACHE_BASE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.base_model == BUNDLED_MODEL
    assert settings.home.is_absolute() and settings.home.name == ".dreamcache"
    assert settings.torch_dtype == (torch.float16 if torch.cuda.is_available() else torch.float32)


def test_environment_overrides_the_file_which_overrides_defaults(tmp_path, monkeypatch):
    config = tmp_path / "dreamcache.toml"
    config.write_text('base_model = "stabilityai/stable-diffusion-2-1-base"\ndtype = "bfloat16"\nhome = "/data/dc"\n')
    monkeypatch.setenv("DREAMCACHE_CONFIG", str(config))
    monkeypatch.setenv("DREAMCACHE_DTYPE", "float32")
    settings = Settings()
    assert settings.base_model == "stabilityai/stable-diffusion-2-1-base"
    assert settings.torch_dtype == torch.float32
    assert str(settings.home) == "/data/dc"


def test_bad_values_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMCACHE_DTYPE", "float8")
    with pytest.raises(ValidationError, match="dtype"):
        Settings()
    monkeypatch.delenv("DREAMCACHE_DTYPE")
    monkeypatch.setenv("DREAMCACHE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        Settings()


def test_unknown_keys_in_the_file_are_errors(tmp_path, monkeypatch):
    config = tmp_path / "dreamcache.toml"
    config.write_text('base_modle = "typo"\n')
    monkeypatch.setenv("DREAMCACHE_CONFIG", str(config))
    with pytest.raises(ValidationError, match="base_modle"):
        Settings()


def test_the_bundled_model_supplies_what_is_unset_and_nothing_else(monkeypatch, tmp_path):
    for name in SETTINGS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    bundled = Settings()
    assert bundled.resolved_base_model == str(config.BUNDLED_DIR / "base")
    assert bundled.resolved_adapter == str(config.BUNDLED_DIR / "adapter")
    assert bundled.resolved_clip_model == str(config.BUNDLED_DIR / "clip")
    (tmp_path / "adapter").mkdir()  # a local path must exist (a hub id is looked up when loaded)
    own = Settings(adapter=str(tmp_path / "adapter"), clip_model="openai/clip-vit-base-patch32")
    assert (own.resolved_adapter, own.resolved_clip_model) == (str(tmp_path / "adapter"), "openai/clip-vit-base-patch32")
    assert own.resolved_base_model == str(config.BUNDLED_DIR / "base")
    real = Settings(base_model="stabilityai/stable-diffusion-2-1-base")
    assert (real.resolved_base_model, real.resolved_adapter, real.resolved_clip_model) == (
        "stabilityai/stable-diffusion-2-1-base", None, None)


def test_a_missing_bundled_model_is_named_with_what_to_do(tmp_path, monkeypatch):
    for name in SETTINGS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config, "BUNDLED_DIR", tmp_path / "product-world")
    with pytest.raises(BundledModelMissing, match=r"base/ is incomplete: .*base/model_index.json is missing.*"
                                                  r"DREAMCACHE_BASE_MODEL"):
        Settings().resolved_base_model
    # A base of one's own needs nothing from the package.
    (tmp_path / "sd").mkdir()
    own = Settings(base_model=str(tmp_path / "sd"))
    assert (own.resolved_base_model, own.resolved_adapter, own.resolved_clip_model) == (str(tmp_path / "sd"), None, None)
