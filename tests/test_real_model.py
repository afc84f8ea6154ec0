"""The real recipe on the real assets, for a few steps (marked slow; CI runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_medical_recipe_then_merge(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["--train.max_steps=3", "--train.batch_size=2", "--data.seq_len=256", "--eval.every_steps=3",
                 "--eval.val_tokens=1024", "--eval.test_tokens=2048", "--eval.qa_questions=4", "--train.progress=false",
                 f"--output_dir={run_dir}"]  # fmt: skip
    result = subprocess.run([sys.executable, "recipes/medical_lora.py", *overrides], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    for variant in ("base", "tuned"):
        assert set(report[variant]) == {"domain_ppl", "general_ppl"}
        assert all(5 < v < 100 for v in report[variant].values()), report  # a real pretrained model's range
    assert report["qa"]["medical"]["questions"] == 4 and 0 <= report["qa"]["medical"]["tuned_accuracy"] <= 1
    assert report["general_kl"] >= 0 and "verdict" in report and report["verdict"]["reasons"]
    leakage = report["diagnostics"]["leakage"]
    assert leakage["test"]["exact"] == 0 and leakage["validation"]["exact"] == 0  # the asset drops held-out copies

    result = subprocess.run([sys.executable, "-m", "peftkit.cli", "merge", str(run_dir), "--out", str(run_dir / "merged")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((run_dir / "merged" / "peftkit_merge.json").read_text())
    assert 0 < check["max_abs_logit_diff_vs_base"] and check["max_abs_logit_diff_vs_adapter"] < 1e-3

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    assert model.config.model_type == "llama" and tokenizer.chat_template
