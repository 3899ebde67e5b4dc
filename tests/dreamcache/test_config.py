import pytest
import torch
from pydantic import ValidationError

from dreamcache.config import BUNDLED_MODEL, Settings


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
    assert str(settings.home) == "/data/dc" and settings.models_dir == settings.home / "models"


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
