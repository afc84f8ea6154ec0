"""Base model vs tuned model on the same held-out rows, as report.json and a printed table."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from peftkit import data
from peftkit.evaluation.perplexity import nll, perplexity


def test_sets(config, tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The final report's rows: the first `eval.test_tokens` tokens of the domain test split and of
    the general text, packed into `data.seq_len` rows."""
    seq_len, budget = config.data.seq_len, config.eval.test_tokens
    sets = {"domain": data.eval_rows(tokenizer, data.load_split(config.data, "test"), seq_len, budget, config.data)}
    general = data.load_general(config.data)
    if general:
        sets["general"] = data.eval_rows(tokenizer, general, seq_len, budget)
    return sets


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


def domain_prompt(tokenizer, train_docs: list[str], tokens: int) -> torch.Tensor | None:
    """The first `tokens` tokens of the training documents: domain context for the prompted baseline."""
    if not tokens or not train_docs:
        return None
    pieces, total = [], 0
    for ids in data.tokenize(tokenizer, train_docs[:256]):
        pieces.append(torch.as_tensor(ids))
        total += len(ids)
        if total >= tokens:
            break
    return torch.cat(pieces)[:tokens]


def prompted_baseline(model, rows: tuple[torch.Tensor, torch.Tensor], prefix: torch.Tensor, batch_size: int,
                      accelerator=None) -> dict:  # fmt: skip
    """The no-fine-tuning alternative for perplexity: the base model (adapter disabled) scores the same
    tokens as the plain evaluation, with `prefix` (domain text) in front of every row as context."""
    peft_model = accelerator.unwrap_model(model) if accelerator else model
    input_ids, labels = rows
    n, p = len(input_ids), len(prefix)
    x = torch.cat([prefix.expand(n, p), input_ids], dim=1)
    y = torch.cat([torch.full((n, p), data.IGNORE_INDEX), labels], dim=1)
    y[:, p] = data.IGNORE_INDEX  # a row's first token has no context in the plain evaluation: not scored there either
    with peft_model.disable_adapter():
        total, tokens = nll(peft_model, x, y, batch_size, accelerator)
    return {"domain_ppl": perplexity(total, tokens), "prompt_tokens": p, "tokens": tokens}


def underfitting(records: list[dict], ev) -> dict:
    """Too little fitting, next to the overfitting checks: validation loss still falling steeply at the
    end, or a run that barely moved from the base model. Each signal comes with what to change."""
    evals = [r for r in records if "val_loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    out: dict = {"underfitting": False, "signals": [], "suggestion": None}
    if len(evals) >= 3:
        drops = [(a["val_loss"] - b["val_loss"]) / a["val_loss"] for a, b in zip(evals[-3:-1], evals[-2:], strict=True)]
        out["val_slope_per_eval"] = sum(drops) / len(drops)
        if out["val_slope_per_eval"] > ev.underfit_slope:
            out["signals"].append(f"validation loss was still falling {out['val_slope_per_eval']:.1%} per evaluation "
                                  f"at the end (threshold {ev.underfit_slope:.1%}, eval.underfit_slope)")  # fmt: skip
            out["suggestion"] = "train longer (train.max_steps) or with a higher train.lr; the optimum is further on"
    if len(evals) >= 2 and len(losses) >= 6:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        out["train_loss_change"] = last / first - 1
        val_gain = 1 - math.exp(min(r["val_loss"] for r in evals[1:]) - evals[0]["val_loss"])  # ppl drop vs step 0
        out["val_ppl_gain"] = val_gain
        # batch-to-batch noise in the training loss is a few percent; a real fit moves it by more than 5%
        if out["train_loss_change"] > -0.05 and val_gain < ev.min_domain_gain:
            out["signals"].append(f"training loss moved {out['train_loss_change']:+.1%} and validation perplexity "
                                  f"{-val_gain:+.1%} from the base model: the adapter barely learned")  # fmt: skip
            out["suggestion"] = ("raise train.lr, method.r or the targets (method.target_modules=all-linear), "
                                 "or train longer")  # fmt: skip
    out["underfitting"] = bool(out["signals"])
    return out


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
    fit = report.get("diagnostics", {}).get("underfitting", {})
    if fit.get("underfitting"):
        reasons.append("underfitting: " + "; ".join(fit["signals"]) + f". Suggestion: {fit['suggestion']}")
    recommend, summary = ("tuned", "fine-tuning helped: deploy the tuned model") if helped else (
        "base", "fine-tuning did not pay off on held-out data: keep the base model")  # fmt: skip
    options = {"base": {"domain_ppl": base["domain_ppl"]}, "tuned": {"domain_ppl": tuned["domain_ppl"]}}
    prompted = report.get("base_prompted")
    if prompted:
        options["base_kshot"] = {"domain_ppl": prompted["domain_ppl"]}
        vs_base, vs_tuned = (
            prompted["domain_ppl"] / base["domain_ppl"] - 1,
            tuned["domain_ppl"] / prompted["domain_ppl"] - 1,
        )
        reasons.append(f"no fine-tuning: the base model with {prompted['prompt_tokens']} tokens of domain text in front "
                       f"scores domain perplexity {prompted['domain_ppl']:.2f} ({vs_base:+.1%} vs the plain base); "
                       f"the tuned model is {vs_tuned:+.1%} against that")  # fmt: skip
        if helped and vs_tuned > -ev.min_domain_gain:
            recommend = "base_kshot"
            summary = ("fine-tuning helped, but the base model prompted with domain examples does as well: "
                       "deploy the base with a domain prompt (no training, no extra weights)")  # fmt: skip
        elif not helped and vs_base <= -ev.min_domain_gain:
            recommend = "base_kshot"
            summary = "fine-tuning did not pay off; the base model prompted with domain examples is the better option"
    for name, group in report.get("qa", {}).items():
        if "kshot_base_accuracy" in group:
            options.setdefault("base_kshot", {})[f"{name}_qa"] = group["kshot_base_accuracy"]
            options["base"][f"{name}_qa"], options["tuned"][f"{name}_qa"] = (
                group["base_accuracy"],
                group["tuned_accuracy"],
            )
            reasons.append(f"{name} QA with {group['kshot']} solved examples in the base model's prompt: "
                           f"{group['kshot_base_accuracy']:.1%} (zero-shot base {group['base_accuracy']:.1%}, "
                           f"tuned {group['tuned_accuracy']:.1%})")  # fmt: skip
    return {"helped": helped, "recommend": recommend, "summary": summary, "options": options, "reasons": reasons}


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
                           + (f" (a sample of {leak['train_docs']:,} of its {leak['sampled_from']:,} documents)"
                              if leak.get("sampled_from") else "")
                           + ("; held-out scores are optimistic: deduplicate the corpus" if serious else ""))  # fmt: skip
    return trusted


def format_report(report: dict) -> str:
    lines = [f"{'':<14}{'base':>10}{'tuned':>10}{'change':>9}   tokens scored"]
    for key, base in report["base"].items():
        name = key.removesuffix("_ppl")
        tuned, change = report["tuned"][key], report["change"][key]
        lines.append(f"{name + ' ppl':<14}{base:>10.2f}{tuned:>10.2f}{change:>+9.1%}   {report['eval_tokens'][name]}")
    prompted = report.get("base_prompted")
    if prompted:
        change = prompted["domain_ppl"] / report["base"]["domain_ppl"] - 1
        lines.append(f"{'domain ppl':<14}{prompted['domain_ppl']:>10.2f}{'':>10}{change:>+9.1%}   "
                     f"base with {prompted['prompt_tokens']} tokens of domain text in front (no fine-tuning)")  # fmt: skip
    for name, group in report.get("qa", {}).items():
        label = f"{name} QA acc"
        lines.append(f"{label:<14}{group['base_accuracy']:>10.1%}{group['tuned_accuracy']:>10.1%}"
                     f"{group['change']:>+9.1%}   {group['questions']} questions")  # fmt: skip
        if "kshot_base_accuracy" in group:
            lines.append(f"{label:<14}{group['kshot_base_accuracy']:>10.1%}{'':>10}"
                         f"{group['kshot_base_accuracy'] - group['base_accuracy']:>+9.1%}   "
                         f"base with {group['kshot']} solved examples in the prompt (no fine-tuning)")  # fmt: skip
    if "general_kl" in report:
        lines.append(f"{'KL from base':<14}{0:>10}{report['general_kl']:>10.4f}{'':>9}   nats/token, general prompts")
    if "verdict" in report:
        lines.append(f"verdict: {report['verdict']['summary']}")
        lines.extend(f"  - {reason}" for reason in report["verdict"]["reasons"])
    return "\n".join(lines)
