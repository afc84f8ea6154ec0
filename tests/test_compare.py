"""`peftkit compare`: several methods, one recipe, one table (tiny model, subprocess per method)."""

import json
import subprocess
import sys

from peftkit.compare import METHODS


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
