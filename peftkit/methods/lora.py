"""LoRA through peft."""

from __future__ import annotations

from peftkit.errors import PeftkitError
from peftkit.methods import register


@register("lora")
def build_lora(config, model):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype keeps the adapter weights in fp32 over a bf16 base, for stable updates
        return get_peft_model(model, lora, autocast_adapter_dtype=True)
    except ValueError as err:
        raise PeftkitError(f"method.target_modules: {err}") from None
