"""A run's report for people: report.md, a self-contained report.html (loss curves embedded as PNG), and
the tables printed in the terminal, from RUN_DIR/report.json and metrics.jsonl."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.evaluation.run_report import RunReport, as_run_report, evaluations


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (empty if there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n") if line] if path.exists() else []


def loss_curves_png(records: list[dict], best_step: int | None) -> bytes:
    """Train, validation and general-text loss against step, with the kept checkpoint marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    evals = evaluations(records)
    curves = (
        (
            "train (mean since last eval)",
            "#1f5fa8",
            [(r.step, r.train_loss) for r in evals if r.train_loss is not None],
        ),
        ("validation (domain)", "#d1495b", [(r.step, r.val_loss) for r in evals]),
        ("general text", "#2e933c", [(r.step, r.general_loss) for r in evals if r.general_loss is not None]),
    )
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="#9bb7d4", lw=1, label="train (step)")
    for label, colour, points in curves:
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=colour, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="grey", ls="--", lw=1, label=f"kept checkpoint (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _summary_rows(report: RunReport) -> list[tuple[str, str, str, str]]:
    rows = []
    tuned, change = report.tuned.by_set(), report.change.by_set()
    for name, base in report.base.by_set().items():
        rows.append((f"{name} ppl", f"{base:.2f}", f"{tuned[name]:.2f}", f"{change[name]:+.1%}"))
    prompted = report.base_prompted
    if prompted:
        change = prompted.domain_ppl / report.base.domain_ppl - 1
        label = f"domain ppl, base + {prompted.prompt_tokens} domain tokens in the prompt"
        rows.append((label, f"{prompted.domain_ppl:.2f}", "", f"{change:+.1%}"))
    for name, group in (report.qa or {}).items():
        rows.append(
            (
                f"{name} QA accuracy (n={group.questions})",
                f"{group.base_accuracy:.1%}",
                f"{group.tuned_accuracy:.1%}",
                f"{group.change:+.1%}",
            )
        )
        if group.kshot_base_accuracy is not None:
            gain = group.kshot_base_accuracy - group.base_accuracy
            label = f"{name} QA accuracy, base {group.kshot}-shot"
            rows.append((label, f"{group.kshot_base_accuracy:.1%}", "", f"{gain:+.1%}"))
    if report.general_kl is not None:
        rows.append(("KL from base on general prompts", "0", f"{report.general_kl:.4f}", ""))
    return rows


def data_summary(report: RunReport | dict) -> str:
    """What the run trained on and was scored on, in one line."""
    report = as_run_report(report)
    parts, training = [], report.training
    if training and training.train_tokens:
        parts.append(
            f"{training.train_tokens:,} training tokens ({training.global_batch_rows} rows per step, "
            f"{training.processes or 1} process(es))"
        )
    if training and training.method:
        parts.append(f"method {training.method}, {training.trainable_params or 0:,} trainable parameters")
    if report.eval_tokens:
        parts.append("scored: " + ", ".join(f"{name} {tokens:,} tokens" for name, tokens in report.eval_tokens.items()))
    return "; ".join(parts) or "n/a"


def _kept_checkpoint(report: RunReport) -> tuple[str, str]:
    """'step A of F' and the stop reason, as the report pages say them ('None' for a report without training)."""
    training = report.training
    if training is None:
        return "step None of None", ""
    return f"step {training.adapter_step} of {training.final_step}", training.stop_reason or ""


def write_report_files(run_dir: Path) -> tuple[Path, Path]:
    """Write RUN_DIR/loss_curves.png, report.md and report.html from report.json and metrics.jsonl."""
    run_dir = Path(run_dir)
    if not (run_dir / "report.json").exists():
        raise PeftkitError(f"{run_dir}: no report.json; train the run first (or run peftkit eval {run_dir})")
    report = RunReport.load(run_dir / "report.json")
    png = loss_curves_png(read_metrics(run_dir), report.training.best_step if report.training else None)
    (run_dir / "loss_curves.png").write_bytes(png)
    verdict = report.verdict
    summary_line = verdict.summary if verdict else "n/a"
    reasons = verdict.reasons if verdict else []
    rows = _summary_rows(report)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    kept, stop_reason = _kept_checkpoint(report)
    summary = data_summary(report)

    md = [f"# peftkit report: {run_dir.name}", "", f"**Verdict: {summary_line}**", ""]
    md += [f"- {reason}" for reason in reasons]
    md += ["", "| metric | base | tuned | change |", "|---|---|---|---|"]
    md += [f"| {' | '.join(row)} |" for row in rows]
    md += ["", f"Kept checkpoint: {kept}; {stop_reason}.", "", f"Data: {summary}", ""]
    md += ["![loss curves](loss_curves.png)", "", "## Config", "", "```yaml", config.strip(), "```", ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))

    image = base64.b64encode(png).decode()
    table = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in row)}</tr>" for row in rows)
    items = "".join(f"<li>{html.escape(r)}</li>" for r in reasons)
    colour = "#2e933c" if verdict and verdict.helped else "#d1495b"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>peftkit report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:right}}
td:first-child{{text-align:left}}.verdict{{color:{colour};font-size:1.2em;font-weight:bold}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>peftkit report: {html.escape(run_dir.name)}</h1>
<p class="verdict">{html.escape(summary_line)}</p><ul>{items}</ul>
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>{table}</table>
<p>Kept checkpoint: {kept};
{html.escape(stop_reason)}.</p>
<p>Data: {html.escape(summary)}</p>
<img alt="loss curves" src="data:image/png;base64,{image}">
<h2>Config</h2><pre>{html.escape(config)}</pre></body></html>"""
    html_path = run_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path


def print_report(report: RunReport | dict, file=None) -> None:
    """The summary as rich tables in the terminal: the comparison, then the verdict and its reasons."""
    from rich.console import Console
    from rich.table import Table

    report = as_run_report(report)
    console = Console(file=file, width=120 if file else None)
    table = Table(title="held-out comparison (base vs tuned)", title_justify="left")
    for column, justify in (("metric", "left"), ("base", "right"), ("tuned", "right"), ("change", "right")):
        table.add_column(column, justify=justify)
    for row in _summary_rows(report):
        table.add_row(*row)
    console.print(table)
    verdict = report.verdict
    if verdict:
        style = "bold green" if verdict.recommend == "tuned" else "bold yellow"
        console.print(f"verdict: {verdict.summary}", style=style)
        for reason in verdict.reasons:
            console.print(f"  - {reason}", highlight=False)


def format_report(report: RunReport | dict) -> str:
    """The comparison and the verdict as a plain-text table (the trainer's log at the end of a run)."""
    report = as_run_report(report)
    lines = [f"{'':<14}{'base':>10}{'tuned':>10}{'change':>9}   tokens scored"]
    tuned, change, tokens = report.tuned.by_set(), report.change.by_set(), report.eval_tokens or {}
    for name, base in report.base.by_set().items():
        lines.append(f"{name + ' ppl':<14}{base:>10.2f}{tuned[name]:>10.2f}{change[name]:>+9.1%}   {tokens[name]}")
    prompted = report.base_prompted
    if prompted:
        gain = prompted.domain_ppl / report.base.domain_ppl - 1
        lines.append(
            f"{'domain ppl':<14}{prompted.domain_ppl:>10.2f}{'':>10}{gain:>+9.1%}   "
            f"base with {prompted.prompt_tokens} tokens of domain text in front (no fine-tuning)"
        )
    for name, group in (report.qa or {}).items():
        label = f"{name} QA acc"
        lines.append(
            f"{label:<14}{group.base_accuracy:>10.1%}{group.tuned_accuracy:>10.1%}"
            f"{group.change:>+9.1%}   {group.questions} questions"
        )
        if group.kshot_base_accuracy is not None:
            lines.append(
                f"{label:<14}{group.kshot_base_accuracy:>10.1%}{'':>10}"
                f"{group.kshot_base_accuracy - group.base_accuracy:>+9.1%}   "
                f"base with {group.kshot} solved examples in the prompt (no fine-tuning)"
            )
    if report.general_kl is not None:
        lines.append(f"{'KL from base':<14}{0:>10}{report.general_kl:>10.4f}{'':>9}   nats/token, general prompts")
    if report.verdict is not None:
        lines.append(f"verdict: {report.verdict.summary}")
        lines.extend(f"  - {reason}" for reason in report.verdict.reasons)
    return "\n".join(lines)
