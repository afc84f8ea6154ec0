"""The domain corpus in memory: the documents of each split, deduplicated (data.dedup) before they are
split by content hash (or by the source's own splits, or into data.folds)."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext

import numpy as np

from peftkit import assets, dedup
from peftkit.alignment.pairs import split_key
from peftkit.config import DataConfig
from peftkit.data import streaming
from peftkit.data.cache import store
from peftkit.data.sources import source_documents
from peftkit.data.splits import fold_of, split_of
from peftkit.errors import PeftkitError


def load_split(config: DataConfig, split: str, log=lambda _: None) -> list[str]:
    """Documents of one split ('train', 'validation' or 'test') of the domain corpus.

    With `data.folds = K`, train and validation are pooled and cut into K folds by content hash;
    fold `data.fold` is the validation split and the others are the training split. Test stays put.
    """
    if config.folds and split in ("train", "validation"):
        pool = _source_split(config, "train", log) + _source_split(config, "validation", log)
        held = [fold_of(doc, config.folds) == config.fold for doc in pool]
        docs = [doc for doc, h in zip(pool, held, strict=True) if h == (split == "validation")]
        if not docs:
            raise PeftkitError(
                f"data.fold {config.fold} of {config.folds} leaves an empty {split} split; use fewer folds"
            )
        return docs
    return _source_split(config, split, log)


def _source_split(config: DataConfig, split: str, log=lambda _: None) -> list[str]:
    path = assets.resolve(config.source, log=log)
    if streaming.active(config, log):
        if split == "train":
            raise PeftkitError(
                "data.source is streamed (data.streaming): its training split is never loaded "
                "whole; use data.streaming.train_documents or data.streaming.train_sample"
            )
        return streaming.held_out(config, split, log)
    docs, where, presplit = source_documents(path, split, config)
    pairs = config.format == "preference"
    if pairs:  # pairs sharing a prompt are near-duplicates and all stay; only the very same pair is dropped
        docs = list(docs)
        kept = list(dict.fromkeys(docs)) if config.dedup != "none" else docs
        if len(kept) < len(docs):
            log(f"{where}: dropped {len(docs) - len(kept):,} repeated pairs of {len(docs):,}")
        docs = kept
    else:
        docs = _deduplicated(list(docs), config, where, log)
    if not presplit:
        key = split_key if pairs else lambda d: "text:" + d
        docs = [d for d in docs if split_of(key(d), config.validation_share, config.test_share) == split]
    if not docs:
        raise PeftkitError(f"data.source: {path} gives an empty {split} split; add documents")
    return docs


_DEDUPLICATED: dict[tuple, list[int]] = {}  # (mode, documents' hash) -> kept indexes: each split reads the source


def _deduplicated(docs: list[str], config: DataConfig, where: str, log=lambda _: None) -> list[str]:
    """`docs` without exact or near duplicates (data.dedup), the first of each group kept."""
    if config.dedup == "none":
        return docs
    key = (config.dedup, hashlib.sha256("\x00".join(docs).encode("utf-8", "surrogatepass")).hexdigest())
    if key not in _DEDUPLICATED:
        # near-duplicate search takes ~15 s per 30k documents: large corpora remember it on disk
        stored = assets.cache_dir() / "dedup" / f"{key[0]}-{key[1][:32]}.npz" if len(docs) >= 1000 else None
        try:
            with np.load(stored) if stored and stored.exists() else nullcontext() as found:
                keep = found["keep"].tolist() if found is not None else None
        except (OSError, ValueError, KeyError):
            keep = None  # a damaged cache entry is rebuilt below
        if keep is None:
            keep, dropped = dedup.unique(docs, near=config.dedup == "near")
            if dropped["exact"] or dropped["near"]:
                log(
                    f"{where}: dropped {dropped['exact']:,} exact and {dropped['near']:,} near duplicates of "
                    f"{len(docs):,} documents (data.dedup={config.dedup})"
                )
            if stored:
                store(stored, keep=np.asarray(keep, dtype=np.int64))
        _DEDUPLICATED[key] = keep
    return [docs[i] for i in _DEDUPLICATED[key]]
