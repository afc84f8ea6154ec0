"""The final evaluation: one function behind both the end of `Trainer.fit()` and `peftkit eval RUN`.

Base vs tuned perplexity on the domain test split and the general text, the prompted (no fine-tuning)
baseline, KL from the base model's answers, then on the main process the QA comparison and the
diagnostics (generalisation gap, memorisation, leakage, underfitting). Both callers hand it the same
inputs, chosen by the same functions (`data.training_documents` for the training side), so a run's
report.json is reproduced by `peftkit eval` to the last digit.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

from peftkit import assets, data
from peftkit.dedup import find_leaks_in
from peftkit.evaluation import bootstrap, forgetting, qa
from peftkit.evaluation.base_cache import BaseCache
from peftkit.evaluation.memorization import memorization
from peftkit.evaluation.render import read_metrics
from peftkit.evaluation.report import (
    comparison,
    domain_prompt,
    prompted_comparison,
    prompted_scores,
    score_variant,
    test_sets,
    underfitting,
)
from peftkit.evaluation.run_report import RunReport
from peftkit.evaluation.serving import serving_latency
from peftkit.evaluation.verdict_rules import decide


def held_out_comparison(
    config, model, tokenizer, accelerator, train_texts: list[str], answers=None, cache=None, clock=None
) -> dict:
    """Base vs tuned perplexity on the test rows, the prompted baseline and (with `answers`) KL from the base,
    each comparison with its paired-bootstrap interval (one scoring pass per model and set, split by row).
    `cache` (a BaseCache): where the base model's scores may come from; `clock` (a Clock): times the parts."""
    cache = cache or BaseCache(config, accelerator, enabled=False, store=False)
    clock = clock or Clock()
    sets = test_sets(config, tokenizer)
    batch, seed = config.eval.batch_size, config.seed
    with clock("perplexity"):
        base = cache.get("base_scores", (sets,), lambda: score_variant(model, sets, batch, accelerator, "base"))
        scores = {"base": base, "tuned": score_variant(model, sets, batch, accelerator, "tuned")}
    cuts = {name: bootstrap.units(*rows, tokenizer.eos_token_id) for name, rows in sets.items()}
    report = comparison(scores, cuts, seed)
    prefix = domain_prompt(tokenizer, train_texts, config.eval.prompt_tokens)
    if prefix is not None:
        with clock("prompted_baseline"):
            prompted = cache.get("prompted", (sets["domain"], prefix),
                                 lambda: prompted_scores(model, sets["domain"], prefix, batch, accelerator))  # fmt: skip
        report["base_prompted"] = prompted_comparison(prompted, scores, cuts["domain"], seed, len(prefix))
    if answers is not None:
        with clock("kl"):
            sums, tokens = forgetting.kl_per_prompt(accelerator.unwrap_model(model), answers, accelerator)
        report["general_kl"] = (sums.sum() / max(int(tokens.sum()), 1)).item()
        report["general_kl_ci95"] = [round(x, 6) for x in bootstrap.ratio_interval(sums.numpy(), tokens.numpy(), seed)]
        report["bootstrap"]["units"]["kl_prompts"] = len(tokens)
    return report


def final_evaluation(
    config, model, tokenizer, accelerator, training, run_dir: Path, best_step: int | None, answers=None, log=print
) -> RunReport:
    """Everything the report says about the tuned model, its training side and verdict left to the caller
    (`training`: a TrainingData, or any object with `documents`, `texts` and `val_docs`); QA and diagnostics
    are computed on the main process only. The base model's side comes from the cache where it can
    (`eval.cache`, base_cache.py); report["evaluation"] says how long each part took and what was reused."""
    clock, cache = Clock(), BaseCache(config, accelerator, model=accelerator.unwrap_model(model))
    report = held_out_comparison(config, model, tokenizer, accelerator, training.texts, answers, cache, clock)
    if accelerator.is_main_process:  # diagnostics need no other process; generation runs on one
        report["cost"] = adapter_cost(run_dir / "adapter")  # written by the main process: read there
        if config.eval.qa_questions:
            with clock("qa"):
                report["qa"] = _qa(config, model, tokenizer, accelerator, log, cache)
        if config.eval.diagnostics:
            with clock("diagnostics"):
                report["diagnostics"] = _diagnostics(config, model, tokenizer, training, run_dir, best_step, cache)
        if config.eval.serving_tokens and report["cost"] is not None:  # last: its copy of the model is then free
            with clock("serving"):
                report["cost"]["serving"] = serving_latency(
                    accelerator.unwrap_model(model), tokenizer, config.eval.serving_tokens, accelerator=accelerator
                )
    report["evaluation"] = {"seconds": clock.seconds(), **cache.summary()}
    return RunReport.from_json(report)


class Clock:
    """Wall-clock seconds per named part of the evaluation, and their total."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        return {
            **{k: round(v, 2) for k, v in self.parts.items()},
            "total": round(time.perf_counter() - self.started, 2),
        }


def adapter_cost(adapter: Path) -> dict | None:
    """What the tuned model adds when served unmerged: the adapter's weights on disk and their count."""
    from safetensors import safe_open

    files = sorted(Path(adapter).glob("*.safetensors"))
    if not files:
        return None
    params = 0
    for path in files:
        with safe_open(path, framework="pt") as weights:
            params += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return {"adapter_bytes": sum(path.stat().st_size for path in files), "adapter_params": params}


def _qa(config, model, tokenizer, accelerator, log, cache=None) -> dict:
    ev, seed = config.eval, config.seed
    path = assets.resolve(ev.qa_source, log=log)
    path = path / "mmlu.jsonl" if path.is_dir() else path
    groups, shots = {}, {}
    for name, medical in _QA_GROUPS:
        # with "all": every medical question, and as many of the others (the same power for both groups)
        count = len(groups["medical"]) if ev.qa_questions == "all" and not medical else ev.qa_questions
        groups[name], shots[name] = qa.select(path, medical, count, ev.kshot, seed, ev.qa_half)
    started = time.perf_counter()
    result = qa.compare(model, tokenizer, groups, ev.batch_size, accelerator, shots, cache)
    scored = sum(len(questions) for questions in groups.values())
    variants = f"base, tuned and {ev.kshot}-shot base" if ev.kshot else "base and tuned"
    log(f"QA: {scored:,} questions scored ({variants}) in {time.perf_counter() - started:.0f} s")
    return result


_QA_GROUPS = (("medical", True), ("general", False))


def _diagnostics(config, model, tokenizer, training, run_dir: Path, best_step: int | None, cache=None) -> dict:
    """Generalisation gap, memorisation, leakage and underfitting, for the report."""
    records = read_metrics(run_dir)
    evals = [r for r in records if "gap" in r]
    best = next((r for r in evals if r["step"] == best_step), None)
    fields = ("step", "train_loss", "val_loss", "gap")
    seq_len = config.data.seq_len
    diagnostics = {
        "generalization_gap": {
            "best": {k: best[k] for k in fields} if best else None,
            "end": {k: evals[-1][k] for k in fields} if evals else None,
        },
        "memorization": memorization(
            model,
            tokenizer,
            training.texts,
            data.training_texts(tokenizer, training.val_docs, config.data),
            prefix=min(32, seq_len // 2),
            length=min(16, seq_len // 4),
            seed=config.seed,
        ),
    }
    held_out = {"validation": training.val_docs, "test": data.load_split(config.data, "test")}

    def leaks() -> dict:
        return find_leaks_in(training.documents, held_out)

    parts = (training.documents, held_out["validation"], held_out["test"])
    diagnostics["leakage"] = cache.get("leakage", parts, leaks, model_free=True, collective=False) if cache else leaks()
    if data.streaming.active(config.data):  # the training side is a sample: say of how many
        documents = data.streaming.train_stats(config.data)["train"]["documents"]
        for leak in diagnostics["leakage"].values():
            leak["sampled_from"] = documents
    diagnostics["underfitting"] = underfitting(records, config.eval)
    return diagnostics


class _RunData:
    """The training side of a finished run, chosen as the trainer chose it (no tokenisation needed)."""

    def __init__(self, config, tokenizer, log):
        self.documents = data.training_documents(config.data, config.seed, log)
        self.texts = data.training_texts(tokenizer, self.documents, config.data)
        self.val_docs = data.load_split(config.data, "validation")


def evaluate_run(run_dir: Path, log=lambda _: None, recompute: bool = False) -> dict:
    """Recompute a finished run's final evaluation from RUN_DIR/config.yaml and RUN_DIR/adapter, as the
    trainer computed it at the end of training, and rewrite report.json (+ .md, .html). `recompute`: the
    base model's side too, not from the evaluation cache (as eval.cache=false)."""
    from peft import PeftModel

    from peftkit import models, runtime
    from peftkit.alignment.config import text_only
    from peftkit.config import Config
    from peftkit.errors import PeftkitError
    from peftkit.evaluation.render import write_report_files

    run_dir = Path(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise PeftkitError(f"{run_dir}: no adapter/ folder; is this a finished peftkit run?")
    config = Config.from_yaml(run_dir / "config.yaml")
    text_only(config, "peftkit eval")
    if recompute:
        config = config.override(["--eval.cache=false"])
    accelerator = models.make_accelerator(config.train.mixed_precision)
    tokenizer = models.load_tokenizer(config.model, log=log)
    base = models.load_model(config.model, log=log)
    if not getattr(base, "is_quantized", False):
        base.to(accelerator.device)
    # the base model's answers come from the untouched base, as in training
    answers = forgetting.base_answers(base, tokenizer, accelerator) if config.eval.kl_prompts else None
    model = PeftModel.from_pretrained(base, run_dir / "adapter").to(accelerator.device)
    path = run_dir / "report.json"
    summary = RunReport.load(path).training if path.exists() else None  # the training side is kept as it was
    with runtime.eager():
        training = _RunData(config, tokenizer, log)
        best_step = summary.best_step if summary else None
        report = final_evaluation(config, model, tokenizer, accelerator, training, run_dir, best_step, answers, log)
    report.training = summary
    report.verdict = decide(report, config.eval)
    report.save(path)
    write_report_files(run_dir)
    return report.to_json()
