"""The verdict's rules one at a time: each comparison judged on its interval, three outcomes, QA that says
when it cannot tell, the cost in the summary, and eval.qa_questions=all."""

from __future__ import annotations

import json
import random
import types

import pytest

from peftkit import Config, PeftkitError
from peftkit.config import EvalConfig
from peftkit.evaluation import decide, format_report, qa
from peftkit.evaluation.final import _qa
from tests.test_run_report import EV, comparison, everything_measured, qa_group, training, with_general


def domain(change: float, ci: list[float]) -> dict:
    return comparison(20.0, 20.0 * (1 + change), ci=ci)


def test_the_default_practical_minimum_is_5_percent():
    assert EvalConfig().min_domain_gain == 0.05
    verdict = decide(domain(-0.03, [-0.04, -0.02]), EvalConfig())
    assert verdict.outcome == "did not help" and "real, but short of the 5% gain required" in verdict.reasons[0]


def test_a_gain_whose_interval_includes_no_change_did_not_help():
    verdict = decide(domain(-0.08, [-0.15, 0.01]), EV)
    assert verdict.outcome == "did not help" and verdict.recommend == "base"
    assert "not a demonstrated gain: the interval includes no change" in verdict.reasons[0]
    assert verdict.deciding == [verdict.reasons[0]]


def test_a_domain_perplexity_that_really_rose_says_so():
    verdict = decide(domain(0.04, [0.02, 0.06]), EV)
    assert verdict.outcome == "did not help" and verdict.reasons[0].endswith("worse: the interval lies above 0")


def test_forgetting_whose_interval_straddles_the_budget_is_uncertain_not_a_loss():
    report = with_general(domain(-0.3, [-0.35, -0.25]), 8.0, 8.72, ci=[0.04, 0.14])
    verdict = decide(report, EV)
    assert verdict.outcome == "helped" and verdict.recommend == "tuned"
    assert "uncertain, the interval straddles the forgetting budget of +10%" in verdict.reasons[1]
    assert "uncertain: general-text perplexity +9.0% may exceed the +10% forgetting budget" in verdict.summary
    assert verdict.reasons[1] in verdict.deciding


def test_a_significant_drop_in_domain_qa_makes_a_gain_mixed():
    report = domain(-0.3, [-0.35, -0.25])
    report["qa"] = {"medical": qa_group(0.5, 0.4, -0.03, n=400)}
    verdict = decide(report, EV)
    assert verdict.outcome == "mixed" and verdict.helped is False and verdict.recommend == "base"
    assert verdict.reasons[1].endswith("significantly worse") and verdict.reasons[1] in verdict.deciding
    assert "but loses medical QA -10.0%" in verdict.summary


def test_qa_at_chance_can_neither_confirm_nor_veto():
    report = domain(-0.3, [-0.35, -0.25])
    report["qa"] = {"medical": qa_group(0.3, 0.2, -0.02, n=30)}  # Wilson interval of 30% of 30 reaches 25%
    verdict = decide(report, EV)
    assert verdict.outcome == "helped" and "answers at chance" in verdict.reasons[1]


def test_qa_that_cannot_rule_out_a_loss_says_so():
    report = domain(-0.3, [-0.35, -0.25])
    report["qa"] = {"general": qa_group(0.6, 0.6, 0.1, n=60)}  # change interval [-10%, +10%]
    reason = decide(report, EV).reasons[1]
    assert "QA cannot tell at this size (a loss of up to 10% is not ruled out; 60 questions detect" in reason


def test_kl_is_judged_on_its_interval():
    report = domain(-0.3, [-0.35, -0.25])
    report.update(general_kl=0.04, general_kl_ci95=[0.03, 0.07])
    verdict = decide(report, EV)  # budget 0.05: straddled
    assert verdict.outcome == "helped" and "KL from the base may exceed its budget of 0.05" in verdict.summary
    report["general_kl_ci95"] = [0.06, 0.09]
    verdict = decide(report, EV)
    assert verdict.outcome == "mixed" and "beyond the budget of 0.05" in verdict.reasons[1]


def test_the_summary_states_the_cost_and_the_table_the_intervals():
    report = everything_measured()
    verdict = decide(report, EV)
    assert "for a 3.0 MiB adapter and 90 s of training on 6,144 tokens" in verdict.summary
    text = format_report({**report, "verdict": verdict.to_json()})
    assert "[-45.0%, -35.0%]" in text and "[+2.0%, +8.0%]" in text and "[0.0120, 0.0310]" in text
    assert (
        "verdict: fine-tuning helped: deploy the tuned model (domain perplexity -40.0%" in text
        and "  * domain test perplexity" in text
    )
    assert "cost: training 90 s on 6,144 tokens; serving unmerged: the base model plus a 3.0 MiB adapter" in text


def test_a_report_from_before_intervals_is_judged_on_its_point_estimates():
    report = {**comparison(20.0, 19.0), **training(best=8)}
    verdict = decide(report, EV)
    assert verdict.outcome == "helped" and "a real gain (no interval in this report)" in verdict.reasons[0]


def test_qa_questions_all_is_accepted_and_a_bad_value_is_one_line():
    assert Config().override(["--eval.qa_questions=all"]).eval.qa_questions == "all"
    assert Config().override(["--eval.qa_questions=12"]).eval.qa_questions == 12
    with pytest.raises(PeftkitError, match=r"'eval.qa_questions' must be an integer or 'all', got 'every'"):
        Config().override(["--eval.qa_questions=every"])
    with pytest.raises(PeftkitError, match="eval.qa_questions"):
        EvalConfig(qa_questions=-1)


def qa_file(path, medical: int, other: int):
    rng = random.Random(0)
    subjects = ["anatomy"] * medical + ["sociology"] * other
    rows = [
        {
            "subject": subject,
            "question": f"the patient received {i}",
            "answer": rng.randrange(4),
            "choices": ["aspirin", "the river", "insulin and recovered .", "music"],
        }
        for i, subject in enumerate(subjects)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_qa_questions_all_scores_every_medical_question_and_as_many_others(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tokenizer

    path = qa_file(tmp_path / "qa.jsonl", medical=14, other=30)
    test, shots = qa.select(path, True, "all", 2, seed=0)
    assert len(test) == 12 and len(shots) == 2 and not {q["question"] for q in test} & {q["question"] for q in shots}
    assert qa.select(path, True, 5, 2, seed=0) == (
        qa.load_questions(path, True, 5, 0),
        qa.load_questions(path, True, 2, 0, 5),
    )

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(target_modules=["q_proj"]))
    ev = EvalConfig(qa_source=str(path), qa_questions="all", kshot=2, batch_size=8)
    config = types.SimpleNamespace(eval=ev, seed=0)
    logged = []
    result = _qa(config, model, build_tokenizer(), None, logged.append)
    assert result["medical"]["questions"] == 12 and result["general"]["questions"] == 12
    assert result["medical"]["chance"] == 0.25 and result["medical"]["change"] == 0.0  # an untrained adapter
    assert result["medical"]["tuned_vs_kshot_ci95"] and logged
    assert logged[0].startswith("QA: 24 questions scored (base, tuned and 2-shot base) in")
