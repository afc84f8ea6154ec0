"""Prompt tuning (trained virtual-token embeddings before the input) and prefix tuning (trained
key/value prefixes in every attention layer), through peft. Neither changes a weight, so neither
can be merged: deploy the base model with the adapter."""

from __future__ import annotations

from peftkit.methods import get_peft_model, register


@register("prompt_tuning")
def build_prompt_tuning(config, model):
    from peft import PromptTuningConfig

    return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=config.virtual_tokens, task_type="CAUSAL_LM"),
                          "method.virtual_tokens")  # fmt: skip


@register("prefix_tuning")
def build_prefix_tuning(config, model):
    from peft import PrefixTuningConfig

    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=config.virtual_tokens, task_type="CAUSAL_LM"),
                          "method.virtual_tokens")  # fmt: skip
