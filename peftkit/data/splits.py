"""Which split, fold or subset a document belongs to: pure functions of its content or key and a seed,
so adding documents never moves existing ones and every process agrees without talking."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from peftkit.config import DataConfig


def split_of(key: str, validation_share: float = 0.05, test_share: float = 0.05) -> str:
    """Deterministic split by hashing a stable key: adding documents never moves existing ones."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test_share:
        return "test"
    if bucket < test_share + validation_share:
        return "validation"
    return "train"


def fold_of(text: str, folds: int) -> int:
    return int.from_bytes(hashlib.sha256(("fold:" + text).encode("utf-8")).digest()[:8], "big") % folds


def kept_by_max_train_docs(count: int, config: DataConfig, seed: int) -> np.ndarray | None:
    """Indexes of the training documents that data.max_train_docs keeps (a seeded choice, nested as
    the number grows), or None when it keeps all."""
    if not config.max_train_docs:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[: config.max_train_docs].numpy()
