"""Was the fine-tune worth it? The verdict as small rules, judged on held-out data only.

    report.verdict = decide(report, config.eval)

Each rule reads one part of a `RunReport` and returns its findings: a reason (one line of the verdict)
and whether it vetoes deploying the tuned model. The tuned model is recommended when no finding vetoes
it, the base model otherwise. Then the alternatives without fine-tuning (the base model prompted with
domain text, k-shot QA) are weighed against that outcome; one may recommend the prompted base instead.
The reasons keep the order of the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from peftkit.evaluation.run_report import RunReport, Verdict, as_run_report

LEAKAGE_TOLERANCE = 0.01  # share of held-out documents also in training above which held-out scores are not trusted


@dataclass(frozen=True)
class Finding:
    """One line of the verdict, and what it decides."""

    reason: str
    veto: bool = False
    """On this evidence the tuned model should not be deployed."""
    recommend: str | None = None
    """An alternative's option to deploy instead ("base_kshot"), with its one-line `summary`."""
    summary: str | None = None


Rule = Callable[[RunReport, object], Iterable[Finding]]


def domain_gain(report: RunReport, ev) -> Iterable[Finding]:
    """Fine-tuning must lower domain test perplexity by eval.min_domain_gain."""
    base, tuned, change = report.base.domain_ppl, report.tuned.domain_ppl, report.change.domain_ppl
    gained = change <= -ev.min_domain_gain
    outcome = "a real gain" if gained else f"short of the {ev.min_domain_gain:.0%} gain required (eval.min_domain_gain)"
    yield Finding(f"domain test perplexity {base:.2f} -> {tuned:.2f} ({change:+.1%}): {outcome}", veto=not gained)


def general_forgetting(report: RunReport, ev) -> Iterable[Finding]:
    """General-text perplexity may rise by eval.max_general_ppl_increase at most."""
    change = report.change.general_ppl
    if change is None:
        return
    budget = ev.max_general_ppl_increase
    over = budget is not None and change > budget
    reason = f"general-text perplexity {report.base.general_ppl:.2f} -> {report.tuned.general_ppl:.2f} ({change:+.1%})"
    yield Finding(reason + (f": beyond the forgetting budget of +{budget:.0%}" if over else ""), veto=over)


def kept_checkpoint(report: RunReport, ev) -> Iterable[Finding]:
    """A trained run must have kept a step within the forgetting budget; say so when it stopped early."""
    training = report.training
    if training is None:
        return
    if training.final_step and training.best_step is None:
        yield Finding("no checkpoint stayed within the forgetting budget; adapter/ holds the last one", veto=True)
    elif training.stopped_early:
        yield Finding(
            f"stopped early ({training.stop_reason}); the best checkpoint, step {training.best_step}, is kept"
        )


def qa_accuracy(report: RunReport, ev) -> Iterable[Finding]:
    """QA accuracy per group; significantly worse general QA vetoes (the model lost knowledge)."""
    for name, group in (report.qa or {}).items():
        lo, hi = group.change_ci95
        worse = hi < 0
        yield Finding(
            f"{name} QA accuracy {group.base_accuracy:.1%} -> {group.tuned_accuracy:.1%} "
            f"(change {group.change:+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}], {group.questions} questions)"
            + (": significantly worse" if worse else ""),
            veto=name == "general" and worse,
        )


def overfitting(report: RunReport, ev) -> Iterable[Finding]:
    """Validation loss rose after the kept step (the guard already kept the best one: no veto)."""
    gap = report.diagnostics and report.diagnostics.generalization_gap
    best, end = (gap.best, gap.end) if gap else (None, None)
    if best and end and end.step != best.step and end.val_loss > best.val_loss:
        yield Finding(
            f"overfitting: validation loss rose from {best.val_loss:.4f} (step {best.step}) to "
            f"{end.val_loss:.4f} (step {end.step}); the step-{best.step} adapter is kept"
        )


def memorisation(report: RunReport, ev) -> Iterable[Finding]:
    """Greedy continuations of training vs unseen text (reported, no veto)."""
    memo = report.diagnostics and report.diagnostics.memorization
    if memo and memo.token_match_gap is not None:
        yield Finding(
            f"memorisation: greedy continuations match training text {memo.train.token_match:.1%} "
            f"vs unseen text {memo.validation.token_match:.1%} of tokens"
            + (" (a memorisation gap)" if memo.token_match_gap > 0.05 else "")
        )


def leakage(report: RunReport, ev) -> Iterable[Finding]:
    """Held-out documents in the training data; above LEAKAGE_TOLERANCE held-out scores are not trusted."""
    leaks = (report.diagnostics and report.diagnostics.leakage) or {}
    for split, leak in leaks.items():
        if not (leak.exact or leak.near):
            continue
        serious = leak.share > LEAKAGE_TOLERANCE
        sample = (
            f" (a sample of {leak.train_docs:,} of its {leak.sampled_from:,} documents)" if leak.sampled_from else ""
        )
        yield Finding(
            f"leakage: {leak.exact} exact and {leak.near} near duplicates of {split} documents "
            f"({leak.share:.1%}) are in the training data"
            + sample
            + ("; held-out scores are optimistic: deduplicate the corpus" if serious else ""),
            veto=serious,
        )


def general_divergence(report: RunReport, ev) -> Iterable[Finding]:
    """KL from the base model's answers may be eval.max_general_kl at most; without it, say what is unseen."""
    kl = report.general_kl
    if kl is None:
        yield Finding(
            "raw-text perplexity cannot see an instruct model losing its chat behaviour; check generations too"
        )
        return
    budget = ev.max_general_kl
    over = budget is not None and kl > budget
    yield Finding(
        f"answers to general prompts diverge from the base model's by KL {kl:.4f} nats/token"
        + (f": beyond the budget of {budget}" if over else ""),
        veto=over,
    )


def too_little_fitting(report: RunReport, ev) -> Iterable[Finding]:
    """The underfitting diagnostic's signals and suggestion (reported, no veto)."""
    fit = report.diagnostics and report.diagnostics.underfitting
    if fit and fit.underfitting:
        yield Finding("underfitting: " + "; ".join(fit.signals) + f". Suggestion: {fit.suggestion}")


RULES: tuple[Rule, ...] = (
    domain_gain,
    general_forgetting,
    kept_checkpoint,
    qa_accuracy,
    overfitting,
    memorisation,
    leakage,
    general_divergence,
    too_little_fitting,
)


def prompted_base(report: RunReport, ev, helped: bool) -> Iterable[Finding]:
    """The base model with domain text in front: recommended when it does as well as the tuned model, or
    when tuning did not pay and the prompt alone gains eval.min_domain_gain."""
    prompted = report.base_prompted
    if prompted is None:
        return
    vs_base = prompted.domain_ppl / report.base.domain_ppl - 1
    vs_tuned = report.tuned.domain_ppl / prompted.domain_ppl - 1
    reason = (
        f"no fine-tuning: the base model with {prompted.prompt_tokens} tokens of domain text in front "
        f"scores domain perplexity {prompted.domain_ppl:.2f} ({vs_base:+.1%} vs the plain base); "
        f"the tuned model is {vs_tuned:+.1%} against that"
    )
    if helped and vs_tuned > -ev.min_domain_gain:
        summary = (
            "fine-tuning helped, but the base model prompted with domain examples does as well: "
            "deploy the base with a domain prompt (no training, no extra weights)"
        )
        yield Finding(reason, recommend="base_kshot", summary=summary)
    elif not helped and vs_base <= -ev.min_domain_gain:
        summary = "fine-tuning did not pay off; the base model prompted with domain examples is the better option"
        yield Finding(reason, recommend="base_kshot", summary=summary)
    else:
        yield Finding(reason)


def kshot_qa(report: RunReport, ev, helped: bool) -> Iterable[Finding]:
    """QA with solved examples in the base model's prompt (reported next to zero-shot base and tuned)."""
    for name, group in (report.qa or {}).items():
        if group.kshot_base_accuracy is not None:
            yield Finding(
                f"{name} QA with {group.kshot} solved examples in the base model's prompt: "
                f"{group.kshot_base_accuracy:.1%} (zero-shot base {group.base_accuracy:.1%}, "
                f"tuned {group.tuned_accuracy:.1%})"
            )


ALTERNATIVES = (prompted_base, kshot_qa)

TUNED = "fine-tuning helped: deploy the tuned model"
BASE = "fine-tuning did not pay off on held-out data: keep the base model"


def options(report: RunReport) -> dict[str, dict[str, float]]:
    """Each deployable option's scores, for the reader to weigh."""
    out = {"base": {"domain_ppl": report.base.domain_ppl}, "tuned": {"domain_ppl": report.tuned.domain_ppl}}
    if report.base_prompted is not None:
        out["base_kshot"] = {"domain_ppl": report.base_prompted.domain_ppl}
    for name, group in (report.qa or {}).items():
        if group.kshot_base_accuracy is not None:
            out.setdefault("base_kshot", {})[f"{name}_qa"] = group.kshot_base_accuracy
            out["base"][f"{name}_qa"] = group.base_accuracy
            out["tuned"][f"{name}_qa"] = group.tuned_accuracy
    return out


def decide(report: RunReport | dict, eval_config, rules=RULES, alternatives=ALTERNATIVES) -> Verdict:
    """The verdict on a report (its own `verdict` is not read): the rules' reasons in order, `helped` if
    none vetoes, and the option to deploy."""
    report = as_run_report(report)
    findings = [finding for rule in rules for finding in rule(report, eval_config)]
    helped = not any(finding.veto for finding in findings)
    recommend, summary = ("tuned", TUNED) if helped else ("base", BASE)
    for alternative in alternatives:
        for finding in alternative(report, eval_config, helped):
            findings.append(finding)
            if finding.recommend:
                recommend, summary = finding.recommend, finding.summary
    reasons = [finding.reason for finding in findings]
    return Verdict(helped=helped, recommend=recommend, summary=summary, options=options(report), reasons=reasons)
