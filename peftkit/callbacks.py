"""Callbacks: plain objects whose hooks the trainer calls at fixed points of a run.

    class PrintLoss(Callback):
        def on_step_end(self, trainer, record):
            if trainer.accelerator.is_main_process:
                print(record.step, record.loss)

    Trainer(config, callbacks=[PrintLoss()]).fit()

Hooks run on every process, in the order the callbacks were given (the trainer's own guard first), so a
decision to stop is taken everywhere alike; do I/O on the main process only. A hook sees the whole trainer
(`trainer.state`, `trainer.model`, `trainer.config`, ...) and may ask for an evaluation after the current
step (`trainer.control.evaluate = True`) or stop the run (`trainer.control.stop("why")`): the loop ends
after the current step, the final evaluation and the report still happen, and the report gives the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class Callback:
    """Override the hooks you need; the others do nothing."""

    def on_fit_start(self, trainer) -> None:
        """Model, data and optimizer are set up (and a checkpoint restored, on resume); no step done yet."""

    def on_optimizer_step(self, trainer) -> None:
        """The optimizer applied an update (not called for a skipped, non-finite step); the gradients are not
        cleared yet and `trainer.state.step` is still the step's index from 0 (AdaLoRA's rank allocation)."""

    def on_step_end(self, trainer, record) -> None:
        """After every optimizer step (`record`: a StepRecord; `record.skipped` for a non-finite step)."""

    def on_evaluate(self, trainer, record) -> None:
        """After a held-out evaluation (`record`: an EvalRecord), before it is written to metrics.jsonl; keys put
        in `record.extra` are written with it."""

    def on_save(self, trainer, path: Path) -> None:
        """After checkpoint `path` was written completely."""

    def on_train_end(self, trainer) -> None:
        """The loop ended (max_steps, or a stop); the adapter in memory is about to be saved and evaluated."""

    def on_run_end(self, trainer, report) -> None:
        """The final report (a RunReport) is written to report.json; `fit()` returns it as a dict."""


@dataclass
class Control:
    """Requests the callbacks make of the loop, reset as the loop acts on them."""

    evaluate: bool = False
    """Evaluate on held-out data (and checkpoint) after this step."""
    stop_reason: str | None = None
    """Set by `stop()`: the loop ends after the current step, and the report says why."""

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason


class CallbackList:
    """Calls one hook on every callback, in order (objects may define only some hooks)."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def __iter__(self):
        return iter(self.callbacks)

    def call(self, hook: str, trainer, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(trainer, *args)
