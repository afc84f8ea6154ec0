"""Augmentation of the training documents (data.augment): reordered sentences and token noise.
Validation and test never pass here."""

from __future__ import annotations

import random
import re

import numpy as np
import torch

from peftkit.config import DataConfig

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def shuffle_sentences(doc: str, rng: random.Random) -> str:
    """The document with its sentences in another order (unchanged when it has fewer than two)."""
    sentences = _SENTENCE_END.split(doc.strip())
    if len(sentences) < 2:
        return doc
    order = list(range(len(sentences)))
    while order == sorted(order):
        rng.shuffle(order)
    return " ".join(sentences[i] for i in order)


def augment_documents(docs: list[str], config: DataConfig, seed: int) -> list[str]:
    """Training documents plus their augmented copies (data.augment); validation and test never pass here."""
    if "sentence_shuffle" not in config.augment:
        return docs
    rng = random.Random(seed)
    copies = [shuffle_sentences(doc, rng) for doc in docs]
    return docs + [copy for copy, doc in zip(copies, docs, strict=True) if copy != doc]


def noise_tokens(rows: torch.Tensor, share: float, vocab_size: int, key: list[int]) -> torch.Tensor:
    """`rows` with each token replaced by a random one with probability `share`, reproducibly for `key`
    (seed, step, micro-batch, rank), so a resumed run sees the same noise. Targets stay the clean rows."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
    replace = torch.rand(rows.shape, generator=generator) < share
    random_ids = torch.randint(0, vocab_size, rows.shape, generator=generator)
    return torch.where(replace, random_ids, rows)
