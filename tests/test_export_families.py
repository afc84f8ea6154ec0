"""GGUF export for every family it supports: a tiny random model of the family with a realistic tokenizer
shape, exported (f16 and q8_0), reloaded with transformers' GGUF loader to the same logits and token ids,
with only tensor names llama.cpp knows for the architecture, and run by llama.cpp itself to the same token
ids, logits within its tolerance and (f16) the same greedy continuations. Families it does not support are refused in
one line, and docs/deployment.md lists exactly the code's families."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from peftkit import export
from peftkit.errors import PeftkitError
from tests.gguf_tokenizers import SAMPLE, byte_level, sentencepiece, training_texts

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Expert sizes stay at the config classes' defaults: the GGUF loader does not read them from the file.
MOE = dict(num_experts=4, num_experts_per_tok=2)
# family -> (tokenizer shape, config overrides): each with the tokenizer its real models ship
CASES = {
    "llama": ("metaspace", {}),  # Llama 2; the byte-level Llama 3 shape is tests/test_export.py's
    "mistral": ("metaspace", {}),
    "qwen2": ("byte-level", {}),
    "qwen3": ("byte-level", {}),
    "qwen2_moe": ("byte-level", MOE),
    "qwen3_moe": ("byte-level", {**MOE, "norm_topk_prob": True}),  # the GGUF loader always normalizes top-k
    "minimax_m2": ("byte-level", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "phi3": ("legacy", {}),
    "gemma2": ("gemma", {"head_dim": 256}),  # = query_pre_attn_scalar: llama.cpp scales by head_dim, the loader by 256
    "gemma3_text": ("gemma", {"head_dim": 256}),
    "nemotron": ("metaspace", {}),
    "gpt2": ("byte-level", {}),
    "stablelm": ("byte-level", {}),
    "starcoder2": ("byte-level", {}),
    "falcon": ("byte-level", {}),
    "bloom": ("byte-level", {}),
    "mamba": ("byte-level", {}),
    "lfm2": ("byte-level", {"layer_types": ["conv", "full_attention"]}),
}
KIND = {shape: "SentencePiece BPE" for shape in ("metaspace", "legacy", "gemma")} | {"byte-level": "byte-level BPE"}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """One thread suits these tiny models; the greedy continuations are reported, not checked, so keep them short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(export.check, "CONTINUATION_TOKENS", 2)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tokenizer(shape: str):
    extra = export.TOKENIZER_CHECK + (SAMPLE,)
    return byte_level(extra) if shape == "byte-level" else sentencepiece(shape, extra)


def tiny_model_dir(root: Path, family: str, quant: str, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape, options = CASES[family]
    tok = tokenizer(shape)
    options = {**options, **overrides}
    if quant == "q8_0" and "num_experts_per_tok" in options:
        # q8_0's rounding flips near-tied top-k expert choices of a random router, and a flipped expert of
        # a random model moves its logits far (the check then refuses the file, rightly); with every expert
        # active the test still checks the experts' layout in the file
        options["num_experts_per_tok"] = options.get("num_experts", options.get("num_local_experts"))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(family, vocab_size=len(tok) + 4, initializer_range=0.05, **TINY, **ids, **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if quant == "q8_0":  # f16's rounding is far below a random model's margins; q8_0's is not
        learn(model, tok, steps=10 if "num_experts_per_tok" in options else 40)  # MoE steps cost more
    path = root / f"tiny-{family}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def learn(model, tok, steps: int = 40, rows: int = 8, length: int = 32) -> None:
    """A few steps on the tokenizer's own texts, so the model predicts confidently as trained models do: the
    export requires the same next token, and a random model's near-ties flip under q8_0's rounding."""
    ids = torch.tensor(tok(" ".join(training_texts())).input_ids)
    batches = ids[: len(ids) // length * length].view(-1, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = batches[torch.arange(step * rows, (step + 1) * rows) % len(batches)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def reload(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def llama_cpp_names(arch: str, n_layers: int) -> set[str]:
    """Every tensor name llama.cpp's loader knows for the architecture (gguf's MODEL_TENSORS)."""
    import gguf

    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[model_arch]]
    return {name.format(bid=bid) for name in names for bid in range(n_layers)}


def test_every_family_the_gguf_loader_reads_is_exported_or_refused_with_a_reason():
    exported = {export.families.loader_name(name) for name in export.FAMILIES}
    assert set(export.loader_families()) == exported | set(export.REFUSED)
    assert not exported & set(export.REFUSED)
    assert set(CASES) == set(export.FAMILIES)  # and every exported family is tested below


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_family_round_trips_through_transformers_gguf_loader(family, quant, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir(tmp_path, family, quant)
    out = tmp_path / f"{family}-{quant}.gguf"
    result = export.export_gguf(model_dir, out, quant=quant, log=lambda _: None)
    assert result["tokenizer"] == KIND[CASES[family][0]] and result["same_next_token"]
    # llama.cpp itself loaded the file too (the test install has its bindings): same tokens, close logits
    assert result["readers"][1].startswith("llama.cpp") and result["llama_cpp"]["same_next_tokens"] == 3
    if quant == "f16":  # and at f16 the same greedy continuations as the source
        assert all(c["same"] for c in result["llama_cpp"]["continuations"]), result["llama_cpp"]["continuations"]

    arch = export.FAMILIES[family].arch
    reader = gguf.GGUFReader(out)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    stored = {t.name.removesuffix(".weight").removesuffix(".bias") for t in reader.tensors}
    assert stored <= llama_cpp_names(arch, TINY["num_hidden_layers"]), stored - llama_cpp_names(arch, 2)
    if quant == "q8_0":
        assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors)

    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    source_tok = AutoTokenizer.from_pretrained(model_dir)
    model, tok = reload(out)
    diff, scale = 0.0, 0.0
    for text in (*export.TOKENIZER_CHECK, SAMPLE):
        ids = source_tok(text).input_ids
        assert tok(text).input_ids == ids, text
        with torch.no_grad():
            a, b = source(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits
        diff, scale = max(diff, (a - b).abs().max().item()), max(scale, a.abs().max().item())
    assert 0 < diff / scale <= export.TOLERANCE[quant]
    assert tok.decode(tok(SAMPLE).input_ids, skip_special_tokens=True).strip() == SAMPLE.strip()


def config_only(root: Path, family: str, **options) -> Path:
    from transformers import AutoConfig

    AutoConfig.for_model(family, vocab_size=300, **TINY, **options).save_pretrained(root / family)
    return root / family


@pytest.mark.parametrize("family", ["gpt_neox", "gpt_oss", "t5"])
def test_a_family_the_export_does_not_write_is_refused_in_one_line_naming_those_it_does(family, tmp_path):
    with pytest.raises(PeftkitError) as refused:
        export.export_gguf(config_only(tmp_path, family), tmp_path / "x.gguf")
    message = str(refused.value)
    assert "\n" not in message and f"model_type {family!r} cannot be exported to GGUF" in message
    assert f"GGUF export supports {', '.join(sorted(export.FAMILIES))}" in message
    assert export.REFUSED.get(family, "cannot read it back") in message
    assert not (tmp_path / "x.gguf").exists()


def test_rope_scaling_the_loader_cannot_rebuild_is_refused(tmp_path):
    rope = dict(rope_type="llama3", rope_theta=5e5, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
    with pytest.raises(PeftkitError, match="rope_type 'llama3' is not supported"):
        export.export_gguf(config_only(tmp_path, "llama", rope_parameters=rope), tmp_path / "x.gguf")


def test_rope_parameters_the_loader_rebuilds_differently_are_refused_however_close_the_logits(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "starcoder2", "f16", rope_theta=1e6)  # the loader keeps 10000
    with pytest.raises(PeftkitError, match=r"the loader rebuilds rope_parameters=.*'rope_theta': 10000\.0"):
        export.export_gguf(model_dir, tmp_path / "x.gguf", log=lambda _: None)


def test_a_config_the_loader_rebuilds_differently_is_refused_and_named(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "qwen3_moe", "f16", norm_topk_prob=False)
    with pytest.raises(PeftkitError, match=r"the loader rebuilds norm_topk_prob=True \(model: False\)"):
        export.export_gguf(model_dir, tmp_path / "x.gguf", log=lambda _: None)
    assert not (tmp_path / "x.gguf").exists()


def test_docs_list_exactly_the_exported_families():
    docs = (Path(__file__).parents[1] / "docs" / "deployment.md").read_text()
    regenerate = "python -c 'from peftkit import export; print(export.support_table())'"
    assert export.support_table() in docs, f"docs/deployment.md: paste the output of {regenerate}"
