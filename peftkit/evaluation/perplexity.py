"""Token-level negative log-likelihood over packed rows, sharded across processes and summed exactly."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from peftkit import loss as chunked_loss
from peftkit.data import IGNORE_INDEX
from peftkit.methods import sequence_logits
from peftkit.progress import bar


@torch.no_grad()
def nll(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int, accelerator=None) -> tuple[float, int]:
    """Summed next-token NLL and the number of scored tokens over all rows.

    Each process scores rows rank, rank+world, ...; the sums are added across processes, so every
    row counts exactly once whatever the process count.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    autocast = accelerator.autocast() if accelerator else nullcontext()
    mine = torch.arange(rank, len(input_ids), world)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    show = rank == 0 and len(mine) > 4 * batch_size
    with autocast, bar(total=len(mine) * world, desc="evaluate", unit="row", disable=not show, leave=False) as progress:
        for start in range(0, len(mine), batch_size):
            progress.update(min(batch_size, len(mine) - start) * world)
            index = mine[start : start + batch_size]
            x, y = input_ids[index].to(device), labels[index].to(device)
            target = y[:, 1:]
            if chunked_loss.chunked_matches(model, x[:1], y[:1]):  # never all of the batch's logits at once
                decoder, head = chunked_loss.decoder_and_head(model)
                loss = chunked_loss.nll_sum(head, chunked_loss.hidden_states(decoder, x), y)
            else:
                logits = sequence_logits(model, x)[:, :-1]
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)),
                    target.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            totals += torch.stack([loss.double(), (target != IGNORE_INDEX).sum().double()])
    model.train(was_training)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return totals[0].item(), int(totals[1].item())


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")
