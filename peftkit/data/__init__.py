"""Data: sources -> formats -> dedup and split -> tokenize (cached) -> packed rows.

One module per step, their public names re-exported here (`from peftkit import data; data.load_split`):

- `sources`: the files people have (JSONL, text, CSV / Parquet, saved datasets), one document at a time;
- `formats`: text, instruction and chat examples tokenised, with their loss masks;
- `splits`: which split, fold or `data.max_train_docs` subset a document belongs to (content hashes);
- `corpus`: the domain corpus's splits in memory, deduplicated before the split;
- `general`: the general-domain text, for the forgetting measure and for replay;
- `augment`: reordered sentences and token noise, for training documents only;
- `cache`: the token cache in $PEFTKIT_CACHE/tokens/;
- `packing`: training rows cut on demand, a pure function of (step, micro-batch, rank);
- `streaming`: corpora larger than memory, through the same steps without loading them whole;
- `training`: what a run reads, built once.
"""

from peftkit.data import streaming
from peftkit.data.augment import augment_documents, noise_tokens, shuffle_sentences
from peftkit.data.cache import encode_cached, tokenize_cached
from peftkit.data.corpus import load_split
from peftkit.data.formats import encode, encoding_key, eval_rows, plain_texts, tokenize
from peftkit.data.general import load_general, replay_documents
from peftkit.data.packing import IGNORE_INDEX, Documents, PackedRows
from peftkit.data.sources import iter_documents, read_documents, source_documents
from peftkit.data.splits import fold_of, kept_by_max_train_docs, split_of
from peftkit.data.training import Batch, TrainingData, build_training_data, training_documents, training_texts

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "Documents",
    "PackedRows",
    "TrainingData",
    "augment_documents",
    "build_training_data",
    "encode",
    "encode_cached",
    "encoding_key",
    "eval_rows",
    "fold_of",
    "iter_documents",
    "kept_by_max_train_docs",
    "load_general",
    "load_split",
    "noise_tokens",
    "plain_texts",
    "read_documents",
    "replay_documents",
    "shuffle_sentences",
    "source_documents",
    "split_of",
    "streaming",
    "tokenize",
    "tokenize_cached",
    "training_documents",
    "training_texts",
]
