"""IA3: learned per-channel scaling of keys, values and the feed-forward input, through peft."""

from __future__ import annotations

from peftkit.methods.registry import get_peft_model, module_targets, peft_kwargs, register

DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj"]  # the paper's choice for decoder models
LORA_DEFAULTS = (["attention"], ["q_proj", "k_proj", "v_proj", "o_proj"])  # today's and the earlier spelling


# IA3 scales activations rather than adding to weights: it needs ~10x LoRA's learning rate
@register("ia3", {"method.target_modules": DEFAULT_TARGETS, "train.lr": 5e-3})
def build_ia3(config, model):
    import dataclasses

    from peft import IA3Config

    # LoRA's default targets (the attention projections) are not IA3's; use IA3's unless the user chose others
    if config.target_modules in LORA_DEFAULTS:
        config = dataclasses.replace(config, target_modules=DEFAULT_TARGETS)
    targets = module_targets(config, model)
    # IA3 scales the inputs of the feed-forward layers (those outside attention) and the outputs of the others
    ia3 = IA3Config(
        target_modules=targets.modules,
        feedforward_modules=targets.feedforward,
        task_type="CAUSAL_LM",
        **peft_kwargs(config, model),
    )
    return get_peft_model(model, ia3)
