"""Corpora larger than memory: streamed one document at a time into cached, memory-mapped token files,
giving the same splits and training rows as the same corpus loaded whole."""

from __future__ import annotations

import dataclasses
import json
import random
import tracemalloc

import numpy as np
import pytest

from peftkit import data
from peftkit.config import DataConfig
from peftkit.data import streaming
from peftkit.errors import PeftkitError
from tests.conftest import build_tokenizer, make_doc


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    streaming._INDEXES.clear()


def corpus(n: int, seed: int = 0, duplicates: int = 40) -> list[str]:
    rng = random.Random(seed)
    docs = [make_doc(rng) + f" case {i} ." for i in range(n)]
    for i in rng.sample(range(n), duplicates):  # exact duplicates up to case, later in the file
        docs.append(docs[i].upper())
    return docs


def write(tmp_path, docs: list[str], kind: str):
    if kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet

        path = tmp_path / "corpus.parquet"
        pyarrow.parquet.write_table(pa.Table.from_pylist([{"text": d} for d in docs]), path, row_group_size=100)
    elif kind == "instruction":
        path = tmp_path / "sft.jsonl"
        rows = [{"prompt": " ".join(d.split()[:3]), "response": d} for d in docs]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # a folder with its own splits
        path = tmp_path / "splits"
        path.mkdir()
        for split, part in (("train", docs[:-200]), ("validation", docs[-200:-100]), ("test", docs[-100:])):
            (path / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "instruction", "presplit"])
def test_a_streamed_corpus_gives_the_same_splits_and_rows_as_loaded_whole(tmp_path, kind):
    fmt = "instruction" if kind == "instruction" else "text"
    config = DataConfig(source=str(write(tmp_path, corpus(1500), kind)), format=fmt, dedup="exact",
                        streaming="off", validation_share=0.1, test_share=0.1)  # fmt: skip
    streamed = dataclasses.replace(config, streaming="on")
    tokenizer = build_tokenizer()
    for split in ("validation", "test"):
        assert data.load_split(streamed, split) == data.load_split(config, split)
    whole = data.load_split(config, "train")
    pairs = data.encode(tokenizer, whole, config)
    in_memory = data.PackedRows([p[0] for p in pairs], 64, seed=5, labels=[p[1] for p in pairs])
    documents = streaming.train_documents(streamed, tokenizer)
    assert isinstance(documents.ids, np.memmap) and len(documents) == len(whole)
    rows = data.PackedRows(documents, 64, seed=5)
    assert rows.rows_per_epoch == in_memory.rows_per_epoch and rows.loss_share() == in_memory.loss_share()
    for start in (0, 17, rows.rows_per_epoch - 1, rows.rows_per_epoch + 3):  # crossing into epoch 2
        for part in ("ids", "labels", "positions"):
            assert np.array_equal(rows.rows(start, 3, part), in_memory.rows(start, 3, part))
    sample = streaming.train_sample(streamed)
    assert sample and set(sample) <= set(whole)
    with pytest.raises(PeftkitError, match="streamed"):
        data.load_split(streamed, "train")


def test_streaming_holds_a_bounded_part_of_the_corpus_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "ENCODE_CHUNK", 64)  # a chunk's token lists are the rest of the peak
    monkeypatch.setattr(streaming, "TRAIN_SAMPLE", 200)
    monkeypatch.setattr(streaming, "HELD_OUT_DOCS", 200)
    rng = random.Random(1)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(6_000):  # ~2 KB per document, like a PubMed abstract
            f.write(json.dumps({"text": " ".join(make_doc(rng) for _ in range(12)) + f" {i}"}) + "\n")
    size = path.stat().st_size
    config = DataConfig(source=str(path), streaming="on", dedup="near")
    tokenizer, logs = build_tokenizer(), []
    warm_up = dataclasses.replace(config, source=str(write(tmp_path, corpus(300), "jsonl")))
    streaming.train_documents(warm_up, tokenizer)  # lazy imports happen here, not in the measurement
    tracemalloc.start()
    documents = streaming.train_documents(config, tokenizer, logs.append)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert documents.tokens > 6_000 * 200
    assert peak < size / 4, f"peak {peak / 2**20:.1f} MiB while streaming a {size / 2**20:.1f} MiB corpus"
    assert any("0 exact and 0 near duplicates" in line for line in logs)  # MinHash LSH found no false duplicates


def test_the_streamed_cache_is_keyed_by_content_and_tokenizer_and_never_half_written(tmp_path, monkeypatch):
    path = write(tmp_path, corpus(600), "jsonl")
    config = DataConfig(source=str(path), streaming="on")
    calls = []
    real = streaming.encode
    monkeypatch.setattr(streaming, "encode", lambda tok, docs, cfg: calls.append(len(docs)) or real(tok, docs, cfg))
    first = streaming.train_documents(config, build_tokenizer())
    again = streaming.train_documents(config, build_tokenizer())
    assert len(calls) == 1 and np.array_equal(first.ids, again.ids)
    other = build_tokenizer()
    other.add_tokens(["aspirin-like"])
    streaming.train_documents(config, other)  # a new tokenizer: tokenised again, the index reused
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "stream").iterdir())) == 1

    def fail(tok, docs, cfg):
        raise KeyboardInterrupt

    path.write_text(path.read_text() + json.dumps({"text": "a new document about aspirin"}) + "\n")
    monkeypatch.setattr(streaming, "encode", fail)
    with pytest.raises(KeyboardInterrupt):  # interrupted while tokenising the changed file
        streaming.train_documents(config, build_tokenizer())
    stream_cache = tmp_path / "cache" / "stream"
    assert not list(stream_cache.rglob("*.tmp-*"))
    assert len(list(stream_cache.glob("*/tokens-*"))) == 2  # the earlier entries, nothing half-written
    monkeypatch.setattr(streaming, "encode", real)
    assert len(streaming.train_documents(config, build_tokenizer())) == len(first) + 1


def test_bad_input_in_a_streamed_file_names_the_line_and_leaves_no_cache(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in corpus(300, duplicates=0)]
    lines[257] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PeftkitError, match=r"bad.jsonl line 258: malformed JSON"):
        data.load_split(DataConfig(source=str(path), streaming="on"), "validation")
    assert not (tmp_path / "cache" / "stream").exists() or not list((tmp_path / "cache" / "stream").rglob("*.json"))


def test_auto_streams_large_sources_and_refuses_what_needs_the_corpus_in_memory(tmp_path, monkeypatch):
    path = write(tmp_path, corpus(300), "jsonl")
    assert not streaming.active(DataConfig(source=str(path)))
    monkeypatch.setattr(streaming, "STREAM_ABOVE_BYTES", path.stat().st_size)
    assert streaming.active(DataConfig(source=str(path)))
    assert not streaming.active(DataConfig(source=str(path), streaming="off"))
    with pytest.raises(PeftkitError, match="data.folds: cross-validation pools the corpus in memory"):
        streaming.active(DataConfig(source=str(path), folds=3))
    with pytest.raises(PeftkitError, match="data.folds"):
        DataConfig(source=str(path), folds=3, streaming="on")
    with pytest.raises(PeftkitError, match="data.augment"):
        DataConfig(source=str(path), augment=["sentence_shuffle"], streaming="on")


def test_training_on_a_streamed_corpus(tiny_config, tmp_path):
    from peftkit import Trainer

    path = write(tmp_path, corpus(400, duplicates=0), "jsonl")
    config = dataclasses.replace(
        tiny_config, data=dataclasses.replace(tiny_config.data, source=str(path), streaming="on", replay=0.2)
    )
    logs = []
    trainer = Trainer(config, log=logs.append)
    report = trainer.fit()
    assert any("tokenising" in line and "streamed training documents" in line for line in logs)
    assert report["tuned"]["domain_ppl"] < report["base"]["domain_ppl"]
    leak = report["diagnostics"]["leakage"]["validation"]
    assert leak["sampled_from"] == streaming.train_stats(config.data)["train"]["documents"] == leak["train_docs"]


def test_preview_of_a_streamed_corpus_counts_from_the_index(tiny_config, tmp_path, monkeypatch):
    from peftkit.preview import preview

    monkeypatch.setattr(streaming, "TRAIN_SAMPLE", 300)  # the train split is counted from a sample
    path = write(tmp_path, corpus(1200), "jsonl")
    whole = dataclasses.replace(tiny_config.data, source=str(path), dedup="exact", streaming="off", seq_len=64)
    counts = {}
    for mode in ("off", "on"):
        config = dataclasses.replace(tiny_config, data=dataclasses.replace(whole, streaming=mode))
        counts[mode] = preview(config, timed_steps=1, log=lambda _: None)["splits"]
    assert counts["on"]["train"]["estimated"] and not counts["off"]["train"]["estimated"]
    for split in ("train", "validation", "test"):
        assert counts["on"][split]["documents"] == counts["off"][split]["documents"]
        assert counts["on"][split]["tokens"] == pytest.approx(counts["off"][split]["tokens"], rel=0.05)


def test_bench_data_quick_compares_both_ways_on_the_same_rows(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import write_jsonl

    rng = random.Random(0)
    docs = write_jsonl(tmp_path / "docs.jsonl", [make_doc(rng) for _ in range(120)])
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_data"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--sizes", "1", "--model", str(tiny_model_dir), "--docs", str(docs)],
        capture_output=True, text=True, env={**os.environ, "PEFTKIT_QUIET": "1"}, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    [run] = report["runs"]
    assert run["on"]["tokens"] == run["off"]["tokens"] > 100_000
    assert run["rows_identical"] is True  # ids, labels and positions compared exactly (else the script fails)
    assert run["on"]["peak_rss_mb"] > 0 and run["off"]["prepare_s"] > 0


def test_a_source_that_changes_between_the_passes_is_an_error_not_misaligned_rows():
    flags = np.array([True, False, True])
    assert list(streaming._aligned(iter(["a", "b", "c"]), flags, "x.jsonl")) == [("a", True), ("b", False), ("c", True)]
    for docs in (["a", "b"], ["a", "b", "c", "d"]):
        with pytest.raises(PeftkitError, match="x.jsonl changed while it was read"):
            list(streaming._aligned(iter(docs), flags, "x.jsonl"))


def test_a_csv_column_that_looks_numeric_at_first_is_still_read_as_text(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("id,text\n" + "".join(f"{i},{i}\n" for i in range(200_000)) + "5,a note about aspirin\n")
    docs = list(data.iter_documents(path, DataConfig()))  # read a block at a time
    assert len(docs) == 200_001 and docs[0] == "0" and docs[-1] == "a note about aspirin"


def test_the_trainer_reads_the_same_rows_streamed_or_whole_with_max_train_docs_and_replay(tiny_config, tmp_path):
    from peftkit import models
    from peftkit.data.training import build_training_data

    path = write(tmp_path, corpus(500), "jsonl")
    streams = {}
    for mode in ("off", "on"):
        config = dataclasses.replace(tiny_config, output_dir=str(tmp_path / mode), data=dataclasses.replace(
            tiny_config.data, source=str(path), streaming=mode, dedup="exact", max_train_docs=150, replay=0.25))  # fmt: skip
        tokenizer = models.load_tokenizer(config.model)
        streams[mode] = build_training_data(config, tokenizer, models.make_accelerator("no"), log=lambda _: None).stream
    whole, streamed = streams["off"], streams["on"]
    assert len(streamed.parts[0]) == 150 and streamed.tokens == whole.tokens
    for part in ("ids", "labels", "positions"):
        assert np.array_equal(streamed.rows(0, 40, part), whole.rows(0, 40, part))


def test_near_duplicates_are_found_streamed_as_in_memory(tmp_path):
    rng = random.Random(5)
    words = [f"w{i}" for i in range(3000)]
    originals = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(600)]
    near = []
    for i in rng.sample(range(4, 600), 50):  # one word of 120 changed: 5-gram Jaccard ~0.92
        changed = originals[i].split()
        changed[rng.randrange(120)] = "changed"
        near.append(" ".join(changed))
    copies = [f"{originals[3]} copy {k}" for k in range(30)]  # a long run of near copies: all meet the first
    path = write(tmp_path, originals + near + copies, "jsonl")
    whole = DataConfig(source=str(path), dedup="near", streaming="off", validation_share=0.1, test_share=0.1)
    streamed = dataclasses.replace(whole, streaming="on")
    logs = []
    for split in ("validation", "test"):
        assert data.load_split(streamed, split, log=logs.append) == data.load_split(whole, split)
    documents = streaming.train_documents(streamed, build_tokenizer())
    assert len(documents) == len(data.load_split(whole, "train")) and any("80 near" in line for line in logs)
