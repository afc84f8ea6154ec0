"""Every shipped recipe builds a valid config, and the commands in its docstring parse."""

import dataclasses
import importlib.util
import json
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


def test_small_data_study_fills_its_table(tiny_config, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("small_data_study", RECIPES[0].parent / "small_data_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SIZES", (20, 60))
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(tiny_config.train, max_steps=4),
        eval=dataclasses.replace(tiny_config.eval, val_tokens=64, test_tokens=64, prompt_tokens=16),
        output_dir=str(tmp_path / "study"),
    )
    rows = module.study(config, log=lambda _: None)
    assert [r["train_docs"] for r in rows] == [20, 60]
    for row in rows:
        assert row["base_prompted"] > 0 and all(row[name] > 0 for name in module.VARIANTS)
    table = (tmp_path / "study" / "study.md").read_text()
    assert table.count("\n| 20 |") == 1 and "LoRA + replay" in table
    assert json.loads((tmp_path / "study" / "study.json").read_text()) == rows
