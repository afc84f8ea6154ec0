"""Documents as token ids and labels: plain text (loss on every token) or instruction / chat examples
rendered with the tokenizer's chat template (loss on the responses only)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from peftkit.config import DataConfig
from peftkit.data.packing import IGNORE_INDEX
from peftkit.errors import PeftkitError
from peftkit.progress import bar


def tokenize(tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Token ids of each document with EOS appended, so packed documents stay separated."""
    eos, out, chunk = tokenizer.eos_token_id, [], 2048
    with bar(total=len(docs), desc="tokenize", unit="doc", disable=len(docs) <= 4 * chunk, leave=False) as progress:
        for start in range(0, len(docs), chunk):
            ids = tokenizer(docs[start : start + chunk], add_special_tokens=False)["input_ids"]
            out.extend(np.asarray([*row, eos], dtype=np.int64) for row in ids)
            progress.update(len(ids))
    return out


def eval_rows(tokenizer, docs: list[str], seq_len: int, budget: int, config: DataConfig | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The first `budget` tokens of `docs` (in order) packed into rows, with labels (in the
    instruction and chat formats, -100 on prompts, as in training).

    A last, partial row is padded and its padding carries no loss, so short sets are scored whole.
    """
    pieces, total = [], 0
    for start in range(0, len(docs), 64):  # tokenize only as much as the budget needs
        for ids, labels in encode(tokenizer, docs[start : start + 64], config):
            pieces.append((ids, labels))
            total += len(ids)
        if total >= budget:
            break
    flat = np.concatenate([p[0] for p in pieces])[:budget]
    flat_labels = np.concatenate([p[1] for p in pieces])[:budget]
    n_rows = -(-len(flat) // seq_len)
    input_ids = np.full(n_rows * seq_len, tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full(n_rows * seq_len, IGNORE_INDEX, dtype=np.int64)
    input_ids[: len(flat)] = flat
    labels[: len(flat)] = flat_labels
    return torch.from_numpy(input_ids).view(n_rows, seq_len), torch.from_numpy(labels).view(n_rows, seq_len)


def encode(tokenizer, docs: list[str], config: DataConfig | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input ids, labels) of each document.

    Text format: the tokens with EOS appended; every token carries loss. Instruction and chat: the
    messages rendered with the tokenizer's chat template (or "prompt\n" + response when it has
    none); labels are -100 outside the assistant turns unless `data.train_on_prompt`, and every
    example ends with EOS inside the loss, so the tuned model learns to stop.
    """
    if config is None or config.format == "text":
        return [(ids, ids) for ids in tokenize(tokenizer, docs)]
    out = []
    for doc in bar(docs, desc="encode", unit="example", disable=len(docs) < 2000, leave=False):
        ids, labels = _encode_example(tokenizer, json.loads(doc), config)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return out


def _encode_example(tokenizer, messages: list[dict], config: DataConfig) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if tokenizer.chat_template:

        def render(turns: list[dict], generation_prompt: bool) -> list[int]:
            return list(tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt,
                                                      return_dict=True)["input_ids"])  # fmt: skip

        ids, spans = render(messages, False), []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
                if render(messages[: i + 1], False) != ids[:end]:
                    raise PeftkitError("data.format=chat: the tokenizer's chat template renders a conversation "
                                       "differently from its beginning; cannot find the assistant turns")  # fmt: skip
                spans.append((start, end))
    else:
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise PeftkitError(f"data.format={config.format}: the tokenizer has no chat template, so only one "
                               "prompt and one response per example can be rendered")  # fmt: skip
        prompt = tokenizer(messages[0]["content"] + "\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"]
        ids, spans = prompt + answer, [(len(prompt), len(prompt) + len(answer))]
    last_start, last_end = spans[-1]
    if eos not in ids[last_start:last_end]:  # make sure the model learns to stop
        ids = ids[:last_end] + [eos] + ids[last_end:]
        spans[-1] = (last_start, last_end + 1)
    if config.train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def plain_texts(tokenizer, docs: list[str], config: DataConfig) -> list[str]:
    """Documents as the text the model reads (chat examples rendered), for memorisation and prompts."""
    if config.format == "text":
        return docs
    return [tokenizer.decode(ids.tolist()) for ids, _ in encode(tokenizer, docs, config)]


def encoding_key(tokenizer, config: DataConfig | None):
    """sha256 of everything besides the documents that decides their encoding: the tokenizer's full
    definition and EOS, and for instruction and chat the format, data.train_on_prompt and the chat
    template. Token caches add the documents."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    digest.update(f"eos={tokenizer.eos_token_id}".encode())
    if config is not None and config.format != "text":
        settings = (config.format, config.train_on_prompt, getattr(tokenizer, "chat_template", None))
        digest.update(json.dumps(settings).encode())
    return digest
