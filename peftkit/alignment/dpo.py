"""DPO in peftkit's loop: the pairs' batches, the reference's log-probabilities, the loss and held-out measures.

The reference is the model as the stage starts (the base with model.adapter merged, the new adapter still the
identity), scored once before the first step over every pair; the training forward then needs one pass of the
policy per pair, never a second model (trl's precompute_ref_log_probs). The loss is trl's DPO loss (its
"reverse_kl" divergence) for the three loss types peftkit offers; tests/test_alignment.py checks it against
trl's DPOTrainer on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PairBatch:
    """Pairs as trl's collator lays them out: the chosen rows, then the rejected rows, right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    ref_logps: torch.Tensor
    """The reference's summed completion log-probability of each row."""

    def to(self, device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask,
                                                   self.ref_logps)))  # fmt: skip

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    completion_mask=self.completion_mask, ref_logps=self.ref_logps)  # fmt: skip


def collate(pairs: list[dict], ref_logps: torch.Tensor, pad_id: int, seq_len: int) -> PairBatch:
    """`pairs` (tokenized) with their reference log-probs [pairs, 2] as one batch, by trl's collator."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    out = DataCollatorForPreference(pad_token_id=pad_id, max_length=seq_len)(pairs)
    ref = torch.cat([ref_logps[:, 0], ref_logps[:, 1]]) if len(ref_logps) else torch.zeros(2 * len(pairs))
    return PairBatch(out["input_ids"], out["attention_mask"], out["completion_mask"], ref.float())


def sequence_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Each row's summed log-probability of its completion tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, -input_ids.shape[1] :][:, :-1].float()  # prompt learning prepends virtual positions
    targets = input_ids[:, 1:]
    token_logps = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * completion_mask[:, 1:]).sum(dim=1)


def dpo_losses(logps, ref_logps, completion_mask, beta: float, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and implicit reward margin beta * (chosen - rejected log-ratio), as trl computes them."""
    chosen, rejected = (logps - ref_logps).chunk(2)
    delta = chosen - rejected
    if loss == "sigmoid":
        per_pair = -F.logsigmoid(beta * delta)
    elif loss == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    elif loss == "ipo":  # trl's length-normalised IPO: log-ratios per completion token
        chosen_tokens, rejected_tokens = completion_mask.sum(dim=1).clamp(min=1).chunk(2)
        per_pair = (chosen / chosen_tokens - rejected / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return per_pair, beta * delta.detach()


class PreferenceForward(nn.Module):
    """The whole training forward of a DPO step (what Accelerate wraps, DDP syncs through it): the mean
    DPO loss of the batch's pairs."""

    def __init__(self, model: nn.Module, beta: float, loss: str):
        super().__init__()
        self.peft_model, self.beta, self.loss = model, beta, loss  # the name checkpoints look the adapter up by
        self.penalty = 0.0  # the trainer subtracts a regulariser's share from the logged loss; DPO has none

    def forward(self, input_ids, attention_mask, completion_mask, ref_logps) -> torch.Tensor:
        logps = sequence_logps(self.peft_model, input_ids, attention_mask, completion_mask)
        per_pair, _ = dpo_losses(logps, ref_logps, completion_mask, self.beta, self.loss)
        return per_pair.mean()


class PairData:
    """The pairs of one run: the training order (a pure function of step, micro-batch and rank: resume is
    exact), the held-out splits and every pair's reference log-probs ([pairs, 2]: chosen, rejected)."""

    def __init__(self, splits: dict[str, list[dict]], docs: dict[str, list[str]], pad_id: int, seq_len: int, seed: int):
        self.splits, self.docs, self.pad_id, self.seq_len, self.seed = splits, docs, pad_id, seq_len, seed
        self.ref: dict[str, torch.Tensor] = {}
        self.val_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # general text, as the text runs score it
        self.rows_per_epoch = len(splits["train"])
        self.tokens = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"])
                          for p in splits["train"])  # fmt: skip

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows_per_epoch)

    def batch(self, step: int, micro: int, rank: int, world: int, rows: int, accum: int) -> PairBatch:
        """Micro-batch `micro` of optimizer step `step` for process `rank` of `world` (`rows` pairs)."""
        start = ((step * accum + micro) * world + rank) * rows
        picked = [self.order(i // self.rows_per_epoch)[i % self.rows_per_epoch] for i in range(start, start + rows)]
        return self.pick("train", picked)

    def pick(self, split: str, indexes) -> PairBatch:
        pairs = [self.splits[split][i] for i in indexes]
        ref = self.ref[split][list(indexes)] if split in self.ref else torch.zeros(0)
        return collate(pairs, ref, self.pad_id, self.seq_len)

    def epoch_of(self, steps: int, world: int, rows: int, accum: int) -> float:
        return steps * world * rows * accum / self.rows_per_epoch


@torch.no_grad()
def score_pairs(model, data: PairData, split: str, batch_size: int, accelerator) -> torch.Tensor:
    """Summed completion log-probs [pairs, 2] (chosen, rejected) of a split under `model`, in eval mode."""
    was_training = model.training
    model.eval()
    pairs = data.splits[split]
    # longest first, so each batch pads to about its own length (and the peak memory comes at once)
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"]))
                   - len(pairs[i]["prompt_ids"]))  # fmt: skip
    out = torch.zeros(len(pairs), 2)
    try:
        for start in range(0, len(pairs), batch_size):
            picked = order[start : start + batch_size]
            batch = data.pick(split, picked).to(accelerator.device)
            with accelerator.autocast():  # the precision training runs in, so the first step's margin is zero
                logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
            out[picked] = torch.stack(logps.float().chunk(2), dim=1).cpu()
    finally:
        model.train(was_training)
    return out


def preference_measures(logps: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor, beta: float, loss: str) -> dict:
    """Held-out measures of pairs scored [pairs, 2] against the reference: the DPO loss, the share of pairs
    whose implicit reward ranks chosen above rejected, the mean reward margin, and the share the model
    itself prefers (higher log-probability for chosen: the measure that also applies to the base)."""
    rows = torch.cat([logps[:, 0], logps[:, 1]])
    ref_rows = torch.cat([ref[:, 0], ref[:, 1]])
    per_pair, margins = dpo_losses(rows, ref_rows, lengths, beta, loss)
    return {
        "loss": per_pair.mean().item(),
        "reward_accuracy": (margins > 0).float().mean().item(),
        "reward_margin": margins.mean().item(),
        "likelihood_accuracy": (logps[:, 0] > logps[:, 1]).float().mean().item(),
    }


def completion_lengths(data: PairData, split: str) -> torch.Tensor:
    """Each row's completion-token count as a [2 x pairs, 1]-broadcastable mask sum (chosen rows, then rejected),
    truncated to data.seq_len as the collator truncates: what IPO's normalisation divides by."""
    pairs = data.splits[split]
    count = [min(len(p[part]), max(data.seq_len - len(p["prompt_ids"]), 0))
             for part in ("chosen_ids", "rejected_ids") for p in pairs]  # fmt: skip
    return torch.tensor(count, dtype=torch.float32)[:, None]
