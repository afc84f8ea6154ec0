"""One registry of adapter methods: adding a method is one module plus one `@register` line.

A method turns a loaded base model into a trainable `peft.PeftModel` according to `MethodConfig`.
"""

from __future__ import annotations

from collections.abc import Callable

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
    """Wrap `model` with the adapter `config.name` describes; base weights end up frozen."""
    if config.name not in _REGISTRY:
        raise PeftkitError(f"method.name: unknown method '{config.name}'; available: {', '.join(names())}")
    return _REGISTRY[config.name](config, model)


from peftkit.methods import lora  # noqa: E402,F401  (registers itself)
