"""Forgetting seen through behaviour: KL divergence from the base model on general prompts.

Raw-text perplexity can fall while an instruct model forgets how to answer (in our trial, LoRA on
PubMed lowered the Instruct model's Wikipedia perplexity by 5%). So the base model answers a fixed
set of general prompts once (chat-formatted when the tokenizer has a chat template, greedy), and
at each evaluation we measure KL(base || tuned) of the next-token distributions over those
answers, in nats per answer token. 0 means the tuned model would answer exactly as the base did.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

CHAT_PROMPTS = (
    "Explain how a bicycle stays upright while moving.",
    "Write a short poem about the sea at night.",
    "What are three good habits for learning a new language?",
    "Summarise the plot of a detective story in two sentences.",
    "How do I convert 5 kilometres to miles?",
    "Give me a simple recipe for pancakes.",
    "Why is the sky blue?",
    "Write a polite email declining a meeting invitation.",
    "What is the capital of Australia, and why was it chosen?",
    "Describe the rules of chess for a beginner.",
    "Translate 'good morning, how are you?' into French.",
    "List three differences between a city and a village.",
)
TEXT_PROMPTS = (
    "The history of the city begins",
    "In mathematics, a prime number is",
    "The river flows through the valley and",
    "During the nineteenth century, the railway",
    "The orchestra played the symphony while",
    "A good football team needs",
    "The old king ruled the country until",
    "Music was played in the hall when",
)


@torch.no_grad()
def base_answers(model, tokenizer, accelerator=None, max_new_tokens: int = 32) -> dict[str, torch.Tensor]:
    """The base model's greedy answers to the general prompts (token ids with masks) and its
    next-token log-probabilities over them, the reference every later KL is measured against.

    `model` is the base model, or a peft model whose adapter is disabled for this. Computing the
    reference once also serves methods whose disabled adapter is not the base (PiSSA, OLoRA).
    """
    if tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in CHAT_PROMPTS]  # fmt: skip
    else:
        prompts = list(TEXT_PROMPTS)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        out = model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        prompt_len = batch["input_ids"].shape[1]
        answer = out[:, prompt_len:].cpu()
        # an answer ends at its first EOS (kept: stopping is behaviour too)
        ended = (answer == tokenizer.eos_token_id).int().cumsum(dim=1)
        answer_mask = (ended == 0) | ((ended == 1) & (answer == tokenizer.eos_token_id))
        attention = torch.cat([batch["attention_mask"], answer_mask.long()], dim=1)
        target_mask = torch.cat([torch.zeros_like(batch["attention_mask"], dtype=torch.bool), answer_mask], dim=1)
        answers = {"input_ids": out.cpu(), "attention_mask": attention, "target_mask": target_mask}
        with accelerator.autocast() if accelerator else nullcontext():
            answers["base_logprobs"] = _logprobs(model, answers, device).cpu()
    model.train(was_training)
    return answers


def _logprobs(model, answers: dict, device) -> torch.Tensor:
    """Log-probabilities of the next token at the answer positions only: [answer tokens, vocab]."""
    from peftkit.methods import sequence_logits

    ids, mask = answers["input_ids"].to(device), answers["attention_mask"].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = sequence_logits(model, ids, attention_mask=mask, position_ids=positions)
    targets = answers["target_mask"][:, 1:].to(device)  # position t predicts token t + 1
    return F.log_softmax(logits[:, :-1][targets].float(), dim=-1)


@torch.no_grad()
def kl_from_base(model, answers: dict, accelerator=None) -> float:
    """Mean KL(base || tuned) in nats per answer token."""
    per_token = _kl_per_token(model, answers, accelerator)
    return (per_token.sum() / max(len(per_token), 1)).item()


@torch.no_grad()
def kl_per_prompt(model, answers: dict, accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(base || tuned) summed over each prompt's answer tokens (float64), and each answer's token count:
    the units the final report's interval on the KL resamples."""
    per_token = _kl_per_token(model, answers, accelerator)
    counts = answers["target_mask"][:, 1:].sum(dim=1)  # positions predicting an answer token, row by row
    sums = torch.stack([part.sum() for part in per_token.split(counts.tolist())]) if len(counts) else per_token
    return sums.double().cpu(), counts.cpu()


def _kl_per_token(model, answers: dict, accelerator=None) -> torch.Tensor:
    """KL(base || tuned) of the next-token distribution at each answer position, prompts in order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with accelerator.autocast() if accelerator else nullcontext():
        tuned = _logprobs(model, answers, device)
    model.train(was_training)
    base = answers["base_logprobs"].to(device)
    return (base.exp() * (base - tuned)).sum(dim=-1)
