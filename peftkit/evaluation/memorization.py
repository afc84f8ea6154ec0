"""Memorisation: does greedy continuation reproduce training documents more than unseen ones?

For a sample of training and of validation documents, the model continues a `prefix`-token
prefix greedily for `length` tokens; we count the share of continuation tokens equal to the true
next tokens, and the share of documents reproduced verbatim. A model that generalises scores the
two samples alike; a gap (train above validation) is memorisation.
"""

from __future__ import annotations

import random

import torch


@torch.no_grad()
def verbatim_rate(model, tokenizer, docs: list[str], prefix: int = 32, length: int = 16) -> dict:
    rows = [ids[: prefix + length] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    rows = [r for r in rows if len(r) == prefix + length]
    if not rows:
        return {"docs": 0, "token_match": None, "verbatim": None}
    ids = torch.tensor(rows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids[:, :prefix].to(device), attention_mask=torch.ones_like(ids[:, :prefix]).to(device),
                         max_new_tokens=length, min_new_tokens=length, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.train(was_training)
    match = out[:, prefix:].cpu() == ids[:, prefix:]
    return {
        "docs": len(rows),
        "token_match": match.float().mean().item(),
        "verbatim": match.all(dim=1).float().mean().item(),
    }


def memorization(model, tokenizer, train_docs: list[str], val_docs: list[str], prefix: int = 32, length: int = 16,
                 sample: int = 32, seed: int = 0) -> dict:  # fmt: skip
    rng = random.Random(seed)
    train = verbatim_rate(model, tokenizer, rng.sample(train_docs, min(sample, len(train_docs))), prefix, length)
    val = verbatim_rate(model, tokenizer, rng.sample(val_docs, min(sample, len(val_docs))), prefix, length)
    gap = (
        None
        if train["token_match"] is None or val["token_match"] is None
        else train["token_match"] - val["token_match"]
    )
    return {"train": train, "validation": val, "token_match_gap": gap}
