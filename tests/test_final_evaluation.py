"""One final evaluation: `peftkit eval RUN` recomputes exactly what the trainer reported at the end of training."""

import dataclasses
import json
import random

import pytest

from peftkit import PeftkitError, Trainer
from peftkit.cli import main


def qa_file(path):
    rng = random.Random(0)
    rows = [
        {
            "subject": subject,
            "question": "the patient received",
            "answer": rng.randrange(4),
            "choices": ["aspirin", "the river", "insulin and recovered .", "music"],
        }
        for subject in ["anatomy"] * 6 + ["sociology"] * 6
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_peftkit_eval_reproduces_the_trainers_report_with_max_train_docs(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))  # an empty evaluation cache: the run computes all
    # max_train_docs keeps a seeded subset whose first documents differ from the split's first documents:
    # the prompted baseline (its domain prefix) and memorisation must be built from that subset both times.
    config = dataclasses.replace(
        tiny_config,
        data=dataclasses.replace(tiny_config.data, max_train_docs=60),
        train=dataclasses.replace(tiny_config.train, max_steps=8),
        eval=dataclasses.replace(
            tiny_config.eval, qa_source=str(qa_file(tmp_path / "qa.jsonl")), qa_questions=5, kshot=1, prompt_tokens=16
        ),
    )
    trained = Trainer(config, log=lambda _: None).fit()
    assert {"base_prompted", "general_kl", "qa", "diagnostics", "verdict"} <= set(trained)
    serving = trained["cost"]["serving"]
    assert serving["unmerged_ms_per_token"] > 0 and serving["merged_ms_per_token"] > 0 and serving["same_tokens"]
    path = tmp_path / "run" / "report.json"
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(trained))

    # Spoil every evaluated number on disk, so that only a real recomputation can give them back.
    spoiled = json.loads(path.read_text())
    for key in ("base", "tuned", "change"):
        spoiled[key] = {k: -1.0 for k in spoiled[key]}
    spoiled["base_prompted"]["domain_ppl"] = -1.0
    spoiled["general_kl"] = -1.0
    spoiled["qa"] = {}
    spoiled["diagnostics"] = {}
    spoiled["verdict"] = {"helped": None, "recommend": "-", "summary": "-", "options": {}, "reasons": []}
    path.write_text(json.dumps(spoiled))

    main(["--quiet", "eval", str(tmp_path / "run")])
    assert "verdict:" in capsys.readouterr().out
    # every number and the verdict, to the last digit; but the serving speed, a wall-clock measurement
    again = json.loads(path.read_text())
    assert untimed(again) == untimed(written)
    # the run computed the base model's side and stored it; `peftkit eval` reused it, with the same digits
    base_side = ["base_scores", "leakage", "prompted", "qa_base"]
    assert written["evaluation"]["computed"] == base_side and written["evaluation"]["reused"] == []
    assert again["evaluation"]["reused"] == base_side and again["evaluation"]["computed"] == []
    assert again["evaluation"]["seconds"]["total"] > 0 and "qa" in again["evaluation"]["seconds"]
    main(["--quiet", "eval", str(tmp_path / "run"), "--recompute"])
    recomputed = json.loads(path.read_text())
    assert recomputed["evaluation"]["reused"] == [] and untimed(recomputed) == untimed(written)
    assert "this evaluation" in (tmp_path / "run" / "report.md").read_text()


def untimed(report: dict) -> dict:
    serving = report["cost"]["serving"]
    assert serving["unmerged_ms_per_token"] > 0 and serving["merged_ms_per_token"] > 0
    timings = {"unmerged_ms_per_token": None, "merged_ms_per_token": None}
    report = {key: value for key, value in report.items() if key != "evaluation"}  # its seconds and cache use
    return {**report, "cost": {**report["cost"], "serving": {**serving, **timings}}}


def test_a_trainer_that_has_not_trained_says_why_it_cannot_evaluate(tiny_config):
    trainer = Trainer(tiny_config, log=lambda _: None)
    trainer.log("logging works before fit()")
    with pytest.raises(PeftkitError, match=r"Trainer.evaluate\(\): the trainer is not set up .* call fit\(\)"):
        trainer.evaluate()
    with pytest.raises(PeftkitError, match=r"Trainer.validate\(\)"):
        trainer.validate()
