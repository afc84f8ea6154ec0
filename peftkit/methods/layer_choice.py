"""`method.auto_layers=N`: put the adapter on the N blocks where the training data pulls hardest.

Before training, the method is applied to every block and its adapter's gradient is measured on the
run's own first training batches (`PROBE_BATCHES` micro-batches, the loss the run trains on): a block's
score is the norm of the gradient of all its adapter weights. For LoRA, whose B starts at zero, that is
the rate at which a step on that block's adapter can lower the loss. The N highest-scoring blocks are
kept (ties to the lower block), the adapter is removed, and the method is applied again to those blocks
only, from the same random state a run given `method.layers` explicitly would start from: a run with
`auto_layers` equals the run with its chosen `method.layers` written out. Scores (each block's share of
the total) and the choice go into report.json (`layer_scores`, `chosen_layers`); under several
processes the scores are summed over every process's batches, so all choose alike.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from peftkit.errors import PeftkitError

PROBE_BATCHES = 4  # training micro-batches the gradient is measured on
_PROBED = ("lora", "dora", "adalora", "loha", "lokr", "ia3")  # methods that adapt chosen blocks (layers_to_transform)


def check(config) -> None:
    """Refuse method.auto_layers where it cannot apply (config: MethodConfig)."""
    if config.name not in _PROBED:
        raise PeftkitError(f"method.auto_layers: method {config.name} does not adapt chosen blocks; "
                           f"use one of {', '.join(_PROBED)}")  # fmt: skip
    if config.layers:
        raise PeftkitError("method.auto_layers chooses method.layers itself; set one of the two")
    if config.init in ("pissa", "olora"):
        raise PeftkitError(f"method.auto_layers with method.init={config.init}: the probe would change the base "
                           "weights it leaves behind; use method.init=default")  # fmt: skip


def block_scores(model, data, accelerator, batch_size: int) -> list[float]:
    """Each block's share of the adapter's gradient norm on the first training batches (all processes)."""
    from peftkit.loss import TrainingForward
    from peftkit.methods.targeting import decoder_blocks

    base = model.get_base_model()
    list_name, blocks = decoder_blocks(base)
    if not blocks:
        raise PeftkitError("method.auto_layers: no list of decoder blocks found in this model")
    index = re.compile(rf"(?:^|\.){re.escape(list_name)}\.(\d+)\.")
    forward = TrainingForward(model)
    squares = torch.zeros(len(blocks), dtype=torch.float64, device=accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in range(PROBE_BATCHES):
        batch = data.batch(step, 0, rank, world, batch_size, 1).to(accelerator.device)
        with accelerator.autocast():
            loss = forward(**batch.model_inputs())
        loss.backward()
        for name, param in model.named_parameters():
            found = index.search(name.removeprefix("base_model.model."))
            if param.grad is not None and found:
                squares[int(found.group(1))] += param.grad.double().pow(2).sum()
        model.zero_grad(set_to_none=True)
    if world > 1:
        squares = accelerator.reduce(squares, reduction="sum")
    norms = squares.sqrt().cpu()
    return (norms / norms.sum().clamp(min=1e-30)).tolist()


def choose(scores: list[float], n: int) -> list[int]:
    if n > len(scores):
        raise PeftkitError(f"method.auto_layers={n}: the model has {len(scores)} blocks")
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n])


def reapply(run, model, data, accelerator, log) -> tuple:
    """Measure, choose, and apply the method again to the chosen blocks (`run`: the Config):
    (the new peft model, {"layer_scores": [...], "chosen_layers": [...]} for the report)."""
    from accelerate.utils import set_seed

    from peftkit.methods.registry import apply

    config = run.method
    scores = block_scores(model, data, accelerator, run.train.batch_size)
    chosen = choose(scores, config.auto_layers)
    base = model.unload()  # the adapter layers removed, the base weights as loaded
    set_seed(run.seed)  # the random state a run with method.layers written out starts its adapter from
    chosen_config = dataclasses.replace(config, layers=chosen, auto_layers=0)
    log(
        f"method.auto_layers={config.auto_layers}: blocks {chosen} by gradient share "
        f"({', '.join(f'{i}:{s:.2f}' for i, s in enumerate(scores))})"
    )
    steps = None if run.train.time_budget_s else run.train.max_steps
    new = apply(chosen_config, base, steps)
    return new, {"layer_scores": [round(s, 6) for s in scores], "chosen_layers": chosen}
