"""The end of a DPO run: the kept adapter saved, measured on the test pairs and the general text against the
model the stage started from, and a verdict in the same three-way form as a text run's.

On the test pairs (never trained on, never used to pick the step): the DPO loss, the reward accuracy (share of
pairs whose implicit reward ranks chosen above rejected; 0 for the reference itself, whose reward is 0) and
margin, and the likelihood accuracy, the share of pairs where the model gives the chosen completion the higher
log-probability, which applies to the reference too and so is the base-vs-tuned comparison, with a paired
bootstrap interval over pairs. Forgetting: general-text perplexity and KL from the reference's answers, as in
text runs, judged against eval.max_general_ppl_increase and eval.max_general_kl.
"""

from __future__ import annotations

import json

import numpy as np

from peftkit import data
from peftkit.alignment.dpo import completion_lengths, preference_measures, score_pairs
from peftkit.evaluation import bootstrap, forgetting
from peftkit.evaluation.final import Clock, _qa
from peftkit.evaluation.report import comparison, score_variant

RESAMPLES = 2000


def interval(values: np.ndarray, seed: int) -> list[float]:
    """95% percentile-bootstrap interval of the mean of per-pair `values`."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (RESAMPLES, len(values)))].mean(axis=1)
    return [round(float(x), 6) for x in np.percentile(means, [2.5, 97.5])]


def preference_report(trainer) -> dict:
    """Test-pair measures of the tuned model against the reference, with intervals."""
    cfg, pairs, acc = trainer.config, trainer.data, trainer.accelerator
    tuned = score_pairs(acc.unwrap_model(trainer.model), pairs, "test", cfg.eval.batch_size, acc)
    ref = pairs.ref["test"]
    measures = preference_measures(tuned, ref, completion_lengths(pairs, "test"), cfg.align.beta, cfg.align.loss)
    base_prefers = (ref[:, 0] > ref[:, 1]).double().numpy()
    tuned_prefers = (tuned[:, 0] > tuned[:, 1]).double().numpy()
    margins = (cfg.align.beta * ((tuned[:, 0] - ref[:, 0]) - (tuned[:, 1] - ref[:, 1]))).double().numpy()
    return {
        "test_pairs": len(ref),
        "loss": measures["loss"],
        "reward_accuracy": measures["reward_accuracy"],
        "reward_accuracy_ci95": interval((margins > 0).astype(float), cfg.seed),
        "reward_margin": measures["reward_margin"],
        "reward_margin_ci95": interval(margins, cfg.seed),
        "likelihood_accuracy": {"base": float(base_prefers.mean()), "tuned": float(tuned_prefers.mean())},
        "likelihood_accuracy_change_ci95": interval(tuned_prefers - base_prefers, cfg.seed),
    }


def forgetting_report(trainer) -> dict:
    """General-text perplexity base vs tuned (paired-bootstrap interval) and KL from the reference's answers."""
    cfg, acc, tokenizer = trainer.config, trainer.accelerator, trainer.tokenizer
    out: dict = {}
    general = data.load_general(cfg.data)
    if general:
        sets = {"general": data.eval_rows(tokenizer, general, cfg.data.seq_len, cfg.eval.test_tokens)}
        scores = {v: score_variant(trainer.model, sets, cfg.eval.batch_size, acc, v) for v in ("base", "tuned")}
        cuts = {name: bootstrap.units(*rows, tokenizer.eos_token_id) for name, rows in sets.items()}
        found = comparison(scores, cuts, cfg.seed)
        out["general_ppl"] = {"base": found["base"]["general_ppl"], "tuned": found["tuned"]["general_ppl"],
                              "change": found["change"]["general_ppl"],
                              "change_ci95": found["change_ci95"]["general_ppl"]}  # fmt: skip
    if trainer.answers is not None:
        sums, tokens = forgetting.kl_per_prompt(acc.unwrap_model(trainer.model), trainer.answers, acc)
        out["general_kl"] = (sums.sum() / max(int(tokens.sum()), 1)).item()
    return out


def verdict(report: dict, eval_config) -> dict:
    """helped / mixed / did not help: did the tuned model prefer the chosen completions of held-out pairs more
    often than the reference did (the interval above 0), and within the forgetting budgets?"""
    pref, forget = report["preference"], report["forgetting"]
    low, high = pref["likelihood_accuracy_change_ci95"]
    acc = pref["likelihood_accuracy"]
    reasons = [f"likelihood accuracy on {pref['test_pairs']} test pairs {acc['base']:.1%} -> {acc['tuned']:.1%} "
               f"(change 95% CI [{low:+.1%}, {high:+.1%}])"]  # fmt: skip
    over = []
    ppl_budget, kl_budget = eval_config.max_general_ppl_increase, eval_config.max_general_kl
    if "general_ppl" in forget and ppl_budget is not None and forget["general_ppl"]["change"] > ppl_budget:
        over.append(f"general perplexity {forget['general_ppl']['change']:+.1%} > budget {ppl_budget:+.0%}")
    if "general_kl" in forget and kl_budget is not None and forget["general_kl"] > kl_budget:
        over.append(f"KL from the reference {forget['general_kl']:.3f} > budget {kl_budget} nats/token")
    if low > 0:
        outcome = "mixed" if over else "helped"
    else:
        outcome = "did not help"
        reasons.append("the interval does not exclude no change: the preference shift is not measurable here")
    return {"outcome": outcome, "reasons": reasons + over}


def finish_preference_run(trainer) -> dict:
    """Restore the best step, save the adapter, evaluate, write report.json and report.md; the report."""
    cfg, acc = trainer.config, trainer.accelerator
    trainer.callbacks.call("on_train_end", trainer)  # the guard restores the best checkpoint
    trainer._save_adapter()
    clock = Clock()
    report: dict = {"objective": "dpo", "align": {"beta": cfg.align.beta, "loss": cfg.align.loss},
                    "reference": cfg.model.adapter or cfg.model.name_or_path}  # fmt: skip
    with clock("preference"):
        report["preference"] = preference_report(trainer)
    with clock("forgetting"):
        report["forgetting"] = forgetting_report(trainer)
    if acc.is_main_process and cfg.eval.qa_questions:
        with clock("qa"):
            report["qa"] = _qa(cfg, trainer.model, trainer.tokenizer, acc, trainer.log)
            if cfg.model.adapter:  # base -> first stage -> this stage, on the same questions
                for group, found in plain_base_qa(cfg, trainer.tokenizer, acc, trainer.log).items():
                    report["qa"][group].update(found)
    report["training"] = trainer._summary().to_json()
    report["evaluation"] = {"seconds": clock.seconds()}
    report["verdict"] = verdict(report, cfg.eval)
    if acc.is_main_process:
        (trainer.run_dir / "report.json").write_text(json.dumps(report, indent=2))
        text = format_preference_report(report)
        (trainer.run_dir / "report.md").write_text("```\n" + text + "\n```\n")
        trainer.log(text)
        trainer.log(f"adapter: {trainer.run_dir / 'adapter'}   report: {trainer.run_dir / 'report.md'}")
    trainer.report = report
    trainer.callbacks.call("on_run_end", trainer, report)
    for tracker in acc.trackers:
        tracker.finish()
    return report


def plain_base_qa(cfg, tokenizer, accelerator, log) -> dict:
    """QA accuracy of the base model without model.adapter, on the questions `_qa` scored."""
    import dataclasses

    from peftkit import assets, models
    from peftkit.evaluation import qa

    ev = cfg.eval
    path = assets.resolve(ev.qa_source, log=log)
    path = path / "mmlu.jsonl" if path.is_dir() else path
    plain = models.load_model(dataclasses.replace(cfg.model, adapter=""), log=log).to(accelerator.device).eval()
    out, medical_count = {}, None
    for name, medical in (("medical", True), ("general", False)):
        count = medical_count if ev.qa_questions == "all" and not medical else ev.qa_questions
        questions, _ = qa.select(path, medical, count, ev.kshot, cfg.seed, ev.qa_half)
        medical_count = len(questions) if medical else medical_count
        if questions:
            right = sum(p == q["answer"] for p, q in zip(qa.choose(plain, tokenizer, questions, ev.batch_size,
                                                                   accelerator), questions, strict=True))  # fmt: skip
            out[name] = {"plain_base_accuracy": right / len(questions),
                         "plain_base_ci95": qa.wilson(right, len(questions))}  # fmt: skip
    return out


def format_preference_report(report: dict) -> str:
    pref, forget, verdict_ = report["preference"], report["forgetting"], report["verdict"]
    acc = pref["likelihood_accuracy"]
    lines = [
        f"DPO ({report['align']['loss']}, beta {report['align']['beta']}) against {report['reference']}",
        f"test pairs: {pref['test_pairs']}   DPO loss {pref['loss']:.4f}",
        f"  prefers chosen (log-probability): base {acc['base']:.1%} -> tuned {acc['tuned']:.1%}   change 95% CI "
        f"[{pref['likelihood_accuracy_change_ci95'][0]:+.1%}, {pref['likelihood_accuracy_change_ci95'][1]:+.1%}]",
        f"  reward accuracy {pref['reward_accuracy']:.1%} {_ci(pref['reward_accuracy_ci95'], '.1%')}   "
        f"margin {pref['reward_margin']:+.4f} {_ci(pref['reward_margin_ci95'], '+.4f')}",
    ]
    if "general_ppl" in forget:
        g = forget["general_ppl"]
        lines.append(f"general perplexity {g['base']:.2f} -> {g['tuned']:.2f} ({g['change']:+.1%}, 95% CI "
                     f"[{g['change_ci95'][0]:+.1%}, {g['change_ci95'][1]:+.1%}])")  # fmt: skip
    if "general_kl" in forget:
        lines.append(f"KL from the reference on general prompts {forget['general_kl']:.4f} nats/token")
    for group, r in (report.get("qa") or {}).items():
        plain = f"plain base {r['plain_base_accuracy']:.1%} -> " if "plain_base_accuracy" in r else ""
        lines.append(f"QA {group} ({r['questions']} questions): {plain}reference {r['base_accuracy']:.1%} -> tuned "
                     f"{r['tuned_accuracy']:.1%} (change 95% CI [{r['change_ci95'][0]:+.1%}, {r['change_ci95'][1]:+.1%}])")  # fmt: skip
    lines.append(f"verdict: {verdict_['outcome']}: " + "; ".join(verdict_["reasons"]))
    return "\n".join(lines)


def _ci(pair: list[float], spec: str) -> str:
    return f"[{format(pair[0], spec)}, {format(pair[1], spec)}]"
