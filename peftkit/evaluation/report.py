"""Base model vs tuned model on the same held-out rows, as report.json and a printed table."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from peftkit import data
from peftkit.evaluation import bootstrap
from peftkit.evaluation.perplexity import nll_rows, perplexity
from peftkit.evaluation.render import format_report  # noqa: F401 (re-exported: it lived here)
from peftkit.evaluation.verdict_rules import decide


def test_sets(config, tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The final report's rows: the first `eval.test_tokens` tokens of the domain test split and of
    the general text, packed into `data.seq_len` rows."""
    seq_len, budget = config.data.seq_len, config.eval.test_tokens
    sets = {"domain": data.eval_rows(tokenizer, data.load_split(config.data, "test"), seq_len, budget, config.data)}
    general = data.load_general(config.data)
    if general:
        sets["general"] = data.eval_rows(tokenizer, general, seq_len, budget)
    return sets


Scores = tuple[torch.Tensor, torch.Tensor]  # per-row NLL sums and scored tokens (`perplexity.nll_rows`)


def score_base_and_tuned(model, sets: dict[str, Scores], batch_size: int, accelerator=None) -> dict[str, dict]:
    """Per-row NLL sums and token counts of the base model (adapter disabled) and the tuned model on each
    named row set: {"base": {"<set>": (sums, tokens)}, "tuned": {..}}."""
    return {variant: score_variant(model, sets, batch_size, accelerator, variant) for variant in ("base", "tuned")}


def score_variant(model, sets: dict[str, Scores], batch_size: int, accelerator=None, variant="tuned") -> dict:
    """One side of `score_base_and_tuned`: {"<set>": (sums, tokens)} of the base ("base": adapter disabled)
    or the tuned model."""
    peft_model = accelerator.unwrap_model(model) if accelerator else model
    with peft_model.disable_adapter() if variant == "base" else nullcontext():
        return {
            name: nll_rows(peft_model, ids, labels, batch_size, accelerator) for name, (ids, labels) in sets.items()
        }


def comparison(scores: dict[str, dict], cuts: dict[str, bootstrap.Units], seed: int) -> dict:
    """Perplexities, their relative change tuned / base - 1 and its paired-bootstrap interval per set, from
    `score_base_and_tuned`'s per-row scores; `cuts`: each set's resampling units (`bootstrap.units`)."""
    report: dict = {"base": {}, "tuned": {}, "change": {}, "change_ci95": {}, "eval_tokens": {}}
    for name, (_, tokens) in scores["base"].items():
        for variant in ("base", "tuned"):
            sums, _ = scores[variant][name]
            report[variant][f"{name}_ppl"] = perplexity(sums.sum().item(), int(tokens.sum()))
        report["eval_tokens"][name] = int(tokens.sum())
        report["change"][f"{name}_ppl"] = report["tuned"][f"{name}_ppl"] / report["base"][f"{name}_ppl"] - 1
        interval = bootstrap.paired_change(scores["base"][name], scores["tuned"][name], cuts[name], seed)
        report["change_ci95"][f"{name}_ppl"] = interval
    report["bootstrap"] = {
        "method": "paired studentized bootstrap over blocks of consecutive test rows",
        "resamples": bootstrap.RESAMPLES,
        "level": bootstrap.LEVEL,
        "seed": seed,
        "units": {name: cut.count for name, cut in cuts.items()},
        "rows_per_unit": {name: cut.rows_per_unit for name, cut in cuts.items()},
    }
    return report


def compare_base_and_tuned(
    model, sets: dict[str, Scores], batch_size: int, accelerator=None, seed: int = 0, eos_token_id: int | None = None
) -> dict:
    """Perplexity of the base model (adapter disabled) and the tuned model on each named row set.

    Returns {"base": {"<set>_ppl": ..}, "tuned": {..}, "change": {"<set>_ppl": relative change},
    "change_ci95": {"<set>_ppl": [low, high]}, "eval_tokens": {"<set>": scored tokens}, "bootstrap": {..}}.
    """
    cuts = {name: bootstrap.units(*rows, eos_token_id) for name, rows in sets.items()}
    return comparison(score_base_and_tuned(model, sets, batch_size, accelerator), cuts, seed)


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


def prompted_scores(model, rows: Scores, prefix: torch.Tensor, batch_size: int, accelerator=None) -> Scores:
    """The no-fine-tuning alternative for perplexity: the base model (adapter disabled) scores the same
    tokens as the plain evaluation, with `prefix` (domain text) in front of every row as context; per row."""
    peft_model = accelerator.unwrap_model(model) if accelerator else model
    input_ids, labels = rows
    n, p = len(input_ids), len(prefix)
    x = torch.cat([prefix.expand(n, p), input_ids], dim=1)
    y = torch.cat([torch.full((n, p), data.IGNORE_INDEX), labels], dim=1)
    y[:, p] = data.IGNORE_INDEX  # a row's first token has no context in the plain evaluation: not scored there either
    with peft_model.disable_adapter():
        return nll_rows(peft_model, x, y, batch_size, accelerator)


def prompted_comparison(prompted: Scores, scores: dict[str, dict], cut: bootstrap.Units, seed: int, p: int) -> dict:
    """The prompted baseline's perplexity, against the plain base and the tuned model, with paired intervals."""
    sums, tokens = prompted
    ppl = perplexity(sums.sum().item(), int(tokens.sum()))
    base, tuned = scores["base"]["domain"], scores["tuned"]["domain"]
    base_ppl = perplexity(base[0].sum().item(), int(base[1].sum()))
    tuned_ppl = perplexity(tuned[0].sum().item(), int(tuned[1].sum()))
    return {
        "domain_ppl": ppl,
        "prompt_tokens": p,
        "tokens": int(tokens.sum()),
        "change": ppl / base_ppl - 1,
        "change_ci95": bootstrap.paired_change(base, prompted, cut, seed),
        "tuned_change": tuned_ppl / ppl - 1,
        "tuned_change_ci95": bootstrap.paired_change(prompted, tuned, cut, seed),
    }


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
            out["signals"].append(
                f"validation loss was still falling {out['val_slope_per_eval']:.1%} per evaluation "
                f"at the end (threshold {ev.underfit_slope:.1%}, eval.underfit_slope)"
            )
            out["suggestion"] = "train longer (train.max_steps) or with a higher train.lr; the optimum is further on"
    if len(evals) >= 2 and len(losses) >= 6:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        out["train_loss_change"] = last / first - 1
        val_gain = 1 - math.exp(min(r["val_loss"] for r in evals[1:]) - evals[0]["val_loss"])  # ppl drop vs step 0
        out["val_ppl_gain"] = val_gain
        # batch-to-batch noise in the training loss is a few percent; a real fit moves it by more than 5%
        if out["train_loss_change"] > -0.05 and val_gain < ev.min_domain_gain:
            out["signals"].append(
                f"training loss moved {out['train_loss_change']:+.1%} and validation perplexity "
                f"{-val_gain:+.1%} from the base model: the adapter barely learned"
            )
            out["suggestion"] = (
                "raise train.lr, method.r or the targets (method.target_modules=all-linear), or train longer"
            )
    out["underfitting"] = bool(out["signals"])
    return out


def verdict(report: dict, ev) -> dict:
    """The verdict on a report.json dict, as a dict: `verdict_rules.decide`, for callers that hold no RunReport."""
    return decide(report, ev).to_json()
