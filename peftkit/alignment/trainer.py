"""PreferenceTrainer: a train.objective=dpo run through Trainer's own loop.

Only what differs from a text run is here: the data (pairs and their reference log-probs), the training
forward (the DPO loss), the held-out record (DPO loss on validation pairs as `val_loss`, so the guard's best
step, patience and restore work unchanged, plus preference accuracy and margin) and the final evaluation.
Checkpoints, exact resume, DDP, the callbacks, time budgets and the forgetting budgets (general perplexity and
KL from the model the stage started from) are Trainer's.
"""

from __future__ import annotations

import math

import torch

from peftkit import data, methods, runtime, sharding
from peftkit.alignment.dpo import PairData, PreferenceForward, completion_lengths, preference_measures, score_pairs
from peftkit.alignment.pairs import tokenize_all
from peftkit.data.splits import kept_by_max_train_docs
from peftkit.errors import PeftkitError
from peftkit.evaluation import forgetting, nll
from peftkit.evaluation.run_report import EvalRecord
from peftkit.trainer import Trainer


def check(config) -> None:
    """What a DPO run cannot do yet, refused before anything loads."""
    refused = {
        "train.sharding": config.train.sharding == "fsdp",
        "method.auto_layers": bool(config.method.auto_layers),
        "data.folds": bool(config.data.folds),
        "data.replay": bool(config.data.replay),
        "data.augment": bool(config.data.augment),
        "data.streaming": config.data.streaming == "on",
        "train.gradient_checkpointing": config.train.gradient_checkpointing,
        "train.compile": config.train.compile == "true",
    }
    for key, bad in refused.items():
        if bad:
            raise PeftkitError(
                f"config key '{key}': not supported with train.objective=dpo yet; leave it at its default"
            )


def build_pair_data(config, tokenizer, log=print) -> PairData:
    """Every split's pairs, read, split by prompt, deduplicated and tokenized (data.max_train_docs applies)."""
    cfg = config.data
    docs = {split: data.load_split(cfg, split, log=log) for split in ("train", "validation", "test")}
    kept = kept_by_max_train_docs(len(docs["train"]), cfg, config.seed)
    if kept is not None:
        docs["train"] = [docs["train"][i] for i in kept]
    splits = {split: tokenize_all(tokenizer, texts, cfg.seq_len, split) for split, texts in docs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = PairData(splits, docs, pad, cfg.seq_len, config.seed)
    general = data.load_general(cfg, log=log)
    if general:
        pairs.val_sets["general"] = data.eval_rows(tokenizer, general, cfg.seq_len, config.eval.val_tokens)
    return pairs


class PreferenceTrainer(Trainer):
    """DPO on the adapter (`train.objective=dpo`, `data.format=preference`); the same arguments as Trainer.
    The reference is the model as the stage starts: the base with `model.adapter` merged, when given."""

    def __init__(self, config, callbacks=(), log=print):
        check(config)
        super().__init__(config, callbacks, log)

    def _setup_data(self) -> None:
        cfg, acc = self.config, self.accelerator
        if self.sharded:
            raise PeftkitError("train.sharding: a DPO run is not sharded yet; run it without sharding")
        if methods.is_prompt_learning(self.model):
            raise PeftkitError(f"method.name={cfg.method.name}: virtual tokens change the model before the first "
                               "step, so it is not its own reference; use a LoRA-family method for DPO")  # fmt: skip
        dropped = [m for m in self.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        for module in dropped:  # as trl's disable_dropout: a noisy policy would not start at its reference
            module.p = 0.0
        if dropped:
            self.log(f"dpo: dropout off in {len(dropped)} modules (method.dropout and the model's own)")
        self.data = build_pair_data(cfg, self.tokenizer, self.log)
        world, batch, accum = acc.num_processes, cfg.train.batch_size, cfg.train.grad_accum
        if self.data.rows_per_epoch < batch * world:
            raise PeftkitError(f"data.source: {self.data.rows_per_epoch} training pairs; one step needs "
                               f"{batch * world}. Add pairs or lower train.batch_size")  # fmt: skip
        self.global_batch = batch * accum * world
        with runtime.eager():  # the reference: the model as it starts (its adapter is still the identity)
            for split in self.data.splits:
                self.data.ref[split] = score_pairs(self.model, self.data, split, cfg.eval.batch_size, acc)
        sizes = ", ".join(f"{len(p):,} {s}" for s, p in self.data.splits.items())
        self.log(
            f"dpo: {sizes} pairs; global batch {batch} x {accum} accumulation x {world} processes = "
            f"{self.global_batch} pairs per step"
            + ("" if cfg.train.time_budget_s else
               f"; {cfg.train.max_steps} steps = {self.data.epoch_of(cfg.train.max_steps, world, batch, accum):.2f} epochs")
        )  # fmt: skip

    def _training_forward(self):
        align = self.config.align
        return PreferenceForward(self.model, align.beta, align.loss), False

    def held_out(self, split: str) -> dict:
        """DPO loss, reward accuracy and margin, and likelihood accuracy of the current model on a split."""
        logps = score_pairs(self.accelerator.unwrap_model(self.model), self.data, split,
                            self.config.eval.batch_size, self.accelerator)  # fmt: skip
        align = self.config.align
        lengths = completion_lengths(self.data, split)
        return preference_measures(logps, self.data.ref[split], lengths, align.beta, align.loss)

    def _held_out_record(self) -> EvalRecord:
        ev, acc, recent = self.config.eval, self.accelerator, self.state.recent_losses
        with sharding.unsharded_root(self.forward):
            measures = self.held_out("validation")
        if acc.num_processes > 1:  # every process decides best step and stopping from the main one's numbers
            from accelerate.utils import broadcast_object_list

            measures = broadcast_object_list([measures])[0]
        # val_ppl is required of every record; for DPO it is only exp(loss), capped (IPO's loss can be large)
        record = {"step": self.state.step, "val_loss": measures["loss"], "val_ppl": math.exp(min(measures["loss"], 50))}
        if recent:
            record["train_loss"] = sum(recent) / len(recent)
            record["gap"] = record["val_loss"] - record["train_loss"]
        if "general" in self.data.val_sets:
            total, tokens = nll(self.model, *self.data.val_sets["general"], ev.batch_size, acc)
            record["general_loss"], record["general_ppl"] = total / tokens, math.exp(total / tokens)
        if self.answers is not None:
            record["general_kl"] = forgetting.kl_from_base(acc.unwrap_model(self.model), self.answers, acc)
        record.update({f"pref_{key}": value for key, value in measures.items() if key != "loss"})
        return EvalRecord.from_json(record)

    def evaluate(self, model=None) -> dict:
        """The test pairs' measures of the current model (a text run's evaluate() scores perplexity)."""
        self._require_setup("evaluate")
        return self.held_out("test")

    def finish(self) -> dict:
        from peftkit.alignment.report import finish_preference_run

        self._require_setup("finish")
        return finish_preference_run(self)
