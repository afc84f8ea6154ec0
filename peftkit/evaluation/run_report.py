"""The run's report (RUN_DIR/report.json) and its held-out evaluations (lines of metrics.jsonl), typed.

    report = RunReport.load(run_dir / "report.json")
    report.tuned.domain_ppl, report.verdict.recommend, report.training.best_step

Every class has `to_json()` and `from_json(d)`, and `from_json(d).to_json() == d` for every file peftkit
writes: the JSON keeps its keys (users read it), a part a run did not measure is left out (no general
text, no QA, no KL, no diagnostics, no prompted baseline), and the training side is written at the top
level although here it is one object, `RunReport.training` (None for a report `peftkit eval` wrote
without one from training). Keys a class does not know are refused, and a part the verdict reads must be
there; anything else may be missing (an older report) and reads as None.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError


def optional():
    """A field that is left out of the JSON while it is None: what the run did not measure."""
    return field(default=None, metadata={"omit_if_none": True})


class JsonRecord:
    """JSON round trip by declaration: keys in field order, nested records read by their annotations."""

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or not f.metadata.get("omit_if_none"):
                out[f.name] = _dump(value)
        return out

    @classmethod
    def from_json(cls, record: dict):
        if not isinstance(record, dict):
            raise PeftkitError(f"{cls.__name__}: expected a JSON object, got {type(record).__name__}")
        hints = _hints(cls)
        unknown = [key for key in record if key not in hints]
        if unknown:
            raise PeftkitError(
                f"{cls.__name__}: unknown keys {unknown} (known: {', '.join(hints)}); "
                "was it written by a newer peftkit?"
            )
        missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in record]
        if missing:
            raise PeftkitError(f"{cls.__name__}: missing keys {missing}; is this a peftkit {cls.__name__}?")
        return cls(**{key: _load(hints[key], value) for key, value in record.items()})


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@functools.cache
def _hints(cls) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in names}


def _load(hint, value):
    """`value` (parsed JSON) as annotation `hint` says: records for records, inside lists, dicts and `X | None`."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        (hint,) = [a for a in args if a is not type(None)]  # the report's unions are all `X | None`
        return _load(hint, value)
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return hint.from_json(value)
    if origin is dict:
        return {key: _load(args[1], item) for key, item in value.items()}
    if origin is list:
        return [_load(args[0], item) for item in value]
    return value


def _dump(value):
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, dict):
        return {key: _dump(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(item) for item in value]
    return value


@dataclass(kw_only=True)
class EvalRecord(JsonRecord):
    """One held-out evaluation during training, a line of metrics.jsonl; step 0 is the base model."""

    step: int
    train_loss: float | None = optional()
    """Mean training loss of the steps since the previous evaluation (absent when none was trained: step 0)."""
    val_loss: float
    """Domain validation loss, nats/token, on the first eval.val_tokens tokens of the validation split."""
    val_ppl: float
    general_loss: float | None = optional()
    """Loss on the general text (absent without data.general_source)."""
    general_ppl: float | None = optional()
    general_kl: float | None = optional()
    """KL from the base model's answers to general prompts, nats/token (absent without eval.kl_prompts)."""
    gap: float | None = optional()
    """val_loss - train_loss: the generalisation gap (absent with train_loss)."""
    within_budget: bool | None = optional()
    """Set by the guard after step 0: general perplexity and KL within the forgetting budgets."""
    best_step: int | None = None
    """The guard's best step so far (None until one is within budget); written with within_budget."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys added by callbacks (`on_evaluate`), written after the others."""

    def to_json(self) -> dict:
        out = super().to_json()
        if self.within_budget is None:
            del out["best_step"]
        extra = out.pop("extra")
        return {**out, **extra}

    @classmethod
    def from_json(cls, record: dict) -> EvalRecord:
        hints = _hints(cls)
        known = {key: value for key, value in record.items() if key in hints and key != "extra"}
        extra = {key: value for key, value in record.items() if key not in known}
        return super().from_json({**known, "extra": extra})

    @staticmethod
    def is_evaluation(line: dict) -> bool:
        """Is this metrics.jsonl line an evaluation (the others are optimizer steps)?"""
        return "val_loss" in line


def evaluations(lines: list[dict]) -> list[EvalRecord]:
    """The evaluations among the lines of metrics.jsonl, in order."""
    return [EvalRecord.from_json(line) for line in lines if EvalRecord.is_evaluation(line)]


@dataclass(kw_only=True)
class Perplexities(JsonRecord):
    """Test perplexity per held-out set: of the base model, of the tuned one, or (`RunReport.change`) the
    tuned model's relative change, tuned / base - 1."""

    domain_ppl: float
    """On the first eval.test_tokens tokens of the domain test split."""
    general_ppl: float | None = optional()
    """On the first eval.test_tokens tokens of the general text (absent without data.general_source)."""

    def by_set(self) -> dict[str, float]:
        """{"domain": .., "general": ..}, the sets this run scored."""
        scores = {"domain": self.domain_ppl, "general": self.general_ppl}
        return {name: value for name, value in scores.items() if value is not None}


@dataclass(kw_only=True)
class ChangeIntervals(JsonRecord):
    """95% intervals of `RunReport.change`, tuned vs base on the same test rows (paired bootstrap,
    `evaluation.bootstrap`): an interval below 0 is a real drop in perplexity, above 0 a real rise."""

    domain_ppl: list[float]
    general_ppl: list[float] | None = optional()


@dataclass(kw_only=True)
class Bootstrap(JsonRecord):
    """How the intervals of the report were computed."""

    method: str
    resamples: int
    level: float
    seed: int
    """config.seed: the same run gives the same intervals."""
    units: dict[str, int]
    """Units resampled per comparison ("domain", "general" test rows or blocks, "kl_prompts")."""
    rows_per_unit: dict[str, int] | None = optional()
    """Consecutive test rows per unit: 1 where documents fit in a row, more where they are longer."""


@dataclass(kw_only=True)
class PromptedBaseline(JsonRecord):
    """The no-fine-tuning alternative: the base model with domain text in front of every test row."""

    domain_ppl: float
    """Domain test perplexity, the same tokens scored as without the prompt."""
    prompt_tokens: int
    """Tokens of training text in front (eval.prompt_tokens, or all the training text if shorter)."""
    tokens: int | None = optional()
    """Tokens scored."""
    change: float | None = optional()
    """Against the plain base model: prompted / base - 1 (below 0: the prompt alone helps)."""
    change_ci95: list[float] | None = optional()
    tuned_change: float | None = optional()
    """The tuned model against this baseline: tuned / prompted - 1 (below 0: tuning beats prompting)."""
    tuned_change_ci95: list[float] | None = optional()


@dataclass(kw_only=True)
class QAGroup(JsonRecord):
    """Multiple-choice accuracy on one group of questions (medical or general), base vs tuned."""

    questions: int
    base_accuracy: float
    base_ci95: list[float] | None = optional()
    """Wilson 95% interval of base_accuracy."""
    tuned_accuracy: float
    tuned_ci95: list[float] | None = optional()
    change: float
    """Paired change in accuracy, tuned minus base, on the same questions."""
    change_ci95: list[float]
    """[low, high]: high below 0 means significantly worse."""
    kshot: int | None = optional()
    """Solved examples in the base model's prompt for kshot_base_accuracy (absent with eval.kshot=0)."""
    kshot_base_accuracy: float | None = optional()
    """The base model's accuracy with `kshot` examples in front: the no-fine-tuning alternative."""
    kshot_base_ci95: list[float] | None = optional()
    tuned_vs_kshot: float | None = optional()
    """Paired change in accuracy, tuned minus the k-shot base, on the same questions."""
    tuned_vs_kshot_ci95: list[float] | None = optional()
    chance: float | None = optional()
    """Accuracy of guessing (the mean of 1 / options): a base model whose interval reaches it is at chance."""
    mde: float | None = optional()
    """The smallest change in accuracy these questions detect (80% power, 5% two-sided, the observed paired
    spread): a real change smaller than this is likely to go unseen."""


@dataclass(kw_only=True)
class GapPoint(JsonRecord):
    """Training and validation loss at one evaluation."""

    step: int
    train_loss: float | None = None
    val_loss: float
    gap: float | None = None


@dataclass(kw_only=True)
class GeneralizationGap(JsonRecord):
    """The train/validation gap at the kept step and at the end (None where there was no such evaluation)."""

    best: GapPoint | None = None
    end: GapPoint | None = None


@dataclass(kw_only=True)
class VerbatimRate(JsonRecord):
    """Greedy continuations of document prefixes against the true text (`memorization.verbatim_rate`)."""

    docs: int | None = None
    """Documents long enough to score."""
    token_match: float | None = None
    """Share of continuation tokens equal to the true ones (None with no document)."""
    verbatim: float | None = None
    """Share of documents continued exactly."""


@dataclass(kw_only=True)
class Memorization(JsonRecord):
    """Does the tuned model reproduce training text more than unseen text?"""

    train: VerbatimRate | None = None
    validation: VerbatimRate | None = None
    token_match_gap: float | None = None
    """train minus validation token_match: a memorisation gap when clearly above 0."""


@dataclass(kw_only=True)
class Leakage(JsonRecord):
    """Held-out documents that are also in the training data, exactly or nearly (`dedup.find_leaks`)."""

    exact: int
    near: int
    held_out_docs: int | None = optional()
    train_docs: int | None = optional()
    """Training documents compared (a sample of `sampled_from` for a streamed corpus)."""
    share: float
    """(exact + near) / held_out_docs."""
    examples: list[dict] | None = optional()
    """A few leaked documents: {"held_out", "train", "jaccard", "text"}."""
    sampled_from: int | None = optional()
    """The streamed corpus' training documents, when train_docs is a sample of them."""


@dataclass(kw_only=True)
class Underfitting(JsonRecord):
    """Too little fitting (`report.underfitting`): still falling steeply at the end, or barely moved."""

    underfitting: bool = False
    signals: list[str] = field(default_factory=list)
    """What shows it, one sentence each."""
    suggestion: str | None = None
    """What to change."""
    val_slope_per_eval: float | None = optional()
    """Mean relative drop of validation loss over the last two evaluations (with at least three)."""
    train_loss_change: float | None = optional()
    """Mean of the last three training losses against the first three, minus 1."""
    val_ppl_gain: float | None = optional()
    """Best validation perplexity's drop against step 0."""


@dataclass(kw_only=True)
class Diagnostics(JsonRecord):
    """What the held-out numbers alone do not show (with eval.diagnostics)."""

    generalization_gap: GeneralizationGap | None = optional()
    memorization: Memorization | None = optional()
    leakage: dict[str, Leakage] | None = optional()
    """Per held-out split ("validation", "test")."""
    underfitting: Underfitting | None = optional()


@dataclass(kw_only=True)
class TrainingSummary(JsonRecord):
    """The training side of the report: how the run went and which step's adapter is kept."""

    best_step: int | None = None
    """The step with the lowest validation loss within the forgetting budget (None if no step was)."""
    adapter_step: int | None = None
    """The step whose adapter RUN_DIR/adapter holds: best_step, or the last step if there is none."""
    final_step: int | None = None
    """The last optimizer step done."""
    stopped_early: bool = False
    stop_reason: str | None = None
    """Why the loop ended ("reached train.max_steps" when it ran to the end)."""
    train_tokens: int | None = None
    best_val_loss: float | None = None
    processes: int | None = None
    global_batch_rows: int | None = None
    """Rows per optimizer step, all processes and micro-batches together."""
    baseline: EvalRecord | None = None
    """The step-0 evaluation: the base model, the reference for the forgetting budget."""
    method: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    tokens_per_s: float | None = None
    """Steady-state training throughput (the first step, warm-up and compilation, is apart)."""
    compiled: bool | None = None
    """Decoder layers ran compiled (regional torch.compile)."""
    first_step_s: float | None = None
    train_seconds: float | None = optional()
    """Time in training steps, the first step of each process's run (warm-up, compilation) left out."""
    planned_steps: int | None = optional()
    """Under train.time_budget: the step count that fitted the budget once the step time was measured."""
    adapted_modules: dict[str, Any] | None = optional()
    """What method.target_modules resolved to: {"names": short module names, "count": adapted weights}."""
    layer_scores: list[float] | None = optional()
    """method.auto_layers: each block's share of the adapter's gradient norm, measured before training."""
    chosen_layers: list[int] | None = optional()
    """method.auto_layers: the blocks the adapter was put on (the highest scores)."""
    adapter_ranks: dict[str, int] | None = optional()
    """AdaLoRA: the rank each adapted weight was left with after the budget re-allocation."""
    sharding: str | None = optional()
    """"fsdp" when the weights were sharded across the processes (FSDP2, train.sharding); absent otherwise."""


@dataclass(kw_only=True)
class Verdict(JsonRecord):
    """Was the fine-tune worth it (`evaluation.verdict_rules.decide`)?"""

    helped: bool
    """outcome == "helped" (kept for readers of older reports)."""
    outcome: str | None = optional()
    """"helped", "mixed" (a real domain gain with a real loss elsewhere) or "did not help"."""
    recommend: str
    """The option to deploy: "tuned", "base", or "base_kshot" (the base model with a domain prompt)."""
    summary: str
    options: dict[str, dict[str, float]]
    """Each option's scores: {"base": {"domain_ppl": .., "medical_qa": ..}, "tuned": .., "base_kshot": ..}."""
    reasons: list[str]
    deciding: list[str] | None = optional()
    """The reasons that decided the outcome and the recommendation (a subset of `reasons`)."""


@dataclass(kw_only=True)
class Serving(JsonRecord):
    """Wall-clock ms per generated token (greedy, batch 1, median of `repeats`): measured, so `peftkit eval`
    gives other numbers on a machine under other load."""

    unmerged_ms_per_token: float
    merged_ms_per_token: float | None
    """None where the adapter cannot be merged (prompt learning, a quantized base)."""
    same_tokens: bool | None
    """Whether the merged copy generated exactly the unmerged model's tokens."""
    new_tokens: int
    prompts: int
    repeats: int


@dataclass(kw_only=True)
class Cost(JsonRecord):
    """What deploying the tuned model adds to the base model (the training side is in `TrainingSummary`)."""

    adapter_bytes: int
    """Size of RUN_DIR/adapter's weights; a merged model has the base model's size instead."""
    adapter_params: int | None = optional()
    serving: Serving | None = optional()
    """Greedy decoding speed unmerged vs merged (`eval.serving_tokens`); None when not measured."""


@dataclass(kw_only=True)
class EvaluationTime(JsonRecord):
    """What the final evaluation cost: wall-clock seconds per part ("perplexity", "prompted_baseline", "kl",
    "qa", "diagnostics", "serving", "total") and which base-model results came from the cache (base_cache.py)."""

    seconds: dict[str, float]
    cache: bool
    reused: list[str]
    computed: list[str]


@dataclass(kw_only=True)
class RunReport(JsonRecord):
    """A run's report.json: base vs tuned on held-out data, the diagnostics, the training side and the verdict.

    The trainer can fill it from the dicts it has, `RunReport.from_json({**final_evaluation(...), **summary})`,
    or field by field (`training=TrainingSummary(best_step=..., ...)`), then sets
    `report.verdict = decide(report, config.eval)` and writes it with `report.save(run_dir / "report.json")`.
    """

    base: Perplexities
    """The base model (adapter disabled)."""
    tuned: Perplexities
    change: Perplexities
    """Relative change, tuned / base - 1: below 0 is better."""
    change_ci95: ChangeIntervals | None = optional()
    """95% intervals of `change` (absent in reports from before peftkit measured them)."""
    eval_tokens: dict[str, int] | None = optional()
    """Tokens scored per test set ("domain", "general")."""
    bootstrap: Bootstrap | None = optional()
    base_prompted: PromptedBaseline | None = optional()
    """Absent with eval.prompt_tokens=0."""
    general_kl: float | None = optional()
    """The tuned model's KL from the base model's answers to general prompts (absent without eval.kl_prompts)."""
    general_kl_ci95: list[float] | None = optional()
    """Its 95% interval, resampling the prompts."""
    qa: dict[str, QAGroup] | None = optional()
    """Per question group ("medical", "general"); absent with eval.qa_questions=0."""
    diagnostics: Diagnostics | None = optional()
    """Absent with eval.diagnostics=false."""
    cost: Cost | None = optional()
    evaluation: EvaluationTime | None = optional()
    """Absent in reports from before peftkit timed its evaluation."""
    training: TrainingSummary | None = None
    """Written at the top level of report.json; None for a report `peftkit eval` wrote on its own."""
    verdict: Verdict | None = optional()

    def to_json(self) -> dict:
        out = super().to_json()
        training = out.pop("training")
        verdict = {"verdict": out.pop("verdict")} if "verdict" in out else {}
        return {**out, **(training or {}), **verdict}

    @classmethod
    def from_json(cls, record: dict) -> RunReport:
        if not isinstance(record, dict):
            raise PeftkitError(f"RunReport: expected a JSON object, got {type(record).__name__}")
        summary_keys = _hints(TrainingSummary)
        training = {key: value for key, value in record.items() if key in summary_keys}
        rest = {key: value for key, value in record.items() if key not in summary_keys}
        if "training" in rest:
            raise PeftkitError("RunReport: unknown key 'training' (report.json has the training side at its top level)")
        report = super().from_json(rest)
        report.training = TrainingSummary.from_json(training) if training else None
        return report

    @classmethod
    def load(cls, path: Path) -> RunReport:
        """Read a report.json (the errors name the file)."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (PeftkitError, ValueError) as e:
            raise PeftkitError(f"{path}: not a peftkit report: {e}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))


def as_run_report(report: RunReport | dict) -> RunReport:
    """A RunReport, or the dict of one (as `Trainer.fit()` returns it today)."""
    return report if isinstance(report, RunReport) else RunReport.from_json(report)
