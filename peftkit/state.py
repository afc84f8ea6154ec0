"""The run's state as typed records: what a checkpoint holds besides tensors, and what each step logs.

`TrainState` is everything the loop and the guard decide with (step, tokens seen, the best step so
far, patience, skipped steps); a checkpoint stores it as `state.json` and resume restores it, so a
resumed run makes the same decisions as one that was never interrupted. `StepRecord` is one line of
metrics.jsonl for an optimizer step. Beside them: the learning-rate schedule a checkpoint's step resumes
(`lr_scheduler`), an evaluation's log line and the config in the flat form trackers store.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from peftkit.evaluation.run_report import EvalRecord


@dataclass
class TrainState:
    """The trainer's and the guard's state after `step` optimizer steps."""

    step: int = 0
    """Optimizer steps completed."""
    train_tokens: int = 0
    """Training tokens consumed (global batch x sequence length per step, skipped steps included)."""
    best_step: int | None = None
    """The step whose validation loss is the lowest within the forgetting budget; its adapter is kept."""
    best_val_loss: float | None = None
    """Validation loss at `best_step`."""
    evals_since_best: int = 0
    """Evaluations since the best one: early stopping compares it with eval.patience."""
    bad_steps: int = 0
    """Steps skipped for a non-finite loss or gradient (the run stops past train.max_bad_steps)."""
    train_seconds: float = 0.0
    """Time spent in training steps, the first step of each process's run (warm-up, compilation) left out."""
    planned_steps: int | None = None
    """Under train.time_budget: the step count fixed once the step time was measured (the schedule's end)."""
    recent_losses: list[float] = field(default_factory=list)
    """Training losses since the last evaluation: their mean is the evaluation's train_loss."""
    baseline: EvalRecord | None = None
    """The step-0 evaluation (the base model): the reference for the forgetting budget."""

    def to_json(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            **fields,
            "recent_losses": list(self.recent_losses),
            "baseline": self.baseline and self.baseline.to_json(),
        }

    @classmethod
    def from_json(cls, record: dict) -> TrainState:
        """The state saved by `to_json`; keys this version does not know are refused, missing ones default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown trainer state keys {unknown}")
        baseline = record.get("baseline")
        return cls(**{**record, "baseline": baseline and EvalRecord.from_json(baseline)})


@dataclass
class StepRecord:
    """One optimizer step, as a line of metrics.jsonl."""

    step: int
    loss: float
    """Mean training loss of the step's global batch (all processes)."""
    lr: float
    """Learning rate after the step's scheduler update."""
    tokens: int
    """Training tokens consumed so far."""
    tokens_per_s: float
    """Steady-state throughput: steps after the first (warm-up, compilation) of this process's run."""
    grad_norm: float | None = None
    """Gradient norm before clipping (absent when train.max_grad_norm is 0)."""
    skipped: bool = False
    """The loss or gradient was not finite: the optimizer did not step."""

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        for key, unset in (("grad_norm", None), ("skipped", False)):
            if record[key] == unset:
                del record[key]
        return record


class StepTimer:
    """Steady-state throughput: the first step of a process's run (warm-up, compilation) is timed apart."""

    def __init__(self):
        self.first_step = 1  # the first step this process runs (after a resume: the one after the checkpoint)
        self.first_step_s: float | None = None
        self.tokens_per_s: float | None = None
        self._seconds = 0.0  # steps after the first
        self._steady = 0
        self._durations: list[float] = []  # each timed step's seconds

    def start(self, step: int) -> None:
        self.first_step = step + 1

    @property
    def steady_steps(self) -> int:
        """Steps timed after the first one."""
        return self._steady

    @property
    def steady_seconds(self) -> float:
        return self._seconds

    def later_half(self) -> tuple[int, float]:
        """(steps, seconds) of the later half of the timed steps: the first ones still warm caches and the
        allocator (on the 135M model the first 5 take ~20% longer than the steady step)."""
        later = self._durations[len(self._durations) // 2 :]
        return len(later), sum(later)

    def step_done(self, step: int, seconds: float, tokens_per_step: int) -> float:
        if step == self.first_step:
            self.first_step_s = seconds
            self.tokens_per_s = tokens_per_step / seconds
        else:  # evaluation time is not training throughput: only the steps are timed
            self._seconds += seconds
            self._steady += 1
            self._durations.append(seconds)
            self.tokens_per_s = tokens_per_step * (step - self.first_step) / self._seconds
        return self.tokens_per_s


UNPLANNED = 2**62  # total_steps of a time-budgeted run before its step count is fixed: the schedule holds its peak


def lr_scheduler(train, optimizer, total: int, at_step: int = 0):
    """The learning-rate schedule of train.lr_schedule ending at `total` steps, set to step `at_step`."""
    from transformers import get_scheduler

    schedule = train.lr_schedule if train.lr_schedule != "constant" else "constant_with_warmup"
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=total)
    if at_step:
        with warnings.catch_warnings():  # torch warns of a scheduler step before any optimizer step: harmless here
            warnings.simplefilter("ignore")
            scheduler.last_epoch = at_step - 1
            scheduler.step()  # LambdaLR's rate is a closed form of the step: the same as if stepped all along
    return scheduler


def evaluation_message(record: EvalRecord) -> str:
    message = f"step {record.step}: val loss {record.val_loss:.4f} (ppl {record.val_ppl:.2f})"
    if record.general_ppl is not None:
        message += f", general ppl {record.general_ppl:.2f}"
    if record.general_kl is not None:
        message += f", general KL {record.general_kl:.4f}"
    if record.train_loss is not None:
        message += f", train loss {record.train_loss:.4f}, gap {record.gap:+.4f}"
    return message + ("  [beyond the forgetting budget]" if record.within_budget is False else "")


def tracker_params(config: dict, prefix: str = "") -> dict:
    """The config as `section.key: value` scalars, the form trackers store hyperparameters in."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(tracker_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out
