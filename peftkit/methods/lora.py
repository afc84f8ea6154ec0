"""The LoRA family through peft: LoRA, DoRA, QLoRA (LoRA on a bitsandbytes-quantized base), with
rsLoRA scaling, PiSSA/OLoRA/Gaussian initialisation and layer selection as options."""

from __future__ import annotations

from peftkit.errors import PeftkitError
from peftkit.methods.registry import get_peft_model, peft_kwargs, register, variant
from peftkit.methods.targeting import resolve

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def lora_config(config, model, use_dora: bool = False):
    from peft import LoraConfig

    if config.init in ("pissa", "olora") and use_dora:
        raise PeftkitError(f"method.init={config.init} with dora: the adapter cannot be converted back to plain "
                           "LoRA on the original base; use method.name=lora or method.init=default")  # fmt: skip
    if config.init in ("pissa", "olora") and getattr(model, "is_quantized", False):
        raise PeftkitError(f"method.init={config.init}: initialising from a quantized base's weights is not supported "
                           "here; use model.quantization=none or method.init=default")  # fmt: skip
    targets = resolve(config, model)
    # fused MoE expert weights are parameters, not modules: peft's target_parameters adapts them
    experts = {"target_parameters": targets.parameters} if targets.parameters else {}
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets.modules,
        use_rslora=config.rslora,
        use_dora=use_dora,
        init_lora_weights=INIT[config.init],
        task_type="CAUSAL_LM",
        **experts,
        **peft_kwargs(config, model),
    )


def build_lora(config, model):
    return get_peft_model(model, lora_config(config, model))


def build_dora(config, model):
    """Weight-decomposed LoRA: a trained magnitude per output row plus a LoRA direction update."""
    return get_peft_model(model, lora_config(config, model, use_dora=True))


# The family's methods and named variants, in the order `peftkit compare` lists them. A LoRA recipe is
# the reference the presets are written against, so lora itself needs no settings.
register("lora")(build_lora)
variant("rslora", "lora", {"method.rslora": True})
register("dora")(build_dora)
variant("pissa", "lora", {"method.init": "pissa"})
# LoRA+: the B matrices learn at 16x the learning rate, which is half a LoRA recipe's
variant("lora_plus", "lora", {"method.lora_plus_ratio": 16, "train.lr": 2.5e-4})
# LoRA on a quantized base: the base's quantization comes from model.quantization (checked by the config)
register("qlora", {"model.quantization": "nf4"})(build_lora)
