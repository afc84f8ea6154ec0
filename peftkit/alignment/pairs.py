"""Preference pairs: read and checked record by record, split by their prompt, tokenized as trl tokenizes them.

A record is `{prompt, chosen, rejected}` (field names from data.prompt_field / chosen_field / rejected_field):
three strings, or a conversation (the prompt a list of {role, content} messages, each completion a list of
assistant messages) rendered with the tokenizer's chat template. Every source the text formats read (JSONL,
CSV/Parquet, saved datasets, a folder of splits) gives pairs through the same readers: a pair travels as one
JSON document, so splitting and deduplication work on it unchanged, except that the split hashes the prompt
alone (every pair of one prompt lands in the same split) and duplicates are exact ones only (pairs that share a
prompt are near-duplicates by construction and must all stay).

Tokenization is trl's (DPOTrainer._prepare_dataset): a plain completion gets the EOS token; prompt and
prompt+completion are tokenized whole and the completion starts where they diverge (trl's
common_prefix_length), so both toolkits train on the same tokens (tests/test_alignment.py checks it).
"""

from __future__ import annotations

import json

from peftkit.errors import PeftkitError


def pair_record(record: dict, spec, where: str) -> str:
    """One record as a pair document (JSON), or a one-line error naming `where` and the fix."""
    fields = {"prompt": spec.prompt_field, "chosen": spec.chosen_field, "rejected": spec.rejected_field}
    pair = {}
    for part, name in fields.items():
        value = record.get(name)
        if isinstance(value, list) and _messages(value):
            pair[part] = [{"role": m["role"], "content": m["content"]} for m in value]
        elif isinstance(value, str):
            pair[part] = value
        else:
            raise PeftkitError(f"{where}: no field '{name}' holding a string or a list of {{role, content}} "
                               f"messages; set data.{part}_field to the field that holds the {part}")  # fmt: skip
    if len({type(v) for v in pair.values()}) > 1:
        raise PeftkitError(f"{where}: mixes plain text and message lists; give prompt, chosen and rejected "
                           "all as strings or all as message lists")  # fmt: skip
    for part in ("chosen", "rejected"):
        if not _text(pair[part]).strip():
            raise PeftkitError(f"{where}: the {part} completion is empty; a pair needs two non-empty completions")
    if pair["chosen"] == pair["rejected"]:
        raise PeftkitError(f"{where}: chosen equals rejected, so the pair prefers nothing; fix or drop it")
    return json.dumps(pair, ensure_ascii=False)


def _messages(value: list) -> bool:
    return bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _text(part) -> str:
    return part if isinstance(part, str) else "".join(m["content"] for m in part)


def split_key(doc: str) -> str:
    """What a pair's split is hashed from: its prompt."""
    return "prompt:" + json.dumps(json.loads(doc)["prompt"], ensure_ascii=False)


def tokenize(tokenizer, doc: str) -> dict[str, list[int]]:
    """prompt_ids, chosen_ids and rejected_ids of one pair document, as trl's DPOTrainer makes them."""
    from trl.data_utils import common_prefix_length

    pair = json.loads(doc)
    if isinstance(pair["prompt"], list):  # conversational: the chat template renders all three
        if not getattr(tokenizer, "chat_template", None):
            raise PeftkitError("data.source: the pairs are message lists, but the tokenizer has no chat template to "
                               "render them; give the pairs as plain strings, or use a model with a chat template")  # fmt: skip

        def ids(messages, **kwargs):
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

        prompt = ids(pair["prompt"], add_generation_prompt=True)
        chosen, rejected = (ids(pair["prompt"] + pair[part]) for part in ("chosen", "rejected"))
    else:
        eos = tokenizer.eos_token
        prompt = tokenizer(text=pair["prompt"])["input_ids"]
        chosen, rejected = (
            tokenizer(text=pair["prompt"] + (text if text.endswith(eos) else text + eos))["input_ids"]
            for text in (pair["chosen"], pair["rejected"])
        )
    shared = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt_ids": prompt[:shared], "chosen_ids": chosen[shared:], "rejected_ids": rejected[shared:]}


def tokenize_all(tokenizer, docs: list[str], seq_len: int, split: str) -> list[dict[str, list[int]]]:
    """Every pair of a split tokenized; a prompt that leaves no room for its completions in data.seq_len is
    refused, naming the pair (after splitting, its source line is no longer known)."""
    pairs = [tokenize(tokenizer, doc) for doc in docs]
    for doc, pair in zip(docs, pairs, strict=True):
        if len(pair["prompt_ids"]) >= seq_len:
            prompt = _text(json.loads(doc)["prompt"])
            raise PeftkitError(
                f"data.source: the {split} pair whose prompt starts {prompt[:60]!r} has a prompt of "
                f"{len(pair['prompt_ids'])} tokens, which leaves no room in data.seq_len={seq_len}; raise "
                "data.seq_len or shorten the prompt"
            )
        if not pair["chosen_ids"] or not pair["rejected_ids"]:
            raise PeftkitError(f"data.source: the {split} pair whose prompt starts {_text(json.loads(doc)['prompt'])[:60]!r}"
                               " has a completion that adds no token; fix or drop it")  # fmt: skip
    return pairs
