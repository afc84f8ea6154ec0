"""The token cache: encodings of large corpora remembered in $PEFTKIT_CACHE/tokens/, and the atomic
writer that every in-memory data cache (tokens, deduplication) stores its arrays with."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from peftkit import assets
from peftkit.config import DataConfig
from peftkit.data.formats import encode, encoding_key


def store(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache file (.npz) atomically; a full or read-only cache never stops a run."""
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(partial, **arrays)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)


def tokenize_cached(tokenizer, docs: list[str], log=lambda _: None) -> list[np.ndarray]:
    """`tokenize`, remembered in $PEFTKIT_CACHE/tokens/ under a key made of the documents' text (so the
    files' content and every data setting that shapes them) and the tokenizer's full definition:
    a second run starts at once, and a change to any of them tokenises again."""
    return [ids for ids, _ in encode_cached(tokenizer, docs, None, log)]


def encode_cached(
    tokenizer, docs: list[str], config: DataConfig | None, log=lambda _: None
) -> list[tuple[np.ndarray, np.ndarray]]:
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
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # rebuilt below
            print(f"peftkit: cached tokens {path} are damaged ({type(err).__name__}); tokenising again",
                  file=sys.stderr, flush=True)  # fmt: skip
    pairs = encode(tokenizer, docs, config)
    arrays = {"flat": np.concatenate([p[0] for p in pairs]), "ends": np.cumsum([len(p[0]) for p in pairs])}
    if not text:
        arrays["labels"] = np.concatenate([p[1] for p in pairs])
    store(path, **arrays)
    return pairs
