"""k-fold cross-validation: how well does this recipe generalise on this corpus?

Train and validation documents are pooled and cut into K folds by content hash; K adapters are
trained with the same config, each validated on the fold it did not see. The spread of the K
validation perplexities says how much a single split's number can be trusted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from peftkit.config import Config
from peftkit.evaluation.run_report import as_run_report


def cross_validate(config: Config, folds: int, log=print) -> dict:
    from peftkit.alignment.config import text_only
    from peftkit.trainer import Trainer

    text_only(config, "peftkit cv")

    base = Path(config.output_dir)
    results = []
    for fold in range(folds):
        log(f"fold {fold + 1} of {folds}")
        data = dataclasses.replace(config.data, folds=folds, fold=fold)
        fold_config = dataclasses.replace(config, data=data, output_dir=str(base / f"fold-{fold}"))
        report = as_run_report(Trainer(fold_config, log=log).fit())
        best_val_loss = report.training.best_val_loss
        results.append(
            {
                "fold": fold,
                "val_ppl": math.exp(best_val_loss) if best_val_loss is not None else None,
                "best_step": report.training.best_step,
                "tuned_domain_test_ppl": report.tuned.domain_ppl,
                "base_domain_test_ppl": report.base.domain_ppl,
            }
        )
    values = [r["val_ppl"] for r in results if r["val_ppl"] is not None]
    summary = {
        "folds": folds,
        "val_ppl_mean": statistics.fmean(values) if values else None,
        "val_ppl_std": statistics.stdev(values) if len(values) > 1 else None,
        "per_fold": results,
    }
    base.mkdir(parents=True, exist_ok=True)
    (base / "cv.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_cv(summary: dict) -> str:
    lines = [f"{'fold':>4}  {'val ppl':>9}  {'best step':>9}  {'test ppl (tuned / base)':>24}"]
    for r in summary["per_fold"]:
        val = f"{r['val_ppl']:.2f}" if r["val_ppl"] is not None else "n/a"
        lines.append(
            f"{r['fold']:>4}  {val:>9}  {r['best_step']!s:>9}  "
            f"{r['tuned_domain_test_ppl']:>11.2f} / {r['base_domain_test_ppl']:.2f}"
        )
    if summary["val_ppl_mean"] is not None:
        spread = f" ± {summary['val_ppl_std']:.2f} (std)" if summary["val_ppl_std"] is not None else ""
        lines.append(f"validation perplexity over {summary['folds']} folds: {summary['val_ppl_mean']:.2f}{spread}")
    return "\n".join(lines)
