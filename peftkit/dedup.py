"""Near-duplicate detection between document sets (train vs held-out leakage, corpus hygiene).

A held-out score means little if the held-out documents were also trained on. Documents are
compared as sets of word 5-gram shingles; a pair whose Jaccard similarity reaches the threshold
is a near duplicate. Candidates come from an inverted index of the (smaller) held-out side, so
the cost grows with the number of shingles, not with the number of document pairs.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict

SHINGLE = 5
NEAR_DUPLICATE_JACCARD = 0.8
COMMON_SHINGLE = 64  # a shingle indexed for this many documents is boilerplate: stop indexing it
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = SHINGLE) -> set[int]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {hash(" ".join(words))} if words else set()
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def fingerprint(text: str) -> str:
    return hashlib.sha1(" ".join(_WORD.findall(text.lower())).encode()).hexdigest()


def matches(train: list[str], held_out: list[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> dict[int, tuple]:
    """{held-out index: (train index, Jaccard)} for each held-out document that training also holds,
    identical up to case and punctuation (Jaccard 1.0) or with 5-gram Jaccard >= threshold."""
    held_prints = {fingerprint(t): i for i, t in enumerate(held_out)}
    held_sets = [shingles(t) for t in held_out]
    index: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(held_sets):
        for h in s:
            index[h].append(i)
    found: dict[int, tuple[int, float]] = {}
    for j, text in enumerate(train):
        i = held_prints.get(fingerprint(text))
        if i is not None:
            found[i] = (j, 1.0)
            continue
        train_set = shingles(text)
        shared = Counter(i for h in train_set for i in index.get(h, ()))
        for i, common in shared.items():
            if common < threshold * len(held_sets[i]):
                continue  # Jaccard >= t needs at least t * |held-out shingles| in common
            jaccard = common / (len(train_set) + len(held_sets[i]) - common)
            if jaccard >= threshold and jaccard > found.get(i, (0, 0.0))[1]:
                found[i] = (j, round(jaccard, 3))
    return found


def find_leaks(train: list[str], held_out: list[str], threshold: float = NEAR_DUPLICATE_JACCARD, examples: int = 3):
    """Summary of `matches`: {"exact": n, "near": n, "held_out_docs": n, "share": fraction, "examples": [...]}."""
    found = matches(train, held_out, threshold)
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
