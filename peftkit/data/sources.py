"""Documents from the files people have, read one at a time, so that a corpus larger than memory can
stream through the same readers that load a small one whole.

Every reader yields the documents of a file in order, skipping empty ones; a record that cannot be
read raises `PeftkitError` naming the file and line (or row) and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from peftkit.config import DataConfig
from peftkit.errors import PeftkitError

TABLE_BATCH = 4096  # rows per record batch read from CSV, Parquet and saved datasets


def read_documents(
    path: Path, text_field: str = "text", template: str = "", config: DataConfig | None = None
) -> list[str]:
    """Documents of a .jsonl file (one object per line), a .txt file (blank-line-separated), or a
    .csv / .parquet table (one row per document). `template` ("{title}\n\n{abstract}") builds the
    text from several fields instead of taking `text_field`. With `config` in the instruction or chat
    format, each document is an example: its messages as a JSON list (see `data.encode`)."""
    spec = config or DataConfig(text_field=text_field, template=template)
    docs = list(iter_documents(path, spec))
    if not docs:
        raise PeftkitError(f"{path}: holds no documents")
    return docs


def iter_documents(path: Path, spec: DataConfig) -> Iterator[str]:
    """`read_documents`, one document at a time."""
    if not path.is_file():
        raise PeftkitError(f"{path}: no such data file")
    if path.suffix in (".csv", ".parquet"):
        yield from table_documents(path, spec, _table_batches(path))
    elif path.suffix == ".txt":
        if spec.format != "text":
            raise PeftkitError(
                f"{path}: a .txt file holds plain text; data.format={spec.format} needs .jsonl or a table"
            )
        yield from _text_blocks(path)
    elif path.suffix == ".jsonl":
        for number, line in _utf8_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PeftkitError(f"{path} line {number}: malformed JSON ({err.msg}); one object per line") from None
            text = record_document(record, spec, f"{path} line {number}")
            if text.strip():
                yield text
    else:
        raise PeftkitError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .txt, .csv or .parquet")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its "\\n" or "\\r\\n"); nothing else ends a line, since text may hold U+2028."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError:
                raise PeftkitError(f"{path} line {number}: not valid UTF-8; re-encode the file as UTF-8") from None


def read_utf8(path: Path) -> str:
    """A whole (small) file's text, or the line where it stops being UTF-8."""
    return "\n".join(line for _, line in _utf8_lines(path))


def _text_blocks(path: Path) -> Iterator[str]:
    """The blank-line-separated blocks of a text file, stripped."""
    block: list[str] = []
    for _, line in _utf8_lines(path):
        if line:
            block.append(line)
            continue
        text = "\n".join(block).strip()
        if text:
            yield text
        block = []
    text = "\n".join(block).strip()
    if text:
        yield text


def record_document(record, spec: DataConfig, where: str) -> str:
    """One record as a document: its text, or for instruction/chat its messages as a JSON list."""
    if not isinstance(record, dict):
        raise PeftkitError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if spec.format == "preference":
        from peftkit.alignment.pairs import pair_record

        return pair_record(record, spec, where)
    if spec.format == "instruction":
        prompt = _field_or_template(record, spec.prompt_field, spec.prompt_template, "data.prompt_template", where)
        response = _field_or_template(record, spec.response_field, "", "", where)
        return json.dumps([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    if spec.format == "chat":
        messages = record.get(spec.messages_field)
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PeftkitError(f"{where}: field '{spec.messages_field}' must be a list of {{role, content}} messages; "
                               "set data.messages_field")  # fmt: skip
        if not any(m["role"] == "assistant" for m in messages):
            raise PeftkitError(f"{where}: a chat example without an assistant turn has nothing to learn; "
                               "add the answer or drop the example")  # fmt: skip
        return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages])
    return _field_or_template(record, spec.text_field, spec.template, "data.template", where)


def _field_or_template(record: dict, field: str, template: str, template_key: str, where: str) -> str:
    if template:
        try:
            return template.format(**record)
        except KeyError as err:
            raise PeftkitError(
                f"{where}: no field {err} for {template_key}; fields here: {', '.join(record)}"
            ) from None
    if not isinstance(record.get(field), str):
        key = {"text": "data.text_field"}.get(field, "the data.*_field setting")
        raise PeftkitError(f"{where}: no string field '{field}'; set {key} to the field that holds it")
    return record[field]


def _table_batches(path: Path) -> Iterator:
    """Record batches of a CSV or Parquet file, read as they are needed."""
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.suffix == ".parquet":
            yield from pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=TABLE_BATCH)
        else:  # every column as text: a streamed CSV infers types from its first block only
            names = pyarrow.csv.open_csv(path).schema.names
            strings = pyarrow.csv.ConvertOptions(column_types=dict.fromkeys(names, pyarrow.string()))
            yield from pyarrow.csv.open_csv(path, convert_options=strings)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise PeftkitError(f"{path}: cannot read as {path.suffix[1:]} ({str(err).splitlines()[0]})") from None


def table_documents(where: Path | str, spec: DataConfig, batches: Iterable) -> Iterator[str]:
    """Documents of a table's record batches (a CSV / Parquet file, a `datasets` dataset), by column,
    template or format."""
    row = 0
    for batch in batches:
        columns = list(batch.schema.names)
        if spec.format == "text" and not spec.template:
            if spec.text_field not in columns:
                raise PeftkitError(
                    f"{where}: no column '{spec.text_field}' (columns: {', '.join(columns)}); set data.text_field"
                )
            texts = [t if isinstance(t, str) else "" for t in batch.column(spec.text_field).to_pylist()]
        else:
            texts = [record_document(r, spec, f"{where} row {row + i + 1}") for i, r in enumerate(batch.to_pylist())]
        row += batch.num_rows
        yield from (text for text in texts if text.strip())


def saved_dataset(path: Path, split: str, config: DataConfig) -> tuple[Iterator[str], bool]:
    """A `datasets` dataset saved with save_to_disk (memory-mapped, read batch by batch): the documents
    of its own `split` when it has train/validation/test splits (True), else of all its rows, to be
    split by content hash (False)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if {"train", "validation", "test"} <= set(loaded):
            return table_documents(path / split, config, loaded[split].data.table.to_batches(TABLE_BATCH)), True
        if set(loaded) != {"train"}:
            raise PeftkitError(f"data.source: {path} has splits {sorted(loaded)}; use train, validation and test, "
                               "or a single train split to be divided by content hash")  # fmt: skip
        loaded = loaded["train"]
    return table_documents(path, config, loaded.data.table.to_batches(TABLE_BATCH)), False


def source_documents(path: Path, split: str, config: DataConfig) -> tuple[Iterator[str], str, bool]:
    """(documents, where, presplit) of a resolved `data.source`: with presplit, the source's own
    `split`; otherwise all of its documents, to be divided by content hash."""
    if path.is_dir() and any((path / f"{name}.jsonl").exists() for name in ("train", "validation", "test")):
        file = path / f"{split}.jsonl"
        if not file.exists():
            raise PeftkitError(f"data.source: {path} has no {split}.jsonl; a folder source needs train, "
                               "validation and test .jsonl files, or point data.source at one file")  # fmt: skip
        return _nonempty(iter_documents(file, config), file), str(file), True
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        docs, presplit = saved_dataset(path, split, config)
        return docs, f"{path} ({split})" if presplit else str(path), presplit
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if files and config.format != "text":
            raise PeftkitError(
                f"data.source: {path} holds .txt files; data.format={config.format} needs .jsonl or a table"
            )
        if not files:
            raise PeftkitError(f"data.source: {path} holds no train.jsonl, saved dataset or .txt files")
        # one document per file
        return (text for text in (read_utf8(f).strip() for f in files) if text), str(path), False
    return _nonempty(iter_documents(path, config), path), str(path), False


def _nonempty(docs: Iterator[str], path: Path) -> Iterator[str]:
    """`docs`, or an error naming `path` when it yields none."""
    empty = True
    for doc in docs:
        empty = False
        yield doc
    if empty:
        raise PeftkitError(f"{path}: holds no documents")


def source_files(path: Path) -> list[Path]:
    """The files a resolved `data.source` reads, in a stable order (for its content key and size)."""
    if not path.exists():  # checked here too: the streaming size check stats the files before any reader runs
        raise PeftkitError(
            f"data.source: {path}: no such data file or folder; give a .jsonl, .txt, .csv or .parquet file, "
            "a folder of them, a saved dataset or asset:NAME"
        )
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
