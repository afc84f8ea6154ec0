"""The typed report: report.json and metrics.jsonl read back to the same JSON, and the verdict's rules.

The golden verdicts were first produced by the verdict as it was before it became rules (one function over
the report dict), checked against it on thousands of random reports. Issue 21 changed the rules on purpose
(intervals, three outcomes, QA that cannot veto at chance, a loss elsewhere making a gain "mixed" instead
of vetoing it); each case below was then rewritten by hand to say what docs/guard.md's rules say of it,
most with the intervals a report now carries, two ("the comparison only", "written by peftkit eval alone")
without, as reports written before intervals are judged. They pin the reasons, their order, the outcome,
the options, the recommendation and the reasons that decided.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import pytest

from peftkit import Trainer
from peftkit.config import EvalConfig
from peftkit.errors import PeftkitError
from peftkit.evaluation import EvalRecord, RunReport, decide, evaluate_run, format_report
from peftkit.evaluation.qa import wilson
from peftkit.evaluation.render import read_metrics
from peftkit.evaluation.report import verdict
from peftkit.evaluation.run_report import evaluations
from peftkit.evaluation.verdict_rules import RULES, Finding

EV = EvalConfig(min_domain_gain=0.01, max_general_ppl_increase=0.1, max_general_kl=0.05)


def comparison(base: float, tuned: float, ci: list[float] | None = None) -> dict:
    report = {
        "base": {"domain_ppl": base},
        "tuned": {"domain_ppl": tuned},
        "change": {"domain_ppl": tuned / base - 1},
        "eval_tokens": {"domain": 512},
    }
    if ci:  # a report with intervals also says how they were computed
        report["change_ci95"] = {"domain_ppl": ci}
        units = {"domain": 16}
        method = "paired studentized bootstrap over blocks of consecutive test rows"
        report["bootstrap"] = {"method": method, "resamples": 2000, "level": 0.95, "seed": 0, "units": units}
        report = {key: report[key] for key in ("base", "tuned", "change", "change_ci95", "eval_tokens", "bootstrap")}
    return report


def with_general(report: dict, base: float, tuned: float, ci: list[float] | None = None) -> dict:
    report["base"]["general_ppl"], report["tuned"]["general_ppl"] = base, tuned
    report["change"]["general_ppl"] = tuned / base - 1
    report["eval_tokens"]["general"] = 512
    if ci:
        report["change_ci95"]["general_ppl"] = ci
        report["bootstrap"]["units"]["general"] = 16
    return report


def training(best: int | None, stop: str | None = None, final: int = 12) -> dict:
    baseline = {"step": 0, "val_loss": 3.0, "val_ppl": 20.09, "general_loss": 2.0, "general_ppl": 7.39}
    return {
        "best_step": best,
        "adapter_step": best or final,
        "final_step": final,
        "stopped_early": stop is not None,
        "stop_reason": stop or "reached train.max_steps",
        "train_tokens": 6144,
        "best_val_loss": None if best is None else 2.5,
        "processes": 1,
        "global_batch_rows": 16,
        "baseline": baseline,
        "method": "lora",
        "trainable_params": 4096,
        "total_params": 100000,
        "tokens_per_s": 1500.0,
        "compiled": False,
        "first_step_s": 0.4,
        "train_seconds": 89.6,
    }


def qa_group(base: float, tuned: float, hi: float, kshot: float | None = None, n: int = 200) -> dict:
    """A QA group of `n` questions whose paired change has the interval [hi - 0.2, hi]."""
    group = {
        "questions": n,
        "base_accuracy": base,
        "base_ci95": wilson(round(base * n), n),
        "tuned_accuracy": tuned,
        "tuned_ci95": wilson(round(tuned * n), n),
        "change": tuned - base,
        "change_ci95": [round(hi - 0.2, 4), hi],
    }
    if kshot is not None:
        group.update(kshot=3, kshot_base_accuracy=kshot, kshot_base_ci95=wilson(round(kshot * n), n))
        group.update(
            tuned_vs_kshot=round(tuned - kshot, 4),
            tuned_vs_kshot_ci95=[round(tuned - kshot - 0.1, 4), round(tuned - kshot + 0.1, 4)],
        )
    group.update(chance=0.25, mde=0.14)
    return group


def leak(exact: int, near: int, sampled_from: int | None = None) -> dict:
    found = {
        "exact": exact,
        "near": near,
        "held_out_docs": 100,
        "train_docs": 200,
        "share": (exact + near) / 100,
        "examples": [],
    }
    if sampled_from:
        found["sampled_from"] = sampled_from
    return found


def diagnostics(gap=None, memo=None, leaks=None, under=None) -> dict:
    nothing = {"docs": 0, "token_match": None, "verbatim": None}
    return {
        "generalization_gap": gap or {"best": None, "end": None},
        "memorization": memo or {"train": nothing, "validation": nothing, "token_match_gap": None},
        "leakage": leaks or {"validation": leak(0, 0), "test": leak(0, 0)},
        "underfitting": under or {"underfitting": False, "signals": [], "suggestion": None},
    }


def prompted_base(prompted_ppl: float, base: float, tuned: float, vs_base: list[float], vs_tuned: list[float]) -> dict:
    return {
        "domain_ppl": prompted_ppl,
        "prompt_tokens": 128,
        "tokens": 512,
        "change": prompted_ppl / base - 1,
        "change_ci95": vs_base,
        "tuned_change": tuned / prompted_ppl - 1,
        "tuned_change_ci95": vs_tuned,
    }


def everything_measured() -> dict:
    report = with_general(comparison(20.0, 12.0, ci=[-0.45, -0.35]), 8.0, 8.4, ci=[0.02, 0.08])
    report["base_prompted"] = prompted_base(18.0, 20.0, 12.0, vs_base=[-0.14, -0.06], vs_tuned=[-0.38, -0.28])
    report["general_kl"] = 0.02
    report["general_kl_ci95"] = [0.012, 0.031]
    report["qa"] = {"medical": qa_group(0.4, 0.5, 0.25, kshot=0.45), "general": qa_group(0.5, 0.5, 0.1, kshot=0.55)}
    report["diagnostics"] = diagnostics(
        gap={
            "best": {"step": 8, "train_loss": 2.0, "val_loss": 2.5, "gap": 0.5},
            "end": {"step": 12, "train_loss": 1.8, "val_loss": 2.6, "gap": 0.8},
        },
        memo={
            "train": {"docs": 32, "token_match": 0.4, "verbatim": 0.0},
            "validation": {"docs": 30, "token_match": 0.3, "verbatim": 0.0},
            "token_match_gap": 0.1,
        },
        leaks={"validation": leak(0, 0), "test": leak(0, 1)},
    )
    report["cost"] = {"adapter_bytes": 3 * 2**20, "adapter_params": 786432}
    return {**report, **training(best=8)}


def forgot() -> dict:
    report = with_general(comparison(20.0, 12.0, ci=[-0.45, -0.35]), 8.0, 10.0, ci=[0.18, 0.32])
    report.update(general_kl=0.2, general_kl_ci95=[0.15, 0.26], qa={"general": qa_group(0.6, 0.4, -0.05)})
    return {**report, **training(best=None)}


def prompted(tuned: float, ci: list[float], prompted_ppl: float, vs_base: list[float], vs_tuned: list[float]) -> dict:
    return {
        **comparison(20.0, tuned, ci=ci),
        "base_prompted": prompted_base(prompted_ppl, 20.0, tuned, vs_base=vs_base, vs_tuned=vs_tuned),
    }


def leaked_stopped_underfit() -> dict:
    report = with_general(comparison(20.0, 15.0, ci=[-0.3, -0.2]), 8.0, 8.1, ci=[-0.01, 0.03])
    report["general_kl"] = 0.01
    report["general_kl_ci95"] = [0.006, 0.015]
    signal = "validation loss was still falling 3.0% per evaluation at the end"
    report["diagnostics"] = diagnostics(
        leaks={"validation": leak(2, 1, sampled_from=5000), "test": leak(0, 0)},
        under={"underfitting": True, "signals": [signal], "suggestion": "train longer", "val_slope_per_eval": 0.03},
    )
    return {**report, **training(best=4, stop="validation loss did not improve for 2 evaluations after step 4")}


def eval_only() -> dict:  # written by `peftkit eval` without a report from training
    return {**comparison(20.0, 14.0), "diagnostics": diagnostics()}


RAW_TEXT = "raw-text perplexity cannot see an instruct model losing its chat behaviour; check generations too"
BASE = "fine-tuning did not pay off on held-out data: keep the base model"


def expect(outcome: str, recommend: str, summary: str, options: dict, reasons: list[str], deciding: list[int]) -> dict:
    """The verdict's JSON; `deciding`: the indices of the reasons that decided."""
    return {
        "helped": outcome == "helped",
        "outcome": outcome,
        "recommend": recommend,
        "summary": summary,
        "options": options,
        "reasons": reasons,
        "deciding": [reasons[i] for i in deciding],
    }


KSHOT_DOES_AS_WELL = (
    "fine-tuning helped, but the base model prompted with domain examples does as well: deploy the base with a "
    "domain prompt (no training, no extra weights)"
)
KSHOT_IS_BETTER = "fine-tuning did not pay off; the base model prompted with domain examples is the better option"
EVERYTHING_REASONS = [
    "domain test perplexity 20.00 -> 12.00 (-40.0%, 95% CI [-45.0%, -35.0%]): a real gain",
    "general-text perplexity 8.00 -> 8.40 (+5.0%, 95% CI [+2.0%, +8.0%]): a real increase, within the budget of +10%",
    "medical QA accuracy 40.0% -> 50.0% (change +10.0%, 95% CI [+5.0%, +25.0%], 200 questions): significantly better",
    "general QA accuracy 50.0% -> 50.0% (change +0.0%, 95% CI [-10.0%, +10.0%], 200 questions): QA cannot tell "
    "at this size (a loss of up to 10% is not ruled out; 200 questions detect changes of 14% or more; "
    "eval.qa_questions=all scores every medical question)",
    "overfitting: validation loss rose from 2.5000 (step 8) to 2.6000 (step 12); the step-8 adapter is kept",
    "memorisation: greedy continuations match training text 40.0% vs unseen text 30.0% of tokens (a memorisation gap)",
    "leakage: 0 exact and 1 near duplicates of test documents (1.0%) are in the training data",
    "answers to general prompts diverge from the base model's by KL 0.0200 nats/token (95% CI [0.0120, 0.0310])",
    "no fine-tuning: the base model with 128 tokens of domain text in front scores domain perplexity 18.00 "
    "(-10.0% vs the plain base, 95% CI [-14.0%, -6.0%]); the tuned model is -33.3% against that, 95% CI "
    "[-38.0%, -28.0%]",
    "medical QA with 3 solved examples in the base model's prompt: 45.0% (zero-shot base 40.0%, tuned 50.0%; "
    "tuned vs 3-shot base +5.0%, 95% CI [-5.0%, +15.0%])",
    "general QA with 3 solved examples in the base model's prompt: 55.0% (zero-shot base 50.0%, tuned 50.0%; "
    "tuned vs 3-shot base -5.0%, 95% CI [-15.0%, +5.0%])",
]

GOLDEN = {
    "everything measured, tuning helped": (
        everything_measured,
        expect(
            "helped",
            "tuned",
            "fine-tuning helped: deploy the tuned model (domain perplexity -40.0%, 95% CI [-45.0%, -35.0%], "
            "for a 3.0 MiB adapter and 90 s of training on 6,144 tokens)",
            {
                "base": {"domain_ppl": 20.0, "medical_qa": 0.4, "general_qa": 0.5},
                "tuned": {"domain_ppl": 12.0, "medical_qa": 0.5, "general_qa": 0.5},
                "base_kshot": {"domain_ppl": 18.0, "medical_qa": 0.45, "general_qa": 0.55},
            },
            EVERYTHING_REASONS,
            deciding=[0],
        ),
    ),
    "the comparison only": (
        lambda: comparison(20.0, 19.9),
        expect(
            "did not help",
            "base",
            BASE,
            {"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 19.9}},
            [
                "domain test perplexity 20.00 -> 19.90 (-0.5%): short of the 1% gain required (eval.min_domain_gain)",
                RAW_TEXT,
            ],
            deciding=[0],
        ),
    ),
    "forgot beyond the budgets": (
        forgot,
        expect(
            "mixed",
            "base",
            "mixed: fine-tuning gains domain perplexity -40.0%, 95% CI [-45.0%, -35.0%] but loses general-text "
            "perplexity +25.0% (budget +10%); every checkpoint beyond the forgetting budget; general QA "
            "-20.0%; KL from the base 0.200 (budget 0.05): keep the base model, or deploy the tuned model only "
            "if that loss does not matter for your use",
            {"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 12.0}},
            [
                "domain test perplexity 20.00 -> 12.00 (-40.0%, 95% CI [-45.0%, -35.0%]): a real gain",
                "general-text perplexity 8.00 -> 10.00 (+25.0%, 95% CI [+18.0%, +32.0%]): beyond the "
                "forgetting budget of +10%",
                "no checkpoint stayed within the forgetting budget; adapter/ holds the last one",
                "general QA accuracy 60.0% -> 40.0% (change -20.0%, 95% CI [-25.0%, -5.0%], 200 questions): "
                "significantly worse",
                "answers to general prompts diverge from the base model's by KL 0.2000 nats/token (95% CI "
                "[0.1500, 0.2600]): beyond the budget of 0.05",
            ],
            deciding=[0, 1, 2, 3, 4],
        ),
    ),
    "the prompted base does as well": (
        lambda: prompted(16.0, [-0.25, -0.15], 16.1, vs_base=[-0.24, -0.15], vs_tuned=[-0.02, 0.01]),
        expect(
            "helped",
            "base_kshot",
            KSHOT_DOES_AS_WELL,
            {"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 16.0}, "base_kshot": {"domain_ppl": 16.1}},
            [
                "domain test perplexity 20.00 -> 16.00 (-20.0%, 95% CI [-25.0%, -15.0%]): a real gain",
                RAW_TEXT,
                "no fine-tuning: the base model with 128 tokens of domain text in front scores domain "
                "perplexity 16.10 (-19.5% vs the plain base, 95% CI [-24.0%, -15.0%]); the tuned model is "
                "-0.6% against that, 95% CI [-2.0%, +1.0%]",
            ],
            deciding=[0, 2],
        ),
    ),
    "tuning did not pay, the prompt does": (
        lambda: prompted(19.9, [-0.015, 0.005], 19.0, vs_base=[-0.07, -0.03], vs_tuned=[0.03, 0.065]),
        expect(
            "did not help",
            "base_kshot",
            KSHOT_IS_BETTER,
            {"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 19.9}, "base_kshot": {"domain_ppl": 19.0}},
            [
                "domain test perplexity 20.00 -> 19.90 (-0.5%, 95% CI [-1.5%, +0.5%]): short of the 1% gain "
                "required (eval.min_domain_gain), and the interval includes no change",
                RAW_TEXT,
                "no fine-tuning: the base model with 128 tokens of domain text in front scores domain "
                "perplexity 19.00 (-5.0% vs the plain base, 95% CI [-7.0%, -3.0%]); the tuned model is +4.7% "
                "against that, 95% CI [+3.0%, +6.5%]",
            ],
            deciding=[0, 2],
        ),
    ),
    "leakage, stopped early, underfitting": (
        leaked_stopped_underfit,
        expect(
            "did not help",
            "base",
            BASE,
            {"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 15.0}},
            [
                "domain test perplexity 20.00 -> 15.00 (-25.0%, 95% CI [-30.0%, -20.0%]): a real gain",
                "general-text perplexity 8.00 -> 8.10 (+1.2%, 95% CI [-1.0%, +3.0%])",
                "stopped early (validation loss did not improve for 2 evaluations after step 4); the best "
                "checkpoint, step 4, is kept",
                "leakage: 2 exact and 1 near duplicates of validation documents (3.0%) are in the training "
                "data (a sample of 200 of its 5,000 documents); held-out scores are optimistic: deduplicate "
                "the corpus",
                "answers to general prompts diverge from the base model's by KL 0.0100 nats/token (95% CI "
                "[0.0060, 0.0150])",
                "underfitting: validation loss was still falling 3.0% per evaluation at the end. Suggestion: "
                "train longer",
            ],
            deciding=[3],
        ),
    ),
    "written by peftkit eval alone": (
        eval_only,
        expect(
            "helped",
            "tuned",
            "fine-tuning helped: deploy the tuned model (domain perplexity -30.0%)",
            {"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 14.0}},
            [
                "domain test perplexity 20.00 -> 14.00 (-30.0%): a real gain (no interval in this report)",
                RAW_TEXT,
            ],
            deciding=[0],
        ),
    ),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_the_verdict_of_each_golden_report(name):
    build, expected = GOLDEN[name]
    report = build()
    assert decide(RunReport.from_json(report), EV).to_json() == expected
    assert verdict(copy.deepcopy(report), EV) == expected  # the dict entry point, until every caller is typed
    assert json.dumps(verdict(report, EV)) == json.dumps(expected)  # the options in the same order too


@pytest.mark.parametrize("name", GOLDEN)
def test_a_report_reads_back_to_the_same_json(name):
    report = GOLDEN[name][0]()
    report["verdict"] = verdict(report, EV)
    typed = RunReport.from_json(report)
    assert json.dumps(typed.to_json()) == json.dumps(report)  # keys, values and their order
    assert (typed.training is None) == ("final_step" not in report)
    assert format_report(typed) == format_report(report)


def test_typed_fields_read_what_the_json_says():
    report = RunReport.from_json({**everything_measured(), "verdict": verdict(everything_measured(), EV)})
    assert report.change.general_ppl == pytest.approx(0.05) and report.base.by_set() == {"domain": 20.0, "general": 8.0}
    assert report.training.best_step == 8 and report.training.baseline.general_ppl == 7.39
    assert report.qa["medical"].kshot_base_accuracy == 0.45 and report.diagnostics.leakage["test"].near == 1
    assert report.diagnostics.generalization_gap.end.val_loss == 2.6 and report.verdict.recommend == "tuned"


def test_evaluation_records_read_back_to_the_same_line():
    lines = [
        {"step": 0, "val_loss": 3.0, "val_ppl": 20.1, "general_loss": 2.0, "general_ppl": 7.4, "general_kl": 0.0},
        {
            "step": 4,
            "train_loss": 2.9,
            "val_loss": 2.8,
            "val_ppl": 16.4,
            "gap": -0.1,
            "within_budget": False,
            "best_step": None,
        },
        {
            "step": 8,
            "train_loss": 2.5,
            "val_loss": 2.6,
            "val_ppl": 13.5,
            "gap": 0.1,
            "within_budget": True,
            "best_step": 8,
            "callback_metric": 0.5,
        },
    ]
    steps = [{"step": 1, "loss": 3.1, "lr": 1e-3, "tokens": 128, "tokens_per_s": 10.0}]
    records = evaluations(steps + lines)
    assert [json.dumps(r.to_json()) for r in records] == [json.dumps(line) for line in lines]
    assert records[0].within_budget is None and records[1].best_step is None and records[2].best_step == 8
    assert records[2].extra == {"callback_metric": 0.5}


def test_unknown_and_missing_keys_are_refused_by_name(tmp_path):
    with pytest.raises(PeftkitError, match=r"RunReport: unknown keys \['tuned_ppl'\]"):
        RunReport.from_json({**comparison(20.0, 19.0), "tuned_ppl": 19.0})
    with pytest.raises(PeftkitError, match=r"missing keys \['change'\]"):
        RunReport.from_json({"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 19.0}})
    with pytest.raises(PeftkitError, match=r"QAGroup: unknown keys \['acc'\]"):
        RunReport.from_json({**comparison(20.0, 19.0), "qa": {"medical": {**qa_group(0.4, 0.5, 0.1), "acc": 1}}})
    path = tmp_path / "report.json"
    path.write_text("{}")
    with pytest.raises(PeftkitError, match=f"{path}: not a peftkit report: RunReport: missing keys"):
        RunReport.load(path)


def test_a_rule_of_ones_own_can_veto_and_keeps_its_place_among_the_reasons():
    def too_big(report, ev):
        if report.training and report.training.trainable_params > 1000:
            yield Finding("more than 1,000 trainable parameters", veto=True)

    report = everything_measured()
    judged = decide(report, EV, rules=(*RULES, too_big))
    # vetoed, and the prompted base (10% better than the plain one) is the option the alternatives then pick
    assert judged.helped is False and judged.recommend == "base_kshot" and judged.summary == KSHOT_IS_BETTER
    assert judged.outcome == "did not help" and judged.deciding[0] == "more than 1,000 trainable parameters"
    assert judged.reasons == [*EVERYTHING_REASONS[:8], "more than 1,000 trainable parameters", *EVERYTHING_REASONS[8:]]


def test_the_files_a_run_writes_read_back_to_the_same_json(tiny_config, tmp_path):
    rng = random.Random(0)
    questions = [
        {
            "subject": subject,
            "question": f"the patient received {i}",
            "answer": rng.randrange(4),
            "choices": ["aspirin", "the river", "insulin and recovered .", "music"],
        }
        for i, subject in enumerate(["anatomy"] * 8 + ["sociology"] * 8)
    ]
    qa_path = tmp_path / "qa.jsonl"
    qa_path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    evaluation = {"qa_source": str(qa_path), "qa_questions": 4, "kshot": 2, "prompt_tokens": 24, "every_steps": 2}
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(tiny_config.train, max_steps=4),
        eval=dataclasses.replace(tiny_config.eval, **evaluation),
    )
    Trainer(config, log=lambda _: None).fit()
    run = Path(config.output_dir)
    written = json.loads((run / "report.json").read_text())
    assert {"base_prompted", "general_kl", "qa", "diagnostics", "best_step", "verdict"} <= set(written)
    assert RunReport.load(run / "report.json").to_json() == written
    lines = [line for line in read_metrics(run) if EvalRecord.is_evaluation(line)]
    assert len(lines) == 3 and [r.to_json() for r in evaluations(read_metrics(run))] == lines

    (run / "report.json").unlink()  # `peftkit eval` on its own writes the evaluation side only
    alone = evaluate_run(run)
    assert "best_step" not in alone and RunReport.from_json(alone).training is None
    assert RunReport.load(run / "report.json").to_json() == json.loads((run / "report.json").read_text()) == alone
