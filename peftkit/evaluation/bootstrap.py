"""Paired bootstrap intervals for the relative change in perplexity between two models on the same rows.

Both models score the same tokens of the same packed rows, so the change in perplexity is

    exp((sum of tuned NLL - sum of base NLL) / scored tokens) - 1

and its uncertainty comes from which test text was drawn. The units resampled (with replacement, seeded
by `config.seed`) are rows where documents fit in a row, and fixed blocks of consecutive rows where
documents are longer (rows of one long document are not independent evidence). Each resample draws as many
units as there are; the interval is a studentized bootstrap interval (see `change_interval`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from peftkit.data import IGNORE_INDEX

RESAMPLES = 2000  # enough for 2.5% tails to within ~0.3 percentage points of coverage
LEVEL = 0.95
MIN_UNITS = 16  # long documents are cut into blocks so that at least this many units are resampled


@dataclass(frozen=True)
class Units:
    """How one row set is cut into resampling units: `rows_per_unit` consecutive rows each."""

    rows: int
    rows_per_unit: int

    @property
    def count(self) -> int:
        return -(-self.rows // self.rows_per_unit)


def units(input_ids: torch.Tensor, labels: torch.Tensor, eos_token_id: int | None) -> Units:
    """Blocks of about one document: one row where documents are shorter than a row, more where they are
    longer, but never fewer than MIN_UNITS blocks where there are that many rows."""
    rows, seq_len = input_ids.shape
    scored = labels != IGNORE_INDEX  # padding is often the EOS token too: count only scored ones
    documents = int(((input_ids == eos_token_id) & scored).sum()) if eos_token_id is not None else 0
    tokens = int(scored.sum())
    per_document = tokens / max(documents, 1) / seq_len  # rows per document
    block = max(1, min(round(per_document), rows // MIN_UNITS))
    return Units(rows=rows, rows_per_unit=block)


def block_sums(values: torch.Tensor | np.ndarray, cut: Units) -> np.ndarray:
    """Per-row values summed over each unit of `cut` (the last unit may be shorter)."""
    values = np.asarray(values, dtype=np.float64)
    starts = np.arange(0, len(values), cut.rows_per_unit)
    return np.add.reduceat(values, starts) if len(values) else values


def change_interval(
    reference: np.ndarray, other: np.ndarray, tokens: np.ndarray, seed: int, resamples: int = RESAMPLES
) -> list[float]:
    """[low, high] of exp(sum(other - reference) / sum(tokens)) - 1, the relative change in perplexity from
    the `reference` model to the `other`, by paired resampling of the units (NLL sums and token counts per
    unit, the same units for both models)."""
    diff = np.asarray(other, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    low, high = ratio_interval(diff, tokens, seed, resamples)
    return [round(math.expm1(low), 6), round(math.expm1(high), 6)]


def ratio_interval(values: np.ndarray, tokens: np.ndarray, seed: int, resamples: int = RESAMPLES) -> list[float]:
    """LEVEL interval of sum(values) / sum(tokens) over resampled units (a per-token mean: NLL difference, KL).

    A studentized (bootstrap-t) interval: each resample's estimate is divided by its own standard error,
    which keeps the coverage near LEVEL when a few units moved much more than the rest (a skew that makes the
    plain percentile interval too short on the other side; measured in tests/test_verdict_calibration.py).
    """
    values, tokens = np.asarray(values, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    m = len(values)
    if m == 0 or tokens.sum() == 0:
        return [float("nan"), float("nan")]
    estimate = values.sum() / tokens.sum()
    error = _standard_error(values[None], tokens[None], np.array([estimate]))[0] if m > 1 else 0.0
    if m < 3 or error == 0:  # nothing varies (a no-op adapter), or too few units to see a spread
        return [estimate, estimate]
    rng = np.random.default_rng(seed)
    pivots = []
    for start in range(0, resamples, 256):  # a few MB at a time, whatever the number of units
        picks = rng.integers(0, m, size=(min(256, resamples - start), m))
        v, n = values[picks], tokens[picks]
        means = v.sum(axis=1) / n.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            pivots.append((means - estimate) / _standard_error(v, n, means))
    pivots = np.concatenate(pivots)
    pivots = pivots[np.isfinite(pivots)]  # a resample of one unit repeated has no spread
    tail = (1 - LEVEL) / 2
    upper, lower = np.quantile(pivots, [1 - tail, tail])
    return [float(estimate - upper * error), float(estimate - lower * error)]


def _standard_error(diff: np.ndarray, tokens: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Standard error of each row's ratio sum(diff) / sum(tokens), by linearisation (one row per sample)."""
    m = diff.shape[1]
    residuals = (diff - means[:, None] * tokens) / tokens.mean(axis=1, keepdims=True)
    return residuals.std(axis=1, ddof=1) / math.sqrt(m)


def paired_change(
    reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor], cut: Units, seed: int
) -> list[float]:
    """The interval of `other`'s perplexity change against `reference`'s, from per-row (NLL sums, tokens)."""
    (ref_sums, ref_tokens), (other_sums, other_tokens) = reference, other
    if not torch.equal(ref_tokens, other_tokens):
        raise ValueError("paired bootstrap: the two models must score the same tokens of the same rows")
    tokens = block_sums(ref_tokens, cut)
    return change_interval(block_sums(ref_sums, cut), block_sums(other_sums, cut), tokens, seed)
