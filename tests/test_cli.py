import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_clean_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("peftkit: error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["recipes/medical_lora.py", "--train.lrr=1"], "did you mean 'train.lr'"),
        (["recipes/medical_lora.py", "--train.batch_size=-1"], "train.batch_size"),
        (["-m", "peftkit.cli", "train", "nope.yaml"], "nope.yaml: no such recipe or config file"),
        (["-m", "peftkit.cli", "eval", "/nonexistent/run"], "no adapter/ folder"),
        (["-m", "peftkit.cli", "merge", "/nonexistent/run", "--out", "/tmp/x"], "no adapter/ folder"),
        (["-m", "peftkit.cli", "fetch", "nope"], "unknown asset 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    assert_clean_error(run(*args), fragment)


def test_yaml_config_with_a_bad_value_names_file_and_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: fast\n")
    assert_clean_error(run("-m", "peftkit.cli", "train", str(config)), "c.yaml: config key 'train.lr' must be a number")


def test_recipe_help_lists_every_key():
    result = run("recipes/medical_lora.py", "--help")
    assert result.returncode == 0
    assert "--train.lr" in result.stdout and "--eval.patience" in result.stdout


def test_train_eval_merge_from_the_cli(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    tiny_config.save_yaml(config)
    out = tmp_path / "run"
    result = run("-m", "peftkit.cli", "train", str(config), "--train.max_steps=4", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr
    assert "domain ppl" in result.stdout
    before = json.loads((out / "report.json").read_text())

    result = run("-m", "peftkit.cli", "eval", str(out))
    assert result.returncode == 0, result.stderr
    after = json.loads((out / "report.json").read_text())
    assert after["tuned"]["domain_ppl"] == pytest.approx(before["tuned"]["domain_ppl"], rel=1e-5)
    assert after["best_step"] == before["best_step"]  # recomputing keeps the training record

    result = run("-m", "peftkit.cli", "merge", str(out), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors").exists()

    result = run(
        "-m", "peftkit.cli", "generate", str(out), "--prompt", "the patient", "--max-new-tokens", "4", "--no-stream"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("--- adapter0\n")

    for name in ("report.md", "report.html", "loss_curves.png"):
        (out / name).unlink()
    result = run("-m", "peftkit.cli", "report", str(out))
    assert result.returncode == 0, result.stderr
    assert "domain ppl" in result.stdout
    assert_report_pages_say(out, json.loads((out / "report.json").read_text()))


def assert_report_pages_say(run_dir, report):
    """report.md and report.html carry the report's verdict, every reason (the deciding ones in bold), the
    base/tuned numbers, the kept step, the config and the loss curves, not only a title."""
    import base64
    import html
    import re

    md, page = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    verdict, png = report["verdict"], (run_dir / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and verdict["reasons"] and verdict["deciding"]
    assert f"**Verdict: {verdict['summary']}**" in md and html.escape(verdict["summary"]) in page
    for reason in verdict["reasons"]:
        bold = reason in verdict["deciding"]
        assert (f"- **{reason}**" if bold else f"- {reason}\n") in md, reason
        assert (f"<li><b>{html.escape(reason)}</b></li>" if bold else f"<li>{html.escape(reason)}</li>") in page
    for name in ("domain", "general"):
        base, tuned = report["base"][f"{name}_ppl"], report["tuned"][f"{name}_ppl"]
        low, high = report["change_ci95"][f"{name}_ppl"]
        change = report["change"][f"{name}_ppl"]
        cells = [f"{name} ppl", f"{base:.2f}", f"{tuned:.2f}", f"{change:+.1%}", f"[{low:+.1%}, {high:+.1%}]"]
        assert f"| {' | '.join(cells)} |" in md, cells
        assert "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" in page, cells
    kept = f"Kept checkpoint: step {report['adapter_step']} of {report['final_step']}"  # the training side: top level
    assert kept in md and kept in page
    config = (run_dir / "config.yaml").read_text().strip()
    assert f"```yaml\n{config}\n```" in md and html.escape(config) in page
    assert "![loss curves](loss_curves.png)" in md
    [embedded] = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(embedded) == png


def test_cross_validation_trains_one_adapter_per_fold(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    tiny_config.save_yaml(config)
    out = tmp_path / "cv"
    result = run("-m", "peftkit.cli", "cv", str(config), "--folds", "2", "--train.max_steps=4",
                 "--eval.diagnostics=false", f"--output_dir={out}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "cv.json").read_text())
    assert summary["folds"] == 2 and len(summary["per_fold"]) == 2
    assert (out / "fold-0" / "adapter").is_dir() and (out / "fold-1" / "adapter").is_dir()
    assert "validation perplexity over 2 folds" in result.stdout
    # each fold trains and validates on its own split: a fold index ignored would give two equal runs
    first, second = (load_file(out / f"fold-{k}" / "adapter" / "adapter_model.safetensors") for k in (0, 1))
    assert first.keys() == second.keys() and any(not torch.equal(first[key], second[key]) for key in first)
    assert summary["per_fold"][0]["val_ppl"] != summary["per_fold"][1]["val_ppl"]
    assert summary["val_ppl_std"] > 0


def test_doctor_reports_the_environment(tmp_path):
    import os

    result = subprocess.run([sys.executable, "-m", "peftkit.cli", "doctor"], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PEFTKIT_CACHE": str(tmp_path)}, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for fragment in ("packages: peftkit", "cpu: ", "gpus: ", "bf16 compute: ", "bitsandbytes: ",
                     f"asset cache: {tmp_path}", "smollm2-135m-instruct: not fetched"):  # fmt: skip
        assert fragment in result.stdout, fragment


def test_quiet_mode_turns_progress_bars_off(monkeypatch):
    from peftkit import progress

    monkeypatch.delenv("PEFTKIT_QUIET", raising=False)
    assert not progress.bar(total=3).disable
    monkeypatch.setenv("PEFTKIT_QUIET", "1")
    assert progress.bar(total=3).disable and progress.bar(range(3), desc="x").disable
    from peftkit.cli import build_parser

    assert build_parser().parse_args(["--quiet", "doctor"]).quiet
