"""Corpora larger than memory: read one document at a time, split and deduplicated on the fly,
tokenised into memory-mapped files, and cut into training rows on demand.

A streamed source is never held whole. It is read in passes, one document at a time:

1. the index (no tokenizer needed), two passes: the first finds duplicates, keeping the first of
   each group -- exact ones with a set of 8-byte fingerprints (~70 bytes per document), near ones
   (data.dedup=near) with MinHash LSH over signatures written to disk (448 bytes per document,
   deleted after) instead of the in-memory inverted index of every shingle; the second gives each
   kept document its split by content hash, keeps the first HELD_OUT_DOCS documents of validation
   and test as text for evaluation, and a seeded uniform sample of TRAIN_SAMPLE training documents
   for the leakage check, memorisation and the domain prompt;
2. the tokens: the training documents encoded ENCODE_CHUNK at a time and appended to flat files
   (4 bytes per token, one more for the loss mask of instruction and chat data), memory-mapped for
   training.

Both are cached under $PEFTKIT_CACHE/stream/, keyed by the source files' content and the data
settings (and for the tokens, the tokenizer), and are built in a temporary folder renamed into
place: an interrupted run leaves nothing half-written.

Everything else -- splits, formats, packing, replay -- is as in memory: with data.dedup=exact or
none a corpus trains on the same rows streamed or not; with near, MinHash estimates the Jaccard
similarity that the in-memory search computes, so a pair near the threshold can go either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from peftkit import assets
from peftkit.config import DataConfig
from peftkit.data.formats import encode, encoding_key
from peftkit.data.packing import IGNORE_INDEX, Documents
from peftkit.data.sources import source_documents, source_files
from peftkit.data.splits import split_of
from peftkit.dedup import BANDS, ROWS, fingerprint, lsh_duplicates, minhash
from peftkit.errors import PeftkitError
from peftkit.hashing import sha256_file
from peftkit.progress import bar

STREAM_ABOVE_BYTES = 1 << 30  # data.streaming=auto streams sources of 1 GiB and more
HELD_OUT_DOCS = 10_000  # validation / test documents kept as text: far more than the evaluation budgets read
TRAIN_SAMPLE = 10_000  # training documents sampled for the leakage check and memorisation
ENCODE_CHUNK = 4096  # documents tokenised at once
HELD_OUT = ("validation", "test")


def active(config: DataConfig, log=lambda _: None) -> bool:
    """Whether `data.source` streams: data.streaming=on, or auto and its files reach STREAM_ABOVE_BYTES."""
    if config.streaming == "off":
        return False
    size = sum(f.stat().st_size for f in source_files(assets.resolve(config.source, log=log)))
    if config.streaming == "auto" and size < STREAM_ABOVE_BYTES:
        return False
    if config.folds:
        raise PeftkitError("data.folds: cross-validation pools the corpus in memory, and data.source is streamed "
                           f"({size / 2**30:.1f} GiB); set data.streaming=off or data.folds=0")  # fmt: skip
    if "sentence_shuffle" in config.augment:
        raise PeftkitError("data.augment: sentence_shuffle copies the corpus in memory, and data.source is streamed "
                           f"({size / 2**30:.1f} GiB); drop it or set data.streaming=off")  # fmt: skip
    return True


def held_out(config: DataConfig, split: str, log=lambda _: None) -> list[str]:
    """The first HELD_OUT_DOCS documents of a held-out split, in source order."""
    docs = _read_texts(_index(config, log) / f"{split}.jsonl")
    if not docs:
        raise PeftkitError(f"data.source: {config.source} gives an empty {split} split; add documents")
    return docs


def train_sample(config: DataConfig, log=lambda _: None) -> list[str]:
    """A seeded uniform sample of up to TRAIN_SAMPLE training documents, in source order."""
    return _read_texts(_index(config, log) / "sample.jsonl")


def train_stats(config: DataConfig, log=lambda _: None) -> dict:
    """{"documents", "characters"} of the training split, and the same for the held-out splits."""
    return json.loads((_index(config, log) / "meta.json").read_text())


def train_documents(config: DataConfig, tokenizer, log=lambda _: None) -> Documents:
    """The training split's documents, tokenised (once; cached) into memory-mapped flat arrays."""
    index = _index(config, log)
    key = hashlib.sha256((index.parent.name + encoding_key(tokenizer, config).hexdigest()).encode()).hexdigest()
    folder = index.parent / f"tokens-{key[:32]}"
    text = config.format == "text"
    if not (folder / "meta.json").exists():
        flags = np.load(index / "train.npy")
        docs, _, _ = source_documents(assets.resolve(config.source), "train", config)
        log(f"data.source: tokenising {int(flags.sum()):,} streamed training documents into {folder}")
        with _building(folder) as tmp, open(tmp / "ids.bin", "wb") as ids_file, \
                open(tmp / "mask.bin", "wb") as mask_file:  # fmt: skip
            lengths, loss = array("q"), array("q")  # 8 bytes per document

            def flush(chunk: list[str]) -> None:
                pairs = encode(tokenizer, chunk, config)
                ids_file.write(np.concatenate([ids for ids, _ in pairs]).astype(np.uint32).tobytes())
                if not text:
                    mask_file.write(np.concatenate([lab != IGNORE_INDEX for _, lab in pairs]).tobytes())
                lengths.extend(len(ids) for ids, _ in pairs)
                loss.extend(len(ids) if text else int((lab != IGNORE_INDEX).sum()) for ids, lab in pairs)

            chunk = []
            with bar(total=int(flags.sum()), desc="tokenize", unit="doc", leave=False) as progress:
                for doc in (doc for doc, keep in _aligned(docs, flags, config.source) if keep):
                    chunk.append(doc)
                    if len(chunk) == ENCODE_CHUNK:
                        flush(chunk)
                        progress.update(len(chunk))
                        chunk = []
                if chunk:
                    flush(chunk)
            np.savez(tmp / "docs.npz", lengths=np.frombuffer(lengths, np.int64), loss=np.frombuffer(loss, np.int64))
            (tmp / "meta.json").write_text(json.dumps({"documents": len(lengths), "tokens": int(sum(lengths))}))
    else:
        log(f"data.source: streamed training tokens from the cache ({folder})")
    with np.load(folder / "docs.npz") as table:
        lengths, loss = table["lengths"], table["loss"]
    ids = np.memmap(folder / "ids.bin", dtype=np.uint32, mode="r")
    mask = None if text else np.memmap(folder / "mask.bin", dtype=np.bool_, mode="r")
    return Documents(ids, mask, np.cumsum(lengths) - lengths, lengths, loss)


# --- the index: splits, duplicates, held-out texts and the training sample -----------------------

_INDEXES: dict[tuple, Path] = {}  # (source, settings, files' size and time) -> index folder, per process


def _index(config: DataConfig, log) -> Path:
    path = assets.resolve(config.source, log=log)
    files = source_files(path)
    settings = (config.format, config.text_field, config.template, config.prompt_field, config.prompt_template,
                config.response_field, config.messages_field, config.validation_share, config.test_share,
                config.dedup, HELD_OUT_DOCS, TRAIN_SAMPLE)  # fmt: skip
    memo = (str(path), settings, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if memo not in _INDEXES:
        digest = hashlib.sha256(json.dumps(settings).encode())
        for f in files:  # the files' content, not their names or times, decides the key
            digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{sha256_file(f)}".encode())
        folder = assets.cache_dir() / "stream" / digest.hexdigest()[:32] / "index"
        if not (folder / "meta.json").exists():
            _build_index(config, path, folder, log)
        _INDEXES[memo] = folder
    return _INDEXES[memo]


def _build_index(config: DataConfig, path: Path, folder: Path, log) -> None:
    where, presplit = source_documents(path, "train", config)[1:]
    names = ("train", *HELD_OUT) if presplit else ("train",)  # sources with their own splits: dedup per split

    def documents(name: str) -> Iterator[str]:  # a fresh pass over one part of the source
        return source_documents(path, name, config)[0]

    log(f"data.source: streaming {where}: deduplicating (data.dedup={config.dedup}) and splitting")
    counts = {split: {"documents": 0, "characters": 0} for split in ("train", *HELD_OUT)}
    dropped, rng, sample = {"exact": 0, "near": 0}, random.Random(0), []
    with _building(folder) as tmp:
        keep = {name: _kept(documents(name), config, tmp / "minhash.u32", dropped) for name in names}
        held = {split: open(tmp / f"{split}.jsonl", "w", encoding="utf-8") for split in HELD_OUT}
        try:
            for name in names:
                flags = bytearray()
                for doc, kept in _aligned(documents(name), keep[name], where):
                    split = name if presplit else split_of("text:" + doc, config.validation_share, config.test_share)
                    flags.append(kept and split == "train")
                    if not kept:
                        continue
                    count = counts[split]
                    if split == "train":
                        _reservoir(sample, (count["documents"], doc), rng)
                    elif count["documents"] < HELD_OUT_DOCS:
                        held[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
                    count["documents"] += 1
                    count["characters"] += len(doc)
                if name == "train":
                    np.save(tmp / "train.npy", np.frombuffer(bytes(flags), dtype=np.bool_))
        finally:
            for f in held.values():
                f.close()
        if not counts["train"]["documents"]:
            raise PeftkitError(f"data.source: {where} gives an empty train split; add documents")
        with open(tmp / "sample.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for _, doc in sorted(sample))
        (tmp / "meta.json").write_text(json.dumps({**counts, "dropped": dropped}))
    log(f"data.source: {counts['train']['documents']:,} training, {counts['validation']['documents']:,} validation "
        f"and {counts['test']['documents']:,} test documents; dropped {dropped['exact']:,} exact and "
        f"{dropped['near']:,} near duplicates")  # fmt: skip


def _kept(docs: Iterator[str], config: DataConfig, scratch: Path, dropped: dict) -> np.ndarray:
    """Which documents survive data.dedup, the first of each group kept: exact duplicates by a set of
    8-byte fingerprints, near duplicates by MinHash LSH over signatures kept in `scratch` on disk."""
    seen: set[int] = set()
    near = config.dedup == "near"
    alive = bytearray()
    with open(scratch, "wb") as signatures:
        for doc in bar(docs, desc="dedup", unit="doc", leave=False):
            fresh = True
            if config.dedup != "none":
                printed = int(fingerprint(doc)[:16], 16)
                fresh = printed not in seen
                seen.add(printed)
            alive.append(fresh)
            if near:
                signatures.write(minhash(doc).tobytes() if fresh else bytes(4 * BANDS * ROWS))
    keep = np.frombuffer(bytes(alive), dtype=np.bool_).copy()
    dropped["exact"] += int((~keep).sum())
    if near and keep.any():
        duplicates = lsh_duplicates(np.memmap(scratch, dtype=np.uint32, mode="r").reshape(len(keep), -1), keep)
        dropped["near"] += int(duplicates.sum())
        keep &= ~duplicates
    scratch.unlink()
    return keep


def _aligned(docs: Iterator[str], flags: np.ndarray, source: str) -> Iterator[tuple[str, bool]]:
    """(document, its flag); the source must still hold as many documents as when its flags were made."""
    count = 0
    for count, doc in enumerate(docs, 1):
        if count > len(flags):
            break
        yield doc, bool(flags[count - 1])
    if count != len(flags):
        raise PeftkitError(f"data.source: {source} changed while it was read; run again to index it anew")


def _reservoir(sample: list, item: tuple, rng: random.Random) -> None:
    """Keep `sample` a uniform sample of up to TRAIN_SAMPLE of the items seen (item[0] = how many came before)."""
    if len(sample) < TRAIN_SAMPLE:
        sample.append(item)
    elif (slot := rng.randrange(item[0] + 1)) < TRAIN_SAMPLE:
        sample[slot] = item


def _read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@contextmanager
def _building(folder: Path) -> Iterator[Path]:
    """A temporary folder that becomes `folder` only when the block completes."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same folder first
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
