"""A run's report for people: report.md, a self-contained report.html (loss curves embedded as PNG), and
the tables printed in the terminal, from RUN_DIR/report.json and metrics.jsonl."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.evaluation.run_report import RunReport, as_run_report, evaluations
from peftkit.evaluation.verdict_rules import duration, size


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


def _pct(interval: list[float] | None) -> str:
    return f"[{interval[0]:+.1%}, {interval[1]:+.1%}]" if interval else ""


@dataclass(frozen=True)
class Row:
    """One comparison of the report's table; an alternative without fine-tuning stands in the base column."""

    metric: str
    """The row's name in report.md/html and the terminal table."""
    short: str
    """Its name in the plain-text table, with `note` after the numbers."""
    base: str
    tuned: str
    change: str
    interval: str
    """95% interval of the change."""
    note: str = ""

    def cells(self) -> tuple[str, str, str, str, str]:
        return self.metric, self.base, self.tuned, self.change, self.interval


def _summary_rows(report: RunReport) -> list[Row]:
    rows = []
    tuned, change, tokens = report.tuned.by_set(), report.change.by_set(), report.eval_tokens or {}
    intervals = report.change_ci95.to_json() if report.change_ci95 else {}
    for name, base in report.base.by_set().items():
        numbers = (f"{base:.2f}", f"{tuned[name]:.2f}", f"{change[name]:+.1%}", _pct(intervals.get(f"{name}_ppl")))
        rows.append(Row(f"{name} ppl", f"{name} ppl", *numbers, note=f"{tokens.get(name, '')} tokens scored"))
    prompted = report.base_prompted
    if prompted:
        metric = f"domain ppl: base + {prompted.prompt_tokens} domain tokens in the prompt"
        note = f"base with {prompted.prompt_tokens} tokens of domain text in front (no fine-tuning)"
        if prompted.tuned_change is not None:
            numbers = (f"{report.tuned.domain_ppl:.2f}", f"{prompted.tuned_change:+.1%}")
            rows.append(
                Row(
                    metric, "domain ppl", f"{prompted.domain_ppl:.2f}", *numbers, _pct(prompted.tuned_change_ci95), note
                )
            )
        else:  # a report from before intervals: the prompt's change against the plain base
            vs_base = f"{prompted.domain_ppl / report.base.domain_ppl - 1:+.1%}"
            rows.append(Row(metric, "domain ppl", f"{prompted.domain_ppl:.2f}", "", vs_base, "", note))
    for name, group in (report.qa or {}).items():
        accuracies = (f"{group.base_accuracy:.1%}", f"{group.tuned_accuracy:.1%}", f"{group.change:+.1%}")
        detects = f", detects {group.mde:.0%}" if group.mde else ""
        note = f"{group.questions} questions{detects}"
        rows.append(
            Row(
                f"{name} QA accuracy (n={group.questions})",
                f"{name} QA acc",
                *accuracies,
                _pct(group.change_ci95),
                note,
            )
        )
        if group.kshot_base_accuracy is not None:
            metric = f"{name} QA accuracy: base {group.kshot}-shot"
            note = f"base with {group.kshot} solved examples in the prompt (no fine-tuning)"
            kshot = f"{group.kshot_base_accuracy:.1%}"
            if group.tuned_vs_kshot is not None:
                versus = (
                    f"{group.tuned_accuracy:.1%}",
                    f"{group.tuned_vs_kshot:+.1%}",
                    _pct(group.tuned_vs_kshot_ci95),
                )
                rows.append(Row(metric, f"{name} QA acc", kshot, *versus, note))
            else:
                gain = f"{group.kshot_base_accuracy - group.base_accuracy:+.1%}"
                rows.append(Row(metric, f"{name} QA acc", kshot, "", gain, "", note))
    if report.general_kl is not None:
        interval = report.general_kl_ci95
        spread = f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        numbers = ("0", f"{report.general_kl:.4f}", "", spread)
        rows.append(Row("KL from base on general prompts", "KL from base", *numbers, "nats/token, general prompts"))
    return rows


def cost_line(report: RunReport) -> str:
    """What the tuned model costs to train and to serve, in one line ("" when the report does not say)."""
    parts, training = [], report.training
    if training and training.train_seconds is not None:
        seconds = training.train_seconds + (training.first_step_s or 0.0)
        parts.append(f"training {duration(seconds)} on {training.train_tokens or 0:,} tokens")
    if report.cost:
        params = f" ({report.cost.adapter_params:,} parameters)" if report.cost.adapter_params else ""
        parts.append(f"serving unmerged: the base model plus a {size(report.cost.adapter_bytes)} adapter{params}")
        parts.append(f"merged: the base model's size{serving_speed(report.cost.serving)}")
    if report.evaluation:
        parts.append(evaluation_time(report.evaluation))
    return "; ".join(parts)


def evaluation_time(evaluation) -> str:
    """ "this evaluation 48 s (perplexity 20 s, qa 12 s, ...; the base model's scores from the cache)"."""
    seconds = dict(evaluation.seconds)
    total = seconds.pop("total", sum(seconds.values()))
    split = ", ".join(f"{name.replace('_', ' ')} {value:.0f} s" for name, value in seconds.items())
    reused = f"; reused from the cache: {', '.join(evaluation.reused)}" if evaluation.reused else ""
    return f"this evaluation {total:.0f} s ({split}{reused})"


def serving_speed(serving) -> str:
    """ ", 12.3 ms/token unmerged vs 10.1 merged (+22%, greedy, ...)" from a report's `cost.serving`."""
    if serving is None:
        return " and speed"
    how = f"greedy, {serving.new_tokens} tokens on {serving.prompts} prompts, median of {serving.repeats}"
    if serving.merged_ms_per_token is None:
        return (
            f"; decoding {serving.unmerged_ms_per_token:.1f} ms/token unmerged ({how}; this adapter cannot be merged)"
        )
    extra = serving.unmerged_ms_per_token / serving.merged_ms_per_token - 1
    same = "" if serving.same_tokens else "; the merged copy generated other tokens"
    return (
        f"; decoding {serving.unmerged_ms_per_token:.1f} ms/token unmerged vs {serving.merged_ms_per_token:.1f} "
        f"merged ({extra:+.0%}, {how}){same}"
    )


def _verdict_lines(report: RunReport) -> list[str]:
    """The verdict, its reasons ('*' marks those that decided) and the cost, as lines of text."""
    verdict = report.verdict
    if verdict is None:
        return []
    deciding = set(verdict.deciding or [])
    lines = [f"verdict: {verdict.summary}"]  # the summary says the outcome: helped, mixed or did not pay off
    lines += [f"  {'*' if reason in deciding else '-'} {reason}" for reason in verdict.reasons]
    return lines + ([f"cost: {cost_line(report)}"] if cost_line(report) else [])


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


def layer_bars(training) -> list[str]:
    """method.auto_layers: each block's gradient share as a bar, the chosen blocks marked (a text chart).
    `training`: a TrainingSummary, or a dict with layer_scores and chosen_layers (the preview's)."""
    read = training.get if isinstance(training, dict) else lambda key: getattr(training, key, None)
    scores = read("layer_scores") if training is not None else None
    if not scores:
        return []
    top = max(scores) or 1.0
    chosen = set(read("chosen_layers") or [])
    return [f"block {i:>3} {'#' * max(1, round(30 * s / top)):<30} {s:.3f}{'  <- adapted' if i in chosen else ''}"
            for i, s in enumerate(scores)]  # fmt: skip


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
    deciding = set(verdict.deciding or []) if verdict else set()
    rows = [row.cells() for row in _summary_rows(report)]
    cost = cost_line(report)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    kept, stop_reason = _kept_checkpoint(report)
    summary = data_summary(report)
    bars = layer_bars(report.training)
    bars_title = "Blocks chosen by method.auto_layers (share of the adapter's gradient before training)"

    md = [f"# peftkit report: {run_dir.name}", "", f"**Verdict: {summary_line}**", ""]
    md += [f"- **{reason}**" if reason in deciding else f"- {reason}" for reason in reasons]
    md += ["", "| metric | base | tuned | change | 95% CI |", "|---|---|---|---|---|"]
    md += [f"| {' | '.join(row)} |" for row in rows]
    md += ["", f"Kept checkpoint: {kept}; {stop_reason}.", "", f"Data: {summary}", ""]
    md += [f"Cost: {cost}", ""] if cost else []
    md += [f"## {bars_title}", "", "```", *bars, "```", ""] if bars else []
    md += ["![loss curves](loss_curves.png)", "", "## Config", "", "```yaml", config.strip(), "```", ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))

    image = base64.b64encode(png).decode()
    table = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in row)}</tr>" for row in rows)
    items = "".join(
        f"<li><b>{html.escape(r)}</b></li>" if r in deciding else f"<li>{html.escape(r)}</li>" for r in reasons
    )
    colours = {"helped": "#2e933c", "mixed": "#c98a00"}
    colour = colours.get(verdict.outcome or ("helped" if verdict.helped else ""), "#d1495b") if verdict else "#d1495b"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>peftkit report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:right}}
td:first-child{{text-align:left}}.verdict{{color:{colour};font-size:1.2em;font-weight:bold}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>peftkit report: {html.escape(run_dir.name)}</h1>
<p class="verdict">{html.escape(summary_line)}</p><ul>{items}</ul>
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th><th>95% CI</th></tr>{table}</table>
<p>Kept checkpoint: {kept};
{html.escape(stop_reason)}.</p>
<p>Data: {html.escape(summary)}</p>
<p>Cost: {html.escape(cost or "n/a")}</p>
{f"<h2>{bars_title}</h2><pre>{html.escape(chr(10).join(bars))}</pre>" if bars else ""}
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
    columns = (("metric", "left"), ("base", "right"), ("tuned", "right"), ("change", "right"), ("95% CI", "right"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for row in _summary_rows(report):
        table.add_row(*row.cells())
    console.print(table)
    verdict = report.verdict
    if verdict:
        style = "bold green" if verdict.recommend == "tuned" else "bold yellow"
        first, *rest = _verdict_lines(report)
        console.print(first, style=style)
        for line in rest:
            console.print(line, highlight=False)


def format_report(report: RunReport | dict) -> str:
    """The comparison and the verdict as a plain-text table (the trainer's log at the end of a run)."""
    report = as_run_report(report)
    lines = [f"{'':<14}{'base':>10}{'tuned':>10}{'change':>9}   {'95% CI':<18}"]
    for row in _summary_rows(report):
        numbers = f"{row.short:<14}{row.base:>10}{row.tuned:>10}{row.change:>9}   {row.interval:<18}"
        lines.append(f"{numbers} {row.note}".rstrip())
    return "\n".join(lines + _verdict_lines(report))
