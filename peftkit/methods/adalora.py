"""AdaLoRA through peft: LoRA in SVD form (P diag(E) Q) whose rank budget is re-allocated while training.

Every step, after the optimizer's update and before the gradients are cleared, peft's
`update_and_allocate` scores each singular triplet by its sensitivity (|w * grad|, smoothed) and masks
the least important ones until the average rank falls from `init_r` to `method.r`; a trainer that never
calls it trains plain, fixed-rank LoRA (the silent trap of peft#2940 and sentence-transformers#3842).
Here the call is a callback (`RankAllocation`) that the trainer adds for this method, and the schedule
is tied to the run's length: no pruning for the first 10% of the steps (`tinit`), the budget falling
over the next 70% with a cubic schedule (a re-allocation every 5% of the run, `deltaT`), and the ranks
fixed for the last 20% (`tfinal`).

What checkpoints need beyond the adapter (`checkpoint_state`): the weights at full `init_r` (peft saves
the adapter cut to the allocated ranks, which cannot be loaded back into a model still allocating),
the current rank pattern and the allocator's smoothed scores, so that resume continues the same
allocation exactly and a best-step restore brings back that step's ranks.
"""

from __future__ import annotations

import math

from peftkit.errors import PeftkitError
from peftkit.methods.registry import get_peft_model, peft_kwargs, register
from peftkit.methods.targeting import resolve

INIT_RANK_FACTOR = 1.5  # init_r = 1.5 x method.r, the ratio of the AdaLoRA paper's settings (12 -> 8)


def schedule(total_steps: int) -> dict[str, int]:
    """tinit, tfinal and deltaT for a run of `total_steps` optimizer steps."""
    tinit, tfinal = max(1, total_steps // 10), max(1, total_steps // 5)
    if total_steps - tfinal - tinit < 2:
        raise PeftkitError(
            f"method.name=adalora: train.max_steps={total_steps} leaves no steps to re-allocate ranks in "
            "(10% warm-up, 20% fixed at the end); train for at least 4 steps"
        )
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, total_steps // 20), "total_step": total_steps}


def build_adalora(config, model, total_steps: int | None = None):
    from peft import AdaLoraConfig

    if total_steps is None:
        raise PeftkitError("method.name=adalora: its rank schedule needs the run's length; set train.max_steps "
                           "(train.time_budget fixes the length only once training runs)")  # fmt: skip
    targets = resolve(config, model)
    if targets.parameters:
        raise PeftkitError("method.name=adalora: fused MoE expert parameters take plain LoRA only; "
                           "drop 'experts' from method.target_modules")  # fmt: skip
    adalora = AdaLoraConfig(
        init_r=math.ceil(config.r * INIT_RANK_FACTOR),
        target_r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets.modules,
        task_type="CAUSAL_LM",
        **schedule(total_steps),
        **peft_kwargs(config, model),
    )
    return get_peft_model(model, adalora)


def is_adalora(model) -> bool:
    return hasattr(getattr(model, "base_model", None), "rankallocator")


def ranks(model) -> dict[str, int] | None:
    """The rank each adapted weight has now ({module: rank}), or None if no budget was allocated yet."""
    pattern = model.peft_config["default"].rank_pattern
    if not pattern:
        return None
    return {name.replace(".lora_E", "").replace(".default", ""): int(sum(mask)) for name, mask in pattern.items()}


class RankAllocation:
    """The callback that makes AdaLoRA adaptive: peft's budget update after every applied optimizer step."""

    def on_optimizer_step(self, trainer) -> None:
        trainer.model.base_model.update_and_allocate(trainer.state.step)


def checkpoint_state(model) -> dict:
    """What resume and best-step restore need besides the adapter folder (see the module docstring)."""
    allocator = model.base_model.rankallocator
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".default" in k}
    scores = {name: {k: v.cpu() for k, v in getattr(allocator, name).items()}
              for name in ("ipt", "exp_avg_ipt", "exp_avg_unc")}  # fmt: skip
    return {"weights": weights, "rank_pattern": model.peft_config["default"].rank_pattern, "scores": scores}


def load_checkpoint_state(model, state: dict) -> None:
    result = model.load_state_dict(state["weights"], strict=False)
    if result.unexpected_keys:
        raise PeftkitError(f"AdaLoRA checkpoint: weights do not match this adapter ({result.unexpected_keys[:3]} ...)")
    model.peft_config["default"].rank_pattern = state["rank_pattern"]
    device = next(model.parameters()).device
    allocator = model.base_model.rankallocator
    for name, values in state["scores"].items():
        setattr(allocator, name, {k: v.to(device) for k, v in values.items()})


register("adalora", steps=True)(build_adalora)
