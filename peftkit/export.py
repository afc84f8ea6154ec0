"""Export a (merged) Llama-architecture model folder to GGUF, and check the file before keeping it.

The file is written with the `gguf` package's writer under llama.cpp's tensor names (q and k rows
permuted the way llama.cpp's own converter does), with the byte-level BPE tokenizer, special
tokens and chat template as metadata. It is then loaded back with transformers' GGUF loader and
compared with the source model: the same tokenisation of the check texts, logits within the
quantisation's tolerance and the same greedy next token. A file that fails is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from peftkit.errors import PeftkitError
from peftkit.merge import CHECK_INPUTS
from peftkit.progress import quiet

# Max |logit difference| of the reloaded GGUF against the source fp32 model, relative to the
# largest |logit| on the check inputs. Measured on SmolLM2-135M (max |logit| ~30): f32 0 (exact),
# f16 1.1e-3, q8_0 2.1e-2 of the max.
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "q8_0": 5e-2}
CONTINUATION_TOKENS = 16  # greedy tokens compared (reported, not required: q8_0 may part ways late)
TOKENIZER_CHECK = CHECK_INPUTS + ("Ünïcödé, digits 12345 and  double  spaces\n\tnewline.",)


def export_gguf(model_dir: Path, out: Path, quant: str = "f16", overwrite: bool = False, log=print) -> dict:
    """Write `model_dir` (a Hugging Face Llama folder, e.g. the output of `peftkit merge`) as GGUF."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if quant not in TOLERANCE:
        raise PeftkitError(f"--quant {quant}: choose one of {', '.join(TOLERANCE)}")
    if not (model_dir / "config.json").exists():
        raise PeftkitError(f"{model_dir}: no config.json; export takes a model folder (e.g. from `peftkit merge`)")
    if out.exists() and not overwrite:
        raise PeftkitError(f"{out} already exists; choose another file or pass --overwrite")
    if out.suffix != ".gguf":
        raise PeftkitError(f"{out}: the output file name must end in .gguf")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise PeftkitError(
            f"{model_dir}/config.json: model_type {config.get('model_type')!r}; GGUF export supports llama"
        )
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise PeftkitError(f"{model_dir}/config.json: rope_type {rope['rope_type']!r} is not supported by the export")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = _tokenizer_metadata(tokenizer, model_dir, config["vocab_size"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked alone in a scratch folder, so the reload cannot pick up the source
    # folder's config.json or tokenizer.json instead of the file's own metadata.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        partial = scratch / out.name
        _write(gguf, model, config, vocab, partial, quant, name=model_dir.name)
        check = _check(model, tokenizer, partial, quant)
        os.replace(partial, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    same = sum(c["same"] for c in check["continuations"])
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {quant}); reloaded with transformers: max |logit diff| "
        f"{check['max_abs_logit_diff']:.2e} ({check['relative']:.1e} of max |logit|, tolerance {TOLERANCE[quant]:.0e}); "
        f"same {CONTINUATION_TOKENS}-token greedy continuation for {same} of {len(check['continuations'])} prompts")  # fmt: skip
    for c in check["continuations"]:
        log(f"  {c['prompt']!r}\n    source: {c['source']!r}\n    gguf:   {c['gguf']!r}")
    return {"path": str(out), "quant": quant, **check}


def _tokenizer_metadata(tokenizer, model_dir: Path, vocab_size: int) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
        raise PeftkitError(
            f"{model_dir}: GGUF export needs a byte-level BPE tokenizer (GPT-2 style, as in Llama 3, SmolLM, Qwen); "
            f"this one is {model.get('type') or type(tokenizer).__name__}"
        )
    pre = _pre_tokenizer_name(spec["pre_tokenizer"], model_dir)
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf_type("CONTROL") if added[i]["special"] else gguf_type("USER_DEFINED"))
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf_type("NORMAL"))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf_type("UNUSED"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = tokenizer("a").input_ids
    return {
        "tokens": tokens, "types": types, "merges": merges, "pre": pre,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id, "add_bos": bool(ids) and ids[0] == tokenizer.bos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }  # fmt: skip


def gguf_type(name: str) -> int:
    import gguf

    return int(getattr(gguf.TokenType, name))


def _is_byte_level(pre) -> bool:
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _pre_tokenizer_name(pre: dict, model_dir: Path) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how this tokenizer splits text before BPE."""
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"  # the GPT-2 split regex
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # single digits, then the GPT-2 split regex
    if kinds == ["Split", "ByteLevel"]:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise PeftkitError(
        f"{model_dir}/tokenizer.json: pre-tokenizer {kinds} has no GGUF (llama.cpp) equivalent known here"
    )


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q and k rows with rotary halves interleaved (its convert_hf_to_gguf.py permute)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)  # fmt: skip


def _write(gguf, model, config: dict, vocab: dict, path: Path, quant: str, name: str) -> None:
    n_layers, n_head, n_kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]  # fmt: skip
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):  # fmt: skip
        if vocab[key] is not None:
            add(vocab[key])
    w.add_add_bos_token(vocab["add_bos"])
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise PeftkitError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        data = tensor.detach().float().numpy()
        if gguf_name.endswith("attn_q"):
            data = _permute(data, n_head)
        elif gguf_name.endswith("attn_k"):
            data = _permute(data, n_kv)
        full = f"{gguf_name}.{suffix}"
        if data.ndim == 1 or quant == "f32":
            w.add_tensor(full, data.astype(np.float32))
        elif quant == "q8_0" and data.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(full, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(full, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=not quiet())
    w.close()


def _check(model, tokenizer, path: Path, quant: str) -> dict:
    """Reload the file with transformers' GGUF loader; compare tokenisation and logits with the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": path.name}
    hf_logging.disable_progress_bar()
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    for text in TOKENIZER_CHECK:
        a, b = tokenizer(text).input_ids, reloaded_tok(text).input_ids
        if a != b:
            raise PeftkitError(
                f"GGUF export: the reloaded tokenizer splits {text[:40]!r} differently ({a[:8]} vs {b[:8]})"
            )
    diff, scale, same_argmax = 0.0, 0.0, True
    with torch.no_grad():
        for text in CHECK_INPUTS:
            ids = torch.tensor([tokenizer(text).input_ids])
            x, y = model(ids).logits, reloaded(ids).logits
            diff = max(diff, (x - y).abs().max().item())
            scale = max(scale, x.abs().max().item())
            same_argmax &= bool((x[0, -1].argmax() == y[0, -1].argmax()).item())
    relative = diff / scale
    if relative > TOLERANCE[quant] or not same_argmax:
        raise PeftkitError(
            f"GGUF export: the reloaded {quant} file differs from the source model (max |logit diff| {diff:.3g}, "
            f"{relative:.1e} of max |logit|, tolerance {TOLERANCE[quant]:.0e}, same next token: {same_argmax}); "
            "nothing was written"
        )
    continuations = []
    for text in CHECK_INPUTS:
        ids = torch.tensor([tokenizer(text).input_ids])
        a, b = (greedy(m, ids, tokenizer) for m in (model, reloaded))
        continuations.append({"prompt": text, "source": a, "gguf": b, "same": a == b})
    return {"max_abs_logit_diff": diff, "relative": relative, "same_next_token": same_argmax,
            "continuations": continuations}  # fmt: skip


@torch.no_grad()
def greedy(model, ids: torch.Tensor, tokenizer) -> str:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CONTINUATION_TOKENS,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
