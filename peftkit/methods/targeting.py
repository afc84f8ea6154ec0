"""Which weights an adapter goes on, read from the model's structure rather than from one family's names.

`method.target_modules` takes keywords, module names and regular expressions, mixed freely:

- `attention`: every linear layer of each decoder block's attention module, fused or not (Llama's
  q/k/v/o_proj, GPT-2's c_attn and attn.c_proj, Phi-3's qkv_proj and o_proj, GPT-NeoX's query_key_value
  and dense). The attention module is the block child that holds the projections peft's per-family
  mapping (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`) names for this model type; for a
  family the mapping does not know, the block child named `*attn*`/`*attention*` that holds linear layers.
  All of its linear layers are taken, not only the mapping's (often q and v only).
- `mlp`: the other linear layers of each decoder block (the feed-forward; a MoE block's shared expert
  and gates; its experts too where they are modules).
- `experts`: a mixture-of-experts block's expert weights. Where they are fused 3-D parameters (how
  transformers 5 builds Mixtral and Qwen2-MoE), LoRA goes on them through peft's `target_parameters`;
  where experts are modules, on their linear layers.
- `all-linear`: every linear layer but the output layer (peft's meaning).
- `re:PATTERN`: the linear layers whose full name matches PATTERN (`re.search`).
- any other entry: a module name or name suffix as peft matches it (`q_proj`, `attn.c_proj`); a container
  module (`self_attn`) stands for its linear layers, and a fused expert parameter (`experts.down_proj`)
  is taken through `target_parameters`.

The result goes to peft as the shortest name suffixes that select exactly the chosen modules, so a
Llama model's `attention` is `q_proj, k_proj, v_proj, o_proj` as before. An entry that selects nothing
is a one-line error listing the model's linear layer names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peftkit.errors import PeftkitError

KEYWORDS = ("attention", "mlp", "experts", "all-linear")
REGEX_PREFIX = "re:"
ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class Targets:
    """What one method config adapts in one model, in peft's terms."""

    modules: list[str]
    """peft `target_modules`: name suffixes, each selecting only chosen modules."""
    parameters: list[str] = field(default_factory=list)
    """peft `target_parameters`: fused expert parameters (name suffixes, or full names when layers are chosen)."""
    feedforward: list[str] = field(default_factory=list)
    """The entries of `modules` that lie outside the attention modules (IA3 scales their inputs)."""


def is_linear(module) -> bool:
    """A linear layer as peft adapts it: torch's (bitsandbytes' quantized ones included) or GPT-2's Conv1D."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | Conv1D)


def decoder_blocks(model) -> tuple[str, list[str]]:
    """(the block list's name, e.g. 'model.layers' or 'transformer.h'; each block's full name)."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    modules = model.named_modules()
    lists = [name for name, module in modules if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if not lists:
        return "", []
    name = min(lists, key=lambda n: n.count("."))  # the outermost: an expert list could be as long
    return name, [f"{name}.{i}" for i in range(count)]


def resolve(config, model) -> Targets:
    """`config.target_modules` (MethodConfig) resolved on `model`, the base model before any method."""
    modules = dict(model.named_modules())
    linear = [name for name, module in modules.items() if is_linear(module)]
    structure = _Structure(model, modules, linear)
    chosen: dict[str, None] = {}  # full module names, in model order once sorted below
    parameters: dict[str, None] = {}
    for entry in config.target_modules:
        found, params = structure.select(entry)
        if not found and not params:
            raise PeftkitError(
                f"method.target_modules: {entry!r} selects nothing in {type(model).__name__} "
                f"({structure.why_empty(entry)}); its linear layers: {', '.join(short_names(linear))} "
                f"(or use {', '.join(KEYWORDS)} or re:PATTERN)"
            )
        chosen.update(dict.fromkeys(found))
        parameters.update(dict.fromkeys(params))
    order = {name: i for i, name in enumerate(modules)}
    chosen_names = sorted(chosen, key=order.__getitem__)
    suffixes = minimal_suffixes(chosen_names, list(modules))
    attention = tuple(f"{a}." for a in structure.attention_modules())
    feedforward = [s for s in suffixes if not any(n.startswith(attention) for n in chosen_names if _matches(n, s))]
    if config.layers and parameters:  # peft's layers_to_transform does not filter target_parameters
        _, blocks = decoder_blocks(model)
        kept = tuple(f"{blocks[i]}." for i in config.layers if i < len(blocks))
        parameters = {p: None for p in parameters if p.startswith(kept)}
    params = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names = list(parameters) if config.layers else minimal_suffixes(list(parameters), params, min_parts=2)
    return Targets(suffixes, names, feedforward)


class _Structure:
    """The model's decoder blocks and their attention, feed-forward and expert parts."""

    def __init__(self, model, modules: dict, linear: list[str]):
        self.model, self.modules, self.linear = model, modules, linear
        self.list_name, self.blocks = decoder_blocks(model)
        self._attention: list[str] | None = None

    def select(self, entry: str) -> tuple[list[str], list[str]]:
        """(full module names, full fused-parameter names) one target entry stands for."""
        if entry == "attention":
            return self._under(self.attention_modules()), []
        if entry == "mlp":
            attention = set(self._under(self.attention_modules()))
            return [n for n in self._under([f"{b}." for b in self.blocks], prefix=True) if n not in attention], []
        if entry == "experts":
            return self._experts()
        if entry == "all-linear":
            head = self.model.get_output_embeddings()
            return [n for n in self.linear if self.modules[n] is not head], []
        if entry.startswith(REGEX_PREFIX):
            try:
                regex = re.compile(entry[len(REGEX_PREFIX) :])
            except re.error as err:
                raise PeftkitError(
                    f"method.target_modules: {entry!r} is not a valid regular expression ({err})"
                ) from None
            return [n for n in self.linear if regex.search(n)], []
        found = []
        for name, module in self.modules.items():
            if not _matches(name, entry):
                continue
            if is_linear(module) or not list(module.children()):
                found.append(name)  # a layer peft adapts (or refuses, naming its type)
            else:
                found += self._under([name])  # a container stands for its linear layers
        if found:
            return list(dict.fromkeys(found)), []
        return [], [p for p, value in self.model.named_parameters() if value.dim() == 3 and _matches(p, entry)]

    def why_empty(self, entry: str) -> str:
        if not self.blocks:
            return "no decoder block list found"
        if entry == "attention":
            return "no decoder block has one attention module with linear layers"
        if entry == "mlp":
            return "no linear layer outside attention in its decoder blocks; fused experts are taken by 'experts'"
        if entry == "experts":
            return "no mixture-of-experts block with experts"
        return "no module of that name"

    def attention_modules(self) -> list[str]:
        """Full names of each decoder block's attention module."""
        if self._attention is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

            known = set(PEFT_TARGETS.get(getattr(self.model.config, "model_type", ""), []))
            self._attention = [a for a in (self._attention_of(b, known) for b in self.blocks) if a]
        return self._attention

    def _attention_of(self, block: str, known: set[str]) -> str | None:
        children = [f"{block}.{name}" for name, _ in self.modules[block].named_children()]
        children = [c for c in children if self._under([c])]
        holding = [c for c in children if any(n.rsplit(".", 1)[-1] in known for n in self._under([c]))]
        if len(holding) == 1:
            return holding[0]
        named = [c for c in children if ATTENTION_NAME.search(c.rsplit(".", 1)[-1])]
        return named[0] if len(named) == 1 else None

    def _experts(self) -> tuple[list[str], list[str]]:
        """Expert weights of the feed-forward's MoE blocks: fused 3-D parameters, or per-expert linear layers."""
        blocks = tuple(f"{b}." for b in self.blocks)
        attention = tuple(f"{a}." for a in self.attention_modules())  # JetMoE's attention experts are not these
        found, params = [], []
        for name, module in self.modules.items():
            if name.rsplit(".", 1)[-1] != "experts" or not name.startswith(blocks) or name.startswith(attention):
                continue
            fused = [f"{name}.{p}" for p, value in module.named_parameters(recurse=False) if value.dim() == 3]
            params += fused
            if not fused:  # one module per expert (experts.0.w1, ...), routers aside
                found += [n for n in self._under([name]) if "router" not in n]
        return list(dict.fromkeys(found)), params

    def _under(self, parents: list[str], prefix: bool = False) -> list[str]:
        """Linear layers inside the modules `parents` (or whose names start with them, `prefix`)."""
        starts = tuple(parents) if prefix else tuple(f"{p}." for p in parents)
        return [n for n in self.linear if n.startswith(starts)]


def _matches(name: str, suffix: str) -> bool:
    """peft's rule for a target name: the whole name, or its end after a dot."""
    return name == suffix or name.endswith(f".{suffix}")


def minimal_suffixes(chosen: list[str], universe: list[str], min_parts: int = 1) -> list[str]:
    """The shortest dotted suffixes (of `min_parts` names at least) of `chosen` names that match no name of
    `universe` outside `chosen`; a suffix never starts with a block index ('layers.1.mlp...', not '1.mlp...').
    In order, deduplicated."""
    chosen_set, out, verdicts = set(chosen), {}, {}
    by_last: dict[str, list[str]] = {}  # only names with the same last part can end with a suffix
    for name in universe:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)

    def selects_only_chosen(suffix: str) -> bool:
        if suffix not in verdicts:  # many names share a suffix (every block's q_proj): decide it once
            group = by_last.get(suffix.rsplit(".", 1)[-1], [])
            verdicts[suffix] = all(n in chosen_set for n in group if _matches(n, suffix))
        return verdicts[suffix]

    for name in chosen:
        parts = name.split(".")
        for start in range(max(len(parts) - min_parts, 0), -1, -1):
            if parts[start].isdigit() and start > 0:
                continue
            suffix = ".".join(parts[start:])
            if selects_only_chosen(suffix):
                out[suffix] = None
                break
    return list(out)


def short_names(names: list[str]) -> list[str]:
    """Last name components, deduplicated, in order."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def adapted(peft_model) -> dict:
    """What a built method adapts: {"names": name suffixes, "count": adapted weights}. Trained modules of
    `modules_to_save` count; a frozen carrier (top_layers' identity IA3 vector) does not."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    modules, params = [], []
    for name, module in base.named_modules():
        if any(f".{inner}" in f".{name}" for inner in ("base_layer", "modules_to_save.", "original_module")):
            continue  # inside a wrapper: the wrapper itself is counted
        if not any(p.requires_grad for p in module.parameters()):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            modules.append(name)
        elif isinstance(module, BaseTunerLayer):
            layer = module
            while hasattr(layer, "parameter_name"):  # peft's ParamWrapper, nested once per parameter
                params.append(f"{name}.{layer.parameter_name}")
                layer = layer.base_layer
            if layer is module:
                modules.append(name)
    module_names = [n.replace(".base_layer", "") for n, _ in base.named_modules()]
    param_names = [n.replace(".base_layer", "") for n, _ in base.named_parameters()]
    params.sort(key={name: i for i, name in enumerate(param_names)}.get)  # model order, not peft's nesting order
    names = minimal_suffixes(modules, module_names) + minimal_suffixes(params, param_names, min_parts=2)
    return {"names": names, "count": len(modules) + len(params)}
