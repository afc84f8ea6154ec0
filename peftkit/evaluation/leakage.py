"""Train/held-out leakage: exact and near-duplicate documents shared between splits.

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
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = SHINGLE) -> set[int]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {hash(" ".join(words))} if words else set()
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def _fingerprint(text: str) -> str:
    return hashlib.sha1(" ".join(_WORD.findall(text.lower())).encode()).hexdigest()


def find_leaks(train: list[str], held_out: list[str], threshold: float = NEAR_DUPLICATE_JACCARD, examples: int = 3):
    """Held-out documents that also occur in training, exactly or nearly.

    Returns {"exact": n, "near": n, "held_out_docs": n, "examples": [{"held_out": i, "train": j, "jaccard": s}]};
    `exact` counts documents identical up to case and punctuation, `near` the others with
    Jaccard >= threshold.
    """
    held_prints = {_fingerprint(t): i for i, t in enumerate(held_out)}
    held_sets = [shingles(t) for t in held_out]
    index: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(held_sets):
        for h in s:
            index[h].append(i)

    exact, near, found = set(), {}, []
    for j, text in enumerate(train):
        i = held_prints.get(_fingerprint(text))
        if i is not None:
            exact.add(i)
            found.append({"held_out": i, "train": j, "jaccard": 1.0})
            continue
        train_set = shingles(text)
        shared = Counter(i for h in train_set for i in index.get(h, ()))
        for i, common in shared.items():
            if i in exact or common < threshold * len(held_sets[i]):
                continue  # Jaccard >= t needs at least t * |held-out shingles| in common
            jaccard = common / (len(train_set) + len(held_sets[i]) - common)
            if jaccard >= threshold and jaccard > near.get(i, 0):
                near[i] = jaccard
                found.append({"held_out": i, "train": j, "jaccard": round(jaccard, 3)})
    near_only = {i for i in near if i not in exact}
    kept = sorted(found, key=lambda e: -e["jaccard"])[:examples]
    for example in kept:
        example["text"] = held_out[example["held_out"]][:100]
    return {"exact": len(exact), "near": len(near_only), "held_out_docs": len(held_out), "examples": kept}
