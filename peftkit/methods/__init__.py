"""One registry of parameter-efficient methods: adding one is a module plus one `@register` line.

A method turns a loaded base model into a trainable `peft.PeftModel` according to `MethodConfig`,
with the base weights frozen. Every method is a peft model, so saving, loading with plain peft,
switching adapters and `disable_adapter()` (the base model, for the guard's comparisons) work the
same for all of them. Families: `lora` (lora, dora, qlora), `lycoris` (loha, lokr), `ia3`,
`prompt` (prompt_tuning, prefix_tuning) and `partial` (top_layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peftkit.errors import PeftkitError

_REGISTRY: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    def decorate(build: Callable) -> Callable:
        _REGISTRY[name] = build
        return build

    return decorate


def names() -> list[str]:
    return sorted(_REGISTRY)


def apply(config, model):
    """Wrap `model` with the method `config.name` describes; base weights end up frozen."""
    from peft import prepare_model_for_kbit_training

    if config.name not in _REGISTRY:
        raise PeftkitError(f"method.name: unknown method '{config.name}'; available: {', '.join(names())}")
    if getattr(model, "is_quantized", False):
        # fp32 norms and embeddings, input gradients on; no gradient checkpointing (it costs speed, not needed here)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = _REGISTRY[config.name](config, model)
    if config.neftune_alpha:
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(peft_model, config.neftune_alpha)  # noise only while the model is in training mode
    return peft_model


def peft_kwargs(config, model) -> dict:
    """Options several peft configs share: which blocks to adapt."""
    if not config.layers:
        return {}
    blocks = model.config.num_hidden_layers
    if max(config.layers) >= blocks:
        raise PeftkitError(f"method.layers: the model has blocks 0..{blocks - 1}; got {config.layers}")
    return {"layers_to_transform": list(config.layers), "layers_pattern": "layers"}


def targets(config, model) -> str | list[str]:
    """method.target_modules for peft; ['all-linear'] is expanded to names when layers are chosen
    (peft takes `layers_to_transform` only with a list of names)."""
    if config.target_modules != ["all-linear"]:
        return list(config.target_modules)
    if not config.layers:
        return "all-linear"
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"})  # fmt: skip


def get_peft_model(model, peft_config, config_key: str = "method.target_modules"):
    from peft import get_peft_model as wrap

    try:
        # autocast_adapter_dtype keeps adapter weights in fp32 over a bf16 base, for stable updates
        return wrap(model, peft_config, autocast_adapter_dtype=True)
    except ValueError as err:
        raise PeftkitError(f"{config_key}: {err}") from None


def is_prompt_learning(model) -> bool:
    """Prompt/prefix tuning: the adapter is extra inputs, not a change to any weight."""
    config = getattr(model, "active_peft_config", None)
    return bool(config and config.is_prompt_learning)


def sequence_logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits for the positions of `input_ids` only (prompt tuning prepends virtual-token positions)."""
    return model(input_ids=input_ids, **kwargs).logits[:, -input_ids.shape[1] :]


def optimizer(config, model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; LoRA+ gives the B matrices `lora_plus_ratio` x the learning rate."""
    if config.lora_plus_ratio:
        from peft.optimizers import create_loraplus_optimizer

        if not any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad):
            raise PeftkitError(f"method.lora_plus_ratio: LoRA+ needs LoRA B matrices; method {config.name} has none")
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=config.lora_plus_ratio,
                                         weight_decay=weight_decay)  # fmt: skip
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def converts_on_save(config) -> bool:
    """PiSSA and OLoRA move the base weights at initialisation; the saved adapter is converted back to
    plain LoRA on the original base, so everything downstream loads it onto the unmodified model."""
    return config.name in ("lora", "qlora") and config.init in ("pissa", "olora")


from peftkit.methods import ia3, lora, lycoris, partial, prompt  # noqa: E402,F401  (they register themselves)
