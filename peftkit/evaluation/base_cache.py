"""The base model's side of the final evaluation, kept between runs of the same base model and data.

Every run of one base model on one corpus computes the same numbers for the base: its per-row NLL on
the domain test rows and the general text, the prompted (no fine-tuning) baseline, its QA picks with
and without solved examples; and the train/held-out leakage check depends on the documents alone.
They are about half of the guard's time, so they are stored in `$PEFTKIT_CACHE/eval/KEY.pt` and
reused. KEY is a sha256 of everything such a number depends on: the base model's files (sha256 of
each file in its folder: weights, config, tokenizer), the base's parameter dtypes as loaded and the
scoring path the method takes (chunked loss or full logits, QA through a KV cache or not), the exact
inputs (token ids of the rows, prefix, questions and solved examples, documents), the eval batch size,
the autocast dtype, the device (GPU name), the process count, the versions of torch, transformers,
peft and bitsandbytes, and the source of the scoring code itself. A hit is therefore the number the run
would have computed, to the last digit (tested: a run reproduces its first report with and without the
cache). A quantized base is never cached (training prepares it for k-bit training, `peftkit eval` does not).

`eval.cache=false` (or `peftkit eval RUN --recompute`) recomputes everything and rewrites the entries;
deleting `$PEFTKIT_CACHE/eval` clears them. A model that is not a local folder is never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from peftkit import assets, models
from peftkit.hashing import sha256_file_memo

FORMAT = 1  # bump when what an entry holds changes


def model_fingerprint(model_config) -> str | None:
    """sha256 over the base model's folder (every file's name and sha256) and its load settings; None
    when the model is not a local folder (nothing to hash: nothing is cached)."""
    ref = model_config.name_or_path
    folder = assets.resolve(ref) if assets.is_asset(ref) else Path(ref).expanduser()
    if not folder.is_dir():
        return None

    def hashed(folder: Path) -> list:
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        return [(f.name, sha256_file_memo(f)) for f in files]

    adapter = models.stage_adapter(model_config)  # a merged stage adapter is part of the base: never the plain base
    digest = hashlib.sha256(json.dumps(
        {"dtype": model_config.dtype, "quantization": model_config.quantization, "files": hashed(folder),
         **({"adapter": hashed(adapter)} if adapter else {})}, sort_keys=True).encode())  # fmt: skip
    return digest.hexdigest()


def _feed(digest, part: Any) -> None:
    """Every byte of `part` (tensors, lists, tuples, dicts, strings, numbers) into `digest`."""
    if isinstance(part, torch.Tensor):
        part = part.detach().cpu().contiguous()
        digest.update(f"tensor{tuple(part.shape)}{part.dtype}".encode())
        digest.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
    elif isinstance(part, (list, tuple)):
        digest.update(f"seq{len(part)}".encode())
        for item in part:
            _feed(digest, item)
    elif isinstance(part, dict):
        digest.update(f"map{len(part)}".encode())
        for key in sorted(part, key=str):
            _feed(digest, str(key))
            _feed(digest, part[key])
    elif part is None or isinstance(part, (str, int, float, bool)):
        digest.update(json.dumps(part).encode())
    else:
        raise TypeError(f"base_cache: cannot key on a {type(part).__name__}")


# The code that computes what is cached: an entry is reused only by the code that wrote it.
_SCORING = ("evaluation/base_cache.py", "evaluation/perplexity.py", "evaluation/qa.py", "evaluation/report.py",
            "loss.py", "dedup.py", "methods/__init__.py")  # fmt: skip


def _code_version() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _SCORING:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def _scoring_path(model) -> dict:
    """What decides how `model`'s base side is computed, beyond its weights: the base's parameter dtypes
    (dtype 'auto' resolved; quantized layers), whether the loss runs chunked or through the full logits, and
    whether QA runs through a KV cache (not for prompt learning)."""
    from peftkit import loss
    from peftkit.methods import is_prompt_learning

    inner = getattr(model, "module", model)
    return {
        "dtypes": sorted({str(p.dtype) for p in inner.parameters()}),
        "prompt_learning": bool(is_prompt_learning(inner)),
        "chunked": loss.decoder_and_head(model) is not None and not loss.regularised(model),
    }


class BaseCache:
    """Get-or-compute for the base model's results of one evaluation (`enabled`: eval.cache unless given;
    False: compute, then
    store, so that a recompute refreshes the entries; with `store=False` too: compute only). `hits` and
    `computed` name what came from where."""

    def __init__(self, config, accelerator=None, enabled: bool | None = None, store: bool = True, model=None):
        self.enabled = enabled = config.eval.cache if enabled is None else enabled
        self.accelerator = accelerator
        self.hits: list[str] = []
        self.computed: list[str] = []
        # a quantized base is prepared differently in training and in `peftkit eval`: never cached
        usable = (enabled or store) and config.model.quantization == "none"
        fingerprint = model_fingerprint(config.model) if usable else None
        self.folder = assets.cache_dir() / "eval" if fingerprint else None
        device = getattr(accelerator, "device", torch.device("cpu"))
        self.context = {
            "format": FORMAT,
            "code": _code_version(),
            "model": fingerprint,
            "scoring": _scoring_path(model) if model is not None and fingerprint else None,
            "batch_size": config.eval.batch_size,
            "mixed_precision": str(getattr(accelerator, "mixed_precision", "no")),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "processes": getattr(accelerator, "num_processes", 1),
            "packages": {name: _version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")},
        }

    def get(self, name: str, parts: tuple, compute: Callable[[], Any], model_free=False, collective=True) -> Any:
        """The stored value for (`name`, `parts`) or `compute()`'s, stored. `collective`: every process calls
        this and the main one decides hit or miss for all (compute() may hold collectives); False: the main
        process alone calls it. `model_free`: the value depends on `parts` alone, not on the model."""
        if self.folder is None:
            return compute()
        digest = hashlib.sha256(name.encode())
        _feed(digest, self.context if not model_free else {"format": FORMAT, "code": self.context["code"]})
        _feed(digest, parts)
        path = self.folder / f"{name}-{digest.hexdigest()[:32]}.pt"
        value = [self._load(path) if self.enabled and self._is_main() else None]
        if self.accelerator is not None and self.accelerator.num_processes > 1 and collective:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(value)
        if value[0] is not None:
            self.hits.append(name)
            return value[0]["value"]
        result = compute()
        self.computed.append(name)
        if self._is_main():
            self._store(path, result)
        return result

    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @staticmethod
    def _load(path: Path) -> dict | None:
        try:
            return torch.load(path, weights_only=True) if path.exists() else None
        except Exception:  # a damaged entry is recomputed and replaced, never trusted
            return None

    @staticmethod
    def _store(path: Path, value: Any) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
                torch.save({"value": value}, f)
            os.replace(f.name, path)  # atomic: a reader sees the old entry or the whole new one
        except OSError:  # a read-only or full cache costs time, never the run
            pass

    def summary(self) -> dict:
        return {"cache": self.enabled and self.folder is not None, "reused": sorted(set(self.hits)),
                "computed": sorted(set(self.computed))}  # fmt: skip


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
