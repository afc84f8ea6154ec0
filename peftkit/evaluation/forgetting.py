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
def base_answers(peft_model, tokenizer, max_new_tokens: int = 32) -> dict[str, torch.Tensor]:
    """The base model's greedy answers to the general prompts, as token ids with masks."""
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
    device = next(peft_model.parameters()).device
    was_training = peft_model.training
    peft_model.eval()
    with peft_model.disable_adapter():
        out = peft_model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    peft_model.train(was_training)
    prompt_len = batch["input_ids"].shape[1]
    answer = out[:, prompt_len:].cpu()
    # an answer ends at its first EOS (kept: stopping is behaviour too)
    ended = (answer == tokenizer.eos_token_id).int().cumsum(dim=1)
    answer_mask = (ended == 0) | ((ended == 1) & (answer == tokenizer.eos_token_id))
    attention = torch.cat([batch["attention_mask"], answer_mask.long()], dim=1)
    target_mask = torch.cat([torch.zeros_like(batch["attention_mask"], dtype=torch.bool), answer_mask], dim=1)
    return {"input_ids": out.cpu(), "attention_mask": attention, "target_mask": target_mask}


def _logprobs(model, answers: dict, device) -> torch.Tensor:
    mask = answers["attention_mask"].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=answers["input_ids"].to(device), attention_mask=mask, position_ids=positions).logits
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def kl_from_base(peft_model, answers: dict, accelerator=None) -> float:
    """Mean KL(base || tuned) in nats per answer token."""
    device = next(peft_model.parameters()).device
    was_training = peft_model.training
    peft_model.eval()
    with accelerator.autocast() if accelerator else nullcontext():
        tuned = _logprobs(peft_model, answers, device)
        with peft_model.disable_adapter():
            base = _logprobs(peft_model, answers, device)
    peft_model.train(was_training)
    per_token = (base.exp() * (base - tuned)).sum(dim=-1)  # KL at each position predicting the next token
    targets = answers["target_mask"][:, 1:].to(device)
    return (per_token[targets].sum() / targets.sum().clamp(min=1)).item()
