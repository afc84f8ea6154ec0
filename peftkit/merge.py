"""Merge a run's adapter into its base model for deployment, and check the result before writing it.

The merge happens in fp32 (merging into a bf16 base moved logits by up to 0.875 in our trial,
against 6e-5 in fp32) and is cast to the requested dtype afterwards. Before anything is written,
the merged model's logits are compared with the adapter model's on a few inputs; a difference
beyond MERGE_ATOL, or a merged model identical to the base, is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from peftkit import models
from peftkit.config import Config
from peftkit.errors import PeftkitError
from peftkit.locking import OutputLock
from peftkit.progress import bar

MERGE_ATOL = 1e-3  # max |logit difference| merged vs adapter model, both fp32 (typically ~1e-4)
CHECK_INPUTS = (
    "The patient was admitted with acute myocardial infarction and treated with",
    "Randomized controlled trials of antibiotic prophylaxis showed",
    "The history of the Roman Empire begins with",
)


COMBINATIONS = ("linear", "cat", "ties", "dare_ties", "dare_linear")
NOT_MERGEABLE = ("prompt_tuning", "prefix_tuning")
# quantized bases: merged vs quantized adapter model within this share of the base's own quantization error
QUANTIZED_MERGE_SHARE = {"nf4": 0.1, "int8": 0.5}


def merge_run(run_dir: Path, out: Path, dtype: str = "fp32", overwrite: bool = False, log=print) -> dict:
    """Write RUN_DIR's base model with its adapter merged in to `out` (safetensors + tokenizer)."""
    return merge_runs([Path(run_dir)], None, "linear", out, dtype, overwrite, log)


def merge_runs(
    run_dirs: list[Path], weights: list[float] | None, combination: str, out: Path, dtype: str = "fp32",
    overwrite: bool = False, log=print,
) -> dict:  # fmt: skip
    """Merge one run's adapter, or a weighted combination of several runs' adapters (peft's
    add_weighted_adapter), into their common base model and write it to `out`."""
    # the bar is closed however the merge ends, so that an error starts its own line
    # one merge per output: a second process writing the same --out is refused in one line
    with OutputLock.output(Path(out), "peftkit merge"), bar(total=4, desc="merge", unit="stage", leave=False) as stages:
        return _merge_runs(run_dirs, weights, combination, out, dtype, overwrite, log, stages)


def _merge_runs(run_dirs, weights, combination, out, dtype, overwrite, log, stages) -> dict:
    run_dirs, out = [Path(r) for r in run_dirs], Path(out)
    for run_dir in run_dirs:
        if not (run_dir / "adapter" / "adapter_config.json").exists():
            raise PeftkitError(f"{run_dir}: no adapter/ folder; merge takes finished peftkit run folders")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeftkitError(f"--out {out} already holds files; choose another folder or pass --overwrite")
    if dtype not in models.DTYPES:
        raise PeftkitError(f"--dtype {dtype}: choose one of {', '.join(models.DTYPES)}")
    if combination not in COMBINATIONS:
        raise PeftkitError(f"--combination {combination}: choose one of {', '.join(COMBINATIONS)}")
    weights = weights or [1.0] * len(run_dirs)
    if len(weights) != len(run_dirs):
        raise PeftkitError(f"--weights: {len(weights)} weights for {len(run_dirs)} adapters; give one per adapter")
    configs = [Config.from_yaml(r / "config.yaml") for r in run_dirs]
    bases = {c.model.name_or_path + (f" + {c.model.adapter}" if c.model.adapter else "") for c in configs}
    if len(bases) > 1:
        raise PeftkitError(f"the adapters were trained on different base models ({', '.join(sorted(bases))})")
    config = configs[0]
    for run_dir, run_config in zip(run_dirs, configs, strict=True):
        if run_config.method.name in NOT_MERGEABLE:
            raise PeftkitError(
                f"{run_dir}: method {run_config.method.name} adds virtual tokens, not weight changes, so it cannot be "
                f"merged; deploy the base model with the adapter (peftkit generate {run_dir})"
            )
    # stages: load, merge + check, save, done
    tokenizer = models.load_tokenizer(config.model)
    inputs = tokenizer(list(CHECK_INPUTS), return_tensors="pt", padding=True)
    quantized = config.model.quantization != "none"
    tolerance = MERGE_ATOL
    if quantized:
        # QLoRA trained against the quantized weights: merge into those weights dequantized, not into the
        # original full-precision ones (the known trap), and check against the quantized adapter model.
        # No fp32 model reproduces bitsandbytes' kernels exactly (LLM.int8 also quantizes activations),
        # so the tolerance is a share of the quantization error itself: the trap is off by about all of it.
        reference = _adapter_model(models.load_model(config.model, dtype=torch.float32), run_dirs, weights, combination)
        full = models.load_model(dataclasses.replace(config.model, quantization="none"), dtype=torch.float32).eval()
        with torch.no_grad():
            adapted = reference(**inputs).logits
            with reference.disable_adapter():
                quantization_error = (reference(**inputs).logits - full(**inputs).logits).abs().max().item()
        del reference, full
        tolerance = QUANTIZED_MERGE_SHARE[config.model.quantization] * quantization_error
        base_model = models.load_model(config.model, dtype=torch.float32).dequantize(dtype=torch.float32)
    else:
        base_model = models.load_model(config.model, dtype=torch.float32)
    model = _adapter_model(base_model, run_dirs, weights, combination)
    stages.update(1)
    with torch.no_grad():
        if not quantized:
            adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    diff = (merged - adapted).abs()[mask].max().item()
    moved = (merged - base).abs()[mask].max().item()
    if diff > tolerance:
        raise PeftkitError(
            f"merged logits differ from the adapter model's by {diff:.2e} > {tolerance:.2e}; nothing written"
        )
    if moved == 0:
        raise PeftkitError("the merged model is identical to the base model (the adapter is a no-op); nothing written")

    merged_model = merged_model.to(models.DTYPES[dtype])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    stages.update(1)
    merged_model.save_pretrained(partial)
    stages.update(1)
    tokenizer.save_pretrained(partial)
    check = {"max_abs_logit_diff_vs_adapter": diff, "max_abs_logit_diff_vs_base": moved, "tolerance": tolerance,
             "quantization": config.model.quantization,
             "dtype": dtype, "base_model": config.model.name_or_path, "runs": [str(r) for r in run_dirs],
             "weights": weights, "combination": combination if len(run_dirs) > 1 else None}  # fmt: skip
    (partial / "peftkit_merge.json").write_text(json.dumps(check, indent=2))
    (partial / "README.md").write_text(model_card(run_dirs[0], config, check))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    stages.update(1)
    log(
        f"merged {', '.join(map(str, run_dirs))} into {out} ({dtype}); logits match the adapter model within {diff:.1e}"
    )
    return check


def _adapter_model(base, run_dirs: list[Path], weights: list[float], combination: str):
    """`base` with the runs' adapters: one as it is, several combined into one weighted adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, run_dirs[0] / "adapter", adapter_name="a0")
    if len(run_dirs) > 1:
        for index, run_dir in enumerate(run_dirs[1:], 1):
            model.load_adapter(run_dir / "adapter", adapter_name=f"a{index}")
        names = [f"a{i}" for i in range(len(run_dirs))]
        try:
            model.add_weighted_adapter(names, weights, "combined", combination_type=combination,
                                       density=0.5 if "ties" in combination or "dare" in combination else None)  # fmt: skip
        except ValueError as err:
            raise PeftkitError(f"--combination {combination}: {err}") from None
        model.set_adapter("combined")
        for name in names:
            model.delete_adapter(name)
    return model.eval()


def model_card(run_dir: Path, config: Config, check: dict) -> str:
    """A short model card: base model, method, data, and the run's held-out results and verdict."""
    method = config.method
    lines = [
        f"# {run_dir.name} (merged by peftkit)",
        "",
        f"- base model: `{config.model.name_or_path}`"
        + (f" with `{config.model.adapter}` merged" if config.model.adapter else ""),
        f"- method: {method.name}, r={method.r}, alpha={method.alpha}, targets {', '.join(method.target_modules)}",
        f"- data: `{config.data.source}`, rows of {config.data.seq_len} tokens, {config.train.max_steps} steps "
        f"at lr {config.train.lr}",
        f"- merged in fp32, saved as {check['dtype']}; max |logit difference| vs the adapter model "
        f"{check['max_abs_logit_diff_vs_adapter']:.1e}",
    ]
    report_path = run_dir / "report.json"
    if report_path.exists() and config.train.objective == "dpo":
        from peftkit.alignment.report import format_preference_report

        lines += ["", "```", format_preference_report(json.loads(report_path.read_text())), "```"]
    elif report_path.exists():
        from peftkit.evaluation.run_report import RunReport

        report = RunReport.load(report_path)
        tuned = report.tuned.to_json()
        lines += ["", "| held-out metric | base | tuned |", "|---|---|---|"]
        lines += [f"| {key} | {value:.2f} | {tuned[key]:.2f} |" for key, value in report.base.to_json().items()]
        if report.verdict:
            lines += ["", f"Verdict: {report.verdict.summary}."]
    return "\n".join(lines) + "\n"
