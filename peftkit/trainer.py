"""Trainer: one explicit training loop on `accelerate.Accelerator`.

    from peftkit import progress, Config, Trainer
    report = Trainer(Config(output_dir="runs/x")).fit()

The loop: micro-batches of packed rows -> loss scaled for accumulation -> backward -> clip ->
AdamW step -> LR schedule; every `eval.every_steps` a held-out evaluation, a checkpoint and the
early-stopping decision. At the end the best checkpoint's adapter is saved to RUN_DIR/adapter and
the base and tuned models are compared on the held-out domain and general text.
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

from peftkit import assets, checkpoint, data, methods, models, progress, speed
from peftkit.config import Config
from peftkit.dedup import find_leaks
from peftkit.errors import PeftkitError
from peftkit.evaluation import compare_base_and_tuned, forgetting, format_report, nll, qa, test_sets, verdict
from peftkit.evaluation.memorization import memorization
from peftkit.evaluation.render import read_metrics, write_report_files
from peftkit.evaluation.report import domain_prompt, prompted_baseline, underfitting
from peftkit.manifest import write_manifest

RUN_FILES = ("config.yaml", "metrics.jsonl", "report.json", "report.md", "report.html", "loss_curves.png",
             "manifest.json", "adapter", "checkpoints")  # fmt: skip


class Trainer:
    """Fine-tunes `config.model` on `config.data` with `config.method`.

    Args:
        config: the run's configuration.
        callbacks: objects with optional `on_step(trainer, record)` and `on_eval(trainer, record)`
            methods, called on the main process with each metrics record.
        log: where progress messages go (main process only).
    """

    def __init__(self, config: Config, callbacks=(), log=print):
        self.config = config
        self.callbacks = list(callbacks)
        self._log = log
        self.run_dir = Path(config.output_dir)
        self._initial_adapter = self.run_dir / "initial_adapter"

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            self._log(message)

    def fit(self, resume: bool | None = None) -> dict:
        """Train, evaluate against the base model, and return the report (also in RUN_DIR/report.json)."""
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        cfg, train = self.config, self.config.train
        resume = train.resume if resume is None else resume
        self.accelerator = acc = models.make_accelerator(train.mixed_precision, train.report_to, self.run_dir)
        checkpoint.check_unsharded(acc)
        _check_run_dir(self.run_dir, resume, train.overwrite)

        # Everything that can fail on bad input is loaded before the run folder is touched.
        set_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(cfg.model, log=self.log)
        base = models.load_model(cfg.model, log=self.log)
        if not getattr(base, "is_quantized", False):  # bitsandbytes places quantized weights when loading
            base.to(acc.device)
        # The forgetting reference comes from the untouched base, before any method can change it.
        self.answers = forgetting.base_answers(base, self.tokenizer, acc) if cfg.eval.kl_prompts else None
        self.model = methods.apply(cfg.method, base)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self._params = {"trainable_params": trainable, "total_params": total}
        self.log(f"{cfg.method.name}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
        stream, val_sets = self._prepare_data()
        world, batch, accum = acc.num_processes, train.batch_size, train.grad_accum
        self._global_batch = batch * accum * world
        self.log(
            f"train: {stream.tokens:,} tokens in {stream.rows_per_epoch:,} rows of {cfg.data.seq_len}; "
            f"global batch {batch} x {accum} accumulation x {world} processes = {self._global_batch} rows"
            f" ({self._global_batch * cfg.data.seq_len:,} tokens) per step; {train.max_steps} steps = "
            f"{stream.epoch_of(train.max_steps, world, batch, accum):.2f} epochs"
        )

        forward = self._training_forward(stream)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = methods.optimizer(cfg.method, self.model, train.lr, train.weight_decay)
        scheduler = get_scheduler(
            train.lr_schedule if train.lr_schedule != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=train.warmup_steps,
            num_training_steps=train.max_steps,
        )
        # The scheduler is stepped by hand once per optimizer step, whatever the process count.
        # The module Accelerate wraps is the whole training forward, loss included (DDP syncs through it).
        model, optimizer = acc.prepare(forward, optimizer)
        peft_model = self.model

        state = {"best_step": None, "best_val_loss": None, "evals_since_best": 0, "train_tokens": 0,
                 "baseline": None, "recent_losses": [], "bad_steps": 0}  # fmt: skip
        start = 0
        found = checkpoint.latest_valid(self.run_dir, log=self.log) if resume else None
        if resume and not found and checkpoint.checkpoints(self.run_dir):
            raise PeftkitError(
                f"{self.run_dir}: every checkpoint fails its manifest check (damaged); nothing was changed. "
                "Start over with --train.overwrite=true"
            )
        if acc.is_main_process:
            _reset_run_dir(self.run_dir, fresh=found is None)
            cfg.save_yaml(self.run_dir / "config.yaml")
            write_manifest(self.run_dir, cfg, world)
        if train.report_to:  # after the run folder is set up: trackers write into it
            acc.init_trackers("tb", config=_flat(cfg.to_dict()))
        if acc.is_main_process:
            if methods.converts_on_save(cfg.method):
                peft_model.save_pretrained(self._initial_adapter)  # PiSSA/OLoRA: the reference for conversion
        acc.wait_for_everyone()
        if found:
            state = {**state, **checkpoint.load(found, peft_model, optimizer, scheduler, acc)}
            start = state.pop("step")
            if acc.is_main_process:
                _truncate_metrics(self.run_dir / "metrics.jsonl", start)
            self.log(f"resumed from {found} at step {start}")
        elif resume:
            self.log(f"{self.run_dir}: no complete checkpoint yet; starting from step 0")
        if start == 0:
            # Step 0 is the base model (LoRA starts as the identity): the reference for the curves
            # and for the forgetting budget.
            state["baseline"] = self._evaluate(0, peft_model, val_sets, [], state)

        loop = (model, optimizer, scheduler, params, stream, val_sets)
        self._done, self._updating = (start or None), False
        try:
            final_step, stop_reason = self._loop(loop, start, state)
        except KeyboardInterrupt:
            self._save_on_interrupt(model, optimizer, scheduler, state)
            raise
        with speed.eager():
            return self._finish(model, peft_model, final_step, stop_reason, state)

    def _loop(self, loop, start: int, state: dict) -> tuple[int, str | None]:
        """Steps `start+1 .. max_steps`; returns the last step done and why it stopped early, if it did."""
        model, optimizer, scheduler, params, stream, val_sets = loop
        cfg, train, acc = self.config, self.config.train, self.accelerator
        world, batch, accum = acc.num_processes, train.batch_size, train.grad_accum
        tokens_per_step = self._global_batch * cfg.data.seq_len
        bar = progress.bar(total=train.max_steps, initial=start, desc="train", unit="step",
                           disable=not (acc.is_main_process and train.progress))  # fmt: skip
        train_seconds, done = 0.0, start
        separate = cfg.data.separate_documents and not methods.is_prompt_learning(self.model)
        model.train()
        for step in range(start, train.max_steps):
            step_start = time.perf_counter()
            step_loss = torch.zeros((), device=acc.device)
            for micro in range(accum):
                rows = stream.batch(step, micro, acc.process_index, world, batch, accum)
                targets = stream.batch(step, micro, acc.process_index, world, batch, accum, part="labels")
                extra = {}
                if separate:  # positions restart per document: attention keeps documents apart
                    positions = stream.batch(step, micro, acc.process_index, world, batch, accum, part="positions")
                    extra["position_ids"] = positions.to(acc.device)  # with no cache, transformers then masks
                inputs = rows
                if "token_noise" in cfg.data.augment:  # noisy inputs, clean targets
                    key = [self.config.seed, step, micro, acc.process_index]
                    inputs = data.noise_tokens(rows, cfg.data.token_noise, len(self.tokenizer), key)
                targets, inputs = targets.to(acc.device), inputs.to(acc.device)
                with nullcontext() if micro == accum - 1 else acc.no_sync(model):
                    loss = model(input_ids=inputs, labels=targets, **extra) / accum  # scale for accumulation
                    acc.backward(loss)
                step_loss += loss.detach()
            grad_norm = acc.clip_grad_norm_(params, train.max_grad_norm) if train.max_grad_norm else None
            step_loss = acc.reduce(step_loss, reduction="mean").item()
            finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(float(grad_norm)))
            self._updating = True  # an interrupt inside the update must not be checkpointed
            if finite:
                optimizer.step()
            scheduler.step()  # the schedule follows the step count, skipped steps included
            optimizer.zero_grad(set_to_none=True)
            state["train_tokens"] += tokens_per_step
            done = step + 1
            self._done = done
            self._updating = False
            seconds = time.perf_counter() - step_start
            if done == start + 1:
                self._first_step_s = seconds
                if self._compiled:
                    self.log(f"first step {seconds:.1f} s, compilation included")
            else:  # steady state: the first step (warm-up, compilation) is reported apart, as first_step_s
                train_seconds += seconds  # evaluation time is not training throughput
            timed = (done - start - 1, train_seconds) if done > start + 1 else (1, seconds)
            self._throughput = tokens_per_step * timed[0] / timed[1]
            record = {"step": done, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "tokens": state["train_tokens"],
                      "tokens_per_s": self._throughput}  # fmt: skip
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if not finite:
                state["bad_steps"] += 1
                record["skipped"] = True
                self._record(record, "on_step")
                if state["bad_steps"] > train.max_bad_steps:
                    kept = [p.name for _, p in checkpoint.checkpoints(self.run_dir)]
                    raise PeftkitError(
                        f"step {done}: non-finite loss or gradient ({state['bad_steps']} steps skipped, more than "
                        f"train.max_bad_steps={train.max_bad_steps}); stopped. Kept checkpoints: "
                        f"{', '.join(kept) or 'none'}. Lower train.lr or check the data"
                    )
                continue
            state["recent_losses"].append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if done % train.log_every == 0:
                self._record(record, "on_step")
            if done % cfg.eval.every_steps == 0 or done == train.max_steps:
                self._evaluate(done, self.model, val_sets, state["recent_losses"], state)
                state["recent_losses"] = []
                checkpoint.save(self.run_dir, done, model, optimizer, scheduler, state, acc)
                if acc.is_main_process:
                    checkpoint.prune(self.run_dir, train.keep_checkpoints, state["best_step"])
                stop_reason = self._stop_reason(state)
                if stop_reason:
                    bar.close()
                    return done, stop_reason
        bar.close()
        return done, None

    def _training_forward(self, stream) -> speed.TrainingForward:
        """The training forward: chunked loss (checked against the model's own on a real row),
        autocast-friendly adapter inputs, optional activation checkpointing, regional compilation."""
        train, acc = self.config.train, self.accelerator
        chunked = train.chunked_loss
        if chunked:
            row = stream.batch(0, 0, 0, 1, 1, 1)
            labels = stream.batch(0, 0, 0, 1, 1, 1, part="labels")
            with acc.autocast():
                chunked = speed.chunked_matches(self.model, row.to(acc.device), labels.to(acc.device))
            if not chunked:
                self.log("train.chunked_loss: this model's loss is not plain cross-entropy over its output layer "
                         "(or it prepends virtual tokens); using its own forward, which holds every logit")  # fmt: skip
        self._compiled = False
        wanted, why = speed.compile_wanted(train.compile, self.model)
        if wanted:
            count = speed.compile_layers(self.model, assets.cache_dir() / "inductor")
            self._compiled = count > 0
            self.log(f"compiling {count} decoder layers (regional torch.compile; cached in {assets.cache_dir() / 'inductor'})"
                     if count else "train.compile: no decoder layer list found; running eagerly")  # fmt: skip
        elif train.compile != "false":
            self.log(f"not compiling: {why}")
        threads = speed.set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
        self.log(f"training forward: {'chunked' if chunked else 'full-logit'} loss, "
                 f"{acc.mixed_precision if acc.mixed_precision in ('bf16', 'fp16') else 'fp32'} autocast, {threads} threads per process"
                 + (", activation checkpointing" if train.gradient_checkpointing else ""))  # fmt: skip
        return speed.training_forward(self.model, train, acc.mixed_precision, chunked, self._compiled)

    def _save_on_interrupt(self, model, optimizer, scheduler, state: dict) -> None:
        """Ctrl-C: checkpoint the last completed step (one process only: a process group may be gone)."""
        acc, done = self.accelerator, getattr(self, "_done", None)
        if done is None or getattr(self, "_updating", False) or acc.num_processes > 1:
            return
        if not (self.run_dir / "checkpoints" / f"step-{done}").exists():
            checkpoint.save(self.run_dir, done, model, optimizer, scheduler, state, acc)
        self.log(f"interrupted: saved checkpoint step-{done}; continue with --train.resume=true")

    def _prepare_data(self):
        cfg = self.config
        if data.streaming.active(cfg.data, self.log):
            with self.accelerator.main_process_first():  # one process builds the token files, the others read them
                domain = data.streaming.train_documents(cfg.data, self.tokenizer, self.log)
            # the leakage check, memorisation and the prompted baseline look at a sample of the corpus
            self.train_docs = data.streaming.train_sample(cfg.data)
            kept = data.kept_by_max_train_docs(len(domain), cfg.data, cfg.seed)
            if kept is not None:
                domain = domain.select(kept)
        else:
            docs = data.load_split(cfg.data, "train", log=self.log)
            kept = data.kept_by_max_train_docs(len(docs), cfg.data, cfg.seed)
            if kept is not None:
                docs = [docs[i] for i in kept]
            self.train_docs = docs  # the corpus as given: the leakage check looks at these
            augmented, labels = data.augment_documents(docs, cfg.data, cfg.seed), None
            if cfg.data.format == "text":
                tokens = data.tokenize_cached(self.tokenizer, augmented, self.log)
            else:
                pairs = data.encode_cached(self.tokenizer, augmented, cfg.data, self.log)
                tokens, labels = [p[0] for p in pairs], [p[1] for p in pairs]
            if len(tokens) > len(docs):
                self.log(f"sentence_shuffle: {len(tokens) - len(docs):,} reordered copies added to {len(docs):,} "
                         "documents")  # fmt: skip
            domain = data.Documents.from_arrays(tokens, labels)
        # as the model reads them (chat examples rendered): for memorisation and the prompted baseline
        self.train_texts = self.train_docs if cfg.data.format == "text" else data.plain_texts(
            self.tokenizer, self.train_docs[:512], cfg.data)  # fmt: skip
        parts = [domain]
        if cfg.data.replay:
            general = data.load_general(cfg.data, log=self.log)
            if not general:
                raise PeftkitError("data.replay needs data.general_source (general-domain documents to replay)")
            wanted = int(domain.tokens * cfg.data.replay / (1 - cfg.data.replay))
            replay = data.replay_documents(
                general, self.tokenizer, max(cfg.eval.val_tokens, cfg.eval.test_tokens), wanted
            )
            self.log(f"replay: {sum(len(t) for t in replay):,} tokens of general text mixed into {domain.tokens:,} "
                     "domain tokens")  # fmt: skip
            parts.append(data.Documents.from_arrays(replay))  # general text: loss on every token
        stream = data.PackedRows(parts, cfg.data.seq_len, cfg.seed)
        if cfg.data.format != "text":
            self.log(f"{cfg.data.format}: {stream.loss_share():.1%} of the training tokens carry loss (responses"
                     + (" and prompts)" if cfg.data.train_on_prompt else " only)"))  # fmt: skip
        needed = cfg.train.batch_size * self.accelerator.num_processes
        if stream.rows_per_epoch < needed:
            raise PeftkitError(
                f"data.source: the training split has {stream.tokens} tokens, {stream.rows_per_epoch} rows of "
                f"{cfg.data.seq_len}; one step needs {needed}. Add documents or lower data.seq_len / train.batch_size"
            )
        self.val_docs = data.load_split(cfg.data, "validation")
        val_sets = {
            "domain": data.eval_rows(self.tokenizer, self.val_docs, cfg.data.seq_len, cfg.eval.val_tokens, cfg.data)
        }
        general = data.load_general(cfg.data, log=self.log)
        if general:
            val_sets["general"] = data.eval_rows(self.tokenizer, general, cfg.data.seq_len, cfg.eval.val_tokens)
        return stream, val_sets

    def _record(self, record: dict, hook: str) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.config.train.report_to:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
            self.accelerator.log(scalars, step=record["step"])
        for callback in self.callbacks:
            if hasattr(callback, hook):
                getattr(callback, hook)(self, record)

    def _evaluate(self, step: int, model, val_sets: dict, recent_losses: list[float], state: dict) -> dict:
        """Held-out losses, the train/validation gap, and the best-checkpoint bookkeeping."""
        with speed.eager():
            return self._evaluate_eagerly(step, model, val_sets, recent_losses, state)

    def _evaluate_eagerly(self, step: int, model, val_sets: dict, recent_losses: list[float], state: dict) -> dict:
        ev, acc = self.config.eval, self.accelerator
        record = {"step": step}
        if recent_losses:
            record["train_loss"] = sum(recent_losses) / len(recent_losses)
        for name, (input_ids, labels) in val_sets.items():
            total, tokens = nll(model, input_ids, labels, ev.batch_size, acc)
            key = "val" if name == "domain" else name
            record[f"{key}_loss"] = total / tokens
            record[f"{key}_ppl"] = math.exp(total / tokens)
        if self.answers is not None:
            record["general_kl"] = forgetting.kl_from_base(acc.unwrap_model(model), self.answers, acc)
        if recent_losses:
            record["gap"] = record["val_loss"] - record["train_loss"]
        baseline = state["baseline"]
        if step > 0:
            ppl_budget, kl_budget = ev.max_general_ppl_increase, ev.max_general_kl
            record["within_budget"] = not (
                (ppl_budget is not None and "general_ppl" in record
                 and record["general_ppl"] > baseline["general_ppl"] * (1 + ppl_budget))
                or (kl_budget is not None and record.get("general_kl", 0.0) > kl_budget)
            )  # fmt: skip
            best = state["best_val_loss"]
            if record["within_budget"] and (best is None or record["val_loss"] < best - ev.min_delta):
                state.update(best_step=step, best_val_loss=record["val_loss"], evals_since_best=0)
            else:
                state["evals_since_best"] += 1
            record["best_step"] = state["best_step"]
        self._record(record, "on_eval")
        message = f"step {step}: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"
        if "general_ppl" in record:
            message += f", general ppl {record['general_ppl']:.2f}"
        if "general_kl" in record:
            message += f", general KL {record['general_kl']:.4f}"
        if recent_losses:
            message += f", train loss {record['train_loss']:.4f}, gap {record['gap']:+.4f}"
        self.log(message + ("" if record.get("within_budget", True) else "  [beyond the forgetting budget]"))
        return record

    def _stop_reason(self, state: dict) -> str | None:
        ev = self.config.eval
        if ev.patience and state["evals_since_best"] >= ev.patience:
            return (f"validation loss did not improve by more than {ev.min_delta} (within the forgetting budget) "
                    f"for {ev.patience} evaluations after step {state['best_step']}")  # fmt: skip
        return None

    def _finish(self, model, peft_model, final_step: int, stop_reason: str | None, state: dict) -> dict:
        acc, best_step = self.accelerator, state["best_step"]
        if best_step is not None and best_step != final_step:
            checkpoint.load_adapter_weights(peft_model, self.run_dir / "checkpoints" / f"step-{best_step}" / "adapter")
            self.log(f"restored the best checkpoint, step {best_step}")
        if acc.is_main_process:
            shutil.rmtree(self.run_dir / "adapter", ignore_errors=True)
        converts = methods.converts_on_save(self.config.method)
        checkpoint.save_adapter(acc, model, self.run_dir / "adapter", self._initial_adapter if converts else None)
        if converts:
            # The in-memory base holds PiSSA/OLoRA residual weights, so disable_adapter() is not the base
            # model: evaluate the saved (converted) adapter on a freshly loaded original base instead.
            from peft import PeftModel

            acc.wait_for_everyone()
            base = models.load_model(self.config.model, log=self.log)
            model = peft_model = PeftModel.from_pretrained(base, self.run_dir / "adapter").to(acc.device)
            self.model = model
        report = self.evaluate(peft_model)
        report.update(best_step=best_step, adapter_step=best_step or final_step, final_step=final_step,
                      stopped_early=stop_reason is not None, stop_reason=stop_reason or "reached train.max_steps",
                      train_tokens=state["train_tokens"], best_val_loss=state["best_val_loss"],
                      processes=acc.num_processes, global_batch_rows=self._global_batch,
                      baseline=state["baseline"], method=self.config.method.name, **self._params,
                      tokens_per_s=getattr(self, "_throughput", None), compiled=self._compiled,
                      first_step_s=getattr(self, "_first_step_s", None))  # fmt: skip
        if acc.is_main_process:  # diagnostics need no other process; generation runs on one
            report.update(self._diagnostics(peft_model, best_step))
        report["verdict"] = verdict(report, self.config.eval)
        if acc.is_main_process:
            (self.run_dir / "report.json").write_text(json.dumps(report, indent=2))
            write_report_files(self.run_dir)
            self.log(format_report(report))
            self.log(f"adapter: {self.run_dir / 'adapter'}   report: {self.run_dir / 'report.html'}")
        for tracker in acc.trackers:  # flush and close; not end_training(), which also ends the process group
            tracker.finish()
        acc.wait_for_everyone()
        return report

    def _diagnostics(self, peft_model, best_step: int | None) -> dict:
        """QA base vs tuned, generalisation gap, memorisation and leakage, for the report."""
        ev, out = self.config.eval, {}
        if ev.qa_questions:
            path = assets.resolve(ev.qa_source, log=self.log)
            path = path / "mmlu.jsonl" if path.is_dir() else path
            seed, n = self.config.seed, ev.qa_questions
            groups = {
                "medical": qa.load_questions(path, True, n, seed),
                "general": qa.load_questions(path, False, n, seed),
            }
            shots = {"medical": qa.load_questions(path, True, ev.kshot, seed, skip=n),
                     "general": qa.load_questions(path, False, ev.kshot, seed, skip=n)}  # fmt: skip
            out["qa"] = qa.compare(peft_model, self.tokenizer, groups, ev.batch_size, self.accelerator, shots)
        if not ev.diagnostics:
            return out
        evals = [r for r in read_metrics(self.run_dir) if "gap" in r]
        seq_len = self.config.data.seq_len
        best = next((r for r in evals if r["step"] == best_step), None)
        diagnostics = {
            "generalization_gap": {
                "best": {k: best[k] for k in ("step", "train_loss", "val_loss", "gap")} if best else None,
                "end": {k: evals[-1][k] for k in ("step", "train_loss", "val_loss", "gap")} if evals else None,
            },
            "memorization": memorization(
                peft_model,
                self.tokenizer,
                self.train_texts,
                self.val_docs
                if self.config.data.format == "text"
                else data.plain_texts(self.tokenizer, self.val_docs[:512], self.config.data),
                prefix=min(32, seq_len // 2),
                length=min(16, seq_len // 4),
                seed=self.config.seed,
            ),  # fmt: skip
            "leakage": {
                "validation": find_leaks(self.train_docs, self.val_docs),
                "test": find_leaks(self.train_docs, data.load_split(self.config.data, "test")),
            },  # fmt: skip
        }
        if data.streaming.active(self.config.data):  # the training side is a sample: say of how many
            documents = data.streaming.train_stats(self.config.data)["train"]["documents"]
            for leak in diagnostics["leakage"].values():
                leak["sampled_from"] = documents
        diagnostics["underfitting"] = underfitting(read_metrics(self.run_dir), self.config.eval)
        out["diagnostics"] = diagnostics
        return out

    def evaluate(self, model=None) -> dict:
        """Base vs tuned perplexity on the domain test split and the general text (fixed token budgets)."""
        sets = test_sets(self.config, self.tokenizer)
        report = compare_base_and_tuned(model or self.model, sets, self.config.eval.batch_size, self.accelerator)
        prefix = domain_prompt(self.tokenizer, self.train_texts, self.config.eval.prompt_tokens)
        if prefix is not None:
            report["base_prompted"] = prompted_baseline(model or self.model, sets["domain"], prefix,
                                                        self.config.eval.batch_size, self.accelerator)  # fmt: skip
        if self.answers is not None:
            report["general_kl"] = forgetting.kl_from_base(self.accelerator.unwrap_model(model or self.model),
                                                           self.answers, self.accelerator)  # fmt: skip
        return report


def _flat(config: dict, prefix: str = "") -> dict:
    """The config as `section.key: value` scalars, the form trackers store hyperparameters in."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, to start a new run over an existing one."""
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if resume and not (run_dir / "config.yaml").exists():
        raise PeftkitError(f"{run_dir}: no peftkit run to resume (no config.yaml); start without --train.resume")
    if existing and not resume:
        if not overwrite:
            raise PeftkitError(
                f"output_dir {run_dir} already holds files; continue that run with --train.resume=true, replace it "
                "with --train.overwrite=true, or choose another --output_dir"
            )
        if not (run_dir / "config.yaml").exists():
            raise PeftkitError(f"output_dir {run_dir} is not a peftkit run folder; refusing to overwrite it")


def _reset_run_dir(run_dir: Path, fresh: bool) -> None:
    """Create the run folder; for a fresh start, remove the files of the run it replaces."""
    if fresh and run_dir.is_dir():
        for name in RUN_FILES:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (and a line cut short by a kill),
    so the log reads as one run."""
    if path.exists():
        kept = []
        for line in path.read_text().split("\n"):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue
        path.write_text("".join(line + "\n" for line in kept))
