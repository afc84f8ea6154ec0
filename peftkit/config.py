"""The one typed schema shared by the Python API, YAML files and `--section.key=value` flags.

Every field is documented once, in its `help` metadata; the CLI's help and the docs read it from
here. Values from YAML and the command line are coerced to the field's type and checked, and an
unknown key or an invalid value raises `PeftkitError` naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit import schema
from peftkit.alignment.config import AlignConfig
from peftkit.errors import PeftkitError
from peftkit.schema import option as _f
from peftkit.schema import require as _require


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "asset:smollm2-135m-instruct",
        "base model: 'asset:NAME' from the asset catalog, or a local transformers folder",
    )
    dtype: str = _f(
        "auto",
        "dtype of the frozen base weights; 'auto' = bf16 where the hardware computes it fast, else fp32",
        ("auto", "bf16", "fp16", "fp32"),
    )
    trust_remote_code: bool = _f(False, "allow model code shipped inside the model folder to run")
    allow_pickle: bool = _f(
        False, "allow pickled .bin weights (loaded with torch.load(weights_only=True)); safetensors only otherwise"
    )
    quantization: str = _f(
        "none",
        "load the frozen base quantized through bitsandbytes: 4-bit NormalFloat (QLoRA) or 8-bit",
        ("none", "nf4", "int8"),
    )
    adapter: str = _f(
        "",
        "a PEFT adapter folder (or a run folder: its adapter/) merged into the base weights as they "
        "load: the model a second stage (e.g. DPO after domain tuning) starts from and is compared with",
    )

    def __post_init__(self):
        _require(not self.adapter or self.quantization == "none", "model.adapter",
                 "cannot be merged into a quantized base; merge it first (peftkit merge) and quantize that")  # fmt: skip


AUGMENTATIONS = ("token_noise", "sentence_shuffle")
TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass
class DataConfig:
    source: str = _f(
        "asset:pubmed-abstracts",
        "domain corpus: 'asset:NAME'; a .jsonl, .txt, .csv or .parquet file, a folder of .txt files, or a "
        "`datasets` dataset saved with save_to_disk (split by content hash unless it has train/validation/test); "
        "or a folder with train.jsonl, validation.jsonl and test.jsonl",
    )
    text_field: str = _f("text", "JSONL field or table column that holds the document text")
    template: str = _f(
        "", "build the text from several fields instead, e.g. '{title}\\n\\n{abstract}' (Python format syntax)"
    )
    format: str = _f(
        "text",
        "text (continued pretraining: loss on every token), instruction (prompt/response fields) or chat (a "
        "messages list, rendered with the tokenizer's chat template); the last two train on responses only; "
        "preference: prompt/chosen/rejected (strings, or message lists) for train.objective=dpo",
        ("text", "instruction", "chat", "preference"),
    )
    prompt_field: str = _f("prompt", "instruction format: field with the prompt")
    prompt_template: str = _f(
        "", "instruction format: build the prompt from fields instead, e.g. 'Write the abstract of: {title}'"
    )
    response_field: str = _f("response", "instruction format: field with the response")
    messages_field: str = _f("messages", "chat format: field with the list of {role, content} messages")
    chosen_field: str = _f("chosen", "preference format: field with the preferred completion")
    rejected_field: str = _f("rejected", "preference format: field with the dispreferred completion")
    train_on_prompt: bool = _f(False, "instruction / chat: also put loss on prompt and user tokens")
    general_source: str = _f(
        "asset:wiki-general",
        "general-domain text for measuring forgetting ('asset:NAME', a .jsonl or .txt file); '' disables it",
    )
    seq_len: int = _f(512, "tokens per packed training row (documents joined by EOS)")
    max_train_docs: int | None = _f(None, "use at most this many training documents (after shuffling)")
    validation_share: float = _f(0.05, "share of documents hashed into validation when the source is one file")
    test_share: float = _f(0.05, "share of documents hashed into test when the source is one file")
    folds: int = _f(
        0,
        "k-fold cross-validation: pool train and validation, split them into this many folds by content hash; 0 = off",
    )
    fold: int = _f(0, "the fold held out for validation when data.folds > 0")
    dedup: str = _f(
        "near",
        "drop duplicate documents before splitting, keeping the first: 'exact' (same words, ignoring case and "
        "punctuation), 'near' (also 5-gram Jaccard >= 0.8), 'none'",
        ("near", "exact", "none"),
    )
    streaming: str = _f(
        "auto",
        "read the corpus one document at a time into memory-mapped token files (cached) instead of loading it "
        "whole: near duplicates by MinHash LSH, held-out splits keep their first 10,000 documents; 'auto' = for "
        "sources of 1 GiB+",
        ("auto", "on", "off"),
    )
    separate_documents: bool = _f(
        True,
        "in training, documents packed into one row do not attend to each other: position ids restart at each "
        "document, which transformers turns into a block-diagonal causal mask (any attention implementation)",
    )
    replay: float = _f(
        0.0,
        "share of training tokens drawn from general_source documents that no evaluation scores (the usual "
        "remedy for forgetting); 0 = off",
    )
    augment: list[str] = _f(
        [],
        "training-only augmentations, each measured by the guard: token_noise (inputs get random tokens, "
        "targets stay clean), sentence_shuffle (adds a copy of each document with its sentences reordered); "
        "NEFTune is method.neftune_alpha",
    )
    token_noise: float = _f(0.1, "token_noise: probability that an input token is replaced by a random one")

    def __post_init__(self):
        _require(self.seq_len >= 8, "data.seq_len", f"must be at least 8, got {self.seq_len}")
        _require(0 <= self.replay < 1, "data.replay", f"must be a share in [0, 1), got {self.replay}")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        _require(not unknown, "data.augment", f"unknown {unknown}; choose from {list(AUGMENTATIONS)}")
        _require(0 < self.token_noise < 1, "data.token_noise", f"must be in (0, 1), got {self.token_noise}")
        _require(self.format == "text" or "sentence_shuffle" not in self.augment, "data.augment",
                 "sentence_shuffle applies to format text only (it would reorder prompts and answers)")  # fmt: skip
        _require(
            self.max_train_docs is None or self.max_train_docs > 0,
            "data.max_train_docs",
            "must be a positive number or null",
        )
        _require(self.folds == 0 or self.folds >= 2, "data.folds", f"must be 0 (off) or at least 2, got {self.folds}")
        _require(
            0 <= self.fold < max(self.folds, 1), "data.fold", f"must be in [0, {max(self.folds, 1)}), got {self.fold}"
        )
        _require(self.streaming != "on" or not self.folds, "data.folds",
                 "cross-validation pools the corpus in memory; it cannot be used with data.streaming=on")  # fmt: skip
        _require(self.streaming != "on" or "sentence_shuffle" not in self.augment, "data.augment",
                 "sentence_shuffle copies the corpus in memory; it cannot be used with data.streaming=on")  # fmt: skip
        for key in ("validation_share", "test_share"):
            value = getattr(self, key)
            _require(0 < value < 0.5, f"data.{key}", f"must be between 0 and 0.5, got {value}")


@dataclass
class MethodConfig:
    name: str = _f(
        "lora",
        "adapter method, from the registry in peftkit/methods: lora, dora, adalora (LoRA whose ranks are "
        "re-allocated while training, from 1.5 x method.r to an average of method.r), qlora (lora on a model.quantization "
        "base), ia3, loha, lokr, prompt_tuning, prefix_tuning, top_layers (unfreeze the top blocks, no adapter)",
    )
    r: int = _f(16, "rank (LoRA, DoRA, LoHa, LoKr)")
    alpha: float = _f(32.0, "scaling numerator (scale = alpha / r; alpha / sqrt(r) with rslora)")
    dropout: float = _f(0.0, "dropout on the adapter input (LoRA family, LoHa/LoKr module dropout)")
    target_modules: list[str] = _f(
        ["attention"],
        "what to adapt, comma-separated on the command line: attention (each block's attention projections, "
        "fused or not), mlp, experts (MoE expert weights), all-linear, module names or suffixes (q_proj, "
        "attn.c_proj) or re:REGEX over module names; see docs/models.md",
    )
    layers: list[int] = _f([], "adapt only these block indices (peft layers_to_transform); empty = all blocks")
    auto_layers: int = _f(
        0,
        "adapt only the N blocks where the adapter's gradient on the first training batches is largest, measured "
        "before training (method.layers=auto; the scores and the choice are in report.json); 0 = off",
    )
    rslora: bool = _f(False, "rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r")
    init: str = _f(
        "default",
        "LoRA initialisation: default (B = 0), gaussian, pissa or olora (start from the weights' principal "
        "or QR directions; the saved adapter is converted to plain LoRA on the original base)",
        ("default", "gaussian", "pissa", "olora"),
    )
    lora_plus_ratio: float = _f(0.0, "LoRA+: learning rate of the B matrices = ratio x train.lr (e.g. 16); 0 = off")
    virtual_tokens: int = _f(20, "prompt_tuning / prefix_tuning: number of trained virtual tokens")
    top_layers: int = _f(2, "top_layers: how many of the last transformer blocks to unfreeze")
    unfreeze_pattern: str = _f(
        "", "top_layers: train the weights of modules whose name matches this regex instead (e.g. 'mlp|norm')"
    )
    neftune_alpha: float = _f(0.0, "NEFTune: uniform noise of scale alpha / sqrt(length x hidden) on input embeddings in training; 0 = off")  # fmt: skip

    def __post_init__(self):
        from peftkit import methods

        _require(self.name in methods.names(), "method.name", f"must be one of {methods.names()}, got {self.name!r}")
        for key in ("r", "virtual_tokens", "top_layers"):
            _require(getattr(self, key) > 0, f"method.{key}", f"must be positive, got {getattr(self, key)}")
        _require(0 <= self.dropout < 1, "method.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.target_modules), "method.target_modules", "must name at least one module")
        for entry in self.target_modules:
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as err:
                    _require(False, "method.target_modules", f"{entry!r} is not a valid regular expression ({err})")
        _require(all(i >= 0 for i in self.layers), "method.layers", f"block indices must be >= 0, got {self.layers}")
        _require(self.auto_layers >= 0, "method.auto_layers", f"must be >= 0, got {self.auto_layers}")
        if self.auto_layers:
            from peftkit.methods.layer_choice import check

            check(self)
        _require(self.lora_plus_ratio == 0 or self.lora_plus_ratio >= 1, "method.lora_plus_ratio",
                 f"must be 0 (off) or >= 1 (B learns faster than A), got {self.lora_plus_ratio}")  # fmt: skip
        _require(self.neftune_alpha >= 0, "method.neftune_alpha", f"must be >= 0, got {self.neftune_alpha}")
        if self.unfreeze_pattern:
            try:
                re.compile(self.unfreeze_pattern)
            except re.error as err:
                _require(False, "method.unfreeze_pattern", f"not a valid regular expression ({err})")


def duration_s(text: str) -> float | None:
    """'90s', '10m', '1.5h' or a bare number of seconds, in seconds (None when not a positive duration)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)] if match else 0
    return seconds or None


@dataclass
class TrainConfig:
    objective: str = _f(
        "lm",
        "lm: next-token loss on the data; dpo: preference pairs (data.format=preference), the "
        "model as it starts being the reference (docs/alignment.md)",
        ("lm", "dpo"),
    )
    max_steps: int = _f(100, "optimizer steps to train (unless train.time_budget is set)")
    time_budget: str = _f(
        "",
        "train for this long instead of train.max_steps, e.g. '90s', '10m', '1.5h': the steady step time is "
        "measured (the first step, with compilation, and evaluations do not count), the step count that fits is "
        "fixed, and the learning-rate schedule runs to it",
    )
    batch_size: int = _f(8, "packed rows per process per micro-batch")
    grad_accum: int = _f(1, "micro-batches accumulated into one optimizer step")
    lr: float = _f(2e-4, "peak learning rate")
    lr_schedule: str = _f("cosine", "decay after warmup", ("cosine", "linear", "constant"))
    warmup_steps: int = _f(10, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay on the trainable parameters")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 disables clipping")
    mixed_precision: str = _f(
        "auto", "autocast precision; 'auto' = bf16 where supported", ("auto", "bf16", "fp16", "no")
    )
    compile: str = _f(
        "auto",
        "regional torch.compile of the decoder layers (cached under $PEFTKIT_CACHE/inductor); 'auto' = for "
        "models of 50M+ parameters where a C++ compiler is found",
        ("auto", "true", "false"),
    )
    chunked_loss: bool = _f(
        True, "cross-entropy over chunks of 512 positions, recomputed in backward: all logits never exist at once"
    )
    gradient_checkpointing: bool = _f(
        False, "recompute each decoder layer in backward: far less activation memory, about 25% slower"
    )
    sharding: str = _f(
        "none",
        "multi-process runs: 'fsdp' shards the frozen base and the adapter across the processes (FSDP2, one "
        "decoder layer per unit), so each holds 1/N of the weights; 'none' = a whole copy per process (DDP). "
        "A launch config with distributed_type: FSDP (recipes/accelerate/fsdp.yaml) also selects 'fsdp'",
        ("none", "fsdp"),
    )
    collective_timeout: str = _f(
        "30m",
        "multi-process runs: how long a process waits for the others at one collective (gradient all-reduce, "
        "evaluation gather) before it stops the run with an error, so a process that died or stalled, on "
        "this machine or another, ends the run instead of hanging it (it must exceed the longest wait the main "
        "process imposes alone: preparing data or assets first, writing a checkpoint); a duration such as '90s'",
    )
    keep_checkpoints: int = _f(2, "newest checkpoints kept besides the best one")
    max_bad_steps: int = _f(3, "steps with a non-finite loss or gradient skipped before the run stops")
    log_every: int = _f(1, "steps between training-loss records in metrics.jsonl")
    resume: bool = _f(False, "continue from the newest complete checkpoint in output_dir")
    overwrite: bool = _f(False, "allow starting a new run in an output_dir that already holds one")
    progress: bool = _f(True, "show a progress bar")
    report_to: list[str] = _f(
        ["tensorboard"],
        "experiment trackers through Accelerate: tensorboard (event files in RUN_DIR/tb/), mlflow, wandb "
        "(when installed); [] = none",
    )

    def __post_init__(self):
        unknown = sorted(set(self.report_to) - set(TRACKERS))
        _require(not unknown, "train.report_to", f"unknown {unknown}; choose from {list(TRACKERS)} or []")
        for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, key)
            _require(value > 0, f"train.{key}", f"must be positive, got {value}")
        _require(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        _require(
            not self.time_budget or self.time_budget_s is not None,
            "train.time_budget",
            f"must be a duration such as '90s', '10m' or '1.5h', got {self.time_budget!r}",
        )
        _require(
            duration_s(self.collective_timeout) is not None,
            "train.collective_timeout",
            f"must be a duration such as '90s' or '10m', got {self.collective_timeout!r}",
        )
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
        _require(self.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0")
        _require(
            not (self.resume and self.overwrite),
            "train.resume",
            "cannot be combined with train.overwrite=true; choose one",
        )

    @property
    def time_budget_s(self) -> float | None:
        """train.time_budget in seconds (None when unset or not a positive duration)."""
        return duration_s(self.time_budget)

    @property
    def collective_timeout_s(self) -> float:
        return duration_s(self.collective_timeout)


@dataclass
class EvalConfig:
    every_steps: int = _f(25, "steps between held-out evaluations (and checkpoints)")
    val_tokens: int = _f(8192, "validation tokens scored at each evaluation during training")
    test_tokens: int = _f(
        32768,
        "tokens of the domain test split and of the general text scored for the final report, "
        "taken from the start of each set, packed into seq_len rows",
    )
    batch_size: int = _f(4, "rows per forward pass during evaluation")
    kshot: int = _f(
        3, "no-fine-tuning baseline: the base model answers QA with this many solved examples in the prompt; 0 = off"
    )
    prompt_tokens: int = _f(
        128,
        "no-fine-tuning baseline: the base model scores the domain test set with this many tokens of training "
        "documents in front of each row (context, not trained); 0 = off",
    )
    underfit_slope: float = _f(
        0.01, "underfitting: validation loss still falling by more than this share per evaluation at the end"
    )
    patience: int = _f(0, "stop after this many evaluations without improvement; 0 = never stop early")
    min_delta: float = _f(0.0, "validation-loss decrease that counts as an improvement")
    max_general_ppl_increase: float | None = _f(
        0.10,
        "forgetting budget: a checkpoint whose general-text perplexity exceeds the base model's by more "
        "than this fraction (e.g. 0.05) is never chosen as best, and the verdict rejects such a model",
    )
    max_general_kl: float | None = _f(
        None,
        "forgetting budget in nats per token: a checkpoint whose answers to general prompts diverge from the "
        "base model's by more KL than this is never chosen as best",
    )
    kl_prompts: bool = _f(True, "measure KL from the base model on a fixed set of general prompts at each evaluation")
    qa_source: str = _f("asset:mmlu", "multiple-choice questions (JSONL: subject, question, choices, answer)")
    qa_questions: int | str = _f(
        0,
        "questions per group (medical, general) scored base vs tuned at the end; 0 = skip; 'all' = every question "
        "of the medical MMLU subjects (1,089) and as many of the others (see docs/guard.md for its cost)",
        choices=("all",),
    )
    qa_half: str = _f(
        "all",
        "QA on every question, or only on those whose text hashes into the test half (the "
        "other half may have trained the run: recipes/medical_dpo.py)",
        ("all", "test"),
    )
    diagnostics: bool = _f(True, "memorisation and train/held-out leakage checks in the final report")
    cache: bool = _f(
        True,
        "reuse the base model's final-evaluation results (and the leakage check) from earlier runs of the same base "
        "and data ($PEFTKIT_CACHE/eval, keyed by hashes of both); false = recompute and rewrite them",
    )
    serving_tokens: int = _f(
        8,
        "serving cost in the final report: ms per token of greedy decoding this many tokens on 3 fixed prompts, "
        "adapter unmerged vs merged (seconds on a 135M model); 0 = skip",
    )
    min_domain_gain: float = _f(
        0.05,
        "relative drop in domain test perplexity the tuned model must reach for the verdict 'helped'; why 5%: "
        "docs/guard.md",
    )

    def __post_init__(self):
        for key in ("every_steps", "val_tokens", "test_tokens", "batch_size"):
            value = getattr(self, key)
            _require(value > 0, f"eval.{key}", f"must be positive, got {value}")
        _require(self.patience >= 0, "eval.patience", "must be >= 0")
        _require(self.min_delta >= 0, "eval.min_delta", "must be >= 0")
        _require(
            self.max_general_ppl_increase is None or self.max_general_ppl_increase >= 0,
            "eval.max_general_ppl_increase",
            "must be a fraction >= 0 (e.g. 0.05) or null",
        )
        _require(0 <= self.min_domain_gain < 1, "eval.min_domain_gain", "must be in [0, 1)")
        _require(self.max_general_kl is None or self.max_general_kl >= 0, "eval.max_general_kl", "must be >= 0 or null")
        _require(
            self.qa_questions == "all" or (isinstance(self.qa_questions, int) and self.qa_questions >= 0),
            "eval.qa_questions",
            f"must be a number of questions >= 0 or 'all', got {self.qa_questions!r}",
        )
        _require(self.kshot >= 0, "eval.kshot", "must be >= 0")
        _require(self.serving_tokens >= 0, "eval.serving_tokens", "must be >= 0")
        _require(self.prompt_tokens >= 0, "eval.prompt_tokens", "must be >= 0")
        _require(self.underfit_slope > 0, "eval.underfit_slope", "must be > 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    output_dir: str = _f("runs/peftkit", "run folder: checkpoints, adapter, metrics and report")
    seed: int = _f(0, "seed for data order, adapter initialisation and dropout")

    def __post_init__(self):
        _require((self.train.objective == "dpo") == (self.data.format == "preference"), "train.objective",
                 "dpo trains on pairs and pairs train only with dpo: set train.objective=dpo with data.format=preference")  # fmt: skip
        if self.method.name == "qlora":
            _require(self.model.quantization != "none", "model.quantization",
                     "method qlora trains LoRA on a quantized base: set model.quantization=nf4 (or int8)")  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "config") -> Config:
        """Build a config from nested dicts, rejecting unknown keys and invalid values."""
        return schema.build(cls, data, prefix="", origin=origin)

    def override(self, assignments: list[str], origin: str = "command line") -> Config:
        """Return a copy with `section.key=value` assignments applied, each value converted to its field's type.
        A train.max_steps given without a train.time_budget replaces the budget (a step count is what was asked)."""
        data = self.to_dict()
        keys = {item.lstrip("-").split("=", 1)[0] for item in assignments}
        if "train.max_steps" in keys and "train.time_budget" not in keys:
            data["train"]["time_budget"] = ""
        for item in assignments:
            text = item[2:] if item.startswith("--") else item
            if "=" not in text:
                raise PeftkitError(
                    f"{origin}: '{item}' is not an override; write it as --section.key=value, e.g. --train.max_steps=20"
                )
            dotted, raw = text.split("=", 1)
            *sections, key = dotted.split(".")
            node, path = data, []
            for section in sections:
                path.append(section)
                if not isinstance(node.get(section), dict):
                    schema.unknown(".".join(path), schema.keys(Config, path[:-1]), origin)
                node = node[section]
            if key not in node:
                schema.unknown(dotted, schema.keys(Config, sections), origin)
            node[key] = raw  # a string: schema.coerce converts it to the field's type
        return Config.from_dict(data, origin=origin)

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PeftkitError(f"{path}: no such config file") from None
        except UnicodeDecodeError:
            raise PeftkitError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path} line {mark.line + 1}" if mark else str(path)
            raise PeftkitError(f"{where}: invalid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PeftkitError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
        return cls.from_dict(data, origin=str(path))


def describe() -> list[tuple[str, str, Any, str]]:
    """Every config key as (dotted key, type, default, help), for --help and the docs."""
    return schema.describe(Config)
