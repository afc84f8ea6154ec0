"""GGUF files that llama.cpp itself loads (issue 25): the pre-tokenizer name is the one llama.cpp's converter
would write, a tokenizer llama.cpp has no name for is refused, and every export is loaded by llama.cpp (its
Python bindings are part of the test install) to the same tokenisation, close logits and, at f16, the same
greedy continuations as the source model."""

from __future__ import annotations

import json

import llama_cpp  # noqa: F401  (the test install brings it: a missing install fails here, not as skips)
import pytest
import torch

from peftkit import export
from peftkit.errors import PeftkitError
from peftkit.export import llama_cpp_check, pretokenizers
from tests.gguf_tokenizers import SAMPLE, byte_level
from tests.test_export_families import learn


def _save(path, tokenizer, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.1,
                         **overrides)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama trained a few steps, so it predicts confidently as trained models do (a random model's
    near-ties flip under q8_0's rounding: 1 of 3 continuations kept, against 3 of 3 after 40 steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _save(tmp_path_factory.mktemp("llama-cpp"), byte_level(extra=export.TOKENIZER_CHECK + (SAMPLE,)))
    model = AutoModelForCausalLM.from_pretrained(path)
    learn(model, AutoTokenizer.from_pretrained(path), steps=40)
    model.save_pretrained(path)
    return path


def test_a_tokenizer_outside_llama_cpps_table_is_named_by_its_split_rule(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert pretokenizers.chkhsh(tokenizer) not in pretokenizers.KNOWN
    name, how = pretokenizers.identify(tokenizer, [spec["pre_tokenizer"]], model_dir)
    assert (name, how.split(" (")[0]) == ("gpt-2", "its split rule")
    assert name in pretokenizers.ACCEPTED


def test_a_pre_tokenizer_llama_cpp_has_no_name_for_is_refused_in_one_line(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = byte_level(extra=export.TOKENIZER_CHECK)
    # words split on whitespace before the byte-level step: no llama.cpp regex does that
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    model_dir = _save(tmp_path / "model", tokenizer)
    out = tmp_path / "x.gguf"
    with pytest.raises(PeftkitError, match="llama.cpp knows no pre-tokenizer for this tokenizer") as err:
        export.export_gguf(model_dir, out, quant="f32", log=lambda _: None)
    assert "\n" not in str(err.value) and "tokenizer.json" in str(err.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_normalizer_llama_cpp_does_not_apply_keeps_the_split_rule_from_naming_it(tmp_path):
    from tokenizers import normalizers

    tokenizer = byte_level(extra=export.TOKENIZER_CHECK)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(PeftkitError, match=r"split \['ByteLevel'\] after a normalizer is none of its regexes"):
        export.export_gguf(_save(tmp_path / "model", tokenizer), tmp_path / "x.gguf", quant="f32", log=lambda _: None)
    assert not (tmp_path / "x.gguf").exists()


def test_the_name_transformers_reader_accepted_but_llama_cpp_refuses_is_caught(model_dir, tmp_path, monkeypatch):
    """The bug of issue 25: `tokenizer.ggml.pre = "gpt2"` passed the transformers round trip; llama.cpp refuses it."""
    monkeypatch.setattr(pretokenizers, "_by_split", lambda parts: "gpt2")
    monkeypatch.setattr(pretokenizers, "ACCEPTED", pretokenizers.ACCEPTED | {"gpt2"})
    out = tmp_path / "x.gguf"
    with pytest.raises(PeftkitError, match="llama.cpp cannot load the file.*unknown pre-tokenizer type: 'gpt2'"):
        export.export_gguf(model_dir, out, quant="f32", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_llama_cpp_loads_the_export_with_the_same_tokens_and_logits_within_tolerance(model_dir, tmp_path, quant):
    lines = []
    result = export.export_gguf(model_dir, tmp_path / f"m-{quant}.gguf", quant=quant, log=lines.append)
    lc = result["llama_cpp"]
    assert result["readers"] == ["transformers' GGUF reader", llama_cpp_check.version()]
    assert result["pre_tokenizer"] == "gpt-2"
    assert lc["relative"] <= llama_cpp_check.TOLERANCE[quant] and lc["max_abs_logit_diff"] > 0.0
    same = [c["same"] for c in lc["continuations"]]
    # f32 and f16 continue every prompt like the source; q8_0 (llama.cpp also rounds the activations) most
    assert all(same) if quant != "q8_0" else sum(same) * 2 > len(same)
    assert "checked by transformers' GGUF reader and llama.cpp" in lines[0]
    assert lines[2].startswith("  llama.cpp: same tokenisation")


def test_a_gemma_config_llama_cpp_would_scale_differently_is_refused_before_loading(tmp_path):
    """Gemma with head_dim 16 and the default query_pre_attn_scalar 256 passed transformers' reader, but llama.cpp
    scales queries by 1/sqrt(head_dim): its logits were 21% of their range away. Refused up front, in one line."""
    from transformers import Gemma2Config

    Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(
        PeftkitError, match=r"config.json: query_pre_attn_scalar 256 differs from head_dim 16; llama.cpp"
    ) as err:
        export.export_gguf(tmp_path, tmp_path / "g.gguf", log=lambda _: None)
    assert "\n" not in str(err.value) and not (tmp_path / "g.gguf").exists()
