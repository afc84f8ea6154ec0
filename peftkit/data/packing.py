"""Tokenized documents -> fixed-length packed rows, built on demand.

Training rows are the training documents in a seeded random order (a new order every epoch), each
followed by EOS, concatenated and cut into `seq_len`-token rows; the tail that does not fill a row is
dropped. Since the number of rows per epoch does not depend on the order, the rows of optimizer step
s, micro-batch m and process r are a pure function of (s, m, r): resuming needs only the step, and
every process reads a disjoint shard.

Rows are cut when asked for, from the documents' flat token arrays (which may be memory-mapped
files) and one epoch's order: memory is ~16 bytes per document, not per token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # label value that carries no loss


@dataclass
class Documents:
    """Tokenized documents as slices of flat arrays. A slice may be listed more than once (replayed
    general text cycles through its documents)."""

    ids: np.ndarray  # flat token ids of every document (np.memmap for a streamed corpus)
    mask: np.ndarray | None  # flat, parallel to ids: True where the token carries loss; None = all do
    starts: np.ndarray  # per document: where its tokens start in `ids`
    lengths: np.ndarray  # per document: how many tokens it has (EOS included)
    loss: np.ndarray  # per document: how many of its tokens carry loss

    @classmethod
    def from_arrays(cls, docs: list[np.ndarray], labels: list[np.ndarray] | None = None) -> Documents:
        """From one array per document (and labels parallel to them, -100 where there is no loss)."""
        slot_of: dict[int, int] = {}  # the same array listed twice (replay cycling) is stored once
        stored, slots = [], []
        for i, doc in enumerate(docs):
            if id(doc) not in slot_of:
                slot_of[id(doc)] = len(stored)
                stored.append(i)
            slots.append(slot_of[id(doc)])
        sizes = np.asarray([len(docs[i]) for i in stored], dtype=np.int64)
        offsets = np.cumsum(sizes) - sizes
        ids = np.concatenate([docs[i] for i in stored]).astype(np.int32) if stored else np.zeros(0, np.int32)
        mask = None
        if labels is not None:
            mask = np.concatenate([labels[i] != IGNORE_INDEX for i in stored]) if stored else np.zeros(0, bool)
        slots = np.asarray(slots, dtype=np.int64)
        lengths = sizes[slots]
        loss = lengths if labels is None else np.asarray([int((lab != IGNORE_INDEX).sum()) for lab in labels])
        return cls(ids, mask, offsets[slots], lengths, np.asarray(loss, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def select(self, index: np.ndarray) -> Documents:
        """These documents, in this order."""
        index = np.asarray(index, dtype=np.int64)
        return Documents(self.ids, self.mask, self.starts[index], self.lengths[index], self.loss[index])

    def piece(self, doc: int, offset: int, count: int, part: str) -> np.ndarray:
        """`count` tokens of document `doc` from `offset`: ids, labels or positions (`part`)."""
        if part == "positions":
            return np.arange(offset, offset + count, dtype=np.int64)
        start = int(self.starts[doc]) + offset
        ids = np.asarray(self.ids[start : start + count], dtype=np.int64)
        if part == "labels" and self.mask is not None:
            return np.where(self.mask[start : start + count], ids, IGNORE_INDEX)
        return ids


class PackedRows:
    """The training stream: epoch after epoch of shuffled, packed rows."""

    def __init__(self, docs, seq_len: int, seed: int, labels: list[np.ndarray] | None = None):
        """`docs`: `Documents`, a list of them (read as one corpus, in order), or one token array per
        document with `labels` parallel to them (-100 where there is no loss; None = the tokens)."""
        if isinstance(docs, Documents):
            docs = [docs]
        elif not docs or not isinstance(docs[0], Documents):
            docs = [Documents.from_arrays(docs, labels)]
        self.parts, self.seq_len, self.seed = docs, seq_len, seed
        self._offsets = np.cumsum([0] + [len(p) for p in docs])
        self._lengths = np.concatenate([p.lengths for p in docs])
        self.tokens = int(self._lengths.sum())
        self.rows_per_epoch = self.tokens // seq_len
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's document order and where each document ends in the epoch's token stream."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
            self._epochs[epoch] = (order, np.cumsum(self._lengths[order]))
            if len(self._epochs) > 2:  # a batch can cross into the next epoch, never further
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def row(self, index: int, part: str = "ids") -> np.ndarray:
        """Row `index` of the endless stream (crossing epochs as needed): token ids, labels or positions
        within their document (which restart at 0 where a document starts, so attention can keep
        documents apart)."""
        epoch, offset = divmod(index, self.rows_per_epoch)
        order, ends = self._order(epoch)
        begin = offset * self.seq_len
        k = int(np.searchsorted(ends, begin, side="right"))  # the document holding the row's first token
        pieces, filled = [], 0
        while filled < self.seq_len:
            doc = int(order[k])
            within = begin + filled - int(ends[k] - self._lengths[doc])
            count = min(int(self._lengths[doc]) - within, self.seq_len - filled)
            p = int(np.searchsorted(self._offsets, doc, side="right")) - 1
            pieces.append(self.parts[p].piece(doc - int(self._offsets[p]), within, count, part))
            filled, k = filled + count, k + 1
        return np.concatenate(pieces)

    def rows(self, start: int, count: int, part: str = "ids") -> torch.Tensor:
        """Rows `start .. start+count` of the endless stream: their token ids, labels or positions."""
        return torch.from_numpy(np.stack([self.row(i, part) for i in range(start, start + count)]))

    def epoch_rows(self, epoch: int, part: str = "ids") -> np.ndarray:
        """All of one epoch's rows (for inspection: this materialises the epoch)."""
        return self.rows(epoch * self.rows_per_epoch, self.rows_per_epoch, part).numpy()

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int,
              part: str = "ids") -> torch.Tensor:  # fmt: skip
        """Rows for one micro-batch of one process: disjoint across processes and micro-batches."""
        start = ((step * grad_accum + micro) * world + rank) * batch_size
        return self.rows(start, batch_size, part)

    def loss_share(self) -> float:
        """Share of the tokens that carry loss (1 for plain text)."""
        return float(sum(int(p.loss.sum()) for p in self.parts) / max(self.tokens, 1))

    def epoch_of(self, step: int, world: int, batch_size: int, grad_accum: int) -> float:
        return step * grad_accum * world * batch_size / self.rows_per_epoch
