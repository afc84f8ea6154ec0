"""Held-out evaluation: perplexity on domain and general text, base vs tuned, and the report."""

from peftkit.evaluation.final import evaluate_run, final_evaluation
from peftkit.evaluation.perplexity import nll, perplexity
from peftkit.evaluation.report import compare_base_and_tuned, format_report, test_sets, verdict
from peftkit.evaluation.run_report import EvalRecord, RunReport
from peftkit.evaluation.verdict_rules import decide

__all__ = [
    "EvalRecord",
    "RunReport",
    "compare_base_and_tuned",
    "decide",
    "evaluate_run",
    "final_evaluation",
    "format_report",
    "nll",
    "perplexity",
    "test_sets",
    "verdict",
]
