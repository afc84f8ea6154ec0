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
    none); unless `data.train_on_prompt`, labels are -100 except on each assistant content and the
    token that closes its turn (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>, ...), and every example
    ends with EOS inside the loss, so the tuned model learns to stop (the template's own EOS where it
    closes the turn or the conversation with one, else one added after the last closing token).
    """
    if config is None or config.format == "text":
        return [(ids, ids) for ids in tokenize(tokenizer, docs)]
    out = []
    for doc in bar(docs, desc="encode", unit="example", disable=len(docs) < 2000, leave=False):
        ids, labels = _encode_example(tokenizer, json.loads(doc), config)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return out


_PROBE = "\ue000peftkit assistant content\ue001"  # private-use characters: no template or example writes them
_MASKING = 2  # version of the rule that decides the labels (part of the token cache's key)


def _encode_example(tokenizer, messages: list[dict], config: DataConfig) -> tuple[list[int], list[int]]:
    if tokenizer.chat_template:
        ids, spans, blank = _chat_turns(tokenizer, messages)
    else:
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise PeftkitError(f"data.format={config.format}: the tokenizer has no chat template, so only one "
                               "prompt and one response per example can be rendered")  # fmt: skip
        prompt = tokenizer(messages[0]["content"] + "\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"]
        ids, spans, blank = prompt + answer, [(len(prompt), len(prompt) + len(answer))], []
    eos, (last_start, last_end) = tokenizer.eos_token_id, spans[-1]
    if eos not in ids[last_start:last_end]:  # make sure the model learns to stop
        after = last_end
        while after < len(blank) and blank[after]:
            after += 1
        if after < len(ids) and ids[after] == eos:  # the template ends the example with EOS (Phi-3): train on it
            spans[-1] = (last_start, after + 1)
        else:
            ids = ids[:last_end] + [eos] + ids[last_end:]
            spans[-1] = (last_start, last_end + 1)
    if config.train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def _chat_turns(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """The rendered conversation's token ids, the token span of each assistant turn (its content and the token
    that closes the turn) and which tokens are whitespace only.

    Each content is found by character offsets: the conversation is rendered again with that one content
    replaced by a probe string, and what surrounds the probe surrounds the content in the real rendering. So no
    template style is assumed (ChatML, Llama 3 headers, Gemma turns, Mistral [INST], Phi-3 tags), and templates
    that prepend BOS, strip the content, fold the system message into a user turn or end with EOS all work.
    """
    text, spans = _render(tokenizer, messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probed = [*messages[:i], {**message, "content": _PROBE}]
        head, _, tail = _render(tokenizer, [*probed, *messages[i + 1 :]]).partition(_PROBE)
        # the turn's closing token starts at the first non-blank character the template writes after the content
        # (for the turn alone, so that nothing of the next turn counts): <|im_end|>, <|eot_id|>, </s> ...
        own_tail = _render(tokenizer, probed).partition(_PROBE)[2]
        closing = len(own_tail) - len(own_tail.lstrip())
        content_end = len(text) - len(tail)
        found = text.startswith(head) and text.endswith(tail) and content_end >= len(head)
        if not found or text[content_end : content_end + closing + 1] != own_tail[: closing + 1]:
            raise PeftkitError(
                f"data.format=chat: the tokenizer's chat template renders message {i + 1} (assistant) differently "
                "depending on its content; cannot find where the content is to put the loss on it"
            )
        spans.append((len(head), content_end + closing + (closing < len(own_tail))))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded.get("offset_mapping")
    if offsets is None:  # only the fast (tokenizers) backend maps tokens to characters
        raise PeftkitError(
            f"data.format=chat: {type(tokenizer).__name__} gives no character offsets; load the model's "
            "fast tokenizer (a tokenizer.json) to put the loss on the assistant turns"
        )
    token_spans = []
    for begin, end in spans:  # the tokens that overlap the characters
        inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > begin]
        if inside:
            token_spans.append((inside[0], inside[-1] + 1))
        else:  # an empty content that the template does not close: an empty span where it would be
            at = next((k for k, (a, _) in enumerate(offsets) if a >= begin), len(ids))
            token_spans.append((at, at))
    return ids, token_spans, [not text[a:b].strip() for a, b in offsets]


def _render(tokenizer, messages: list[dict]) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as error:  # raise_exception(...) in the template: roles it does not accept
        raise PeftkitError(f"data.format=chat: the tokenizer's chat template refuses an example: {error}") from None


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
        # the special tokens are the template's variables (bos_token, eos_token); the masking rule's version
        # keeps labels cached under an earlier rule from being read back
        specials = getattr(tokenizer, "special_tokens_map", {})
        settings = (config.format, config.train_on_prompt, getattr(tokenizer, "chat_template", None), specials)
        digest.update(json.dumps([*settings, _MASKING], sort_keys=True, default=str).encode())
    return digest
