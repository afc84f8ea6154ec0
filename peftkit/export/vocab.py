"""The tokenizer as GGUF metadata, in the two shapes llama.cpp and transformers' GGUF loader both read:

- byte-level BPE (GPT-2 style: Llama 3, Qwen, SmolLM, GPT-2, StarCoder2): `tokenizer.ggml.model = "gpt2"`,
  tokens in the byte alphabet, merges and llama.cpp's name for the pre-tokenizer split (`pretokenizers.py`);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3): `tokenizer.ggml.model =
  "llama"`, "\u2581" for spaces, `<0xNN>` byte tokens typed BYTE, scores and the merges.

Special token ids and the chat template come from `gguf.SpecialVocab` (the reader llama.cpp's converter
uses); whether BOS/EOS are added is read from what the tokenizer actually does.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.export import pretokenizers


@dataclass
class Vocab:
    """What the GGUF file says about the tokenizer."""

    model: str
    """`tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)."""
    pre: str
    """`tokenizer.ggml.pre`: llama.cpp's name for how text is split before BPE."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    add_space_prefix: bool | None
    special: object
    """A `gguf.SpecialVocab`: special token ids, whether BOS/EOS are added, the chat template."""
    pre_how: str = "SentencePiece models have no pre-tokenizer name"
    """How `pre` was identified (llama.cpp's tokenizer hash, or the split rule it matched)."""

    @property
    def kind(self) -> str:
        return {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}[self.model]

    @property
    def description(self) -> str:
        if self.model == "llama":
            return "SentencePiece BPE tokenizer"
        return f"byte-level BPE tokenizer, pre-tokenizer {self.pre!r} by {self.pre_how}"

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def tokenizer_metadata(tokenizer, model_dir: Path, vocab_size: int) -> Vocab:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    byte_level = model.get("type") == "BPE" and _has(spec.get("pre_tokenizer"), "ByteLevel")
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not byte_level
    if not (byte_level or sentencepiece):
        raise PeftkitError(
            f"{model_dir}: GGUF export needs a byte-level BPE tokenizer (GPT-2 style, as in Llama 3, SmolLM, Qwen) "
            "or a SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma); "
            f"this one is {model.get('type') or type(tokenizer).__name__}"
        )
    if len(tokenizer) > vocab_size:
        raise PeftkitError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "resize the embeddings before exporting"
        )
    tokens, types = _tokens(spec, vocab_size, sentencepiece)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    common = {"tokens": tokens, "types": types, "merges": merges, "special": _special(tokenizer, model_dir, vocab_size)}
    if byte_level:
        pre, how = pretokenizers.identify(tokenizer, _parts(spec["pre_tokenizer"]), model_dir, spec.get("normalizer"))
        return Vocab(model="gpt2", pre=pre, pre_how=how, scores=None, add_space_prefix=None, **common)
    return Vocab(model="llama", pre="default", scores=_scores(tokens, merges), add_space_prefix=_prefix(spec), **common)


def _tokens(spec: dict, vocab_size: int, sentencepiece: bool) -> tuple[list[str], list[int]]:
    """One token and its llama.cpp type per embedding row; rows no token uses are `[PADn]`, UNUSED."""
    model = spec["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(_type("CONTROL" if added[i]["special"] else "USER_DEFINED"))
        elif i in by_id:
            tokens.append(by_id[i])
            byte = sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", by_id[i])
            types.append(_type("UNKNOWN" if by_id[i] == model.get("unk_token") else "BYTE" if byte else "NORMAL"))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_type("UNUSED"))
    return tokens, types


def _special(tokenizer, model_dir: Path, vocab_size: int):
    """Special token ids and the chat template as llama.cpp's converter reads them (`gguf.SpecialVocab`), and
    whether BOS/EOS are added as the tokenizer really does it, rather than as SpecialVocab guesses from the
    post-processor template."""
    import gguf

    gguf_log = logging.getLogger("gguf.vocab")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # its warnings about those guesses
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
    finally:
        gguf_log.setLevel(level)
    if isinstance(tokenizer.chat_template, str):
        special.chat_template = tokenizer.chat_template
    ids = tokenizer("a").input_ids
    special.add_special_token = {
        "bos": bool(ids) and ids[0] == tokenizer.bos_token_id,
        "eos": len(ids) > 1 and ids[-1] == tokenizer.eos_token_id,
    }
    return special


def _type(name: str) -> int:
    import gguf

    return int(getattr(gguf.TokenType, name))


def _parts(component) -> list[dict]:
    if not component:
        return []
    return component.get("pretokenizers") or component.get("normalizers") or [component]


def _has(component, kind: str) -> bool:
    return any(part.get("type") == kind for part in _parts(component))


def _prefix(spec: dict) -> bool:
    """Whether a "\u2581" is put before the text: Metaspace's prepend scheme, or a Prepend normalizer (legacy)."""
    metaspace = [p for p in _parts(spec.get("pre_tokenizer")) if p.get("type") == "Metaspace"]
    if metaspace:
        return metaspace[0].get("prepend_scheme", "always") != "never"
    return _has(spec.get("normalizer"), "Prepend")


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores for llama.cpp, which merges the pair whose result scores highest: a token
    made by merge r scores -r, so it merges in BPE's own order. Other tokens score 0 (no merge makes them)."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]
