"""One registry of parameter-efficient methods: adding one is a module plus one `@register` line.

A method turns a loaded base model into a trainable `peft.PeftModel` according to `MethodConfig`,
with the base weights frozen. Every method is a peft model, so saving, loading with plain peft,
switching adapters and `disable_adapter()` (the base model, for the guard's comparisons) work the
same for all of them. Families: `lora` (lora, dora, qlora), `lycoris` (loha, lokr), `ia3`,
`prompt` (prompt_tuning, prefix_tuning) and `partial` (top_layers).

Each method declares its preset in its `register` line: the settings it needs on top of a LoRA
recipe such as recipes/medical_lora.py (learning rate 5e-4), e.g. IA3's targets and learning rate.
`variant(...)` names other presets of a method (`pissa` is lora with `method.init=pissa`).
`peftkit compare` and the per-family recipes read them from here. torch is imported only where a
method is built, so reading the registry and its presets (the CLI's help, config checks) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    import torch

    from peftkit.config import Config

_REGISTRY: dict[str, Callable] = {}
_STEPPED: set[str] = set()  # methods whose builder takes the run's length (AdaLoRA's rank schedule)
_PRESETS: dict[str, Preset] = {}  # in declaration order: the order of `peftkit compare`'s table


@dataclass(frozen=True)
class Preset:
    """A named way to run a method: the method and the settings it needs on top of a LoRA recipe."""

    name: str
    method: str
    settings: dict[str, object] = field(default_factory=dict)  # dotted config keys: {"train.lr": 5e-3}

    def overrides(self) -> list[str]:
        """The preset as command-line overrides, e.g. ['--method.name=ia3', '--train.lr=0.005']."""
        return [f"--{key}={_text(value)}" for key, value in {"method.name": self.method, **self.settings}.items()]

    def apply(self, config: Config) -> Config:
        """A copy of `config` with this preset's method and settings, resolved as the command line would."""
        return config.override(self.overrides(), origin=f"preset {self.name}")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def register(name: str, preset: dict[str, object] | None = None, steps: bool = False) -> Callable[[Callable], Callable]:
    """Register a method's builder under `name`, with its preset (`preset`: settings on top of a LoRA
    recipe, as dotted config keys, e.g. {"train.lr": 1e-3}) under the same name. `steps`: the builder also
    takes `total_steps`, the run's length (None when it is not known before training)."""

    def decorate(build: Callable) -> Callable:
        _REGISTRY[name] = build
        if steps:
            _STEPPED.add(name)
        variant(name, name, preset or {})
        return build

    return decorate


def variant(name: str, method: str, settings: dict[str, object]) -> None:
    """Name another preset of the registered `method`, e.g. variant("rslora", "lora", {"method.rslora": True})."""
    if method not in _REGISTRY:
        raise PeftkitError(f"preset {name}: method {method!r} is not registered (register it first)")
    if "method.name" in settings:
        raise PeftkitError(f"preset {name}: the method is {method!r}; do not set method.name in its settings")
    if name in _PRESETS:
        raise PeftkitError(f"preset {name}: declared twice")
    _PRESETS[name] = Preset(name, method, dict(settings))


def names() -> list[str]:
    return sorted(_REGISTRY)


def presets() -> dict[str, Preset]:
    """Every preset by name, methods and variants, in declaration order."""
    return dict(_PRESETS)


def preset(name: str) -> Preset:
    if name not in _PRESETS:
        raise PeftkitError(f"unknown preset {name!r}; choose from {', '.join(_PRESETS)}")
    return _PRESETS[name]


def apply(config, model, total_steps: int | None = None):
    """Wrap `model` with the method `config.name` describes; base weights end up frozen. `total_steps`: the
    optimizer steps the run will take, for methods whose schedule depends on it (AdaLoRA)."""
    from peft import prepare_model_for_kbit_training

    if config.name not in _REGISTRY:
        raise PeftkitError(f"method.name: unknown method '{config.name}'; available: {', '.join(names())}")
    if getattr(model, "is_quantized", False):
        # fp32 norms and embeddings, input gradients on; no gradient checkpointing (it costs speed, not needed here)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    build = _REGISTRY[config.name]
    peft_model = build(config, model, total_steps) if config.name in _STEPPED else build(config, model)
    if config.neftune_alpha:
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(peft_model, config.neftune_alpha)  # noise only while the model is in training mode
    return peft_model


def peft_kwargs(config, model) -> dict:
    """Options several peft configs share: which blocks to adapt."""
    if not config.layers:
        return {}
    from peftkit.methods.targeting import decoder_blocks

    blocks = model.config.num_hidden_layers
    if max(config.layers) >= blocks:
        raise PeftkitError(f"method.layers: the model has blocks 0..{blocks - 1}; got {config.layers}")
    list_name, _ = decoder_blocks(model)  # 'model.layers', GPT-2's 'transformer.h'
    return {"layers_to_transform": list(config.layers), "layers_pattern": list_name.rsplit(".", 1)[-1] or "layers"}


def module_targets(config, model):
    """method.target_modules resolved on `model` (`peftkit.methods.targeting.Targets`) for a method that adapts
    modules only: fused expert parameters take LoRA (peft's target_parameters), so they are refused here."""
    from peftkit.methods.targeting import resolve

    resolved = resolve(config, model)
    if resolved.parameters:
        raise PeftkitError(
            f"method.target_modules: {','.join(config.target_modules)} includes fused expert parameters "
            f"({', '.join(resolved.parameters)}), which only LoRA adapts here (method.name=lora); method "
            f"{config.name} takes modules only"
        )
    return resolved


def targets(config, model) -> list[str]:
    """method.target_modules for peft: the name suffixes of the modules it selects in `model`."""
    return module_targets(config, model).modules


def adapted_modules(model) -> dict:
    """What the method adapted in `model` (a peft model): {"names": [...], "count": N}, for preview and report."""
    from peftkit.methods.targeting import adapted

    return adapted(model)


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
    import torch

    if config.lora_plus_ratio:
        from peft.optimizers import create_loraplus_optimizer

        if not any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad):
            raise PeftkitError(f"method.lora_plus_ratio: LoRA+ needs LoRA B matrices; method {config.name} has none")
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=config.lora_plus_ratio,
                                         weight_decay=weight_decay)  # fmt: skip
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def callbacks(config) -> list:
    """Callbacks a method needs in the training loop (AdaLoRA's rank allocation after every step)."""
    if config.name == "adalora":
        from peftkit.methods.adalora import RankAllocation

        return [RankAllocation()]
    return []


def converts_on_save(config) -> bool:
    """PiSSA and OLoRA move the base weights at initialisation; the saved adapter is converted back to
    plain LoRA on the original base, so everything downstream loads it onto the unmodified model."""
    return config.name in ("lora", "qlora") and config.init in ("pissa", "olora")
