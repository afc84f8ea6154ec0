"""Documents -> tokens -> fixed-length packed rows, and which rows each process reads at each step.

Training rows are the training documents in a seeded random order (a new order every epoch),
each followed by EOS, concatenated and cut into `seq_len`-token rows; the tail that does not fill
a row is dropped. Since the number of rows per epoch does not depend on the order, the rows of
optimizer step s, micro-batch m and process r are a pure function of (s, m, r): resuming needs
only the step, and every process reads a disjoint shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from peftkit import assets, dedup
from peftkit.config import DataConfig
from peftkit.corpora import split_of
from peftkit.errors import PeftkitError
from peftkit.progress import bar

IGNORE_INDEX = -100  # label value that carries no loss


def read_documents(
    path: Path, text_field: str = "text", template: str = "", config: DataConfig | None = None
) -> list[str]:
    """Documents of a .jsonl file (one object per line), a .txt file (blank-line-separated), or a
    .csv / .parquet table (one row per document). `template` ("{title}\n\n{abstract}") builds the
    text from several fields instead of taking `text_field`. With `config` in the instruction or chat
    format, each document is an example: its messages as a JSON list (see `encode`)."""
    spec = config or DataConfig(text_field=text_field, template=template)
    if not path.is_file():
        raise PeftkitError(f"{path}: no such data file")
    if path.suffix in (".csv", ".parquet"):
        docs = [text for text in _table_texts(path, spec) if text.strip()]
    else:
        docs = _text_file_documents(path, spec)
    if not docs:
        raise PeftkitError(f"{path}: holds no documents")
    return docs


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise PeftkitError(f"{path} line {line}: not valid UTF-8; re-encode the file as UTF-8") from None


def _text_file_documents(path: Path, spec: DataConfig) -> list[str]:
    content = _read_utf8(path)
    if path.suffix == ".txt":
        if spec.format != "text":
            raise PeftkitError(
                f"{path}: a .txt file holds plain text; data.format={spec.format} needs .jsonl or a table"
            )
        return [block.strip() for block in content.split("\n\n") if block.strip()]
    if path.suffix != ".jsonl":
        raise PeftkitError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .txt, .csv or .parquet")
    docs = []
    for number, line in enumerate(content.split("\n"), 1):  # not splitlines(): text may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PeftkitError(f"{path} line {number}: malformed JSON ({err.msg}); one object per line") from None
        text = _record_doc(record, spec, f"{path} line {number}")
        if text.strip():
            docs.append(text)
    return docs


def _record_doc(record, spec: DataConfig, where: str) -> str:
    """One record as a document: its text, or for instruction/chat its messages as a JSON list."""
    if not isinstance(record, dict):
        raise PeftkitError(f"{where}: expected a JSON object, got {type(record).__name__}")
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


def _table_texts(path: Path, spec: DataConfig, table=None) -> list[str]:
    """Documents of a CSV / Parquet file or a `datasets` table, by column, template or format."""
    if table is None:
        import pyarrow.csv
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path) if path.suffix == ".parquet" else pyarrow.csv.read_csv(path)
        except Exception as err:  # pyarrow raises several types for unreadable files
            raise PeftkitError(f"{path}: cannot read as {path.suffix[1:]} ({str(err).splitlines()[0]})") from None
    columns = list(table.column_names)
    if spec.format == "text" and not spec.template:
        if spec.text_field not in columns:
            raise PeftkitError(
                f"{path}: no column '{spec.text_field}' (columns: {', '.join(columns)}); set data.text_field"
            )
        return [t if isinstance(t, str) else "" for t in table.column(spec.text_field).to_pylist()]
    return [_record_doc(row, spec, f"{path} row {i + 1}") for i, row in enumerate(table.to_pylist())]


def load_split(config: DataConfig, split: str, log=lambda _: None) -> list[str]:
    """Documents of one split ('train', 'validation' or 'test') of the domain corpus.

    With `data.folds = K`, train and validation are pooled and cut into K folds by content hash;
    fold `data.fold` is the validation split and the others are the training split. Test stays put.
    """
    if config.folds and split in ("train", "validation"):
        pool = _source_split(config, "train", log) + _source_split(config, "validation", log)
        held = [fold_of(doc, config.folds) == config.fold for doc in pool]
        docs = [doc for doc, h in zip(pool, held, strict=True) if h == (split == "validation")]
        if not docs:
            raise PeftkitError(
                f"data.fold {config.fold} of {config.folds} leaves an empty {split} split; use fewer folds"
            )
        return docs
    return _source_split(config, split, log)


def fold_of(text: str, folds: int) -> int:
    return int.from_bytes(hashlib.sha256(("fold:" + text).encode("utf-8")).digest()[:8], "big") % folds


def _source_split(config: DataConfig, split: str, log=lambda _: None) -> list[str]:
    path = assets.resolve(config.source, log=log)
    if path.is_dir() and any((path / f"{name}.jsonl").exists() for name in ("train", "validation", "test")):
        file = path / f"{split}.jsonl"
        if not file.exists():
            raise PeftkitError(f"data.source: {path} has no {split}.jsonl; a folder source needs train, "
                               "validation and test .jsonl files, or point data.source at one file")  # fmt: skip
        return _deduplicated(read_documents(file, config=config), config, str(file), log)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        docs, presplit = _saved_dataset(path, split, config)
        if presplit:
            return _deduplicated(docs, config, f"{path} ({split})", log)
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if files and config.format != "text":
            raise PeftkitError(
                f"data.source: {path} holds .txt files; data.format={config.format} needs .jsonl or a table"
            )
        if not files:
            raise PeftkitError(f"data.source: {path} holds no train.jsonl, saved dataset or .txt files")
        docs = [text for text in (_read_utf8(f).strip() for f in files) if text]  # one document per file
    else:
        docs = read_documents(path, config=config)
    docs = _deduplicated(docs, config, str(path), log)
    docs = [d for d in docs if split_of("text:" + d, config.validation_share, config.test_share) == split]
    if not docs:
        raise PeftkitError(f"data.source: {path} gives an empty {split} split; add documents")
    return docs


_DEDUPLICATED: dict[tuple, list[int]] = {}  # (mode, documents' hash) -> kept indexes: each split reads the source


def _deduplicated(docs: list[str], config: DataConfig, where: str, log=lambda _: None) -> list[str]:
    """`docs` without exact or near duplicates (data.dedup), the first of each group kept."""
    if config.dedup == "none":
        return docs
    key = (config.dedup, hashlib.sha256("\x00".join(docs).encode("utf-8", "surrogatepass")).hexdigest())
    if key not in _DEDUPLICATED:
        # near-duplicate search takes ~15 s per 30k documents: large corpora remember it on disk
        stored = assets.cache_dir() / "dedup" / f"{key[0]}-{key[1][:32]}.npz" if len(docs) >= 1000 else None
        try:
            with np.load(stored) if stored and stored.exists() else nullcontext() as found:
                keep = found["keep"].tolist() if found is not None else None
        except (OSError, ValueError, KeyError):
            keep = None  # a damaged cache entry is rebuilt below
        if keep is None:
            keep, dropped = dedup.unique(docs, near=config.dedup == "near")
            if dropped["exact"] or dropped["near"]:
                log(f"{where}: dropped {dropped['exact']:,} exact and {dropped['near']:,} near duplicates of "
                    f"{len(docs):,} documents (data.dedup={config.dedup})")  # fmt: skip
            if stored:
                _store(stored, keep=np.asarray(keep, dtype=np.int64))
        _DEDUPLICATED[key] = keep
    return [docs[i] for i in _DEDUPLICATED[key]]


def _store(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache file (.npz) atomically; a full or read-only cache never stops a run."""
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(partial, **arrays)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)


def _saved_dataset(path: Path, split: str, config: DataConfig) -> tuple[list[str], bool]:
    """A `datasets` dataset saved with save_to_disk: its own train/validation/test splits when it has
    them (True), else all its rows, to be split by content hash (False)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if {"train", "validation", "test"} <= set(loaded):
            texts = _table_texts(path / split, config, loaded[split].data.table)
            return [t for t in texts if t.strip()], True
        if set(loaded) != {"train"}:
            raise PeftkitError(f"data.source: {path} has splits {sorted(loaded)}; use train, validation and test, "
                               "or a single train split to be divided by content hash")  # fmt: skip
        loaded = loaded["train"]
    return [t for t in _table_texts(path, config, loaded.data.table) if t.strip()], False


def load_general(config: DataConfig, log=lambda _: None) -> list[str] | None:
    """General-domain documents for measuring forgetting, or None when disabled."""
    if not config.general_source:
        return None
    path = assets.resolve(config.general_source, log=log)
    if path.is_dir():
        path = path / "general.jsonl"
    return read_documents(path, "text")


def tokenize(tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Token ids of each document with EOS appended, so packed documents stay separated."""
    eos, out, chunk = tokenizer.eos_token_id, [], 2048
    with bar(total=len(docs), desc="tokenize", unit="doc", disable=len(docs) <= 4 * chunk, leave=False) as progress:
        for start in range(0, len(docs), chunk):
            ids = tokenizer(docs[start : start + chunk], add_special_tokens=False)["input_ids"]
            out.extend(np.asarray([*row, eos], dtype=np.int64) for row in ids)
            progress.update(len(ids))
    return out


def eval_rows(tokenizer, docs: list[str], seq_len: int, budget: int, config: DataConfig | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The first `budget` tokens of `docs` (in order) packed into rows, with labels (in the
    instruction and chat formats, -100 on prompts, as in training).

    A last, partial row is padded and its padding carries no loss, so short sets are scored whole.
    """
    pieces, total = [], 0
    for start in range(0, len(docs), 64):  # tokenize only as much as the budget needs
        for ids, labels in encode(tokenizer, docs[start : start + 64], config):
            pieces.append((ids, labels))
            total += len(ids)
        if total >= budget:
            break
    flat = np.concatenate([p[0] for p in pieces])[:budget]
    flat_labels = np.concatenate([p[1] for p in pieces])[:budget]
    n_rows = -(-len(flat) // seq_len)
    input_ids = np.full(n_rows * seq_len, tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full(n_rows * seq_len, IGNORE_INDEX, dtype=np.int64)
    input_ids[: len(flat)] = flat
    labels[: len(flat)] = flat_labels
    return torch.from_numpy(input_ids).view(n_rows, seq_len), torch.from_numpy(labels).view(n_rows, seq_len)


def encode(tokenizer, docs: list[str], config: DataConfig | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input ids, labels) of each document.

    Text format: the tokens with EOS appended; every token carries loss. Instruction and chat: the
    messages rendered with the tokenizer's chat template (or "prompt\n" + response when it has
    none); labels are -100 outside the assistant turns unless `data.train_on_prompt`, and every
    example ends with EOS inside the loss, so the tuned model learns to stop.
    """
    if config is None or config.format == "text":
        return [(ids, ids) for ids in tokenize(tokenizer, docs)]
    out = []
    for doc in bar(docs, desc="encode", unit="example", disable=len(docs) < 2000, leave=False):
        ids, labels = _encode_example(tokenizer, json.loads(doc), config)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return out


def _encode_example(tokenizer, messages: list[dict], config: DataConfig) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if tokenizer.chat_template:

        def render(turns: list[dict], generation_prompt: bool) -> list[int]:
            return list(tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt,
                                                      return_dict=True)["input_ids"])  # fmt: skip

        ids, spans = render(messages, False), []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
                if render(messages[: i + 1], False) != ids[:end]:
                    raise PeftkitError("data.format=chat: the tokenizer's chat template renders a conversation "
                                       "differently from its beginning; cannot find the assistant turns")  # fmt: skip
                spans.append((start, end))
    else:
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise PeftkitError(f"data.format={config.format}: the tokenizer has no chat template, so only one "
                               "prompt and one response per example can be rendered")  # fmt: skip
        prompt = tokenizer(messages[0]["content"] + "\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"]
        ids, spans = prompt + answer, [(len(prompt), len(prompt) + len(answer))]
    last_start, last_end = spans[-1]
    if eos not in ids[last_start:last_end]:  # make sure the model learns to stop
        ids = ids[:last_end] + [eos] + ids[last_end:]
        spans[-1] = (last_start, last_end + 1)
    if config.train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def plain_texts(tokenizer, docs: list[str], config: DataConfig) -> list[str]:
    """Documents as the text the model reads (chat examples rendered), for memorisation and prompts."""
    if config.format == "text":
        return docs
    return [tokenizer.decode(ids.tolist()) for ids, _ in encode(tokenizer, docs, config)]


class PackedRows:
    """The training stream: epoch after epoch of shuffled, packed rows."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, seed: int, labels: list[np.ndarray] | None = None):
        """`labels`: per document, parallel to `docs` (-100 where there is no loss); None = the tokens."""
        self.docs, self.labels, self.seq_len, self.seed = docs, labels, seq_len, seed
        self.tokens = int(sum(len(d) for d in docs))
        self.rows_per_epoch = self.tokens // seq_len
        self._epoch, self._parts = -1, {}

    def epoch_rows(self, epoch: int, part: str = "ids") -> np.ndarray:
        """This epoch's rows of token ids, of their labels, or of their positions within their document
        (which restart at 0 where a document starts, so attention can keep documents apart)."""
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
            keep = self.rows_per_epoch * self.seq_len
            sources = {"ids": self.docs, "labels": self.labels if self.labels is not None else self.docs,
                       "positions": [np.arange(len(d)) for d in self.docs]}  # fmt: skip
            self._parts = {name: np.concatenate([arrays[i] for i in order])[:keep].reshape(-1, self.seq_len)
                           for name, arrays in sources.items()}  # fmt: skip
            self._epoch = epoch
        return self._parts[part]

    def rows(self, start: int, count: int, part: str = "ids") -> torch.Tensor:
        """Rows `start .. start+count` of the endless stream (crossing epochs as needed): their token
        ids, labels or positions (`part`)."""
        out = []
        for index in range(start, start + count):
            epoch, offset = divmod(index, self.rows_per_epoch)
            out.append(self.epoch_rows(epoch, part)[offset])
        return torch.from_numpy(np.stack(out))

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int,
              part: str = "ids") -> torch.Tensor:  # fmt: skip
        """Rows for one micro-batch of one process: disjoint across processes and micro-batches."""
        start = ((step * grad_accum + micro) * world + rank) * batch_size
        return self.rows(start, batch_size, part)

    def loss_share(self) -> float:
        """Share of the tokens that carry loss (1 for plain text)."""
        if self.labels is None:
            return 1.0
        return float(sum(int((lab != IGNORE_INDEX).sum()) for lab in self.labels) / max(self.tokens, 1))

    def epoch_of(self, step: int, world: int, batch_size: int, grad_accum: int) -> float:
        return step * grad_accum * world * batch_size / self.rows_per_epoch


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def shuffle_sentences(doc: str, rng: random.Random) -> str:
    """The document with its sentences in another order (unchanged when it has fewer than two)."""
    sentences = _SENTENCE_END.split(doc.strip())
    if len(sentences) < 2:
        return doc
    order = list(range(len(sentences)))
    while order == sorted(order):
        rng.shuffle(order)
    return " ".join(sentences[i] for i in order)


def augment_documents(docs: list[str], config: DataConfig, seed: int) -> list[str]:
    """Training documents plus their augmented copies (data.augment); validation and test never pass here."""
    if "sentence_shuffle" not in config.augment:
        return docs
    rng = random.Random(seed)
    copies = [shuffle_sentences(doc, rng) for doc in docs]
    return docs + [copy for copy, doc in zip(copies, docs, strict=True) if copy != doc]


def noise_tokens(rows: torch.Tensor, share: float, vocab_size: int, key: list[int]) -> torch.Tensor:
    """`rows` with each token replaced by a random one with probability `share`, reproducibly for `key`
    (seed, step, micro-batch, rank), so a resumed run sees the same noise. Targets stay the clean rows."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
    replace = torch.rand(rows.shape, generator=generator) < share
    random_ids = torch.randint(0, vocab_size, rows.shape, generator=generator)
    return torch.where(replace, random_ids, rows)


def replay_documents(general: list[str], tokenizer, reserved_tokens: int, wanted_tokens: int) -> list[np.ndarray]:
    """Tokenized general documents for replay: none of the first `reserved_tokens` tokens (which the
    general-text evaluations score), then whole documents until `wanted_tokens`, cycling if needed."""
    seen, free = 0, []
    for ids in tokenize(tokenizer, general):
        if seen >= reserved_tokens:
            free.append(ids)
        seen += len(ids)
    if not free:
        raise PeftkitError(
            f"data.replay: data.general_source has {seen} tokens, all scored by the general-text evaluations "
            f"(the first {reserved_tokens}); add general documents or lower eval.test_tokens / eval.val_tokens"
        )
    picked, total = [], 0
    while total < wanted_tokens:
        ids = free[len(picked) % len(free)]
        picked.append(ids)
        total += len(ids)
    return picked


def tokenize_cached(tokenizer, docs: list[str], log=lambda _: None) -> list[np.ndarray]:
    """`tokenize`, remembered in $PEFTKIT_CACHE/tokens/ under a key made of the documents' text (so the
    files' content and every data setting that shapes them) and the tokenizer's full definition:
    a second run starts at once, and a change to any of them tokenises again."""
    return [ids for ids, _ in encode_cached(tokenizer, docs, None, log)]


def encode_cached(tokenizer, docs: list[str], config: DataConfig | None, log=lambda _: None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """`encode`, cached like `tokenize_cached`; instruction and chat examples add the chat template,
    the format and data.train_on_prompt to the key."""
    if len(docs) < 1000:  # small corpora tokenise in well under a second
        return encode(tokenizer, docs, config)
    text = config is None or config.format == "text"
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    digest.update(f"eos={tokenizer.eos_token_id}".encode())
    if not text:
        settings = (config.format, config.train_on_prompt, getattr(tokenizer, "chat_template", None))
        digest.update(json.dumps(settings).encode())
    for doc in docs:
        digest.update(doc.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    path = assets.cache_dir() / "tokens" / f"{digest.hexdigest()[:32]}.npz"
    if path.exists():
        try:
            with np.load(path) as stored:
                flat, ends = stored["flat"], stored["ends"]
                flat_labels = flat if text else stored["labels"]
            if len(ends) == len(docs):
                log(f"tokenised documents from the cache ({path.name})")
                ids, labels = np.split(flat, ends[:-1]), np.split(flat_labels, ends[:-1])
                return list(zip(ids, labels, strict=True))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    pairs = encode(tokenizer, docs, config)
    arrays = {"flat": np.concatenate([p[0] for p in pairs]), "ends": np.cumsum([len(p[0]) for p in pairs])}
    if not text:
        arrays["labels"] = np.concatenate([p[1] for p in pairs])
    _store(path, **arrays)
    return pairs
