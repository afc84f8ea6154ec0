"""Trainer: one explicit training loop on `accelerate.Accelerator`.

    from peftkit import Config, Trainer
    report = Trainer(Config(output_dir="runs/x")).fit()

`fit()` is three phases. `setup()` builds the accelerator, the model with its adapter, the training
data (`data.build_training_data`), the training forward and optimizer, and the run folder (or restores
a checkpoint), then evaluates step 0, the base model. `train()` is the loop: micro-batches of packed
rows -> loss scaled for accumulation -> backward -> clip -> AdamW step -> LR schedule, with the
callbacks after every step. `finish()` saves the kept adapter to RUN_DIR/adapter, runs the final
evaluation (the same function as `peftkit eval`) and writes the report. When to evaluate, which step
to keep and when to stop early is decided by the guard, the first callback
(`peftkit.evaluation.guard.OverfittingGuard`); the run's state is a `TrainState`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from peftkit import checkpoint, distributed, methods, models, progress, runtime, sharding
from peftkit.callbacks import CallbackList, Control
from peftkit.config import Config
from peftkit.data.training import TrainingData, build_training_data
from peftkit.errors import PeftkitError
from peftkit.evaluation import forgetting, format_report, nll
from peftkit.evaluation.final import final_evaluation, held_out_comparison
from peftkit.evaluation.guard import OverfittingGuard
from peftkit.evaluation.render import write_report_files
from peftkit.evaluation.run_report import EvalRecord, RunReport, TrainingSummary
from peftkit.evaluation.verdict_rules import decide
from peftkit.locking import OutputLock
from peftkit.loss import documents_kept_apart, setup_training_forward
from peftkit.manifest import write_manifest
from peftkit.methods import layer_choice
from peftkit.rundir import check_run_dir, reset_run_dir, truncate_metrics
from peftkit.state import UNPLANNED, StepRecord, StepTimer, TrainState, evaluation_message, lr_scheduler, tracker_params


class Trainer:
    """Fine-tunes `config.model` on `config.data` with `config.method`.

    Args:
        config: the run's configuration.
        callbacks: `peftkit.callbacks.Callback` objects (or any objects with some of its hooks), called
            after the guard on every process.
        log: where progress messages go (main process only).
    """

    def __init__(self, config: Config, callbacks=(), log=print):
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.guard = OverfittingGuard(config.eval, config.train.keep_checkpoints)
        self.callbacks = CallbackList([self.guard, *callbacks])
        self.state = TrainState()
        self.control = Control()
        self.timer = StepTimer()
        self._log = log
        # Built by setup(): None until then.
        self.accelerator = None
        self.tokenizer = None
        self.model = None  # the peft model, unwrapped
        self.answers = None  # the base model's answers to general prompts: the reference for KL
        self.data: TrainingData | None = None
        self.forward = None  # the training forward (loss included) as Accelerate prepared it
        self.optimizer = self.scheduler = None
        self.params: list[torch.nn.Parameter] = []  # the trainable parameters (clipped together)
        self.param_counts = {"trainable_params": 0, "total_params": 0}
        self.compiled = False  # decoder layers compiled (regional torch.compile)
        self.layer_choice: dict = {}  # method.auto_layers: {"layer_scores": [...], "chosen_layers": [...]}
        self.sharded = False  # FSDP2: each process holds 1/N of the weights (train.sharding, peftkit.sharding)
        self.global_batch = 0  # rows per optimizer step, all processes and micro-batches together
        # the last step: train.max_steps, or under a time budget unknown (no end) until the step time is measured
        self.total_steps = UNPLANNED if config.train.time_budget_s else config.train.max_steps
        self.initial_adapter = self.run_dir / "initial_adapter"  # PiSSA/OLoRA's start, for their conversion
        self.in_update = False  # inside an optimizer update: an interrupt there is not checkpointed
        self.report: RunReport | None = None
        self.folder_lock = None  # the main process's claim on the run folder (peftkit.locking.OutputLock)

    def log(self, message: str) -> None:
        main = self.accelerator.is_main_process if self.accelerator else os.environ.get("RANK", "0") == "0"
        if main:
            self._log(message)

    def fit(self, resume: bool | None = None) -> dict:
        """Train, evaluate against the base model, and return the report (also in RUN_DIR/report.json)."""
        try:
            with distributed.peers_watched(self.run_dir, self.config.train.collective_timeout):
                self.setup(self.config.train.resume if resume is None else resume)
                try:
                    self.train()
                except KeyboardInterrupt:
                    self._save_on_interrupt()
                    raise
                with runtime.eager():
                    return self.finish()
        finally:
            if self.folder_lock:
                self.folder_lock.release()

    # --- setup -------------------------------------------------------------------------------------

    def setup(self, resume: bool = False) -> None:
        """Everything before the first step. Whatever can fail on bad input is loaded before the run folder
        is touched."""
        from accelerate.utils import set_seed

        train = self.config.train
        launched_sharded = sharding.claim_launch_config()
        self.accelerator = models.make_accelerator(
            train.mixed_precision, train.report_to, self.run_dir, train.collective_timeout_s
        )
        checkpoint.check_supported(self.accelerator)
        self.sharded = sharding.wanted(self.config, self.accelerator, launched_sharded, self.log)
        if self.accelerator.is_main_process:  # one run per folder: a second process is refused here
            self.folder_lock = OutputLock.run_folder(self.run_dir).acquire()
        check_run_dir(self.run_dir, resume, train.overwrite)
        set_seed(self.config.seed)
        self._setup_model()
        self._setup_data()
        if self.config.method.auto_layers:  # measured on the training data, so after it is set up
            self.model, self.layer_choice = layer_choice.reapply(
                self.config, self.model, self.data, self.accelerator, self.log
            )
            self.param_counts["trainable_params"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._setup_optimizer()
        self._setup_run_dir(resume)
        if self.state.step == 0:
            self.validate()  # step 0 is the base model (LoRA starts as the identity): the reference
        self.callbacks.call("on_fit_start", self)

    def _setup_model(self) -> None:
        cfg, acc = self.config, self.accelerator
        self.tokenizer = models.load_tokenizer(cfg.model, log=self.log)
        base = models.load_model(cfg.model, log=self.log)
        if not getattr(base, "is_quantized", False):  # bitsandbytes places quantized weights when loading
            base.to(acc.device)
        # The forgetting reference comes from the untouched base, before any method can change it.
        self.answers = forgetting.base_answers(base, self.tokenizer, acc) if cfg.eval.kl_prompts else None
        self.model = methods.apply(cfg.method, base, None if cfg.train.time_budget_s else cfg.train.max_steps)
        self.callbacks.callbacks[1:1] = methods.callbacks(cfg.method)  # after the guard, before the user's
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self.param_counts = {"trainable_params": trainable, "total_params": total}
        self.log(f"{cfg.method.name}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")

    def _setup_data(self) -> None:
        cfg, acc = self.config, self.accelerator
        separate = cfg.data.separate_documents and not methods.is_prompt_learning(self.model)
        if separate and not documents_kept_apart(self.model):
            separate = False
            self.log(
                "data.separate_documents: this model does not keep packed documents apart through position ids "
                f"({self.model.config.model_type}); its rows use plain causal attention across documents"
            )
        self.data = build_training_data(cfg, self.tokenizer, acc, separate, log=self.log)
        stream, world, batch, accum = self.data.stream, acc.num_processes, cfg.train.batch_size, cfg.train.grad_accum
        self.global_batch = batch * accum * world
        self.log(
            f"train: {stream.tokens:,} tokens in {stream.rows_per_epoch:,} rows of {cfg.data.seq_len}; "
            f"global batch {batch} x {accum} accumulation x {world} processes = {self.global_batch} rows"
            f" ({self.global_batch * cfg.data.seq_len:,} tokens) per step; "
            + (
                f"steps planned to fit train.time_budget={cfg.train.time_budget}"
                if self.total_steps == UNPLANNED
                else f"{cfg.train.max_steps} steps = {stream.epoch_of(cfg.train.max_steps, world, batch, accum):.2f} epochs"
            )
        )

    def _setup_optimizer(self) -> None:
        train, acc = self.config.train, self.accelerator
        forward, self.compiled = self._training_forward()
        if self.sharded:  # before the optimizer is made: sharding replaces the parameters
            sharding.shard_training_forward(forward, self.model, acc, self.data.sample(), self.log)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = methods.optimizer(self.config.method, self.model, train.lr, train.weight_decay)
        self.scheduler = lr_scheduler(train, optimizer, self.total_steps)
        # The scheduler is stepped by hand once per optimizer step, whatever the process count.
        # The module Accelerate wraps is the whole training forward, loss included (DDP syncs through it);
        # a sharded one is FSDP2's, not wrapped again.
        if self.sharded:
            self.forward, self.optimizer = forward, acc.prepare(optimizer)
        else:
            self.forward, self.optimizer = acc.prepare(forward, optimizer)

    def _training_forward(self) -> tuple[torch.nn.Module, bool]:
        """The module a step calls, its loss included, and whether it was compiled."""
        return setup_training_forward(self.model, self.config.train, self.accelerator, self.data.sample(), self.log)

    def _setup_run_dir(self, resume: bool) -> None:
        """A fresh run folder, or the newest complete checkpoint restored into model, optimizer and state."""
        cfg, acc = self.config, self.accelerator
        found = checkpoint.latest_valid(self.run_dir, log=self.log) if resume else None
        if resume and not found and checkpoint.checkpoints(self.run_dir):
            raise PeftkitError(
                f"{self.run_dir}: every checkpoint fails its manifest check (damaged); nothing was changed. "
                "Start over with --train.overwrite=true"
            )
        if acc.is_main_process:
            reset_run_dir(self.run_dir, fresh=found is None)
            cfg.save_yaml(self.run_dir / "config.yaml")
            write_manifest(self.run_dir, cfg, acc.num_processes)
        if cfg.train.report_to:  # after the run folder is set up: trackers write into it
            acc.init_trackers("tb", config=tracker_params(cfg.to_dict()))
        if acc.is_main_process and methods.converts_on_save(cfg.method):
            self.model.save_pretrained(self.initial_adapter)  # PiSSA/OLoRA: the reference for conversion
        acc.wait_for_everyone()
        if found:
            saved = checkpoint.load(found, self.model, self.optimizer, self.scheduler, acc)
            self.state = TrainState.from_json(saved)
            if acc.is_main_process:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
            if self.state.planned_steps is not None:  # a time-budgeted run continues its planned schedule
                self._follow_plan(self.state.planned_steps)
            self.log(f"resumed from {found} at step {self.state.step}")
        elif resume:
            self.log(f"{self.run_dir}: no complete checkpoint yet; starting from step 0")

    # --- the loop ----------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps from `state.step` to `total_steps`, or until a callback stops the run."""
        self._require_setup("train")
        train, state, acc = self.config.train, self.state, self.accelerator
        tokens_per_step = self.global_batch * self.config.data.seq_len
        bar = progress.bar(
            total=None if self.total_steps == UNPLANNED else self.total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not (acc.is_main_process and train.progress),
        )
        self.timer.start(state.step)
        self.forward.train()
        while state.step < self.total_steps and self.control.stop_reason is None:
            started = time.perf_counter()
            loss, grad_norm = self._accumulate_gradients(state.step)
            finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
            self.in_update = True  # an interrupt inside the update must not be checkpointed
            if finite:
                self.optimizer.step()
                self.callbacks.call("on_optimizer_step", self)  # gradients still there (AdaLoRA reads them)
            self.scheduler.step()  # the schedule follows the step count, skipped steps included
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.train_tokens += tokens_per_step
            self.in_update = False
            seconds = time.perf_counter() - started
            record = StepRecord(
                step=state.step,
                loss=loss,
                lr=self.scheduler.get_last_lr()[0],
                tokens=state.train_tokens,
                tokens_per_s=self.timer.step_done(state.step, seconds, tokens_per_step),
                grad_norm=grad_norm,
                skipped=not finite,
            )
            self._account_time(seconds, bar)
            if finite:
                state.recent_losses.append(loss)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record.tokens_per_s:.0f}")
                bar.update(1)
            else:
                state.bad_steps += 1
            if not finite or state.step % train.log_every == 0:
                self._log_metrics(record.to_json())
            self.callbacks.call("on_step_end", self, record)
            if not finite:
                self._stop_if_diverged()
            if self.control.evaluate:  # the guard asks at eval.every_steps and at the last step
                self.validate()
                self.save_checkpoint()
        bar.close()

    def _account_time(self, seconds: float, bar) -> None:
        """Training time after a step; a time-budgeted run fixes its step count once it can."""
        if self.state.step == self.timer.first_step:
            if self.compiled:
                self.log(f"first step {self.timer.first_step_s:.1f} s, compilation included")
        else:  # the first step of a process's run (warm-up, compilation) does not count against a budget
            self.state.train_seconds += seconds
        if self.total_steps == UNPLANNED:
            self._plan_time_budget(bar)

    def _plan_time_budget(self, bar) -> None:
        """Under train.time_budget: once enough steps are timed (6, and 10% of the budget), fix the step count
        that fits what is left of it at the later half's step time, so the schedule ends, annealed, with it."""
        budget, state, timer = self.config.train.time_budget_s, self.state, self.timer
        # every process decides from the slowest one's clock, so all plan the same step count at the same step
        timed, seconds, spent, recent, recent_s = distributed.slowest(
            self.accelerator, timer.steady_steps, timer.steady_seconds, state.train_seconds, *timer.later_half()
        )
        if timed < 6 or seconds < 0.1 * budget:
            return
        per_step = recent_s / recent
        planned = state.step + max(0, int((budget - spent) / per_step + 1e-6))  # 17.9999.. steps are 18
        state.planned_steps = planned
        self._follow_plan(planned)
        bar.total = planned
        self.log(
            f"train.time_budget: {per_step:.3f} s per step over the last {int(recent)} of {int(timed)} steps; "
            f"{planned} steps fit {self.config.train.time_budget} (evaluations not counted)"
        )

    def _follow_plan(self, planned: int) -> None:
        """Run to `planned` steps: the schedule rebuilt for that end, at the current step (its closed form)."""
        self.total_steps = planned
        self.scheduler = lr_scheduler(self.config.train, self.optimizer, planned, at_step=self.state.step)

    def _accumulate_gradients(self, step: int) -> tuple[float, float | None]:
        """Gradients of one optimizer step over train.grad_accum micro-batches; (mean loss, gradient norm)."""
        train, acc = self.config.train, self.accelerator
        step_loss = torch.zeros((), device=acc.device)
        for micro in range(train.grad_accum):
            batch = self.data.batch(
                step, micro, acc.process_index, acc.num_processes, train.batch_size, train.grad_accum
            )
            batch = batch.to(acc.device)
            last = micro == train.grad_accum - 1
            # DDP all-reduces (FSDP2 reduce-scatters) gradients on the last micro-batch only
            with nullcontext() if last else acc.no_sync(self.forward), sharding.gradient_sync(self.forward, last):
                with acc.autocast() if self.sharded else nullcontext():  # Accelerate's prepare() adds it otherwise
                    loss = self.forward(**batch.model_inputs()) / train.grad_accum  # scale for accumulation
                acc.backward(loss)
            step_loss += loss.detach() - acc.unwrap_model(self.forward).penalty / train.grad_accum  # prediction only
        grad_norm = acc.clip_grad_norm_(self.params, train.max_grad_norm) if train.max_grad_norm else None
        step_loss = acc.reduce(step_loss, reduction="mean").item()
        return step_loss, None if grad_norm is None else float(sharding.full(grad_norm))

    def _stop_if_diverged(self) -> None:
        limit = self.config.train.max_bad_steps
        if self.state.bad_steps > limit:
            kept = [p.name for _, p in checkpoint.checkpoints(self.run_dir)]
            raise PeftkitError(
                f"step {self.state.step}: non-finite loss or gradient ({self.state.bad_steps} steps skipped, more "
                f"than train.max_bad_steps={limit}); stopped. Kept checkpoints: {', '.join(kept) or 'none'}. "
                "Lower train.lr or check the data"
            )

    def validate(self) -> EvalRecord:
        """Held-out losses at the current step: validation and general text, KL from the base model's
        answers and the train/validation gap. The guard marks the record before it is logged."""
        self._require_setup("validate")
        with runtime.eager(), sharding.unsharded_root(self.forward):
            record = self._held_out_record()
        self.control.evaluate = False
        self.state.recent_losses = []
        self.callbacks.call("on_evaluate", self, record)
        self._log_metrics(record.to_json())
        self.log(evaluation_message(record))
        return record

    def _held_out_record(self) -> EvalRecord:
        ev, acc, recent = self.config.eval, self.accelerator, self.state.recent_losses
        record = {"step": self.state.step}
        if recent:
            record["train_loss"] = sum(recent) / len(recent)
        for name, (input_ids, labels) in self.data.val_sets.items():
            total, tokens = nll(self.model, input_ids, labels, ev.batch_size, acc)
            key = "val" if name == "domain" else name
            record[f"{key}_loss"] = total / tokens
            record[f"{key}_ppl"] = math.exp(total / tokens)
        if self.answers is not None:
            record["general_kl"] = forgetting.kl_from_base(acc.unwrap_model(self.model), self.answers, acc)
        if recent:
            record["gap"] = record["val_loss"] - record["train_loss"]
        return EvalRecord.from_json(record)

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (every process calls this; written atomically)."""
        state, acc = self.state, self.accelerator
        path = checkpoint.save(
            self.run_dir, state.step, self.forward, self.optimizer, self.scheduler, state.to_json(), acc
        )
        self.callbacks.call("on_save", self, path)
        return path

    def _save_on_interrupt(self) -> None:
        """Ctrl-C: checkpoint the last completed step (one process only: a process group may be gone)."""
        done = self.state.step
        if not done or self.in_update or self.accelerator.num_processes > 1:
            return
        if not (self.run_dir / "checkpoints" / f"step-{done}").exists():
            checkpoint.save(
                self.run_dir, done, self.forward, self.optimizer, self.scheduler, self.state.to_json(), self.accelerator
            )
        self.log(f"interrupted: saved checkpoint step-{done}; continue with --train.resume=true")

    def _log_metrics(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.config.train.report_to:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
            self.accelerator.log(scalars, step=record["step"])

    # --- the end -----------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Save the kept adapter, compare it with the base model, and write the report (`self.report`, a
        RunReport; returned as the dict report.json holds)."""
        self._require_setup("finish")
        cfg, acc, state = self.config, self.accelerator, self.state
        self.callbacks.call("on_train_end", self)  # the guard restores the best checkpoint
        self._save_adapter()
        report = final_evaluation(
            cfg, self.model, self.tokenizer, acc, self.data, self.run_dir, state.best_step, self.answers, self.log
        )
        report.training = self._summary()
        report.verdict = decide(report, cfg.eval)
        if acc.is_main_process:
            report.save(self.run_dir / "report.json")
            write_report_files(self.run_dir)
            self.log(format_report(report))
            self.log(f"adapter: {self.run_dir / 'adapter'}   report: {self.run_dir / 'report.html'}")
        self.report = report
        self.callbacks.call("on_run_end", self, report)
        for tracker in acc.trackers:  # flush and close; not end_training(), which also ends the process group
            tracker.finish()
        # No barrier here: the other processes return while the main one runs QA, diagnostics and the report,
        # which may take longer than train.collective_timeout allows a collective to wait.
        return report.to_json()

    def _save_adapter(self) -> None:
        """RUN_DIR/adapter in plain PEFT format; PiSSA/OLoRA's is converted to LoRA on the original base."""
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(self.run_dir / "adapter", ignore_errors=True)
        converts = methods.converts_on_save(self.config.method)
        checkpoint.save_adapter(acc, self.forward, self.run_dir / "adapter", self.initial_adapter if converts else None)
        if converts or self.sharded:
            # The in-memory base holds PiSSA/OLoRA residual weights, so disable_adapter() is not the base
            # model: evaluate the saved (converted) adapter on a freshly loaded original base instead. A sharded
            # model is evaluated the same way, whole in each process: QA and diagnostics run on one process.
            from peft import PeftModel

            acc.wait_for_everyone()
            if self.sharded:  # the shards and the optimizer's moments are done with: free them first
                getattr(self.optimizer, "optimizer", self.optimizer).state.clear()
                self.forward, self.params = None, []
                sharding.release_memory()
            base = models.load_model(self.config.model, log=self.log)
            self.model = PeftModel.from_pretrained(base, self.run_dir / "adapter").to(acc.device)

    def _summary(self) -> TrainingSummary:
        """The training side of the report."""
        state, reason = self.state, self.control.stop_reason
        return TrainingSummary(
            best_step=state.best_step,
            adapter_step=state.best_step or state.step,
            final_step=state.step,
            stopped_early=reason is not None,
            stop_reason=reason
            or ("used train.time_budget" if state.planned_steps is not None else "reached train.max_steps"),
            train_tokens=state.train_tokens,
            best_val_loss=state.best_val_loss,
            processes=self.accelerator.num_processes,
            global_batch_rows=self.global_batch,
            baseline=state.baseline,
            method=self.config.method.name,
            **self.param_counts,
            tokens_per_s=self.timer.tokens_per_s,
            compiled=self.compiled,
            first_step_s=self.timer.first_step_s,
            train_seconds=state.train_seconds,
            planned_steps=state.planned_steps,
            adapted_modules=methods.adapted_modules(self.model),
            sharding="fsdp" if self.sharded else None,
            **self.layer_choice,
            adapter_ranks=methods.adalora.ranks(self.model) if methods.adalora.is_adalora(self.model) else None,
        )

    def evaluate(self, model=None) -> dict:
        """Base vs tuned perplexity on the test rows, the prompted baseline and KL from the base, now."""
        self._require_setup("evaluate")
        with runtime.eager(), sharding.unsharded_root(self.forward):
            return held_out_comparison(
                self.config, model or self.model, self.tokenizer, self.accelerator, self.data.texts, self.answers
            )

    def _require_setup(self, what: str) -> None:
        if self.model is None:
            raise PeftkitError(
                f"Trainer.{what}(): the trainer is not set up (no model, data or optimizer yet); call fit(), or "
                "setup() first. A finished run is evaluated with peftkit.evaluation.evaluate_run(RUN_DIR)"
            )
