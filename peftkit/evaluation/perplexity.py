"""Token-level negative log-likelihood over packed rows, sharded across processes and summed exactly."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from peftkit import loss as chunked_loss
from peftkit import sharding
from peftkit.data import IGNORE_INDEX
from peftkit.methods import sequence_logits
from peftkit.progress import bar


@torch.no_grad()
def nll(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int, accelerator=None) -> tuple[float, int]:
    """Summed next-token NLL and the number of scored tokens over all rows.

    Each process scores rows rank, rank+world, ...; the sums are added across processes, so every
    row counts exactly once whatever the process count.
    """
    totals = _score(model, input_ids, labels, batch_size, accelerator, per_row=False)
    if accelerator and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return totals[0].item(), int(totals[1].item())


@torch.no_grad()
def nll_rows(
    model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int, accelerator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL (float64) and scored tokens (int64), for every row in row order, on
    every process: what the bootstrap resamples. The same forward passes as `nll`, split by row."""
    mine = _score(model, input_ids, labels, batch_size, accelerator, per_row=True)  # [my rows, 2]
    world = accelerator.num_processes if accelerator else 1
    n = len(input_ids)
    if world > 1:  # pad to the same length everywhere, gather, and put row rank + j*world back at its place
        per = -(-n // world)
        padded = torch.zeros(per, 2, dtype=mine.dtype, device=mine.device)
        padded[: len(mine)] = mine
        gathered = accelerator.gather(padded).view(world, per, 2)
        mine = gathered.transpose(0, 1).reshape(-1, 2)[:n]
    mine = mine.cpu()
    return mine[:, 0].clone(), mine[:, 1].round().long()


def _score(model, input_ids, labels, batch_size: int, accelerator, per_row: bool) -> torch.Tensor:
    """This process's rows (rank, rank+world, ...) scored: [NLL sum, tokens] in total, or one pair per row."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    autocast = accelerator.autocast() if accelerator else nullcontext()
    mine = torch.arange(rank, len(input_ids), world)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    rows = []
    was_training = model.training
    model.eval()
    show = rank == 0 and len(mine) > 4 * batch_size
    with autocast, bar(total=len(mine) * world, desc="evaluate", unit="row", disable=not show, leave=False) as progress:
        for start in range(0, len(mine), batch_size):
            progress.update(min(batch_size, len(mine) - start) * world)
            index = mine[start : start + batch_size]
            x, y = input_ids[index].to(device), labels[index].to(device)
            counts = (y[:, 1:] != IGNORE_INDEX).sum(dim=1).double()
            if per_row:
                rows.append(torch.stack([_row_losses(model, x, y).double(), counts], dim=1))
            else:
                totals += torch.stack([_batch_loss(model, x, y).double(), counts.sum()])
        if world > 1 and sharding.is_sharded(model):
            # a sharded model's layers gather their weights from every process: all make the same number of calls
            most_rows = -(-len(input_ids) // world)
            for _ in range(math.ceil(most_rows / batch_size) - math.ceil(len(mine) / batch_size)):
                _batch_loss(model, input_ids[:1].to(device), labels[:1].to(device))
    model.train(was_training)
    if per_row:
        return torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64, device=device)
    return totals


def _batch_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL of a batch of rows."""
    if chunked_loss.chunked_matches(model, x[:1], y[:1]):  # never all of the batch's logits at once
        decoder, head = chunked_loss.decoder_and_head(model)
        return chunked_loss.nll_sum(head, chunked_loss.hidden_states(decoder, x), y)
    logits = sequence_logits(model, x)[:, :-1]
    flat = logits.float().reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, y[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _row_losses(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each row of a batch: one forward pass, the output layer row by row."""
    if chunked_loss.chunked_matches(model, x[:1], y[:1]):
        decoder, head = chunked_loss.decoder_and_head(model)
        hidden = chunked_loss.hidden_states(decoder, x)
        return torch.stack([chunked_loss.nll_sum(head, hidden[i : i + 1], y[i : i + 1]) for i in range(len(x))])
    logits = sequence_logits(model, x)[:, :-1]
    flat = logits.float().reshape(-1, logits.size(-1))
    losses = F.cross_entropy(flat, y[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(len(x), -1).sum(dim=1)


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")
