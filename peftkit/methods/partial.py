"""Partial fine-tuning without adapters: the top N transformer blocks are trained in full, the
rest stay frozen.

Built on peft's `modules_to_save` so it behaves like every other method: the trained copies of
those blocks' weights are the "adapter" (saved, reloaded with plain peft, merged by replacing the
originals) and `disable_adapter()` gives back the untouched base for the guard's comparisons.
peft needs at least one adapted module to build a model; the carrier is an IA3 scaling vector on
one frozen linear layer, kept frozen at its initial value of exactly 1 (an identity).
`method.unfreeze_pattern` (a regex over module names) chooses the trained modules instead.
"""

from __future__ import annotations

import re

from peftkit.errors import PeftkitError
from peftkit.methods.registry import get_peft_model, register
from peftkit.methods.targeting import decoder_blocks, is_linear


def top_block_modules(model, n: int) -> tuple[list[str], int]:
    """Full names of the leaf modules with weights in the last `n` blocks, and the number of blocks."""
    blocks = model.config.num_hidden_layers
    if n > blocks:
        raise PeftkitError(f"method.top_layers: the model has {blocks} blocks; got {n}")
    prefixes = tuple(f"{block}." for block in decoder_blocks(model)[1][blocks - n :])  # model.layers.N, transformer.h.N
    names = [
        name
        for name, module in model.named_modules()
        if not list(module.children())
        and any(True for _ in module.parameters(recurse=False))
        and name.startswith(prefixes)
    ]
    return names, blocks


def pattern_modules(model, pattern: str) -> list[str]:
    """Full names of the leaf modules with weights whose name matches `pattern` (re.search)."""
    regex = re.compile(pattern)
    names = [name for name, module in model.named_modules()
             if not list(module.children()) and any(True for _ in module.parameters(recurse=False))
             and regex.search(name)]  # fmt: skip
    if not names:
        raise PeftkitError(f"method.unfreeze_pattern {pattern!r} matches no module with weights (e.g. 'layers.29.mlp')")
    if len(names) == sum(
        1 for _, m in model.named_modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ):
        raise PeftkitError(f"method.unfreeze_pattern {pattern!r} matches every module; that is full fine-tuning")
    return names


# whole blocks train in full: ~5x less than a LoRA recipe's learning rate
@register("top_layers", {"method.top_layers": 2, "train.lr": 1e-4})
def build_top_layers(config, model):
    from peft import IA3Config

    if config.unfreeze_pattern:
        modules = pattern_modules(model, config.unfreeze_pattern)
    else:
        modules, blocks = top_block_modules(model, config.top_layers)
        if config.top_layers == blocks:
            raise PeftkitError(
                f"method.top_layers={blocks} unfreezes every block; that is full fine-tuning, choose fewer"
            )
    trained = set(modules)
    in_blocks = tuple(f"{block}." for block in decoder_blocks(model)[1])
    carrier = next(
        (n for n, m in model.named_modules() if is_linear(m) and n.startswith(in_blocks) and n not in trained),
        None,
    )
    if carrier is None:
        raise PeftkitError(
            "method.top_layers: needs a model with blocks under layers.N and one linear layer left frozen"
        )
    peft_model = get_peft_model(model, IA3Config(target_modules=[carrier], feedforward_modules=[], modules_to_save=modules,
                                                 task_type="CAUSAL_LM"), "method.top_layers")  # fmt: skip
    for name, param in peft_model.named_parameters():
        if "ia3_l" in name:
            param.requires_grad_(False)
    return peft_model
