"""Parameter-efficient methods: one registry (`peftkit.methods.registry`), one small module per family.

`lora` (lora, dora, qlora and the rslora / pissa / lora_plus presets), `adalora`, `lycoris` (loha, lokr), `ia3`,
`prompt` (prompt_tuning, prefix_tuning) and `partial` (top_layers) register themselves on import; what to
adapt is resolved from the model's structure in `targeting`.
"""

from peftkit.methods.registry import (
    Preset,
    adapted_modules,
    apply,
    callbacks,
    converts_on_save,
    get_peft_model,
    is_prompt_learning,
    module_targets,
    names,
    optimizer,
    peft_kwargs,
    preset,
    presets,
    register,
    sequence_logits,
    targets,
    variant,
)

# The families register themselves on import, in this order: it is the order of the presets (and
# of `peftkit compare`'s table), so it is kept as written rather than sorted.
# isort: off
from peftkit.methods import lora, adalora, ia3, lycoris, prompt, partial  # noqa: E402,F401
# isort: on

__all__ = [
    "adapted_modules",
    "apply",
    "callbacks",
    "converts_on_save",
    "get_peft_model",
    "is_prompt_learning",
    "module_targets",
    "names",
    "optimizer",
    "peft_kwargs",
    "Preset",
    "preset",
    "presets",
    "register",
    "sequence_logits",
    "targets",
    "variant",
]
