"""LoHa (Hadamard product of two low-rank pairs) and LoKr (Kronecker product) through peft."""

from __future__ import annotations

from peftkit.methods.registry import get_peft_model, peft_kwargs, register, targets


# half a LoRA recipe's rank and alpha: the Hadamard product of two rank-8 pairs reaches rank 64
@register("loha", {"method.r": 8, "method.alpha": 16})
def build_loha(config, model):
    from peft import LoHaConfig

    return get_peft_model(model, LoHaConfig(r=config.r, alpha=config.alpha, module_dropout=config.dropout,
                                            target_modules=targets(config, model), task_type="CAUSAL_LM",
                                            **peft_kwargs(config, model)))  # fmt: skip


@register("lokr", {"train.lr": 1e-3})  # twice a LoRA recipe's learning rate
def build_lokr(config, model):
    from peft import LoKrConfig

    return get_peft_model(model, LoKrConfig(r=config.r, alpha=config.alpha, module_dropout=config.dropout,
                                            target_modules=targets(config, model), task_type="CAUSAL_LM",
                                            **peft_kwargs(config, model)))  # fmt: skip
