"""Data sources: JSONL, text, CSV, Parquet, a folder of text files and a saved `datasets` dataset,
with a text field or a template over several fields, and errors that say where."""

from __future__ import annotations

import json
import re

import pytest

from peftkit.config import DataConfig
from peftkit.data import load_split, read_documents
from peftkit.errors import PeftkitError

ROWS = [{"title": f"Title {i}", "abstract": f"Abstract number {i} about aspirin.", "text": f"doc {i} text"}
        for i in range(60)]  # fmt: skip


def all_splits(config: DataConfig) -> dict[str, list[str]]:
    return {split: load_split(config, split) for split in ("train", "validation", "test")}


def test_csv_and_parquet_give_the_same_documents_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    table = pa.Table.from_pylist(ROWS)
    pyarrow.csv.write_csv(table, tmp_path / "docs.csv")
    pyarrow.parquet.write_table(table, tmp_path / "docs.parquet")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = [r["text"] for r in ROWS]
    for name in ("docs.csv", "docs.parquet", "docs.jsonl"):
        assert read_documents(tmp_path / name) == expected
        templated = read_documents(tmp_path / name, template="{title}\n\n{abstract}")
        assert templated[3] == "Title 3\n\nAbstract number 3 about aspirin."
    splits = all_splits(DataConfig(source=str(tmp_path / "docs.parquet"), validation_share=0.2, test_share=0.2))
    assert sorted(sum(splits.values(), [])) == sorted(expected) and all(splits.values())
    assert splits == all_splits(DataConfig(source=str(tmp_path / "docs.csv"), validation_share=0.2, test_share=0.2))


def test_a_folder_of_text_files_is_one_document_per_file(tmp_path):
    for i in range(40):
        (tmp_path / f"note{i:02d}.txt").write_text(f"Note {i}.\n\nSecond paragraph of note {i}.\n")
    splits = all_splits(DataConfig(source=str(tmp_path), validation_share=0.2, test_share=0.2))
    docs = sum(splits.values(), [])
    assert len(docs) == 40 and "Note 7.\n\nSecond paragraph of note 7." in docs


def test_a_saved_datasets_dataset_keeps_its_own_splits_or_is_hash_split(tmp_path):
    import datasets

    three = datasets.DatasetDict({split: datasets.Dataset.from_list(ROWS[i * 20 : (i + 1) * 20])
                                  for i, split in enumerate(["train", "validation", "test"])})  # fmt: skip
    three.save_to_disk(str(tmp_path / "three"))
    splits = all_splits(DataConfig(source=str(tmp_path / "three")))
    assert splits["validation"] == [r["text"] for r in ROWS[20:40]]
    one = datasets.Dataset.from_list(ROWS)
    one.save_to_disk(str(tmp_path / "one"))
    hashed = all_splits(DataConfig(source=str(tmp_path / "one"), template="{title}", validation_share=0.2,
                                   test_share=0.2))  # fmt: skip
    assert sorted(sum(hashed.values(), [])) == sorted(r["title"] for r in ROWS)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("text,other\n"), "holds no documents"),
        (lambda p: p.write_text("other\nvalue\n"), "no column 'text' \\(columns: other\\); set data.text_field"),
    ],
)
def test_bad_tables_say_what_is_wrong(tmp_path, make, message):
    path = tmp_path / "bad.csv"
    make(path)
    with pytest.raises(PeftkitError, match=message):
        read_documents(path)


def test_a_template_naming_a_missing_field_says_which_and_where(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"title": "a"}) + "\n")
    with pytest.raises(
        PeftkitError, match=r"docs.jsonl line 1: no field 'abstract' for data.template; fields here: title"
    ):
        read_documents(path, template="{title} {abstract}")


def test_tokenisation_cache_is_keyed_by_documents_and_tokenizer(tmp_path, monkeypatch, capsys):
    import random

    import numpy as np

    from peftkit import data
    from tests.conftest import build_tokenizer, make_doc

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    calls = []
    real = data.formats.tokenize
    monkeypatch.setattr(data.formats, "tokenize", lambda tok, docs: calls.append(len(docs)) or real(tok, docs))
    rng = random.Random(0)
    docs = [make_doc(rng) for _ in range(1200)]
    tokenizer = build_tokenizer()
    first = data.tokenize_cached(tokenizer, docs)
    again = data.tokenize_cached(tokenizer, docs)
    assert calls == [1200] and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 1
    data.tokenize_cached(tokenizer, docs[:-1] + [docs[-1] + " aspirin"])  # one document changed
    tokenizer.add_tokens(["aspirin-like"])  # the tokenizer changed
    data.tokenize_cached(tokenizer, docs)
    assert calls == [1200, 1200, 1200]
    entries = sorted((tmp_path / "tokens").glob("*.npz"))
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:200])  # half-written
    capsys.readouterr()
    assert len(data.tokenize_cached(build_tokenizer(), docs)) == 1200 and calls[-1] == 1200  # rebuilt, no error
    assert len(calls) == 4
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"peftkit: cached tokens \S+\.npz are damaged \(\w+\); tokenising again", line), line


def test_exact_and_near_duplicates_are_dropped_before_the_split_keeping_the_first(tmp_path):
    import random

    from peftkit.dedup import unique

    rng = random.Random(3)
    words = [f"w{i}" for i in range(500)]
    originals = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    near = originals[5].split()
    near[30] = "changed"  # one word of 60: 5-gram Jaccard 0.85
    exact = originals[7].upper() + " !"  # same words, other case and punctuation
    texts = [*originals, " ".join(near), exact]
    keep, dropped = unique(texts)
    assert keep == list(range(40)) and dropped == {"exact": 1, "near": 1}
    keep, dropped = unique(texts, near=False)
    assert keep == list(range(41)) and dropped == {"exact": 1, "near": 0}
    distant = originals[9].split()
    distant[10:30] = ["x"] * 20  # a third of the words changed: a different document
    assert unique([originals[9], " ".join(distant)])[0] == [0, 1]

    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    logs = []
    pooled = {mode: sum((load_split(DataConfig(source=str(source), dedup=mode), split, log=logs.append)
                         for split in ("train", "validation", "test")), [])  # fmt: skip
              for mode in ("near", "exact", "none")}  # fmt: skip
    assert sorted(pooled["near"]) == sorted(originals)
    assert len(pooled["exact"]) == 41 and len(pooled["none"]) == 42
    assert any("dropped 1 exact and 1 near duplicates of 42 documents" in line for line in logs)


def test_instruction_encodings_are_cached_with_their_labels_and_settings(tmp_path, monkeypatch):
    import random

    import numpy as np

    from peftkit import data
    from tests.conftest import build_tokenizer

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    calls = []
    real = data.encode
    monkeypatch.setattr(
        data.cache, "encode", lambda tok, docs, config: calls.append(len(docs)) or real(tok, docs, config)
    )
    rng = random.Random(0)
    config = DataConfig(format="instruction")
    docs = [json.dumps([{"role": "user", "content": f"the patient {rng.choice(['received', 'was given'])}"},
                        {"role": "assistant", "content": "aspirin ."}]) for _ in range(1100)]  # fmt: skip
    tokenizer = build_tokenizer()
    first = data.encode_cached(tokenizer, docs, config)
    again = data.encode_cached(tokenizer, docs, config)
    assert calls == [1100]
    for (ids, labels), (ids2, labels2) in zip(first, again, strict=True):
        assert np.array_equal(ids, ids2) and np.array_equal(labels, labels2)
    assert any((labels == -100).any() for _, labels in again)  # the prompt masking came back too
    data.encode_cached(tokenizer, docs, DataConfig(format="instruction", train_on_prompt=True))
    assert calls == [1100, 1100]  # another setting: encoded again
