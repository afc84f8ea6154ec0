"""Tokenizers for the GGUF export tests, built locally with the `tokenizers` library (nothing downloaded).

- `byte_level()`: GPT-2 style byte-level BPE, as in Llama 3, Qwen, SmolLM, GPT-2, StarCoder2.
- `sentencepiece(style)`: SentencePiece-style BPE with byte fallback, shaped like the tokenizer.json files
  transformers writes for SentencePiece models: "metaspace" (Llama 2 / Mistral: a Metaspace pre-tokenizer
  that prepends "\u2581"), "legacy" (Phi-3: Prepend + Replace normalizers, no pre-tokenizer, its added
  <|endoftext|> and <|end|>) and "gemma"
  (Replace normalizer, no prefix space, Gemma's special-token order).
"""

from __future__ import annotations

import json
import random

from tests.conftest import general_doc, make_doc

# what the tests encode: the export's own check texts come on top; this one needs byte fallback
SAMPLE = "Ünïcödé, digits 12345 and  double  spaces\n\tnewline. Unseen: € ☃ 🙂"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def training_texts(extra=()) -> list[str]:
    rng = random.Random(0)
    return [make_doc(rng) for _ in range(200)] + [general_doc(rng) for _ in range(200)] + list(extra)


def byte_level(extra=()):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(training_texts(extra), vocab_size=400, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def sentencepiece(style: str = "metaspace", extra=()):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    gemma = style == "gemma"
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    bos, eos, unk = ("<bos>", "<eos>", "<unk>") if gemma else ("<s>", "</s>", "<unk>")
    # learn merges word by word, as SentencePiece does, then lay the vocabulary out as its models do:
    # special tokens, the 256 byte tokens, then the learned pieces
    learner = Tokenizer(models.BPE(unk_token=unk))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never" if gemma else "first")
    learner.train_from_iterator(training_texts(extra), trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    learned = json.loads(learner.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    elif style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    strip = [] if gemma else [decoders.Strip(content=" ", left=1)]
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token="<pad>" if gemma else unk
    )
    if style == "legacy":  # Phi-3's added tokens; llama.cpp looks <|endoftext|> up in any model named phi3
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>"]})
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    return tokenizer
