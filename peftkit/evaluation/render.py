"""report.md and a self-contained report.html (loss curves embedded as PNG) from a run folder."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from peftkit.errors import PeftkitError


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
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="#9bb7d4", lw=1, label="train (step)")
    for key, label, colour in (("train_loss", "train (mean since last eval)", "#1f5fa8"),
                               ("val_loss", "validation (domain)", "#d1495b"),
                               ("general_loss", "general text", "#2e933c")):  # fmt: skip
        points = [(r["step"], r[key]) for r in evals if key in r]
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


def _summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, base in report.get("base", {}).items():
        tuned, change = report["tuned"][key], report["change"][key]
        rows.append((key.replace("_", " "), f"{base:.2f}", f"{tuned:.2f}", f"{change:+.1%}"))
    prompted = report.get("base_prompted")
    if prompted:
        change = prompted["domain_ppl"] / report["base"]["domain_ppl"] - 1
        rows.append((f"domain ppl, base + {prompted['prompt_tokens']} domain tokens in the prompt",
                     f"{prompted['domain_ppl']:.2f}", "", f"{change:+.1%}"))  # fmt: skip
    for name, group in report.get("qa", {}).items():
        rows.append((f"{name} QA accuracy (n={group['questions']})", f"{group['base_accuracy']:.1%}",
                     f"{group['tuned_accuracy']:.1%}", f"{group['change']:+.1%}"))  # fmt: skip
        if "kshot_base_accuracy" in group:
            rows.append((f"{name} QA accuracy, base {group['kshot']}-shot", f"{group['kshot_base_accuracy']:.1%}", "",
                         f"{group['kshot_base_accuracy'] - group['base_accuracy']:+.1%}"))  # fmt: skip
    if "general_kl" in report:
        rows.append(("KL from base on general prompts", "0", f"{report['general_kl']:.4f}", ""))
    return rows


def data_summary(report: dict) -> str:
    """What the run trained on and was scored on, in one line."""
    parts = []
    if report.get("train_tokens"):
        parts.append(f"{report['train_tokens']:,} training tokens ({report.get('global_batch_rows')} rows per step, "
                     f"{report.get('processes', 1)} process(es))")  # fmt: skip
    if report.get("method"):
        parts.append(f"method {report['method']}, {report.get('trainable_params', 0):,} trainable parameters")
    scored = report.get("eval_tokens", {})
    if scored:
        parts.append("scored: " + ", ".join(f"{name} {tokens:,} tokens" for name, tokens in scored.items()))
    return "; ".join(parts) or "n/a"


def write_report_files(run_dir: Path) -> tuple[Path, Path]:
    """Write RUN_DIR/loss_curves.png, report.md and report.html from report.json and metrics.jsonl."""
    run_dir = Path(run_dir)
    if not (run_dir / "report.json").exists():
        raise PeftkitError(f"{run_dir}: no report.json; train the run first (or run peftkit eval {run_dir})")
    report = json.loads((run_dir / "report.json").read_text())
    png = loss_curves_png(read_metrics(run_dir), report.get("best_step"))
    (run_dir / "loss_curves.png").write_bytes(png)
    verdict = report.get("verdict", {})
    rows = _summary_rows(report)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""

    md = [f"# peftkit report: {run_dir.name}", "", f"**Verdict: {verdict.get('summary', 'n/a')}**", ""]
    md += [f"- {reason}" for reason in verdict.get("reasons", [])]
    md += ["", "| metric | base | tuned | change |", "|---|---|---|---|"]
    md += [f"| {' | '.join(row)} |" for row in rows]
    summary = data_summary(report)
    md += ["", f"Kept checkpoint: step {report.get('adapter_step')} of {report.get('final_step')}; "
           f"{report.get('stop_reason', '')}.", "", f"Data: {summary}", "", "![loss curves](loss_curves.png)", "",
           "## Config", "", "```yaml", config.strip(), "```", ""]  # fmt: skip
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))

    image = base64.b64encode(png).decode()
    table = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in row)}</tr>" for row in rows)
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in verdict.get("reasons", []))
    colour = "#2e933c" if verdict.get("helped") else "#d1495b"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>peftkit report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:right}}
td:first-child{{text-align:left}}.verdict{{color:{colour};font-size:1.2em;font-weight:bold}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>peftkit report: {html.escape(run_dir.name)}</h1>
<p class="verdict">{html.escape(verdict.get("summary", "n/a"))}</p><ul>{reasons}</ul>
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>{table}</table>
<p>Kept checkpoint: step {report.get("adapter_step")} of {report.get("final_step")};
{html.escape(str(report.get("stop_reason", "")))}.</p>
<p>Data: {html.escape(summary)}</p>
<img alt="loss curves" src="data:image/png;base64,{image}">
<h2>Config</h2><pre>{html.escape(config)}</pre></body></html>"""
    html_path = run_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path


def print_report(report: dict, file=None) -> None:
    """The summary as rich tables in the terminal: the comparison, then the verdict and its reasons."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=120 if file else None)
    table = Table(title="held-out comparison (base vs tuned)", title_justify="left")
    for column, justify in (("metric", "left"), ("base", "right"), ("tuned", "right"), ("change", "right")):
        table.add_column(column, justify=justify)
    for row in _summary_rows(report):
        table.add_row(*row)
    console.print(table)
    verdict = report.get("verdict")
    if verdict:
        style = "bold green" if verdict.get("recommend") == "tuned" else "bold yellow"
        console.print(f"verdict: {verdict['summary']}", style=style)
        for reason in verdict.get("reasons", []):
            console.print(f"  - {reason}", highlight=False)
