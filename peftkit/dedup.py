"""Near-duplicate detection between document sets (train vs held-out leakage, corpus hygiene).

A held-out score means little if the held-out documents were also trained on. Documents are
compared as sets of word 5-gram shingles; a pair whose Jaccard similarity reaches the threshold
is a near duplicate. Candidates come from an inverted index of the (smaller) held-out side, so
the cost grows with the number of shingles, not with the number of document pairs.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter, defaultdict

import numpy as np

SHINGLE = 5
NEAR_DUPLICATE_JACCARD = 0.8
COMMON_SHINGLE = 64  # a shingle indexed for this many documents is boilerplate: stop indexing it
# MinHash LSH for corpora too large for the inverted index: 14 bands of 8 hashes make a pair at Jaccard
# 0.8 a candidate with probability 1 - (1 - 0.8**8)**14 = 0.92 (0.85: 0.988, 0.9: 0.9998)
BANDS, ROWS = 14, 8
_PRIME = 4294967311  # the first prime above 2**32: above every crc32 shingle hash
_A, _B = (np.random.default_rng(0).integers(low, 2**31, BANDS * ROWS, dtype=np.uint64) for low in (1, 0))
_WORD = re.compile(r"\w+")


def _grams(text: str, n: int = SHINGLE) -> set[str]:
    """The text's word n-grams, lower-cased (all its words when it has fewer than n)."""
    words = _WORD.findall(text.lower())
    return {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))} if words else set()


def shingles(text: str, n: int = SHINGLE) -> set[int]:
    return {hash(gram) for gram in _grams(text, n)}


def fingerprint(text: str) -> str:
    return hashlib.sha1(" ".join(_WORD.findall(text.lower())).encode()).hexdigest()


def matches(train: list[str], held_out: list[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> dict[int, tuple]:
    """{held-out index: (train index, Jaccard)} for each held-out document that training also holds,
    identical up to case and punctuation (Jaccard 1.0) or with 5-gram Jaccard >= threshold."""
    held_prints: dict[str, list[int]] = defaultdict(list)  # a text held out twice is found twice
    for i, t in enumerate(held_out):
        held_prints[fingerprint(t)].append(i)
    held_sets = [shingles(t) for t in held_out]
    index: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(held_sets):
        for h in s:
            index[h].append(i)
    found: dict[int, tuple[int, float]] = {}
    for j, text in enumerate(train):
        same = held_prints.get(fingerprint(text))
        if same:
            found.update((i, (j, 1.0)) for i in same)  # and on: the same text may be near another held-out one
        train_set = shingles(text)
        shared = Counter(i for h in train_set for i in index.get(h, ()))
        for i, common in shared.items():
            if common < threshold * len(held_sets[i]):
                continue  # Jaccard >= t needs at least t * |held-out shingles| in common
            jaccard = common / (len(train_set) + len(held_sets[i]) - common)
            if jaccard >= threshold and jaccard > found.get(i, (0, 0.0))[1]:
                found[i] = (j, round(jaccard, 3))
    return found


def find_leaks_in(train: list[str], held_out: dict[str, list[str]], threshold=NEAR_DUPLICATE_JACCARD) -> dict:
    """`find_leaks` for several held-out sets at once ({"validation": docs, "test": docs}), reading the
    training side once: {"<set>": summary}."""
    texts = [text for docs in held_out.values() for text in docs]
    found = matches(train, texts, threshold)
    out, start = {}, 0
    for name, docs in held_out.items():
        mine = {i - start: hit for i, hit in found.items() if start <= i < start + len(docs)}
        out[name] = _summary(mine, train, docs)
        start += len(docs)
    return out


def find_leaks(train: list[str], held_out: list[str], threshold: float = NEAR_DUPLICATE_JACCARD, examples: int = 3):
    """Summary of `matches`: {"exact": n, "near": n, "held_out_docs": n, "share": fraction, "examples": [...]}."""
    return _summary(matches(train, held_out, threshold), train, held_out, examples)


def _summary(found: dict[int, tuple], train: list[str], held_out: list[str], examples: int = 3) -> dict:
    exact = sum(1 for _, jaccard in found.values() if jaccard == 1.0)
    kept = sorted(found.items(), key=lambda item: -item[1][1])[:examples]
    return {
        "exact": exact,
        "near": len(found) - exact,
        "held_out_docs": len(held_out),
        "train_docs": len(train),
        "share": len(found) / max(len(held_out), 1),
        "examples": [{"held_out": i, "train": j, "jaccard": jac, "text": held_out[i][:100]} for i, (j, jac) in kept],
    }


def unique(texts: list[str], near: bool = True, threshold: float = NEAR_DUPLICATE_JACCARD) -> tuple[list[int], dict]:
    """Indexes of the documents to keep -- the first of each group of exact (and, with `near`, near)
    duplicates, in order -- and counts {"exact": n, "near": n} of those dropped.

    Each document is compared with the kept ones through an inverted index of their shingles.
    Shingles shared by more than COMMON_SHINGLE kept documents (boilerplate) stop being indexed, which
    bounds the work; it can only under-count shared shingles, so it never invents a duplicate.
    """
    prints: set[str] = set()
    index: dict[int, list[int]] = defaultdict(list)
    sizes: dict[int, int] = {}
    keep, dropped = [], {"exact": 0, "near": 0}
    for i, text in enumerate(texts):
        printed = fingerprint(text)
        if printed in prints:
            dropped["exact"] += 1
            continue
        if near:
            own = shingles(text)
            shared = Counter(k for h in own for k in index.get(h, ()))
            if any(common / (len(own) + sizes[k] - common) >= threshold for k, common in shared.items()):
                dropped["near"] += 1
                continue
            for h in own:
                if len(index[h]) < COMMON_SHINGLE:
                    index[h].append(i)
            sizes[i] = len(own)
        prints.add(printed)
        keep.append(i)
    return keep, dropped


def minhash(text: str) -> np.ndarray:
    """The MinHash signature (BANDS * ROWS uint32) of the text's word 5-gram shingles, hashed with crc32
    so that it is the same in every process (Python's str hash is salted per process)."""
    grams = _grams(text)
    x = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
    if not len(x):
        return np.full(BANDS * ROWS, 2**32 - 1, dtype=np.uint32)
    return ((_A[:, None] * x[None, :] + _B[:, None]) % _PRIME).min(axis=1).astype(np.uint32)  # < 2**63: no overflow


def lsh_duplicates(signatures: np.ndarray, alive: np.ndarray, threshold: float = NEAR_DUPLICATE_JACCARD,
                   neighbours: int = 8) -> np.ndarray:  # fmt: skip
    """Which documents are near duplicates of an earlier kept one, keeping the first of each group like
    `unique`, from their MinHash signatures (N x BANDS*ROWS, may be memory-mapped); `alive` marks the
    documents still in play. Memory: ~60 bytes per document for the band being read, plus 8 bytes per
    distinct near-duplicate pair found.

    Documents sharing a band's 8 hashes are candidates (each paired with the first `neighbours` and
    the `neighbours` just before it among those sharing the band), and a candidate pair is a near
    duplicate when the share of equal hashes, an estimate of the Jaccard similarity, reaches
    `threshold`.
    """
    index, found = np.flatnonzero(alive), []
    for band in range(BANDS):
        rows = np.asarray(signatures[index, band * ROWS : (band + 1) * ROWS], dtype=np.uint64)
        key = rows[:, 0]
        for column in range(1, ROWS):  # FNV-style mixing of the band's hashes into one 64-bit key (wraps)
            key = (key * np.uint64(0x100000001B3)) ^ rows[:, column]
        order = np.argsort(key, kind="stable")  # stable: within a key, documents stay in corpus order
        key, members = key[order], index[order]
        position = np.arange(len(key))
        first = np.maximum.accumulate(np.where(np.r_[True, key[1:] != key[:-1]], position, 0))  # of the key's run
        for d in range(neighbours):
            # each document meets the first documents of its run (the earliest, most likely kept: a
            # long run of copies all meet the original) and the ones just before it
            for earlier in (first + d, position - d - 1):
                valid = (earlier >= first) & (earlier < position)
                found.append(_similar(signatures, members[earlier[valid]], members[valid], threshold))
        found = [np.unique(np.concatenate(found))]  # a pair found in several bands is kept once
    dropped = np.zeros(len(alive), dtype=bool)
    pairs = found[0] if found else np.zeros(0, dtype=np.int64)
    earlier, later = pairs >> 32, pairs & 0xFFFFFFFF
    order = np.lexsort((earlier, later))  # by the later document
    for i, j in zip(earlier[order].tolist(), later[order].tolist(), strict=True):
        if not dropped[i]:  # final by now: every pair ending at i came before
            dropped[j] = True
    return dropped


def _similar(signatures: np.ndarray, earlier: np.ndarray, later: np.ndarray, threshold: float) -> np.ndarray:
    """The pairs (as earlier << 32 | later) whose share of equal MinHash values reaches `threshold`,
    compared a block at a time so that memory stays small however many candidates there are."""
    out = []
    for start in range(0, len(later), 1 << 16):
        e, j = earlier[start : start + (1 << 16)], later[start : start + (1 << 16)]
        agree = (np.asarray(signatures[e]) == np.asarray(signatures[j])).mean(axis=1) >= threshold
        out.append((e[agree].astype(np.int64) << 32) | j[agree].astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
