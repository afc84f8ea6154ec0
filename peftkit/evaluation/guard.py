"""The overfitting and forgetting guard, as a callback of the training loop.

It decides when to evaluate (every `eval.every_steps` and at the last step, `trainer.total_steps`), keeps the step-0
evaluation (the base model) as the reference, marks each evaluation within or beyond the forgetting
budget (general-text perplexity and KL from the base model's answers), tracks the best step (the
lowest validation loss within the budget), stops the run after `eval.patience` evaluations without
improvement, keeps the best checkpoint from pruning, and restores it when the loop ends. The trainer
installs it first, so other callbacks see its marks on each evaluation record.
"""

from __future__ import annotations

from peftkit import checkpoint
from peftkit.callbacks import Callback
from peftkit.evaluation.run_report import EvalRecord


class OverfittingGuard(Callback):
    """Evaluation cadence, forgetting budgets, best step, patience and the best-checkpoint restore.

    Args:
        eval_config: EvalConfig (every_steps, max_general_ppl_increase, max_general_kl, min_delta, patience).
        keep_checkpoints: train.keep_checkpoints, the newest checkpoints kept besides the best one.
    """

    def __init__(self, eval_config, keep_checkpoints: int):
        self.ev = eval_config
        self.keep_checkpoints = keep_checkpoints

    def on_step_end(self, trainer, record) -> None:
        last = record.step == trainer.total_steps  # train.max_steps, or the step count a time budget planned
        if not record.skipped and (record.step % self.ev.every_steps == 0 or last):
            trainer.control.evaluate = True

    def within_budget(self, record: EvalRecord, baseline: EvalRecord) -> bool:
        """Is this evaluation within the forgetting budgets, measured against the base model (step 0)?"""
        ppl_budget, kl_budget = self.ev.max_general_ppl_increase, self.ev.max_general_kl
        ppl_over = (
            ppl_budget is not None
            and record.general_ppl is not None
            and record.general_ppl > baseline.general_ppl * (1 + ppl_budget)
        )
        kl_over = kl_budget is not None and (record.general_kl or 0.0) > kl_budget
        return not (ppl_over or kl_over)

    def on_evaluate(self, trainer, record: EvalRecord) -> None:
        state, step = trainer.state, record.step
        if step == 0:  # the base model (LoRA starts as the identity): the reference for budgets and curves
            state.baseline = record
            return
        record.within_budget = self.within_budget(record, state.baseline)
        best = state.best_val_loss
        if record.within_budget and (best is None or record.val_loss < best - self.ev.min_delta):
            state.best_step, state.best_val_loss, state.evals_since_best = step, record.val_loss, 0
        else:
            state.evals_since_best += 1
        record.best_step = state.best_step
        if self.ev.patience and state.evals_since_best >= self.ev.patience:
            trainer.control.stop(
                f"validation loss did not improve by more than {self.ev.min_delta} (within the forgetting budget) "
                f"for {self.ev.patience} evaluations after step {state.best_step}"
            )

    def on_save(self, trainer, path) -> None:
        if trainer.accelerator.is_main_process:
            checkpoint.prune(trainer.run_dir, self.keep_checkpoints, trainer.state.best_step)

    def on_train_end(self, trainer) -> None:
        best = trainer.state.best_step
        if best is not None and best != trainer.state.step:
            adapter = trainer.run_dir / "checkpoints" / f"step-{best}" / "adapter"
            checkpoint.load_adapter_weights(trainer.model, adapter)
            trainer.log(f"restored the best checkpoint, step {best}")
