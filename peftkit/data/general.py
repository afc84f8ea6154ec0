"""General-domain text (data.general_source): read for the forgetting measure, and replayed into
training (data.replay) without the part that the general-text evaluations score."""

from __future__ import annotations

import numpy as np

from peftkit import assets
from peftkit.config import DataConfig
from peftkit.data.formats import tokenize
from peftkit.data.sources import read_documents
from peftkit.errors import PeftkitError


def load_general(config: DataConfig, log=lambda _: None) -> list[str] | None:
    """General-domain documents for measuring forgetting, or None when disabled."""
    if not config.general_source:
        return None
    path = assets.resolve(config.general_source, log=log)
    if path.is_dir():
        path = path / "general.jsonl"
    return read_documents(path, "text")


def replay_documents(general: list[str], tokenizer, reserved_tokens: int, wanted_tokens: int) -> list[np.ndarray]:
    """Tokenized general documents for replay: none of the first `reserved_tokens` tokens (which the
    general-text evaluations score), then whole documents until `wanted_tokens`, cycling if needed."""
    seen, free = 0, []
    for ids in tokenize(tokenizer, general):
        if seen >= reserved_tokens:
            free.append(ids)
        seen += len(ids)
    if not free:
        raise PeftkitError(
            f"data.replay: data.general_source has {seen} tokens, all scored by the general-text evaluations "
            f"(the first {reserved_tokens}); add general documents or lower eval.test_tokens / eval.val_tokens"
        )
    picked, total = [], 0
    while total < wanted_tokens:
        ids = free[len(picked) % len(free)]
        picked.append(ids)
        total += len(ids)
    return picked
