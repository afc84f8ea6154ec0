"""`peftkit compare`: several methods, one recipe, one table (tiny model, subprocess per method)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import Config, PeftkitError, methods
from peftkit.cli import load_target
from peftkit.compare import METHODS, chart, format_table

MEDICAL_LORA = Path(__file__).resolve().parents[1] / "recipes" / "medical_lora.py"

# compare.py's own per-method overrides before they became presets in the method registry (in its
# table order): every preset must resolve a LoRA recipe to the config these did.
OVERRIDES_BEFORE_PRESETS = {
    "lora": [],
    "rslora": ["--method.rslora=true"],
    "dora": ["--method.name=dora"],
    "pissa": ["--method.init=pissa"],
    "lora_plus": ["--method.lora_plus_ratio=16", "--train.lr=2.5e-4"],
    "qlora": ["--model.quantization=nf4", "--method.name=qlora"],
    "adalora": ["--method.name=adalora"],
    "ia3": ["--method.name=ia3", "--method.target_modules=k_proj,v_proj,down_proj", "--train.lr=5e-3"],
    "loha": ["--method.name=loha", "--method.r=8", "--method.alpha=16"],
    "lokr": ["--method.name=lokr", "--train.lr=1e-3"],
    "prompt_tuning": ["--method.name=prompt_tuning", "--train.lr=3e-2"],
    "prefix_tuning": ["--method.name=prefix_tuning", "--train.lr=1e-2"],
    "top_layers": ["--method.name=top_layers", "--method.top_layers=2", "--train.lr=1e-4"],
}


def test_compare_tabulates_each_method_from_its_own_run(tiny_config, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    tiny_config.save_yaml(config_file)
    out = tmp_path / "compare"
    command = [sys.executable, "-m", "peftkit.cli", "compare", str(config_file), "--out", str(out),
               "--methods", "lora", "ia3", "prompt_tuning", "--train.max_steps=4", "--eval.every_steps=2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "ia3", "prompt_tuning"]
    assert len({r["trainable_params"] for r in rows}) == 3  # each run really used its own method
    for row in rows:
        report = json.loads((out / row["method"] / "report.json").read_text())
        assert report["method"] == row["method"] and report["train_tokens"] == 4 * 4 * 32
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 100  # a python process with torch loaded
        assert row["domain_ppl"] == round(report["tuned"]["domain_ppl"], 2)
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 3 and "| ia3 |" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_rejects_unknown_methods(tiny_config, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    tiny_config.save_yaml(config_file)
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "compare", str(config_file), "--methods", "lora", "magic"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "unknown magic" in done.stderr and "Traceback" not in done.stderr
    assert "top_layers" in METHODS


def test_rerunning_some_methods_keeps_the_other_rows(tmp_path):
    from peftkit.compare import _merge_rows

    path = tmp_path / "compare.json"
    path.write_text(json.dumps([{"method": "lora", "x": 1}, {"method": "ia3", "x": 2}]))
    rows = _merge_rows(path, [{"method": "dora", "x": 3}, {"method": "lora", "x": 4}])
    assert rows == [{"method": "lora", "x": 4}, {"method": "dora", "x": 3}, {"method": "ia3", "x": 2}]


@pytest.mark.parametrize("recipe", ["medical_lora", "tiny"])
def test_each_preset_resolves_a_lora_recipe_as_compares_overrides_did(recipe, tiny_config):
    base = tiny_config if recipe == "tiny" else load_target(str(MEDICAL_LORA))
    presets = methods.presets()
    assert list(presets) == list(OVERRIDES_BEFORE_PRESETS)  # the same names in the same table order
    for name, before in OVERRIDES_BEFORE_PRESETS.items():
        assert presets[name].apply(base) == base.override(before), name
        assert METHODS[name] == presets[name].overrides()  # what compare passes to each run
    assert presets["pissa"].method == "lora" and presets["qlora"].method == "qlora"
    with pytest.raises(PeftkitError, match="unknown preset 'magic'; choose from lora, rslora"):
        methods.preset("magic")


def test_compare_without_general_text_shows_no_general_column(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, general_source=""))
    config_file = tmp_path / "tiny.yaml"
    config.save_yaml(config_file)
    out = tmp_path / "compare"
    cli = [sys.executable, "-m", "peftkit.cli", "compare", str(config_file), "--out", str(out)]
    flags = ["--methods", "lora", "--train.max_steps=2", "--eval.every_steps=2"]
    done = subprocess.run([*cli, *flags], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((out / "compare.json").read_text())
    assert row["general_ppl_base"] is None and row["general_ppl"] is None and row["domain_ppl"] > 0
    cells = [c.strip() for c in (out / "compare.md").read_text().splitlines()[2].split("|")]
    assert cells[6].startswith(f"{row['domain_ppl_base']} -> {row['domain_ppl']}") and cells[7] == "-"
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_table_and_chart_skip_a_missing_general_perplexity(tmp_path):
    row = {
        "method": "lora",
        "trainable_params": 10,
        "trainable_share": 0.01,
        "tokens_per_s": 5.0,
        "peak_rss_mb": 100.0,
        "domain_ppl_base": 20.0,
        "domain_ppl": 10.0,
        "general_ppl_base": 30.0,
        "general_ppl": 33.0,
        "general_kl": None,
        "medical_qa_base": None,
        "medical_qa": None,
        "verdict": "yes",
    }
    rows = [row, row | {"method": "ia3", "general_ppl_base": None, "general_ppl": None}]
    lines = format_table(rows).splitlines()
    assert "| 30.0 -> 33.0 (+10.0%) |" in lines[2] and "| 20.0 -> 10.0 (-50.0%) | - |" in lines[3]
    chart(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_arms_sweep_a_recipe_and_bad_arm_names_are_refused(tiny_config, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    tiny_config.save_yaml(config_file)
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "peftkit.cli", "compare", str(config_file), "--out", str(out), "--train.max_steps=3",
               "--eval.every_steps=3", "--arm", "lr-low", "train.lr=1e-5", "--arm", "r2", "method.r=2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(rows) == ["lr-low", "r2"] and all(r["steps"] == 3 for r in rows.values())  # no default methods
    assert Config.from_yaml(out / "lr-low" / "config.yaml").train.lr == 1e-5
    assert rows["r2"]["trainable_params"] < rows["lr-low"]["trainable_params"]  # r=2 against the recipe's r
    done = subprocess.run([*command[:7], "--arm", "train.lr=1"], capture_output=True, text=True)
    assert done.returncode == 2 and "--arm train.lr=1: an arm starts with a new name" in done.stderr
    done = subprocess.run([*command[:7], "--arm", "x", "--train.lr=1"], capture_output=True, text=True)
    assert done.returncode == 2 and "--train.lr=1 after --arm: overrides for every run go before" in done.stderr
