"""What serving the tuned model costs: greedy decoding with the adapter unmerged vs merged into the weights.

Unmerged, every adapted layer computes its adapter beside the frozen weight on each token; merged (a copy
with the adapter folded in, as `peftkit merge` writes it), the model is the base model's size and speed.
Both decode the same few general prompts (the first of the KL prompts, chat-formatted for chat models),
one at a time, greedy, a fixed number of tokens; the time per generated token is the median of a few
repeats after one untimed warm-up. Seconds on a 135M model; `eval.serving_tokens=0` skips it.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext

import torch

from peftkit.evaluation.forgetting import CHAT_PROMPTS, TEXT_PROMPTS
from peftkit.methods import is_prompt_learning

PROMPTS = 3


def prompts(tokenizer) -> list[torch.Tensor]:
    """Token ids of the fixed prompts, one (1, length) tensor each."""
    if tokenizer.chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in CHAT_PROMPTS[:PROMPTS]
        ]
    else:
        texts = list(TEXT_PROMPTS[:PROMPTS])
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def decode(model, tokenizer, inputs: list[torch.Tensor], new_tokens: int, repeats: int, accelerator=None):
    """(ms per generated token, median over `repeats`; the generated ids of each prompt)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def once() -> list[torch.Tensor]:
        outs = []
        for ids in inputs:
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            outs.append(out[0, ids.shape[1] :].cpu())
        return outs

    timings = []
    with accelerator.autocast() if accelerator else nullcontext():
        tokens = once()  # warm-up: first-call allocations and lazy initialisation are not serving cost
        for _ in range(repeats):
            started = time.perf_counter()
            once()
            timings.append((time.perf_counter() - started) * 1000 / (new_tokens * len(inputs)))
    model.train(was_training)
    return statistics.median(timings), tokens


def mergeable(model) -> bool:
    """A copy of the adapter can be folded into the weights: not prompt learning, not a quantized base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        hasattr(model, "merge_and_unload")
        and not is_prompt_learning(model)
        and not getattr(base, "is_quantized", False)
    )


def serving_latency(model, tokenizer, new_tokens: int = 8, repeats: int = 3, accelerator=None) -> dict:
    """Greedy decoding speed of the peft `model` as served unmerged and of a merged copy (the model itself is
    left untouched), with whether both generate the same tokens."""
    inputs = prompts(tokenizer)
    unmerged, tokens = decode(model, tokenizer, inputs, new_tokens, repeats, accelerator)
    result = {"unmerged_ms_per_token": round(unmerged, 3), "merged_ms_per_token": None, "same_tokens": None}
    if mergeable(model):
        merged_model = copy.deepcopy(model).merge_and_unload()  # a copy: merging in place changes the weights
        merged, merged_tokens = decode(merged_model, tokenizer, inputs, new_tokens, repeats, accelerator)
        del merged_model
        same = all(torch.equal(a, b) for a, b in zip(tokens, merged_tokens, strict=True))
        result.update(merged_ms_per_token=round(merged, 3), same_tokens=same)
    return {**result, "new_tokens": new_tokens, "prompts": len(inputs), "repeats": repeats}
