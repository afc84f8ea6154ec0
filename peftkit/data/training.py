"""What a training run reads, built once: the packed training stream, the held-out rows scored at each
evaluation, and the training documents the guard's final checks look at.

`build_training_data` is the one place the training split is chosen (`data.max_train_docs`), augmented,
tokenized (cached), mixed with replayed general text and packed; `training_documents` is the choice
alone, shared with `peftkit preview` and with the final evaluation that `peftkit eval` repeats.
A micro-batch is a `Batch`, a pure function of (step, micro-batch, rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftkit.data import streaming
from peftkit.data.augment import augment_documents, noise_tokens
from peftkit.data.cache import encode_cached, tokenize_cached
from peftkit.data.corpus import load_split
from peftkit.data.formats import eval_rows, plain_texts
from peftkit.data.general import load_general, replay_documents
from peftkit.data.packing import Documents, PackedRows
from peftkit.data.splits import kept_by_max_train_docs
from peftkit.errors import PeftkitError


@dataclass
class Batch:
    """One micro-batch of packed rows, [rows, seq_len] each."""

    input_ids: torch.Tensor
    """What the model reads (token noise, when asked, is applied here only)."""
    labels: torch.Tensor
    """Next-token targets; -100 (IGNORE_INDEX) where no loss is taken."""
    position_ids: torch.Tensor | None = None
    """Positions restarting at each document (document separation), or None for plain causal rows."""

    def to(self, device) -> Batch:
        positions = None if self.position_ids is None else self.position_ids.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), positions)

    def model_inputs(self) -> dict:
        """Keyword arguments of the training forward."""
        extra = {} if self.position_ids is None else {"position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "labels": self.labels, **extra}


@dataclass
class TrainingData:
    """The training stream and the held-out rows of one run."""

    stream: PackedRows
    """Training rows (domain documents, and replayed general text when data.replay is set)."""
    val_sets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """(input_ids, labels) rows scored at every evaluation: 'domain' (validation split), 'general'."""
    documents: list[str]
    """Training documents as given (after data.max_train_docs; a sample when streamed): the leakage check."""
    texts: list[str]
    """The training documents as the model reads them (chat examples rendered): memorisation, prompted baseline."""
    val_docs: list[str]
    """The validation split's documents (memorisation and leakage compare against them)."""
    seed: int
    token_noise: float | None = None
    """data.token_noise when the token_noise augmentation is on: the share of input tokens replaced."""
    vocab_size: int = 0
    separate_documents: bool = True
    """Positions restart per document, so packed documents do not attend to each other."""

    def sample(self) -> Batch:
        """The first training row, clean and without positions: what the chunked-loss check runs on."""
        return Batch(self.stream.batch(0, 0, 0, 1, 1, 1), self.stream.batch(0, 0, 0, 1, 1, 1, part="labels"))

    def batch(self, step: int, micro: int, rank: int, world: int, rows: int, accum: int) -> Batch:
        """Micro-batch `micro` of optimizer step `step` for process `rank` of `world`."""
        where = (step, micro, rank, world, rows, accum)
        input_ids = self.stream.batch(*where)
        labels = self.stream.batch(*where, part="labels")
        positions = self.stream.batch(*where, part="positions") if self.separate_documents else None
        if self.token_noise is not None:  # noisy inputs, clean targets
            input_ids = noise_tokens(input_ids, self.token_noise, self.vocab_size, [self.seed, step, micro, rank])
        return Batch(input_ids, labels, positions)


def training_documents(config, seed: int, log=lambda _: None) -> list[str]:
    """The training documents a run uses, as given: the training split, or the seeded choice of
    data.max_train_docs from it; for a streamed corpus, the index's sample of it."""
    if streaming.active(config, log):
        return streaming.train_sample(config, log)
    docs = load_split(config, "train", log=log)
    kept = kept_by_max_train_docs(len(docs), config, seed)
    return docs if kept is None else [docs[i] for i in kept]


def training_texts(tokenizer, docs: list[str], config) -> list[str]:
    """Training documents as the model reads them: text as is, instruction and chat examples rendered."""
    return docs if config.format == "text" else plain_texts(tokenizer, docs[:512], config)


def build_training_data(config, tokenizer, accelerator, separate_documents: bool = True, log=print) -> TrainingData:
    """Everything the run reads from its data, checked before the first step (`config`: the run's Config)."""
    cfg = config.data
    if streaming.active(cfg, log):
        with accelerator.main_process_first():  # one process builds the token files, the others read them
            domain = streaming.train_documents(cfg, tokenizer, log)
        docs = training_documents(cfg, config.seed, log)  # the sample the final checks look at
        kept = kept_by_max_train_docs(len(domain), cfg, config.seed)
        if kept is not None:
            domain = domain.select(kept)
    else:
        docs = training_documents(cfg, config.seed, log)
        domain = _tokenized(config, tokenizer, docs, log)
    parts = [domain]
    if cfg.replay:
        parts.append(_replay(config, tokenizer, domain.tokens, log))
    stream = PackedRows(parts, cfg.seq_len, config.seed)
    if cfg.format != "text":
        carried = "responses and prompts" if cfg.train_on_prompt else "responses only"
        log(f"{cfg.format}: {stream.loss_share():.1%} of the training tokens carry loss ({carried})")
    needed = config.train.batch_size * accelerator.num_processes
    if stream.rows_per_epoch < needed:
        raise PeftkitError(
            f"data.source: the training split has {stream.tokens} tokens, {stream.rows_per_epoch} rows of "
            f"{cfg.seq_len}; one step needs {needed}. Add documents or lower data.seq_len / train.batch_size"
        )
    val_docs = load_split(cfg, "validation")
    val_sets = {"domain": eval_rows(tokenizer, val_docs, cfg.seq_len, config.eval.val_tokens, cfg)}
    general = load_general(cfg, log=log)
    if general:
        val_sets["general"] = eval_rows(tokenizer, general, cfg.seq_len, config.eval.val_tokens)
    noise = cfg.token_noise if "token_noise" in cfg.augment else None
    texts = training_texts(tokenizer, docs, cfg)
    return TrainingData(stream, val_sets, docs, texts, val_docs, config.seed, noise, len(tokenizer), separate_documents)


def _tokenized(config, tokenizer, docs: list[str], log) -> Documents:
    """The training documents augmented (data.augment) and tokenized through the cache."""
    cfg = config.data
    augmented, labels = augment_documents(docs, cfg, config.seed), None
    if cfg.format == "text":
        tokens = tokenize_cached(tokenizer, augmented, log)
    else:
        pairs = encode_cached(tokenizer, augmented, cfg, log)
        tokens, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(tokens) > len(docs):
        log(f"sentence_shuffle: {len(tokens) - len(docs):,} reordered copies added to {len(docs):,} documents")
    return Documents.from_arrays(tokens, labels)


def _replay(config, tokenizer, domain_tokens: int, log) -> Documents:
    """General text mixed into training at the share data.replay, loss on every token."""
    cfg = config.data
    general = load_general(cfg, log=log)
    if not general:
        raise PeftkitError("data.replay needs data.general_source (general-domain documents to replay)")
    wanted = int(domain_tokens * cfg.replay / (1 - cfg.replay))
    skip = max(config.eval.val_tokens, config.eval.test_tokens)  # the scored general text is never trained on
    replay = replay_documents(general, tokenizer, skip, wanted)
    log(f"replay: {sum(len(t) for t in replay):,} tokens of general text mixed into {domain_tokens:,} domain tokens")
    return Documents.from_arrays(replay)
