"""Prompt tuning (trained virtual-token embeddings before the input) and prefix tuning (trained
key/value prefixes in every attention layer), through peft. Neither changes a weight, so neither
can be merged: deploy the base model with the adapter."""

from __future__ import annotations

from peftkit.methods.registry import get_peft_model, register


# A few virtual-token embeddings carry the whole adaptation: learning rates 20-60x LoRA's
@register("prompt_tuning", {"train.lr": 3e-2})
def build_prompt_tuning(config, model):
    from peft import PromptTuningConfig

    return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=config.virtual_tokens, task_type="CAUSAL_LM"),
                          "method.virtual_tokens")  # fmt: skip


@register("prefix_tuning", {"train.lr": 1e-2})
def build_prefix_tuning(config, model):
    from peft import PrefixTuningConfig

    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=config.virtual_tokens, task_type="CAUSAL_LM"),
                          "method.virtual_tokens")  # fmt: skip
