"""Is fine-tuning needed at all? Underfitting, the no-fine-tuning baselines, augmentation and replay."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
import torch

from peftkit import Trainer, data
from peftkit.config import EvalConfig
from peftkit.errors import PeftkitError
from peftkit.evaluation import qa
from peftkit.evaluation.report import underfitting, verdict
from tests.conftest import picked_qa_file


def with_changes(config, **sections):
    return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), **v) for k, v in sections.items()})


def records(val_losses, train_losses):
    out = [{"step": 0, "val_loss": val_losses[0]}]
    out += [{"step": i + 1, "loss": loss} for i, loss in enumerate(train_losses)]
    out += [{"step": 10 * i, "val_loss": v} for i, v in enumerate(val_losses[1:], 1)]
    return out


def test_underfitting_signals_and_their_suggestions():
    ev = EvalConfig(underfit_slope=0.01, min_domain_gain=0.01)
    still_falling = underfitting(records([3.0, 2.8, 2.6, 2.4], [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]), ev)
    assert still_falling["underfitting"] and "train.max_steps" in still_falling["suggestion"]
    assert still_falling["val_slope_per_eval"] == pytest.approx((0.2 / 2.8 + 0.2 / 2.6) / 2)
    flat = underfitting(records([3.0, 2.999, 2.999], [3.0, 3.01, 2.99, 3.0, 3.0, 2.995]), ev)
    assert flat["underfitting"] and "barely learned" in flat["signals"][-1] and "method.r" in flat["suggestion"]
    converged = underfitting(records([3.0, 2.5, 2.48, 2.479], [3.0, 2.8, 2.6, 2.5, 2.45, 2.44]), ev)
    assert not converged["underfitting"] and converged["suggestion"] is None


def test_a_run_with_a_tiny_learning_rate_is_reported_as_underfitting(tiny_config):
    config = with_changes(tiny_config, train={"lr": 1e-7, "max_steps": 8}, eval={"every_steps": 2})
    report = Trainer(config, log=lambda _: None).fit()
    fit = report["diagnostics"]["underfitting"]
    assert fit["underfitting"] and "barely learned" in " ".join(fit["signals"]), (
        fit.get("train_loss_change"),
        fit.get("val_ppl_gain"),
    )
    assert any(r.startswith("underfitting:") for r in report["verdict"]["reasons"])


def qa_file(tmp_path):
    rng = random.Random(0)
    rows = [{"subject": subject, "question": f"the patient received {i}", "answer": rng.randrange(4),
             "choices": ["aspirin", "the river", "insulin and recovered .", "music"]}
            for i, subject in enumerate(["anatomy"] * 12 + ["sociology"] * 12)]  # fmt: skip
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kshot_examples_never_include_test_questions(tmp_path):
    path = qa_file(tmp_path)
    test = qa.load_questions(path, True, 8, seed=3)
    shots = qa.load_questions(path, True, 3, seed=3, skip=8)
    assert len(shots) == 3 and not {q["question"] for q in shots} & {q["question"] for q in test}
    text = qa.shots_text(shots)
    assert text.count("Question:") == 3 and text.endswith("\n\n")
    assert all(f"{q['question']}\nAnswer: {q['choices'][q['answer']]}" in text for q in shots)


def test_report_has_the_no_fine_tuning_baselines_and_the_verdict_names_the_best_option(tiny_config, tmp_path):
    # fixed picks (picked_qa_file): base and k-shot base the general option, tuned the medical one; 6 test
    # questions and 2 examples per group, one answer per group, so the k-shot sample cannot move the counts
    questions = picked_qa_file(tmp_path / "qa.jsonl", [0] * 8, [1] * 8)
    config = with_changes(
        tiny_config, eval={"qa_source": str(questions), "qa_questions": 6, "kshot": 2, "prompt_tokens": 24}
    )
    report = Trainer(config, log=lambda _: None).fit()
    prompted = report["base_prompted"]
    assert prompted["prompt_tokens"] == 24 and prompted["tokens"] == report["eval_tokens"]["domain"]
    assert prompted["domain_ppl"] != report["base"]["domain_ppl"]  # the context changed the base model's scores
    for name, (base, tuned) in {"medical": (0.0, 1.0), "general": (1.0, 0.0)}.items():
        group = report["qa"][name]
        assert group["kshot"] == 2 and group["questions"] == 6
        # the k-shot base scored with the adapter on, or the base without its examples' context, would differ
        assert (group["base_accuracy"], group["kshot_base_accuracy"], group["tuned_accuracy"]) == (base, base, tuned)
        assert group["change"] == group["tuned_vs_kshot"] == tuned - base
    verdict = report["verdict"]
    assert verdict["options"] == {
        "base": {"domain_ppl": report["base"]["domain_ppl"], "medical_qa": 0.0, "general_qa": 1.0},
        "tuned": {"domain_ppl": report["tuned"]["domain_ppl"], "medical_qa": 1.0, "general_qa": 0.0},
        "base_kshot": {"domain_ppl": prompted["domain_ppl"], "medical_qa": 0.0, "general_qa": 1.0},
    }
    # the base answers general QA well above chance and the tuned model loses all of it: a significant loss
    # against a domain gain, so the outcome is mixed and the base is kept; the domain prompt does not beat it
    assert report["tuned"]["domain_ppl"] < report["base"]["domain_ppl"] < prompted["domain_ppl"]
    assert (verdict["outcome"], verdict["recommend"]) == ("mixed", "base"), verdict["summary"]
    assert any(r.startswith("general QA accuracy 100.0% -> 0.0%") for r in verdict["deciding"])
    assert any("no fine-tuning" in r for r in verdict["reasons"])


def test_verdict_prefers_the_prompted_base_when_it_does_as_well_as_the_tuned_model():
    ev = EvalConfig(min_domain_gain=0.01)
    report = {"base": {"domain_ppl": 20.0}, "tuned": {"domain_ppl": 16.0}, "change": {"domain_ppl": -0.2},
              "base_prompted": {"domain_ppl": 16.1, "prompt_tokens": 128}}  # fmt: skip
    assert verdict(report, ev)["recommend"] == "base_kshot"
    report["base_prompted"]["domain_ppl"] = 19.0
    assert verdict(report, ev)["recommend"] == "tuned"
    report.update(tuned={"domain_ppl": 19.9}, change={"domain_ppl": -0.005})
    assert verdict(report, ev)["recommend"] == "base_kshot"  # tuning did not pay; the prompt did
    report["base_prompted"]["domain_ppl"] = 20.1
    assert verdict(report, ev)["recommend"] == "base"


def test_sentence_shuffle_reorders_sentences_of_training_documents_only():
    rng = random.Random(0)
    doc = "First sentence here. Second one follows! Third is a question? Fourth (closing) remark."
    shuffled = data.shuffle_sentences(doc, rng)
    split = re.compile(r"(?<=[.!?])\s+")
    assert shuffled != doc and sorted(split.split(shuffled)) == sorted(split.split(doc))
    assert data.shuffle_sentences("One sentence only.", rng) == "One sentence only."
    from peftkit.config import DataConfig

    docs = [doc, "Single sentence."]
    assert data.augment_documents(docs, DataConfig(), seed=0) == docs
    augmented = data.augment_documents(docs, DataConfig(augment=["sentence_shuffle"]), seed=0)
    assert augmented[:2] == docs and len(augmented) == 3 and augmented[2] != doc


def test_token_noise_is_reproducible_and_at_the_stated_rate():
    rows = torch.arange(20000).reshape(10, 2000) % 50
    noisy = data.noise_tokens(rows, 0.1, 50, [0, 3, 0, 0])
    changed = (noisy != rows).float().mean().item()
    assert 0.08 < changed < 0.1  # 10% replaced, a few by the same token
    assert torch.equal(noisy, data.noise_tokens(rows, 0.1, 50, [0, 3, 0, 0]))
    assert not torch.equal(noisy, data.noise_tokens(rows, 0.1, 50, [0, 4, 0, 0]))


@pytest.mark.parametrize("augment", [["token_noise"], ["sentence_shuffle"]])
def test_augmentation_changes_training_but_never_the_held_out_data(augment, tiny_config, tmp_path, monkeypatch):
    # the tiny corpus is lower-case ("... aspirin . the child ..."): let any full stop end a sentence
    monkeypatch.setattr(data.augment, "_SENTENCE_END", re.compile(r"(?<=\.)\s+"))
    plain = with_changes(tiny_config, train={"max_steps": 4})
    noisy = dataclasses.replace(with_changes(plain, data={"augment": augment, "token_noise": 0.3}),
                                output_dir=str(tmp_path / "aug"))  # fmt: skip
    a, b = Trainer(plain, log=lambda _: None), Trainer(noisy, log=lambda _: None)
    ra, rb = a.fit(), b.fit()
    assert ra["baseline"] == rb["baseline"]  # step-0 validation and general scores: identical held-out rows
    assert ra["base"] == rb["base"] and ra["eval_tokens"] == rb["eval_tokens"]  # identical test rows
    assert a.data.val_docs == b.data.val_docs and a.data.documents == b.data.documents
    losses = [[json.loads(line).get("loss") for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
              for t in (a, b)]  # fmt: skip
    assert losses[0] != losses[1]


def test_replay_mixes_general_text_into_training_only(tiny_config, tmp_path):
    logs = []
    plain = with_changes(tiny_config, train={"max_steps": 2})
    mixed = dataclasses.replace(with_changes(plain, data={"replay": 0.3}, eval={"val_tokens": 64, "test_tokens": 64}),
                                output_dir=str(tmp_path / "replay"))  # fmt: skip
    trainer = Trainer(mixed, log=logs.append)
    trainer.fit()
    assert any(line.startswith("replay: ") for line in logs)
    domain = sum(len(t) for t in data.tokenize(trainer.tokenizer, trainer.data.documents))
    stream = trainer.data.stream
    assert stream.tokens >= domain / 0.7 * 0.99  # 30% of the training tokens are general text
    # and no more: whole general documents up to the share, the last one past it by less than its length
    longest = max(len(t) for t in data.tokenize(trainer.tokenizer, data.load_general(mixed.data)))
    assert stream.tokens - domain < domain * 0.3 / 0.7 + longest
    no_general = dataclasses.replace(mixed, data=dataclasses.replace(mixed.data, general_source=""),
                                     output_dir=str(tmp_path / "no-general"))  # fmt: skip
    with pytest.raises(PeftkitError, match="data.replay needs data.general_source"):
        Trainer(no_general, log=lambda _: None).fit()


def test_replay_documents_skip_the_scored_general_text():
    from tests.conftest import build_tokenizer, general_doc

    tokenizer = build_tokenizer()
    rng = random.Random(0)
    general = [general_doc(rng) + f" {i}" for i in range(40)]
    tokens = data.tokenize(tokenizer, general)
    reserved = sum(len(t) for t in tokens[:10]) + 1  # the evaluations score into document 10
    replay = data.replay_documents(general, tokenizer, reserved, wanted_tokens=200)
    # whole documents from the first one past the scored region, in order, until 200 tokens
    assert sum(len(t) for t in replay) >= 200 > sum(len(t) for t in replay[:-1])
    assert all((r == t).all() for r, t in zip(replay, tokens[11:], strict=False))
    with pytest.raises(PeftkitError, match="all scored by the general-text evaluations"):
        data.replay_documents(general, tokenizer, 10**9, 10)
