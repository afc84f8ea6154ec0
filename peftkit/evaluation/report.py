"""Base model vs tuned model on the same held-out rows, as report.json and a printed table."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from peftkit import data
from peftkit.evaluation.perplexity import nll, perplexity


def test_sets(config, tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The final report's rows: the first `eval.test_tokens` tokens of the domain test split and of
    the general text, packed into `data.seq_len` rows."""
    seq_len, budget = config.data.seq_len, config.eval.test_tokens
    sets = {"domain": data.eval_rows(tokenizer, data.load_split(config.data, "test"), seq_len, budget)}
    general = data.load_general(config.data)
    if general:
        sets["general"] = data.eval_rows(tokenizer, general, seq_len, budget)
    return sets


def evaluate_run(run_dir: Path) -> dict:
    """Recompute a finished run's base-vs-tuned comparison from RUN_DIR/config.yaml and RUN_DIR/adapter."""
    from peft import PeftModel

    from peftkit import models
    from peftkit.config import Config
    from peftkit.errors import PeftkitError

    run_dir = Path(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise PeftkitError(f"{run_dir}: no adapter/ folder; is this a finished peftkit run?")
    config = Config.from_yaml(run_dir / "config.yaml")
    accelerator = models.make_accelerator(config.train.mixed_precision)
    tokenizer = models.load_tokenizer(config.model)
    model = PeftModel.from_pretrained(models.load_model(config.model), run_dir / "adapter")
    report = compare_base_and_tuned(model.to(accelerator.device), test_sets(config, tokenizer),
                                    config.eval.batch_size, accelerator)  # fmt: skip
    path = run_dir / "report.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update(report)
    path.write_text(json.dumps(previous, indent=2))
    return previous


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


def format_report(report: dict) -> str:
    lines = [f"{'':<14}{'base':>10}{'tuned':>10}{'change':>9}   tokens scored"]
    for key, base in report["base"].items():
        name = key.removesuffix("_ppl")
        tuned, change = report["tuned"][key], report["change"][key]
        lines.append(f"{name + ' ppl':<14}{base:>10.2f}{tuned:>10.2f}{change:>+9.1%}   {report['eval_tokens'][name]}")
    return "\n".join(lines)
