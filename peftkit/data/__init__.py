"""Data: sources -> formats -> dedup and split -> tokenize (cached) -> packed rows.

`sources` reads the files people have, one document at a time; `packing` cuts training rows on
demand; `streaming` carries corpora larger than memory through the same steps without loading
them whole. This module holds the steps between: splits, deduplication, the instruction and chat
formats, the token cache, replay and augmentation.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from peftkit import assets, dedup
from peftkit.config import DataConfig
from peftkit.corpora import split_of
from peftkit.data import streaming
from peftkit.data.formats import encode, encoding_key, eval_rows, plain_texts, tokenize  # noqa: F401
from peftkit.data.packing import IGNORE_INDEX, Documents, PackedRows  # noqa: F401
from peftkit.data.sources import iter_documents, read_documents, source_documents  # noqa: F401
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


def first_train_documents(config: DataConfig, n: int, log=lambda _: None) -> list[str]:
    """The first `n` training documents (of the training sample, for a streamed corpus)."""
    if streaming.active(config, log):
        return streaming.train_sample(config, log)[:n]
    return load_split(config, "train", log)[:n]


def kept_by_max_train_docs(count: int, config: DataConfig, seed: int) -> np.ndarray | None:
    """Indexes of the training documents that data.max_train_docs keeps (a seeded choice, nested as
    the number grows), or None when it keeps all."""
    if not config.max_train_docs:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[: config.max_train_docs].numpy()


def fold_of(text: str, folds: int) -> int:
    return int.from_bytes(hashlib.sha256(("fold:" + text).encode("utf-8")).digest()[:8], "big") % folds


def _source_split(config: DataConfig, split: str, log=lambda _: None) -> list[str]:
    path = assets.resolve(config.source, log=log)
    if streaming.active(config, log):
        if split == "train":
            raise PeftkitError("data.source is streamed (data.streaming): its training split is never loaded "
                               "whole; use data.streaming.train_documents or data.streaming.train_sample")  # fmt: skip
        return streaming.held_out(config, split, log)
    docs, where, presplit = source_documents(path, split, config)
    docs = _deduplicated(list(docs), config, where, log)
    if not presplit:
        docs = [d for d in docs if split_of("text:" + d, config.validation_share, config.test_share) == split]
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
                log(f"{where}: dropped {dropped['exact']:,} exact and {dropped['near']:,} near duplicates of "
                    f"{len(docs):,} documents (data.dedup={config.dedup})")  # fmt: skip
            if stored:
                _store(stored, keep=np.asarray(keep, dtype=np.int64))
        _DEDUPLICATED[key] = keep
    return [docs[i] for i in _DEDUPLICATED[key]]


def _store(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache file (.npz) atomically; a full or read-only cache never stops a run."""
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(partial, **arrays)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)


def load_general(config: DataConfig, log=lambda _: None) -> list[str] | None:
    """General-domain documents for measuring forgetting, or None when disabled."""
    if not config.general_source:
        return None
    path = assets.resolve(config.general_source, log=log)
    if path.is_dir():
        path = path / "general.jsonl"
    return read_documents(path, "text")


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


def tokenize_cached(tokenizer, docs: list[str], log=lambda _: None) -> list[np.ndarray]:
    """`tokenize`, remembered in $PEFTKIT_CACHE/tokens/ under a key made of the documents' text (so the
    files' content and every data setting that shapes them) and the tokenizer's full definition:
    a second run starts at once, and a change to any of them tokenises again."""
    return [ids for ids, _ in encode_cached(tokenizer, docs, None, log)]


def encode_cached(tokenizer, docs: list[str], config: DataConfig | None, log=lambda _: None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """`encode`, cached like `tokenize_cached`; instruction and chat examples add the chat template,
    the format and data.train_on_prompt to the key."""
    if len(docs) < 1000:  # small corpora tokenise in well under a second
        return encode(tokenizer, docs, config)
    text = config is None or config.format == "text"
    digest = encoding_key(tokenizer, config)
    for doc in docs:
        digest.update(doc.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    path = assets.cache_dir() / "tokens" / f"{digest.hexdigest()[:32]}.npz"
    if path.exists():
        try:
            with np.load(path) as stored:
                flat, ends = stored["flat"], stored["ends"]
                flat_labels = flat if text else stored["labels"]
            if len(ends) == len(docs):
                log(f"tokenised documents from the cache ({path.name})")
                ids, labels = np.split(flat, ends[:-1]), np.split(flat_labels, ends[:-1])
                return list(zip(ids, labels, strict=True))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    pairs = encode(tokenizer, docs, config)
    arrays = {"flat": np.concatenate([p[0] for p in pairs]), "ends": np.cumsum([len(p[0]) for p in pairs])}
    if not text:
        arrays["labels"] = np.concatenate([p[1] for p in pairs])
    _store(path, **arrays)
    return pairs


from peftkit.data.training import Batch, TrainingData, build_training_data, training_documents, training_texts  # noqa: E402,F401
