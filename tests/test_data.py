import json

import numpy as np
import pytest
import torch

from peftkit import PeftkitError
from peftkit.data import IGNORE_INDEX, PackedRows, eval_rows, read_documents, tokenize
from peftkit.data.splits import split_of
from tests.conftest import build_tokenizer


def test_read_documents_errors_name_file_and_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "a"}\n{"text": broken}\n')
    with pytest.raises(PeftkitError, match=r"c.jsonl line 2: malformed JSON"):
        read_documents(f)
    f.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(PeftkitError, match=r"c.jsonl line 2: no string field 'text'"):
        read_documents(f)
    f.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(PeftkitError, match=r"c.jsonl line 2: not valid UTF-8"):
        read_documents(f)
    f.write_text("\n")
    with pytest.raises(PeftkitError, match="holds no documents"):
        read_documents(f)
    t = tmp_path / "c.txt"
    t.write_text("first doc\nstill first\n\nsecond doc\n")
    assert read_documents(t) == ["first doc\nstill first", "second doc"]


def test_split_is_stable_and_roughly_proportional():
    keys = [f"pmid:{i}" for i in range(4000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    share = splits.count("test") / len(keys)
    assert 0.03 < share < 0.07


def test_packed_rows_cover_every_token_once_per_epoch_and_shard_disjointly():
    tokenizer = build_tokenizer()
    docs = tokenize(tokenizer, ["the patient received aspirin ."] * 7 + ["a king ruled the old city"] * 5)
    assert all(d[-1] == tokenizer.eos_token_id for d in docs)
    stream = PackedRows(docs, seq_len=8, seed=1)
    rows = stream.epoch_rows(0)
    assert rows.shape == (stream.tokens // 8, 8)
    # every token of the epoch comes from the documents, and only the tail that fills no row is dropped
    vocab = len(tokenizer)
    packed, source = np.bincount(rows.ravel(), minlength=vocab), np.bincount(np.concatenate(docs), minlength=vocab)
    assert (packed <= source).all() and (source - packed).sum() == stream.tokens % 8
    # two processes x two micro-batches read four disjoint, consecutive slices of the stream
    seen = [stream.batch(0, m, r, world=2, batch_size=1, grad_accum=2) for m in range(2) for r in range(2)]
    assert torch.equal(torch.cat(seen), stream.rows(0, 4))
    # a new epoch is a new order of the same documents
    assert not np.array_equal(stream.epoch_rows(1), rows) or len(docs) < 3


def test_eval_rows_respect_the_budget_and_mask_padding():
    tokenizer = build_tokenizer()
    docs = ["the patient received aspirin ."] * 10
    ids, labels = eval_rows(tokenizer, docs, seq_len=8, budget=20)
    assert ids.shape == (3, 8)
    assert (labels != IGNORE_INDEX).sum() == 20
    assert (labels[-1, 4:] == IGNORE_INDEX).all() and (ids[-1, 4:] == tokenizer.pad_token_id).all()


def test_single_file_source_is_split_by_content(tmp_path):
    from peftkit.config import DataConfig
    from peftkit.data import load_split

    f = tmp_path / "all.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc number {i}"}) + "\n" for i in range(400)))
    config = DataConfig(source=str(f))
    parts = {s: load_split(config, s) for s in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == 400
    assert not set(parts["train"]) & set(parts["test"])


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "first\u2028still first"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_documents(f) == ["first\u2028still first"]


def test_folds_partition_train_and_validation_and_leave_test_alone(corpus_dir):
    import dataclasses

    from peftkit.config import DataConfig
    from peftkit.data import load_split

    config = DataConfig(source=str(corpus_dir))
    pool = load_split(config, "train") + load_split(config, "validation")
    held_out = []
    for fold in range(3):
        folded = dataclasses.replace(config, folds=3, fold=fold)
        train, val = load_split(folded, "train"), load_split(folded, "validation")
        assert sorted(train + val) == sorted(pool) and val
        assert load_split(folded, "test") == load_split(config, "test")
        held_out += val
    assert sorted(held_out) == sorted(pool)  # every document is validated on exactly once
