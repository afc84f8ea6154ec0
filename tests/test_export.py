"""GGUF export: round trip through transformers' GGUF loader on a tiny Llama with a byte-level BPE tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from peftkit import export
from peftkit.errors import PeftkitError
from tests.gguf_tokenizers import byte_level


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    """A tiny Llama (GQA: 4 query heads, 2 key/value heads) with a byte-level BPE tokenizer and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level(extra=export.TOKENIZER_CHECK)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.1)  # fmt: skip
    path = tmp_path_factory.mktemp("bpe-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reload(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))  # fmt: skip


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_matches_the_source_within_the_stated_tolerance(bpe_model_dir, tmp_path, quant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"tiny-{quant}.gguf"
    result = export.export_gguf(bpe_model_dir, out, quant=quant, log=lambda _: None)
    assert out.is_file() and not list(tmp_path.glob(".export-*"))
    source = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.float32)
    source_tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    model, tok = reload(out)
    assert tok.chat_template == source_tok.chat_template
    diffs, scale = [], 0.0
    for text in export.TOKENIZER_CHECK:
        ids = source_tok(text).input_ids
        assert tok(text).input_ids == ids
        a, b = logits(source, ids), logits(model, ids)
        diffs.append((a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
    assert max(diffs) / scale <= export.TOLERANCE[quant]
    if quant == "f32":
        assert max(diffs) == 0.0  # names, permutation and metadata are exact; only f16/q8_0 rounding moves logits
    else:
        assert max(diffs) > 0.0  # the weights really were stored in the lower precision
    assert result["same_next_token"] and len(result["continuations"]) == len(export.CHECK_INPUTS)


def test_a_file_that_does_not_reproduce_the_model_is_refused_and_not_left_behind(bpe_model_dir, tmp_path, monkeypatch):
    # forget llama.cpp's q/k row order
    monkeypatch.setattr(export.families, "_permute", lambda weights, n_head: weights)
    out = tmp_path / "broken.gguf"
    with pytest.raises(PeftkitError, match="differs from the source model"):
        export.export_gguf(bpe_model_dir, out, quant="f32", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_export_refusals(bpe_model_dir, tiny_model_dir, tmp_path):
    (tmp_path / "taken.gguf").write_bytes(b"keep me")
    with pytest.raises(PeftkitError, match="already exists"):
        export.export_gguf(bpe_model_dir, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep me"
    with pytest.raises(PeftkitError, match="must end in .gguf"):
        export.export_gguf(bpe_model_dir, tmp_path / "model.bin")
    with pytest.raises(PeftkitError, match="--quant q4_k: choose one of f32, f16, q8_0"):
        export.export_gguf(bpe_model_dir, tmp_path / "x.gguf", quant="q4_k")
    with pytest.raises(PeftkitError, match="needs a byte-level BPE tokenizer"):
        export.export_gguf(tiny_model_dir, tmp_path / "x.gguf")  # the word-level test tokenizer
    with pytest.raises(PeftkitError, match="no config.json"):
        export.export_gguf(tmp_path, tmp_path / "x.gguf")


def test_cli_export_then_generate_from_the_gguf_file(bpe_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "merged"
    shutil.copytree(bpe_model_dir, model_dir)
    cli = [sys.executable, "-m", "peftkit.cli"]
    done = subprocess.run([*cli, "export", str(model_dir), "--quant", "f32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "same 16-token greedy continuation" in done.stdout
    file = tmp_path / "merged-f32.gguf"
    again = subprocess.run([*cli, "export", str(model_dir), "--quant", "f32"], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("peftkit: error:") and "Traceback" not in again.stderr
    assert "checked by transformers' GGUF reader and llama.cpp" in done.stdout
    answers = {}  # f32 export is exact, so the answers must be identical; the file's runs in llama.cpp
    for target in (model_dir, file):
        done = subprocess.run([*cli, "generate", str(target), "--prompt", "the patient", "--max-new-tokens", "8",
                               "--no-stream"], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers[target] = done.stdout.split("\n", 1)
    assert "(llama.cpp (llama-cpp-python" in answers[file][0] and "llama.cpp" not in answers[model_dir][0]
    assert answers[model_dir][1] == answers[file][1]
