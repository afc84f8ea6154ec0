"""Every shipped recipe builds a valid config, and the commands in its docstring parse."""

import dataclasses
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import Config
from peftkit.cli import load_target

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.py"))

# Each family recipe's difference from medical_lora.py, as it was when the recipes spelled their method
# out in full (before they read the method presets): a preset that changes shows up here.
FAMILY_RECIPES = {
    "medical_dora.py": {"method.name": "dora"},
    "medical_ia3.py": {
        "method.name": "ia3",
        "method.target_modules": ["k_proj", "v_proj", "down_proj"],
        "train.lr": 5e-3,
    },
    "medical_lokr.py": {"method.name": "lokr", "train.lr": 1e-3},
    "medical_prompt_tuning.py": {"method.name": "prompt_tuning", "train.lr": 3e-2},
    "medical_qlora.py": {"method.name": "qlora", "model.quantization": "nf4"},
    "medical_top_layers.py": {"method.name": "top_layers", "train.lr": 1e-4},
}


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


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


@pytest.mark.parametrize("name", FAMILY_RECIPES)
def test_family_recipe_is_medical_lora_with_its_method_preset(name):
    medical_lora = _flat(load_target(str(RECIPES[0].parent / "medical_lora.py")).to_dict())
    family = _flat(load_target(str(RECIPES[0].parent / name)).to_dict())
    assert family == medical_lora | FAMILY_RECIPES[name] | {"output_dir": f"runs/{Path(name).stem}"}


@pytest.mark.parametrize("name", FAMILY_RECIPES)
def test_family_recipe_runs_as_a_script(name):
    # `python recipes/X.py` (and `accelerate launch`, which runs it the same way) finds medical_lora.py
    done = subprocess.run([sys.executable, str(RECIPES[0].parent / name), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and f"usage: recipes/{name}" in done.stdout, done.stderr[-2000:]


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
