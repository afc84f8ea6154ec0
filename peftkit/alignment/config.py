"""The `align.*` settings of a train.objective=dpo run."""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.schema import option, require

LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class AlignConfig:
    beta: float = option(
        0.1, "DPO: how far from the reference the implicit reward lets the model move (larger = closer)"
    )
    loss: str = option(
        "sigmoid", "DPO loss on the reward margin, as trl defines it: sigmoid (DPO), ipo (IPO), hinge (SLiC)", LOSSES
    )

    def __post_init__(self):
        require(self.beta > 0, "align.beta", f"must be positive, got {self.beta}")


def text_only(config, command: str) -> None:
    """Refuse a command that does not handle preference runs yet, in one line."""
    from peftkit.errors import PeftkitError

    if config.train.objective != "lm":
        raise PeftkitError(f"{command}: not available for train.objective={config.train.objective} yet; a DPO run "
                           "is evaluated and reported when it ends (docs/alignment.md)")  # fmt: skip
