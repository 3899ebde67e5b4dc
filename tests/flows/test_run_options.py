"""One home for a run parameter (issue 34): `dreamcache run`'s options and the Prefect deployment's form both
come from CatalogueRunParams, and say the same names, defaults, bounds and choices."""

import re

import pytest
import typer.main
from typer.testing import CliRunner

from flows.cli import EXAMPLES, app
from flows.platform.params import CatalogueRunParams

FIELDS = CatalogueRunParams.model_fields
# The command's spellings that are not --field-name (kept from before the options were generated).
RENAMED = {"prompts": "--prompt", "formats": "--format", "publish_prefix": "--publish-to"}


@pytest.fixture(scope="module")
def options() -> dict:
    """`dreamcache run`'s options by the field they set (and use_prefect)."""
    command = typer.main.get_command(app).commands["run"]
    return {param.name: param for param in command.params}


@pytest.fixture(scope="module")
def form() -> dict:
    """The deployment's form: the parameter schema Prefect registers for catalogue_run, field by field."""
    from flows.runs.catalogue import catalogue_run

    return catalogue_run.parameters.model_dump()["definitions"]["CatalogueRunParams"]["properties"]


def _described(option) -> dict:
    """What the command's help says of an option's bounds and choices (its metavar), as JSON Schema says them."""
    said = {}
    match = re.fullmatch(r"<(int|float) (?:(\S+?)(<=|<))?x(?:(<=|<)(\S+))?>", option.metavar or "")
    if match:
        number = int if match[1] == "int" else float
        if match[2]:
            said["minimum" if match[3] == "<=" else "exclusiveMinimum"] = number(match[2])
        if match[5]:
            said["maximum" if match[4] == "<=" else "exclusiveMaximum"] = number(match[5])
    elif option.metavar:
        said["enum"] = option.metavar.strip("<>").split("|")
    elif hasattr(option.type_descriptor.annotation, "__members__"):  # --guidance: typer's choices, an enum's
        said["enum"] = list(option.type_descriptor.annotation.__members__)
    return said


def test_every_run_parameter_is_one_option_and_every_option_a_parameter(options):
    assert set(options) - {"use_prefect"} == set(FIELDS)
    for name, option in options.items():
        if name != "use_prefect":
            assert option.opts[0] == RENAMED.get(name, "--" + name.replace("_", "-")), name
    # The short aliases and the on/off pairs that scripts use.
    assert options["prompts"].opts == ["--prompt", "-p"] and options["formats"].opts == ["--format", "-f"]
    assert options["negative_prompt"].opts == ["--negative-prompt", "-n"]
    assert options["compare_text_only"].secondary_opts == ["--no-compare-text-only"]
    assert options["use_prefect"].opts == ["--prefect"] and options["use_prefect"].secondary_opts == ["--embedded"]
    assert all(options[name].is_flag and not options[name].secondary_opts for name in ("cutout", "packshot", "dry_run"))


def test_the_options_defaults_bounds_and_choices_are_the_forms(options, form):
    assert list(form) == list(FIELDS)  # the form's fields, in the model's order
    for name, field in form.items():
        option = options[name]
        if name == "source":  # the command's own default: the bundled example catalogue (checked below)
            assert option.default is None and "default" not in field
        elif field["type"] == "array":  # a list option not given is the form's empty list
            assert option.default is None and field.get("default", []) == []
        else:
            assert option.default == field["default"], name
        bounds = {key: field[key] for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum")
                  if key in field}
        assert _described(option) == bounds, name
        if name not in ("source", "prompts", "formats", "approve_if"):  # said there in the command's words
            assert option.help == field["description"], name


def test_the_bounds_the_help_shows_are_the_ones_the_run_enforces(platform_env, options):
    assert _described(options["steps"]) == {"minimum": 0, "maximum": 500}
    result = CliRunner().invoke(app, ["run", "-p", "x", "--steps", "501", "--dry-run"])
    assert result.exit_code == 1 and "steps: Input should be less than or equal to 500" in result.output
    result = CliRunner().invoke(app, ["run", "-p", "x", "--mode", "paint", "--dry-run"])
    assert result.exit_code == 1 and "mode: Input should be 'generate' or 'place'" in result.output
    assert "Traceback" not in result.output


def test_a_run_given_no_options_has_the_models_defaults(options):
    from flows.cli import _run_params

    params = _run_params({name: option.default for name, option in options.items()})  # what typer passes
    assert params == CatalogueRunParams(source=str(EXAMPLES / "catalogue"), prompt_file=str(EXAMPLES / "prompts.txt"))


def test_publish_goes_to_the_same_prefix_from_the_command_and_the_library():
    import inspect

    from flows.steps.publish import publish

    command = typer.main.get_command(app).commands["publish"]
    (to,) = [param for param in command.params if param.name == "to"]
    assert to.default == inspect.signature(publish).parameters["prefix"].default == "published"
