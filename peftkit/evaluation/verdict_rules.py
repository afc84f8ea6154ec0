"""Was the fine-tune worth it? The verdict as small rules, judged on held-out data only.

    report.verdict = decide(report, config.eval)

Each rule reads one part of a `RunReport` and returns its findings: a reason (one line of the verdict) and
what it decides. A finding can establish the domain gain (`gain`), name a real loss elsewhere (`loss`:
general text, KL, QA), veto the tuned model outright (`veto`: no demonstrated gain, leaked held-out data),
or only raise a doubt (`doubt`: an interval that straddles a budget). The outcome is

- "did not help" when a finding vetoes (no gain that is both real and large enough, or untrustworthy data),
- "mixed" when the domain gain is real but something else was really lost,
- "helped" otherwise;

the tuned model is recommended only when it helped. Then the alternatives without fine-tuning (the base
model prompted with domain text, k-shot QA) are weighed against that outcome; one may be recommended
instead. The reasons keep the order of the rules; `deciding` lists those that decided.

Every comparison is judged on its 95% interval where the report has one (`evaluation.bootstrap` for
perplexity and KL, paired QA intervals); reports written before peftkit measured intervals are judged on
the point estimates, as they were then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from peftkit.evaluation.run_report import RunReport, Verdict, as_run_report

LEAKAGE_TOLERANCE = 0.01  # share of held-out documents also in training above which held-out scores are not trusted
QA_RELEVANT = 0.05  # an accuracy loss of 5 points is one a user would notice; an interval that cannot rule it out
# either way decides nothing

HELPED, MIXED, DID_NOT_HELP = "helped", "mixed", "did not help"


@dataclass(frozen=True)
class Finding:
    """One line of the verdict, and what it decides."""

    reason: str
    veto: bool = False
    """On this evidence the tuned model should not be deployed (outcome "did not help")."""
    loss: str | None = None
    """A real loss elsewhere, in a few words for the summary ("general-text perplexity +25.0%"): with a real
    domain gain the outcome is "mixed"."""
    gain: str | None = None
    """The domain gain is established; in a few words for the summary."""
    doubt: str | None = None
    """Not a loss, but the evidence cannot rule one out; said in the summary."""
    recommend: str | None = None
    """An alternative's option to deploy instead ("base_kshot"), with its one-line `summary`."""
    summary: str | None = None


Rule = Callable[[RunReport, object], Iterable[Finding]]


def _ci(interval: list[float] | None) -> str:
    return f", 95% CI [{interval[0]:+.1%}, {interval[1]:+.1%}]" if interval else ""


def domain_gain(report: RunReport, ev) -> Iterable[Finding]:
    """Helped needs a domain test perplexity drop whose interval lies below 0 and that reaches
    eval.min_domain_gain (the smallest gain worth deploying an extra artifact for)."""
    base, tuned, change = report.base.domain_ppl, report.tuned.domain_ppl, report.change.domain_ppl
    interval = report.change_ci95.domain_ppl if report.change_ci95 else None
    need = ev.min_domain_gain
    large = change <= -need
    real = interval[1] < 0 if interval else large
    text = f"domain test perplexity {base:.2f} -> {tuned:.2f} ({change:+.1%}{_ci(interval)})"
    short = f"short of the {need:.0%} gain required (eval.min_domain_gain)"
    if interval is None:
        outcome = "a real gain (no interval in this report)" if large else short
    elif large and real:
        outcome = "a real gain"
    elif large:
        outcome = "not a demonstrated gain: the interval includes no change (score more eval.test_tokens)"
    elif real:
        outcome = f"real, but {short}"
    elif interval[0] > 0:
        outcome = "worse: the interval lies above 0"
    else:
        outcome = f"{short}, and the interval includes no change"
    gain = f"domain perplexity {change:+.1%}{_ci(interval)}" if large and real else None
    yield Finding(f"{text}: {outcome}", veto=gain is None, gain=gain)


def general_forgetting(report: RunReport, ev) -> Iterable[Finding]:
    """General-text perplexity may rise by eval.max_general_ppl_increase at most: forgetting when its interval
    lies above the budget, uncertain when it straddles it."""
    change = report.change.general_ppl
    if change is None:
        return
    budget = ev.max_general_ppl_increase
    interval = report.change_ci95.general_ppl if report.change_ci95 else None
    low, high = interval or (change, change)
    reason = (
        f"general-text perplexity {report.base.general_ppl:.2f} -> {report.tuned.general_ppl:.2f} "
        f"({change:+.1%}{_ci(interval)})"
    )
    what = f"general-text perplexity {change:+.1%}"
    if budget is not None and low > budget:
        yield Finding(f"{reason}: beyond the forgetting budget of +{budget:.0%}", loss=f"{what} (budget +{budget:.0%})")
    elif budget is not None and high > budget:
        doubt = f"{what} may exceed the +{budget:.0%} forgetting budget"
        yield Finding(
            f"{reason}: uncertain, the interval straddles the forgetting budget of +{budget:.0%}", doubt=doubt
        )
    elif interval and low > 0:
        yield Finding(f"{reason}: a real increase" + (f", within the budget of +{budget:.0%}" if budget else ""))
    else:
        yield Finding(reason)


def kept_checkpoint(report: RunReport, ev) -> Iterable[Finding]:
    """A trained run must have kept a step within the forgetting budget; say so when it stopped early."""
    training = report.training
    if training is None:
        return
    if training.final_step and training.best_step is None:
        yield Finding(
            "no checkpoint stayed within the forgetting budget; adapter/ holds the last one",
            loss="every checkpoint beyond the forgetting budget",
        )
    elif training.stopped_early:
        yield Finding(
            f"stopped early ({training.stop_reason}); the best checkpoint, step {training.best_step}, is kept"
        )


def qa_accuracy(report: RunReport, ev) -> Iterable[Finding]:
    """QA accuracy per group: a significant drop is a loss (domain QA as much as general QA), unless the base
    model answers at chance (nothing to lose: its QA can neither confirm nor veto); an interval that cannot
    rule out a loss of QA_RELEVANT says so instead of deciding."""
    for name, group in (report.qa or {}).items():
        lo, hi = group.change_ci95
        reason = (
            f"{name} QA accuracy {group.base_accuracy:.1%} -> {group.tuned_accuracy:.1%} "
            f"(change {group.change:+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}], {group.questions} questions)"
        )
        chance = group.chance if group.chance is not None else 0.25  # MMLU: four options
        detect = f"; {group.questions} questions detect changes of {group.mde:.0%} or more" if group.mde else ""
        if group.base_ci95 and group.base_ci95[0] <= chance:
            yield Finding(
                f"{reason}: the base model answers at chance ({chance:.0%} lies in its interval "
                f"[{group.base_ci95[0]:.1%}, {group.base_ci95[1]:.1%}]), so its QA can neither confirm nor veto"
            )
        elif hi < 0:
            yield Finding(f"{reason}: significantly worse", loss=f"{name} QA {group.change:+.1%}")
        elif lo < -QA_RELEVANT:
            yield Finding(
                f"{reason}: QA cannot tell at this size (a loss of up to {-lo:.0%} is not ruled out{detect}; "
                "eval.qa_questions=all scores every medical question)"
            )
        elif lo > 0:
            yield Finding(f"{reason}: significantly better")
        else:
            yield Finding(f"{reason}: no loss beyond {QA_RELEVANT:.0%}")


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
    """KL from the base model's answers may be eval.max_general_kl at most (judged on its interval over the
    prompts like general-text perplexity); without it, say what is unseen."""
    kl = report.general_kl
    if kl is None:
        yield Finding(
            "raw-text perplexity cannot see an instruct model losing its chat behaviour; check generations too"
        )
        return
    budget = ev.max_general_kl
    interval = report.general_kl_ci95
    low, high = interval or (kl, kl)
    spread = f" (95% CI [{interval[0]:.4f}, {interval[1]:.4f}])" if interval else ""
    reason = f"answers to general prompts diverge from the base model's by KL {kl:.4f} nats/token{spread}"
    if budget is not None and low > budget:
        yield Finding(f"{reason}: beyond the budget of {budget}", loss=f"KL from the base {kl:.3f} (budget {budget})")
    elif budget is not None and high > budget:
        yield Finding(
            f"{reason}: uncertain, the interval straddles the budget of {budget}",
            doubt=f"KL from the base may exceed its budget of {budget}",
        )
    else:
        yield Finding(reason)


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


def _below_zero(interval: list[float] | None) -> bool:
    """A real drop, or no interval to say otherwise (a report from before intervals: the point decides)."""
    return interval is None or interval[1] < 0


def prompted_base(report: RunReport, ev, helped: bool) -> Iterable[Finding]:
    """The base model with domain text in front: recommended when the tuned model does not beat it (an interval
    below 0 and eval.min_domain_gain), or when tuning did not help and the prompt alone gains that much."""
    prompted = report.base_prompted
    if prompted is None:
        return
    vs_base = prompted.domain_ppl / report.base.domain_ppl - 1
    vs_tuned = report.tuned.domain_ppl / prompted.domain_ppl - 1
    need = ev.min_domain_gain
    tuned_better = vs_tuned <= -need and _below_zero(prompted.tuned_change_ci95)
    prompt_helps = vs_base <= -need and _below_zero(prompted.change_ci95)
    reason = (
        f"no fine-tuning: the base model with {prompted.prompt_tokens} tokens of domain text in front "
        f"scores domain perplexity {prompted.domain_ppl:.2f} ({vs_base:+.1%} vs the plain base{_ci(prompted.change_ci95)}); "
        f"the tuned model is {vs_tuned:+.1%} against that{_ci(prompted.tuned_change_ci95)}"
    )
    if helped and not tuned_better:
        summary = (
            "fine-tuning helped, but the base model prompted with domain examples does as well: "
            "deploy the base with a domain prompt (no training, no extra weights)"
        )
        yield Finding(reason, recommend="base_kshot", summary=summary)
    elif not helped and prompt_helps:
        summary = "fine-tuning did not pay off; the base model prompted with domain examples is the better option"
        yield Finding(reason, recommend="base_kshot", summary=summary)
    else:
        yield Finding(reason)


def kshot_qa(report: RunReport, ev, helped: bool) -> Iterable[Finding]:
    """QA with solved examples in the base model's prompt (reported next to zero-shot base and tuned)."""
    for name, group in (report.qa or {}).items():
        if group.kshot_base_accuracy is not None:
            versus = (
                f"; tuned vs {group.kshot}-shot base {group.tuned_vs_kshot:+.1%}{_ci(group.tuned_vs_kshot_ci95)}"
                if group.tuned_vs_kshot is not None
                else ""
            )
            yield Finding(
                f"{name} QA with {group.kshot} solved examples in the base model's prompt: "
                f"{group.kshot_base_accuracy:.1%} (zero-shot base {group.base_accuracy:.1%}, "
                f"tuned {group.tuned_accuracy:.1%}{versus})"
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


def cost(report: RunReport) -> str:
    """What the tuned model cost, in a few words ("" when the report does not say)."""
    parts = []
    if report.cost:
        parts.append(f"a {size(report.cost.adapter_bytes)} adapter")
    training = report.training
    if training and training.train_seconds is not None:
        seconds = training.train_seconds + (training.first_step_s or 0.0)  # the first step (compilation) included
        tokens = f" on {training.train_tokens:,} tokens" if training.train_tokens else ""
        parts.append(f"{duration(seconds)} of training{tokens}")
    return " and ".join(parts)


def size(nbytes: int) -> str:
    return f"{nbytes / 2**10:.0f} KiB" if nbytes < 2**20 else f"{nbytes / 2**20:.1f} MiB"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _trade(findings: list[Finding]) -> str:
    """What a mixed outcome trades: "gains X but loses Y"."""
    gains = "; ".join(f.gain for f in findings if f.gain)
    losses = "; ".join(f.loss for f in findings if f.loss)
    return f"gains {gains} but loses {losses}"


def _summary(outcome: str, findings: list[Finding], report: RunReport) -> str:
    if outcome == HELPED:
        paid = f", for {cost(report)}" if cost(report) else ""
        detail = "; ".join(f.gain for f in findings if f.gain) + paid
        doubts = "; ".join(f.doubt for f in findings if f.doubt)
        return (f"{TUNED} ({detail})" if detail else TUNED) + (f"; uncertain: {doubts}" if doubts else "")
    if outcome == MIXED:
        return (
            f"mixed: fine-tuning {_trade(findings)}: keep the base model, or deploy the tuned model only if "
            "that loss does not matter for your use"
        )
    return BASE


def decide(report: RunReport | dict, eval_config, rules=RULES, alternatives=ALTERNATIVES) -> Verdict:
    """The verdict on a report (its own `verdict` is not read): the rules' reasons in order, the outcome
    (helped, mixed, did not help), the option to deploy, and the reasons that decided."""
    report = as_run_report(report)
    findings = [finding for rule in rules for finding in rule(report, eval_config)]
    vetoes = [f for f in findings if f.veto]
    losses = [f for f in findings if f.loss]
    if vetoes:
        outcome, deciding = DID_NOT_HELP, vetoes + losses
    elif losses:
        outcome, deciding = MIXED, [f for f in findings if f.gain] + losses
    else:
        outcome, deciding = HELPED, [f for f in findings if f.gain or f.doubt]
    helped = outcome == HELPED
    recommend, summary = "tuned" if helped else "base", _summary(outcome, findings, report)
    trade = _trade(findings)
    for alternative in alternatives:
        for finding in alternative(report, eval_config, helped):
            findings.append(finding)
            if finding.recommend:
                recommend, summary = finding.recommend, finding.summary
                summary += f" (the tuned model {trade})" if outcome == MIXED else ""
                deciding.append(finding)
    return Verdict(
        helped=helped,
        outcome=outcome,
        recommend=recommend,
        summary=summary,
        options=options(report),
        reasons=[finding.reason for finding in findings],
        deciding=[finding.reason for finding in deciding],
    )
