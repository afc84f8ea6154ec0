"""Base model vs tuned model on the same held-out rows, as report.json and a printed table."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from peftkit import data
from peftkit.evaluation.perplexity import nll, perplexity


def test_sets(config, tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The final report's rows: the first `eval.test_tokens` tokens of the domain test split and of
    the general text, packed into `data.seq_len` rows."""
    seq_len, budget = config.data.seq_len, config.eval.test_tokens
    sets = {"domain": data.eval_rows(tokenizer, data.load_split(config.data, "test"), seq_len, budget)}
    general = data.load_general(config.data)
    if general:
        sets["general"] = data.eval_rows(tokenizer, general, seq_len, budget)
    return sets


def evaluate_run(run_dir: Path) -> dict:
    """Recompute a finished run's base-vs-tuned comparison from RUN_DIR/config.yaml and RUN_DIR/adapter."""
    from peft import PeftModel

    from peftkit import models
    from peftkit.config import Config
    from peftkit.errors import PeftkitError

    run_dir = Path(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise PeftkitError(f"{run_dir}: no adapter/ folder; is this a finished peftkit run?")
    config = Config.from_yaml(run_dir / "config.yaml")
    accelerator = models.make_accelerator(config.train.mixed_precision)
    tokenizer = models.load_tokenizer(config.model)
    model = PeftModel.from_pretrained(models.load_model(config.model), run_dir / "adapter")
    report = compare_base_and_tuned(model.to(accelerator.device), test_sets(config, tokenizer),
                                    config.eval.batch_size, accelerator)  # fmt: skip
    path = run_dir / "report.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update(report)
    previous["verdict"] = verdict(previous, config.eval)
    path.write_text(json.dumps(previous, indent=2))
    from peftkit.evaluation.render import write_report_files

    write_report_files(run_dir)
    return previous


def compare_base_and_tuned(
    model, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int, accelerator=None
) -> dict:
    """Perplexity of the base model (adapter disabled) and the tuned model on each named row set.

    Returns {"base": {"<set>_ppl": ..}, "tuned": {..}, "change": {"<set>_ppl": relative change},
    "eval_tokens": {"<set>": scored tokens}}.
    """
    peft_model = accelerator.unwrap_model(model) if accelerator else model
    report: dict = {"base": {}, "tuned": {}, "change": {}, "eval_tokens": {}}
    for variant in ("base", "tuned"):
        with peft_model.disable_adapter() if variant == "base" else nullcontext():
            for name, (input_ids, labels) in sets.items():
                total, tokens = nll(peft_model, input_ids, labels, batch_size, accelerator)
                report[variant][f"{name}_ppl"] = perplexity(total, tokens)
                report["eval_tokens"][name] = tokens
    for key, base in report["base"].items():
        report["change"][key] = report["tuned"][key] / base - 1
    return report


def verdict(report: dict, ev) -> dict:
    """Was the fine-tune worth it? Judged on held-out data only, against the base model."""
    base, tuned, change = report["base"], report["tuned"], report["change"]
    helped = change["domain_ppl"] <= -ev.min_domain_gain
    reasons = [
        f"domain test perplexity {base['domain_ppl']:.2f} -> {tuned['domain_ppl']:.2f} ({change['domain_ppl']:+.1%}): "
        + ("a real gain" if helped else f"short of the {ev.min_domain_gain:.0%} gain required (eval.min_domain_gain)")
    ]
    if "general_ppl" in change:
        budget = ev.max_general_ppl_increase
        over = budget is not None and change["general_ppl"] > budget
        reasons.append(
            f"general-text perplexity {base['general_ppl']:.2f} -> {tuned['general_ppl']:.2f} ({change['general_ppl']:+.1%})"
            + (f": beyond the forgetting budget of +{budget:.0%}" if over else "")
        )
        helped = helped and not over
    if report.get("final_step") and report.get("best_step") is None:
        helped = False
        reasons.append("no checkpoint stayed within the forgetting budget; adapter/ holds the last one")
    elif report.get("stopped_early"):
        reasons.append(
            f"stopped early ({report['stop_reason']}); the best checkpoint, step {report['best_step']}, is kept"
        )
    for name, group in report.get("qa", {}).items():
        lo, hi = group["change_ci95"]
        reasons.append(
            f"{name} QA accuracy {group['base_accuracy']:.1%} -> {group['tuned_accuracy']:.1%} "
            f"(change {group['change']:+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}], {group['questions']} questions)"
            + (": significantly worse" if hi < 0 else "")
        )
        if name == "general" and hi < 0:
            helped = False
    helped = _overfitting_signals(report.get("diagnostics", {}), reasons) and helped
    if "general_kl" in report:
        kl_budget = ev.max_general_kl
        over = kl_budget is not None and report["general_kl"] > kl_budget
        reasons.append(f"answers to general prompts diverge from the base model's by KL {report['general_kl']:.4f} "
                       "nats/token" + (f": beyond the budget of {kl_budget}" if over else ""))  # fmt: skip
        helped = helped and not over
    else:
        reasons.append(
            "raw-text perplexity cannot see an instruct model losing its chat behaviour; check generations too"
        )
    return {
        "helped": helped,
        "recommend": "tuned" if helped else "base",
        "summary": "fine-tuning helped: deploy the tuned model" if helped
        else "fine-tuning did not pay off on held-out data: keep the base model",
        "reasons": reasons,
    }  # fmt: skip


LEAKAGE_TOLERANCE = 0.01  # share of held-out documents also in training above which held-out scores are not trusted


def _overfitting_signals(diagnostics: dict, reasons: list[str]) -> bool:
    """Append what the diagnostics show; False if held-out results cannot be trusted (leakage)."""
    trusted = True
    gap = diagnostics.get("generalization_gap", {})
    best, end = gap.get("best"), gap.get("end")
    if best and end and end["step"] != best["step"] and end["val_loss"] > best["val_loss"]:
        reasons.append(f"overfitting: validation loss rose from {best['val_loss']:.4f} (step {best['step']}) to "
                       f"{end['val_loss']:.4f} (step {end['step']}); the step-{best['step']} adapter is kept")  # fmt: skip
    memo = diagnostics.get("memorization", {})
    if memo.get("token_match_gap") is not None:
        reasons.append(f"memorisation: greedy continuations match training text {memo['train']['token_match']:.1%} "
                       f"vs unseen text {memo['validation']['token_match']:.1%} of tokens"
                       + (" (a memorisation gap)" if memo["token_match_gap"] > 0.05 else ""))  # fmt: skip
    for split, leak in diagnostics.get("leakage", {}).items():
        if leak["exact"] or leak["near"]:
            serious = leak["share"] > LEAKAGE_TOLERANCE
            trusted = trusted and not serious
            reasons.append(f"leakage: {leak['exact']} exact and {leak['near']} near duplicates of {split} documents "
                           f"({leak['share']:.1%}) are in the training data"
                           + ("; held-out scores are optimistic: deduplicate the corpus" if serious else ""))  # fmt: skip
    return trusted


def format_report(report: dict) -> str:
    lines = [f"{'':<14}{'base':>10}{'tuned':>10}{'change':>9}   tokens scored"]
    for key, base in report["base"].items():
        name = key.removesuffix("_ppl")
        tuned, change = report["tuned"][key], report["change"][key]
        lines.append(f"{name + ' ppl':<14}{base:>10.2f}{tuned:>10.2f}{change:>+9.1%}   {report['eval_tokens'][name]}")
    for name, group in report.get("qa", {}).items():
        label = f"{name} QA acc"
        lines.append(f"{label:<14}{group['base_accuracy']:>10.1%}{group['tuned_accuracy']:>10.1%}"
                     f"{group['change']:>+9.1%}   {group['questions']} questions")  # fmt: skip
    if "general_kl" in report:
        lines.append(f"{'KL from base':<14}{0:>10}{report['general_kl']:>10.4f}{'':>9}   nats/token, general prompts")
    if "verdict" in report:
        lines.append(f"verdict: {report['verdict']['summary']}")
        lines.extend(f"  - {reason}" for reason in report["verdict"]["reasons"])
    return "\n".join(lines)
