"""Shared fixtures: a tiny Llama model and word-level tokenizer built locally, and a small corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from peftkit import Config, DataConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig

SUBJECTS = ["the patient", "the child", "a woman", "an elderly man", "the cohort"]
VERBS = ["received", "was treated with", "responded to", "was given"]
DRUGS = ["aspirin", "insulin", "metformin", "penicillin", "heparin", "statins"]
OUTCOMES = ["and recovered", "without side effects", "and improved", "after surgery"]
GENERAL = ["the river flows to the sea", "a king ruled the old city", "the team won the final game",
           "music was played in the hall", "the city has a large park"]  # fmt: skip
WORDS = sorted({w for group in (SUBJECTS, VERBS, DRUGS, OUTCOMES, GENERAL) for p in group for w in p.split()} | {"."})


def make_doc(rng: random.Random) -> str:
    sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(DRUGS)} {rng.choice(OUTCOMES)} ."
                 for _ in range(rng.randint(2, 5))]  # fmt: skip
    return " ".join(sentences)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    # a large init scale lets a frozen, tied, random embedding still express sharp next-token distributions
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, initializer_range=0.3)  # fmt: skip
    model = LlamaForCausalLM(config)
    pretrain_on_general_text(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def general_doc(rng: random.Random) -> str:
    return " . ".join(rng.sample(GENERAL, 3)) + " ."


def pretrain_on_general_text(model, tokenizer, steps: int = 150) -> None:
    """Give the tiny base model general knowledge to lose, as a real pretrained model has (~1 s)."""
    import torch

    from peftkit.data import PackedRows, tokenize

    rng = random.Random(1)
    stream = PackedRows(tokenize(tokenizer, [general_doc(rng) for _ in range(300)]), seq_len=32, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = stream.rows(step * 16, 16)
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


MEDICAL_OPTION, GENERAL_OPTION = "aspirin and recovered .", "the river flows to the sea"


def picked_qa_file(path: Path, medical_answers: list[int], general_answers: list[int]) -> Path:
    """Two-option QA questions whose picks are fixed by the models: the tiny base model, pretrained on general
    text only, picks the general sentence (option 1) for every question; LoRA-trained on the medical corpus for
    the default 12 steps it picks the medical one (option 0). The answer keys then fix every accuracy exactly,
    and base and tuned accuracies differ wherever a key holds both options."""
    rng = random.Random(0)
    groups = (("anatomy", medical_answers), ("sociology", general_answers))
    rows = [{"subject": subject, "question": f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}", "answer": answer,
             "choices": [MEDICAL_OPTION, GENERAL_OPTION]} for subject, answers in groups for answer in answers]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_script(name: str):
    """A scripts/ file (no .py suffix) as a module, to test its pieces without running it."""
    import importlib.util
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader(name, str(Path(__file__).resolve().parents[1] / "scripts" / name))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for split, count in [("train", 200), ("validation", 30), ("test", 30)]:
        write_jsonl(path / f"{split}.jsonl", [make_doc(rng) for _ in range(count)])
    write_jsonl(path / "general.jsonl", [general_doc(rng) for _ in range(30)])
    return path


@pytest.fixture
def tiny_config(tiny_model_dir, corpus_dir, tmp_path) -> Config:
    """A config that trains the tiny model for a few fp32 steps in about a second."""
    return make_tiny_config(tiny_model_dir, corpus_dir, tmp_path)


def make_tiny_config(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path) -> Config:
    """tiny_config's value, for fixtures of a wider scope."""
    return Config(
        model=ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32"),
        data=DataConfig(source=str(corpus_dir), general_source=str(corpus_dir / "general.jsonl"), seq_len=32),
        method=MethodConfig(r=8, alpha=16, target_modules=["all-linear"]),
        train=TrainConfig(max_steps=12, batch_size=4, lr=5e-2, warmup_steps=2, mixed_precision="no", progress=False),
        # no forgetting budget by default: most tests check mechanics, and training on the medical
        # words makes the tiny model forget its general text at once
        eval=EvalConfig(every_steps=4, val_tokens=256, test_tokens=512, batch_size=8, max_general_ppl_increase=None),
        output_dir=str(tmp_path / "run"),
    )


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def build_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, as Llama 3, Qwen and SmolLM use) trained on the test corpus's
    words: any text encodes, and GGUF export reads it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [make_doc(rng) for _ in range(200)] + [general_doc(rng) for _ in range(200)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def pytest_addoption(parser):
    parser.addoption(
        "--write-models-table",
        action="store_true",
        help="tests/test_families.py: write the measured support table into docs/models.md (scripts/models_table)",
    )
