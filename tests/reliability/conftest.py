"""The reliability tests reuse the catalogue-run fixtures (tiny model, settings, catalogue, Prefect)."""

from tests.flows.conftest import catalogue, platform_env, prefect_env, tiny_model  # noqa: F401
