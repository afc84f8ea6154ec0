"""IA3: learned per-channel scaling of keys, values and the feed-forward input, through peft."""

from __future__ import annotations

from peftkit.methods import get_peft_model, peft_kwargs, register

DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj"]  # the paper's choice for decoder models
FEEDFORWARD = ["down_proj"]


# IA3 scales activations rather than adding to weights: it needs ~10x LoRA's learning rate
@register("ia3", {"method.target_modules": DEFAULT_TARGETS, "train.lr": 5e-3})
def build_ia3(config, model):
    from peft import IA3Config

    # LoRA's default targets (attention projections) are not IA3's; use IA3's unless the user chose others
    targets = (
        DEFAULT_TARGETS
        if config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        else list(config.target_modules)
    )
    return get_peft_model(model, IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t in FEEDFORWARD],
                                           task_type="CAUSAL_LM", **peft_kwargs(config, model)))  # fmt: skip
