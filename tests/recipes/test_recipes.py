"""Every shipped recipe builds a valid config, and the commands in its docstring parse."""

import importlib.util
import shlex
from pathlib import Path

import pytest

from peftkit import Config
from peftkit.cli import load_target

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.py"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_config_validates_and_documents_its_commands(path):
    config = load_target(str(path))
    assert isinstance(config, Config)
    assert Config.from_dict(config.to_dict()) == config

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = module.__doc__ or ""
    commands = [line.strip() for line in doc.splitlines() if f"recipes/{path.name}" in line]
    assert commands, f"{path.name}: the docstring should show how to run it"
    for command in commands:
        overrides = [a for a in shlex.split(command) if a.startswith("--")]
        config.override(overrides)  # raises PeftkitError if the documented command would not parse
