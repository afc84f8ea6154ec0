"""Several methods on the same data and token budget, side by side: what each costs and gains.

Each method trains in its own process (`peftkit train RECIPE` with the method's overrides), so
its peak memory is its own (read from the operating system's accounting of that child process).
The table: trainable parameters, training tokens/s, peak RSS, domain and general perplexity
(base -> tuned), KL from the base model's answers, QA accuracy and the verdict, as Markdown, JSON
and a PNG chart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import methods as registry
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.evaluation.run_report import RunReport

# Each method's overrides on top of the recipe (a LoRA recipe), in their command-line form: the presets
# declared with the methods in peftkit/methods (compare() reads them there; this is for readers of the table).
METHODS: dict[str, list[str]] = {name: preset.overrides() for name, preset in registry.presets().items()}


def compare(
    target: str,
    methods: list[str],
    out: Path,
    overrides: list[str],
    log=print,
    arms: list[list[str]] = (),
    after_arms: list[str] = (),
) -> list[dict]:
    """Train `target` (a recipe or YAML config) once per method into out/METHOD and tabulate the reports.
    `arms`: more runs, each [NAME, key=value, ...] (a sweep: the recipe with those overrides, into out/NAME);
    `after_arms`: command-line overrides written after an --arm (refused: they would apply to every run)."""
    presets = registry.presets()
    unknown = [m for m in methods if m not in presets]
    if unknown:
        raise PeftkitError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(presets)}")
    if after_arms:
        raise PeftkitError(f"{after_arms[0]} after --arm: overrides for every run go before the first --arm; an "
                           "arm's own are written without dashes (--arm NAME train.lr=1e-3)")  # fmt: skip
    from peftkit.alignment.config import text_only
    from peftkit.cli import load_target

    text_only(load_target(target).override(list(overrides)), "peftkit compare")
    runs = {method: presets[method].overrides() for method in methods}
    for name, *settings in arms:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or "=" in name or name in runs:
            raise PeftkitError(f"--arm {name}: an arm starts with a new name of letters, digits, '-', '_' or '.', "
                               "then its key=value overrides (e.g. --arm lr1e-3 train.lr=1e-3)")  # fmt: skip
        if any("=" not in setting for setting in settings):
            raise PeftkitError(f"--arm {name}: {' '.join(settings)}: each setting is key=value (train.lr=1e-3)")
        runs[name] = [f"--{setting}" for setting in settings]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, settings in runs.items():
        run_dir = out / method
        command = [sys.executable, "-m", "peftkit.cli", "train", target, *overrides, *settings,
                   f"--output_dir={run_dir}", "--train.overwrite=true", "--train.progress=false"]  # fmt: skip
        log(f"[{method}] {' '.join(command[3:])}")
        started = time.perf_counter()
        log_file = out / f"{method}.log"
        with log_file.open("w") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
            # wait4 reports this child's own peak RSS (Linux: KiB); Popen.wait would discard it
            _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            tail = log_file.read_text()[-2000:]
            refused = [line for line in tail.splitlines() if line.startswith("peftkit: error: ")]
            if code == 2 and refused:  # bad input: the run's own one line, not a tail holding it among others
                raise PeftkitError(f"method {method}: {refused[-1].removeprefix('peftkit: error: ')} (log: {log_file})")
            raise PeftkitError(f"method {method} failed (exit {code}); see {log_file}: ...{tail.strip()[-300:]}")
        peak_mb = round(usage.ru_maxrss / 1024, 1)
        report = json.loads((run_dir / "report.json").read_text())
        rows.append(_row(method, report, peak_mb, time.perf_counter() - started))
        log(f"[{method}] " + ", ".join(f"{k}={v}" for k, v in rows[-1].items() if k != "method"))
    rows = _merge_rows(out / "compare.json", rows)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(format_table(rows) + "\n")
    chart(rows, out / "compare.png")
    log(format_table(rows))
    log(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
    return rows


def _merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of an earlier comparison in the same folder are kept unless re-run (order: the presets')."""
    previous = json.loads(path.read_text()) if path.exists() else []
    by_method = {r["method"]: r for r in previous} | {r["method"]: r for r in rows}
    order = list(registry.presets())
    return sorted(by_method.values(), key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))


def _row(method: str, report: RunReport | dict, peak_mb: float | None, wall_s: float) -> dict:
    from peftkit.evaluation.run_report import TrainingSummary, as_run_report

    report = as_run_report(report)
    training = report.training or TrainingSummary()
    qa = (report.qa or {}).get("medical")
    return {
        "method": method,
        "steps": training.final_step,
        "train_s": _rounded((training.train_seconds or 0.0) + (training.first_step_s or 0.0), 1),
        "trainable_params": training.trainable_params,
        "trainable_share": _rounded(training.trainable_params / training.total_params, 6)
        if training.total_params
        else None,
        "tokens_per_s": _rounded(training.tokens_per_s or None, 1),
        "peak_rss_mb": peak_mb,
        "domain_ppl_base": _rounded(report.base.domain_ppl),
        "domain_ppl": _rounded(report.tuned.domain_ppl),
        "general_ppl_base": _rounded(report.base.general_ppl),  # absent without data.general_source
        "general_ppl": _rounded(report.tuned.general_ppl),
        "general_kl": _rounded(report.general_kl, 4),
        "medical_qa_base": qa.base_accuracy if qa else None,
        "medical_qa": qa.tuned_accuracy if qa else None,
        "verdict": report.verdict.recommend,
        "wall_s": round(wall_s, 1),
    }


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


def format_table(rows: list[dict]) -> str:
    def pct(new, old):
        return f"{(new / old - 1) * 100:+.1f}%"

    def change(r, column):
        new, old = r[column], r[f"{column}_base"]
        return f"{old} -> {new} ({pct(new, old)})" if new is not None and old is not None else "-"

    lines = ["| run | steps | trainable | tokens/s | peak RSS | domain ppl | general ppl | KL from base | medical QA "
             "| verdict |", "|---|---:|---:|---:|---:|---|---|---:|---|---|"]  # fmt: skip
    for r in rows:
        qa = f"{r['medical_qa_base']:.0%} -> {r['medical_qa']:.0%}" if r["medical_qa"] is not None else "-"
        kl = f"{r['general_kl']:.3f}" if r["general_kl"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r.get('steps') or '-'} | {r['trainable_params']:,} ({r['trainable_share']:.2%}) | {r['tokens_per_s'] or 0:.0f} "
            f"| {r['peak_rss_mb'] or 0:,.0f} MB | {change(r, 'domain_ppl')} | {change(r, 'general_ppl')} "
            f"| {kl} | {qa} | {r['verdict']} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    domain = [(r["domain_ppl"] / r["domain_ppl_base"] - 1) * 100 for r in rows]
    # runs without data.general_source have no general perplexity: no bar for them
    general = {
        i: (r["general_ppl"] / r["general_ppl_base"] - 1) * 100
        for i, r in enumerate(rows)
        if r["general_ppl"] is not None and r["general_ppl_base"] is not None
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 2))
    y = range(len(rows))
    left.barh([i - 0.2 for i in y], domain, height=0.4, label="domain (PubMed test)")
    if general:
        left.barh([i + 0.2 for i in general], list(general.values()), height=0.4, label="general (Wikipedia)")
    left.set_yticks(list(y), names)
    left.invert_yaxis()
    left.axvline(0, color="black", linewidth=0.8)
    left.set_xlabel("perplexity change vs base (%), lower is better")
    left.legend(loc="lower right", fontsize=8)
    right.barh(list(y), [r["tokens_per_s"] or 0 for r in rows], color="tab:green")
    right.set_yticks(list(y), [f"{r['trainable_share']:.2%}" for r in rows])
    right.invert_yaxis()
    right.set_xlabel("training tokens/s (labels: share of weights trained)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
