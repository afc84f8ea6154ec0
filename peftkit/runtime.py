"""The runtime around the training forward: regional compilation, eager evaluation, CPU threads.

Regional compilation compiles each decoder layer (`nn.Module.compile`); the layers share one
compiled graph, so compiling costs seconds rather than minutes, and inductor's cache
($PEFTKIT_CACHE/inductor) makes the next run start faster still. Evaluation and generation run
eagerly (`eager()`): their shapes vary, and recompiling for each would cost more than it saves.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import torch
from torch import nn

COMPILE_MIN_PARAMS = 50_000_000  # 'auto' compiles models at least this big: smaller ones train in seconds anyway


def _base(model):
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compile_wanted(setting: str, model: nn.Module) -> tuple[bool, str]:
    """Whether to compile ('auto': models of 50M+ parameters where a C++ compiler exists), and why not.

    Prompt-learning methods and quantized bases always run eagerly."""
    from peftkit.methods import is_prompt_learning

    if setting == "false":
        return False, "train.compile=false"
    if is_prompt_learning(model):
        return False, "prompt-learning methods run eagerly (their forward feeds virtual tokens or a prefix cache)"
    if getattr(_base(model), "is_quantized", False):
        return False, "quantized (bitsandbytes) bases run eagerly"
    if torch.device(_device(model)).type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        why = "no C++ compiler (g++) found, which torch.compile needs on the CPU; install one (apt install g++)"
        if setting == "true":
            from peftkit.errors import PeftkitError

            raise PeftkitError(f"train.compile=true: {why}, or set train.compile=false")
        return False, why
    if setting == "auto" and sum(p.numel() for p in model.parameters()) < COMPILE_MIN_PARAMS:
        return False, f"train.compile=auto: models under {COMPILE_MIN_PARAMS // 1_000_000}M parameters run eagerly"
    return True, ""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def compile_layers(model: nn.Module, cache_dir) -> int:
    """Compile every decoder layer in place (regional compilation); returns how many were compiled."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    from peftkit.loss import decoder_and_head

    decoder = decoder_and_head(model)
    layers = decoder_layers(decoder[0]) if decoder else None
    if layers is None:
        return 0
    for layer in layers:
        layer.compile()
    return len(layers)


def decoder_layers(decoder: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of blocks: `layers` (Llama and most families), `h` (GPT-2, Falcon, Bloom), `blocks`, or
    else the one module list directly under the decoder; None where there is none."""
    lists = {name: child for name, child in decoder.named_children() if isinstance(child, nn.ModuleList)}
    for name in ("layers", "h", "blocks"):
        if name in lists:
            return lists[name]
    return next(iter(lists.values())) if len(lists) == 1 else None


@contextmanager
def eager():
    """Run compiled modules eagerly inside (evaluation, generation: shapes vary, compiling would not pay)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def set_threads(processes_here: int) -> int:
    """Share the CPU cores between the processes of this machine (torch uses them all in each by default)."""
    if "OMP_NUM_THREADS" not in os.environ and processes_here > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // processes_here))
    return torch.get_num_threads()
