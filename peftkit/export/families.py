"""What each model family looks like as GGUF: llama.cpp's architecture name, the metadata its converter
writes and the tensor transforms it applies.

The facts come from llama.cpp's converter (`convert_hf_to_gguf.py` and its `conversion/` package:
`TextModel.set_gguf_parameters`, `LlamaModel.permute`, `Gemma2Model.modify_tensors`, `BloomModel`,
`FalconModel`, `Qwen2MoeModel`, `MambaModel`, ...); tensor names come from the `gguf` package's own
per-architecture maps (`gguf.get_tensor_name_map`). transformers' GGUF loader
(`modeling_gguf_pytorch_utils.py`: `LlamaTensorProcessor`, `Gemma2TensorProcessor`, `BloomTensorProcessor`,
`GPT2TensorProcessor`, ...) undoes the same transforms, and the round trip through it is the check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from peftkit.errors import PeftkitError

Tensors = Iterable[tuple[str, np.ndarray]]


def _as_is(name: str, data: np.ndarray, config) -> Tensors:
    yield name, data


@dataclass(frozen=True)
class Family:
    """How one transformers `model_type` is written as GGUF."""

    arch: str
    """GGUF `general.architecture` (a value of `gguf.MODEL_ARCH_NAMES`)."""
    metadata: Callable[[object], dict]
    """config -> {key: value}, each written with `GGUFWriter.add_<key>`; a PeftkitError for a config llama.cpp
    would compute differently (called before the model is loaded)."""
    tensors: Callable[[str, np.ndarray, object], Tensors] = _as_is
    """One Hugging Face tensor -> (Hugging Face-style name that `gguf`'s map knows, data) pairs."""
    transform: str = "none"
    """The tensor transform llama.cpp's converter applies, in a few words (for docs/deployment.md)."""
    limits: str = ""
    """Config values transformers' GGUF loader rebuilds at its own default, whatever the file says (measured:
    a model with another value fails the check, and the error names the field)."""


def _get(config, *names, default=None):
    """The first of `names` the config sets (families name the same hyperparameter differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def rope(config) -> dict:
    """The (full-attention) RoPE parameters; Gemma 3 keeps one set per attention type."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("full_attention", params)


def _kv_heads(config) -> int:
    return _get(config, "num_key_value_heads", "num_attention_heads")


def _head_dim(config) -> int:
    return _get(config, "head_dim", default=config.hidden_size // config.num_attention_heads)


def _decoder(config) -> dict:
    """The keys llama.cpp's `TextModel.set_gguf_parameters` writes for most decoders."""
    meta = {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "head_count": config.num_attention_heads,
        "head_count_kv": _kv_heads(config),
    }
    optional = {
        "rope_freq_base": rope(config).get("rope_theta"),
        "layer_norm_rms_eps": _get(config, "rms_norm_eps", "norm_eps"),
        "layer_norm_eps": _get(config, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"),
        "expert_count": _get(config, "num_local_experts", "num_experts"),
        "expert_used_count": _get(config, "num_experts_per_tok"),
        "key_length": _get(config, "head_dim"),
        "value_length": _get(config, "head_dim"),
    }
    return meta | {key: value for key, value in optional.items() if value is not None}


# --- Llama, Mistral -------------------------------------------------------------------------------------


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q and k rows with the rotary halves interleaved (its `LlamaModel.permute`)."""
    shape = weights.shape
    split = weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
    return split.swapaxes(1, 2).reshape(shape)


def _llama_tensors(name: str, data: np.ndarray, config) -> Tensors:
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        data = _permute(data, config.num_attention_heads)
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        data = _permute(data, _kv_heads(config))
    yield name, data


def _llama(config) -> dict:
    return _decoder(config) | {"vocab_size": config.vocab_size, "rope_dimension_count": _head_dim(config)}


# --- Qwen MoE ---------------------------------------------------------------------------------------------


def _experts(name: str, data: np.ndarray, config) -> Tensors:
    """transformers fuses each layer's experts into `gate_up_proj` (experts, 2 x ff, hidden) and `down_proj`;
    GGUF keeps gate and up apart (`ffn_gate_exps`, `ffn_up_exps`), gate first as in the forward pass."""
    if name.endswith("mlp.experts.gate_up_proj"):
        gate, up = np.split(data, 2, axis=1)
        base = name.removesuffix("gate_up_proj")
        yield f"{base}gate_proj.weight", gate
        yield f"{base}up_proj.weight", up
    elif name.endswith("mlp.experts.down_proj"):
        yield f"{name}.weight", data
    elif name.endswith("shared_expert_gate.weight"):
        yield name, data.reshape(-1)  # a Linear(hidden, 1); llama.cpp and transformers' loader read it 1-D
    else:
        yield name, data


def _moe(config) -> dict:
    optional = {
        "expert_feed_forward_length": _get(config, "moe_intermediate_size"),
        "expert_shared_feed_forward_length": _get(config, "shared_expert_intermediate_size"),
    }
    return _decoder(config) | {key: value for key, value in optional.items() if value is not None}


# --- Phi-3 --------------------------------------------------------------------------------------------------


def _phi3(config) -> dict:
    rotary = rope(config).get("partial_rotary_factor", 1.0)
    return _decoder(config) | {
        "rope_scaling_orig_ctx_len": config.original_max_position_embeddings,
        "rope_dimension_count": int(rotary * config.hidden_size) // config.num_attention_heads,
        # 0 tells llama.cpp "no sliding window" (its Phi3MiniModel)
        "sliding_window": config.sliding_window or 0,
    }


# --- Gemma 2 / 3, Nemotron: norms that scale by (1 + w) -------------------------------------------------------


def _norm_plus_one(name: str, data: np.ndarray, config) -> Tensors:
    """Gemma's RMSNorm and Nemotron's LayerNorm1P multiply by (1 + w); llama.cpp stores 1 + w."""
    yield name, data + 1 if name.endswith("norm.weight") else data


def _same_query_scale(config) -> None:
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim), except in its 27B type (Gemma 2 with 46 layers, Gemma 3
    with 62), where it uses 1/sqrt(hidden_size / heads); a config whose query_pre_attn_scalar says otherwise would
    compute differently there."""
    big = config.num_hidden_layers == (46 if config.model_type == "gemma2" else 62)
    expected = config.hidden_size // config.num_attention_heads if big else config.head_dim
    if config.query_pre_attn_scalar != expected:  # e.g. a small config with head_dim 16 and the default 256
        rule = "hidden_size / heads (its 27B type)" if big else "head_dim"
        raise PeftkitError(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar} differs from {rule} {expected}; llama.cpp scales "
            "Gemma's queries by that (measured on such a model: logits 21% of their range apart), so a GGUF file of "
            "this model would compute differently there"
        )


def _gemma2(config) -> dict:
    _same_query_scale(config)
    optional = {
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "sliding_window": config.sliding_window,
    }
    return _decoder(config) | {key: value for key, value in optional.items() if value is not None}


def _gemma3(config) -> dict:
    _same_query_scale(config)
    meta = _decoder(config)
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
    if "rope_theta" in local:
        meta["rope_freq_base_swa"] = local["rope_theta"]
    if config.final_logit_softcapping:
        meta["final_logit_softcapping"] = config.final_logit_softcapping
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        meta["sliding_window"] = config.sliding_window
    return meta


def _nemotron(config) -> dict:
    rotary = rope(config).get("partial_rotary_factor", 1.0)
    return _decoder(config) | {
        "vocab_size": config.vocab_size,
        "layer_norm_eps": config.norm_eps,
        "rope_dimension_count": int(rotary * config.hidden_size) // config.num_attention_heads,
    }


# --- GPT-2 --------------------------------------------------------------------------------------------------


def _gpt2_tensors(name: str, data: np.ndarray, config) -> Tensors:
    """GPT-2's Conv1D stores weights as (in, out); GGUF wants (out, in) like every Linear."""
    yield name, data.T if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) else data


def _gpt2(config) -> dict:
    return {
        "block_count": config.n_layer,
        "context_length": config.n_positions,
        "embedding_length": config.n_embd,
        "feed_forward_length": config.n_inner or 4 * config.n_embd,
        "head_count": config.n_head,
        "layer_norm_eps": config.layer_norm_epsilon,
    }


# --- StableLM -----------------------------------------------------------------------------------------------


def _stablelm(config) -> dict:
    rotary = rope(config).get("partial_rotary_factor", 1.0)
    meta = _decoder(config) | {
        "rope_dimension_count": int(rotary * _head_dim(config)),
        "parallel_residual": config.use_parallel_residual,
    }
    for key in ("key_length", "value_length"):  # llama.cpp's StableLMModel writes neither
        meta.pop(key, None)
    return meta


# --- Falcon, Bloom: one fused query_key_value ----------------------------------------------------------------


def _falcon_kv_heads(config) -> int:
    """Key/value heads the model really has: Falcon-7B style multi-query attention shares one."""
    if config.new_decoder_architecture or not config.multi_query:
        return config.num_kv_heads
    return 1


def _falcon_tensors(name: str, data: np.ndarray, config) -> Tensors:
    """Falcon's query_key_value holds, per key/value group, its queries then one key and one value; llama.cpp
    stores all queries, then all keys, then all values (its `FalconModel`, "jploski" layout)."""
    if "query_key_value" in name:
        n_head, n_kv = config.num_attention_heads, _falcon_kv_heads(config)
        groups = data.reshape(n_kv, n_head // n_kv + 2, config.hidden_size // n_head, *data.shape[1:])
        parts = (groups[:, :-2], groups[:, -2:-1], groups[:, -1:])
        data = np.concatenate([part.reshape(-1, *data.shape[1:]) for part in parts]).reshape(data.shape)
    yield name, data


def _falcon(config) -> dict:
    return {
        "context_length": config.max_position_embeddings,
        "tensor_data_layout": "jploski",
        "embedding_length": config.hidden_size,
        "feed_forward_length": _get(config, "ffn_hidden_size", default=4 * config.hidden_size),
        "block_count": config.num_hidden_layers,
        "head_count": config.num_attention_heads,
        "head_count_kv": _falcon_kv_heads(config),
        "layer_norm_eps": config.layer_norm_epsilon,
    }


def _bloom_tensors(name: str, data: np.ndarray, config) -> Tensors:
    """Bloom's query_key_value interleaves (q, k, v) per head; llama.cpp stores q | k | v (its `BloomModel`)."""
    name = name.removeprefix("transformer.")  # gguf's Bloom map knows the names without it
    if "query_key_value" in name:
        n_head = config.n_head
        heads = data.reshape(n_head, 3, config.hidden_size // n_head, *data.shape[1:])
        data = heads.swapaxes(0, 1).reshape(data.shape)
    yield name, data


def _bloom(config) -> dict:
    return {
        "context_length": 2048,  # ALiBi has no trained window; Bloom was trained on 2048-token sequences
        "embedding_length": config.hidden_size,
        "feed_forward_length": 4 * config.hidden_size,
        "block_count": config.n_layer,
        "head_count": config.n_head,
        "head_count_kv": config.n_head,
        "layer_norm_eps": config.layer_norm_epsilon,
    }


# --- LFM2: short convolutions, attention on some layers --------------------------------------------------------


def _lfm2_tensors(name: str, data: np.ndarray, config) -> Tensors:
    yield name, data.squeeze(1) if name.endswith("conv.conv.weight") else data  # llama.cpp's conv op takes 2-D


def _lfm2(config) -> dict:
    kv = [_kv_heads(config) if kind == "full_attention" else 0 for kind in config.layer_types]
    return _decoder(config) | {
        "head_count_kv": kv,  # one count per layer, 0 on the convolution layers (llama.cpp's LFM2Model)
        "vocab_size": config.vocab_size,
        "shortconv_l_cache": config.conv_L_cache,
        "feed_forward_length": _lfm2_ff(config),
    }


def _lfm2_ff(config) -> int:
    """The feed-forward width the model really has (Lfm2MLP shrinks and rounds `intermediate_size`)."""
    ff = config.intermediate_size
    if config.block_auto_adjust_ff_dim:
        ff = int(2 * ff / 3)
        if config.block_ffn_dim_multiplier is not None:
            ff = int(config.block_ffn_dim_multiplier * ff)
        ff = config.block_multiple_of * ((ff + config.block_multiple_of - 1) // config.block_multiple_of)
    return ff


# --- MiniMax-M2 -----------------------------------------------------------------------------------------------


def _minimax_tensors(name: str, data: np.ndarray, config) -> Tensors:
    if name.endswith("mlp.e_score_correction_bias"):  # the routing bias: llama.cpp's exp_probs_b.bias
        yield name.replace("mlp.e_score_correction_bias", "block_sparse_moe.e_score_correction.bias"), data
    else:
        yield from _experts(name, data, config)


def _minimax(config) -> dict:
    import gguf

    return _decoder(config) | {
        "expert_feed_forward_length": config.intermediate_size,
        "rope_dimension_count": int(rope(config).get("partial_rotary_factor", 1.0) * _head_dim(config)),
        "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,  # MiniMax-M2 routes with sigmoid scores
    }


# --- Mamba --------------------------------------------------------------------------------------------------


def _mamba_tensors(name: str, data: np.ndarray, config) -> Tensors:
    """llama.cpp stores A = -exp(A_log) and the depthwise conv1d kernel without its size-1 axis."""
    if name.endswith(".A_log"):
        data = -np.exp(data)
    elif name.endswith("conv1d.weight"):
        data = data.squeeze(1)
    yield name, data


def _mamba(config) -> dict:
    return {
        "context_length": 2**20,  # no trained window; llama.cpp's converter writes the same
        "embedding_length": config.hidden_size,
        "feed_forward_length": 0,
        "head_count": 0,
        "block_count": config.num_hidden_layers,
        "ssm_conv_kernel": config.conv_kernel,
        "ssm_inner_size": config.intermediate_size,
        "ssm_state_size": config.state_size,
        "ssm_time_step_rank": config.time_step_rank,
        "layer_norm_rms_eps": config.layer_norm_epsilon,
        "ssm_dt_b_c_rms": False,
    }


PERMUTE = "q/k rows permuted (rotary halves interleaved)"
ONE_PLUS = "norm weights stored as 1 + w"
EXPERTS = "fused expert gate_up_proj split into gate and up"
REGROUPED = "query_key_value regrouped from per-{} (q, k, v) to all q, all k, all v"
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _llama, _llama_tensors, PERMUTE),
    "mistral": Family("llama", _llama, _llama_tensors, PERMUTE, "no sliding window (reloads as LlamaForCausalLM)"),
    "qwen2": Family("qwen2", _decoder),
    "qwen3": Family("qwen3", _decoder),
    "qwen2_moe": Family("qwen2moe", _moe, _experts, EXPERTS, "moe_intermediate_size 1408, shared expert 5632"),
    "qwen3_moe": Family("qwen3moe", _moe, _experts, EXPERTS, "moe_intermediate_size 768, norm_topk_prob true"),
    "minimax_m2": Family("minimax-m2", _minimax, _minimax_tensors, EXPERTS + "; routing bias as exp_probs_b"),
    "phi3": Family("phi3", _phi3, limits="partial_rotary_factor 1.0"),
    "gemma2": Family("gemma2", _gemma2, _norm_plus_one, ONE_PLUS, "query_pre_attn_scalar 256"),
    "gemma3_text": Family("gemma3", _gemma3, _norm_plus_one, ONE_PLUS, "query_pre_attn_scalar 256"),
    "nemotron": Family("nemotron", _nemotron, _norm_plus_one, ONE_PLUS, "partial_rotary_factor 0.5"),
    "gpt2": Family("gpt2", _gpt2, _gpt2_tensors, "Conv1D weights transposed to (out, in)", "n_positions 1024"),
    "stablelm": Family("stablelm", _stablelm, limits="rope_theta 10000, partial_rotary_factor 0.25"),
    "starcoder2": Family("starcoder2", _decoder, limits="rope_theta 10000"),
    "falcon": Family("falcon", _falcon, _falcon_tensors, REGROUPED.format("group"), "new_decoder_architecture false"),
    "bloom": Family("bloom", _bloom, _bloom_tensors, REGROUPED.format("head")),
    "mamba": Family("mamba", _mamba, _mamba_tensors, "A_log stored as -exp(A_log); conv1d kernel squeezed"),
    "lfm2": Family("lfm2", _lfm2, _lfm2_tensors, "short-convolution kernel squeezed to 2-D"),
}

# Families transformers' GGUF loader reads that export does not write, and why.
REFUSED: dict[str, str] = {
    "t5": "encoder-decoder; peftkit exports decoder-only causal LMs",
    "umt5": "encoder-decoder; peftkit exports decoder-only causal LMs",
    "deci": "no transformers model class (DeciLM / Nemotron-NAS need trust_remote_code)",
    "gpt_oss": "transformers' GGUF loader leaves GptOssForCausalLM's fused experts and attention sinks unloaded",
    "gemma4": "not written yet (llama.cpp's Gemma4Model: gemma4 tokenizer, proportional-RoPE frequencies, "
    "per-layer head sizes and embeddings)",
}


# The loader names Gemma's text-only models after the family: its `gemma3` reads a `gemma3_text` model.
LOADER_NAMES = {"gemma3_text": "gemma3", "gemma4_text": "gemma4"}


def loader_name(model_type: str) -> str:
    """The family's key in transformers' `GGUF_CONFIG_MAPPING`."""
    return LOADER_NAMES.get(model_type, model_type)


def loader_families() -> list[str]:
    """The model families transformers' GGUF loader reads back (its config mapping's keys)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(key for key in GGUF_CONFIG_MAPPING if key not in ("general", "tokenizer"))


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def support_table() -> str:
    """docs/deployment.md's table of families, from the code (a test keeps the two equal)."""
    rows = [
        "| model_type | GGUF architecture | tensor transform (llama.cpp's) | transformers' loader rebuilds only |",
        "|---|---|---|---|",
    ]
    for name, family in sorted(FAMILIES.items()):
        rows.append(f"| {name} | {family.arch} | {family.transform} | {family.limits or '-'} |")
    refused = [f"- {name}: {why}" for name, why in sorted(REFUSED.items())]
    return "\n".join([*rows, "", "Read by the loader but refused, in one line naming the families above:", *refused])
