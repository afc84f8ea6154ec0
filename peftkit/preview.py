"""`peftkit preview RECIPE`: what would be trained, before any training.

Token counts per split, packing efficiency, the share of tokens that carry loss, the first
training row as the model will see it, a memory estimate and the expected time, from one timed
training step of the real model on this machine.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from peftkit import data, methods, models
from peftkit.config import Config
from peftkit.loss import CHUNK_TOKENS, training_forward

SAMPLE_DOCS = 2000  # larger training splits are counted on a seeded sample and extrapolated


def preview(config: Config, timed_steps: int = 2, log=print) -> dict:
    from peftkit.alignment.config import text_only

    text_only(config, "peftkit preview")
    tokenizer = models.load_tokenizer(config.model, log=log)
    seq_len, batch = config.data.seq_len, config.train.batch_size
    splits = {}
    train_docs = data.training_documents(config.data, config.seed, log)  # the documents training would read
    if data.streaming.active(config.data, log):  # counted on the index's sample, never loaded whole
        stats = data.streaming.train_stats(config.data, log)
        share = min(1.0, (config.data.max_train_docs or math.inf) / stats["train"]["documents"])
        totals = {
            "documents": round(stats["train"]["documents"] * share),
            "characters": round(stats["train"]["characters"] * share),
        }
        splits["train"] = _count(tokenizer, train_docs, config.seed, config.data, totals)
        for split in ("validation", "test"):
            docs = data.load_split(config.data, split)
            splits[split] = _count(tokenizer, docs, config.seed, config.data, stats[split])
    else:
        train_docs = data.augment_documents(train_docs, config.data, config.seed)
        splits["train"] = _count(tokenizer, train_docs, config.seed, config.data)
        for split in ("validation", "test"):
            splits[split] = _count(tokenizer, data.load_split(config.data, split), config.seed, config.data)
    general = data.load_general(config.data)
    if general:
        splits["general"] = _count(tokenizer, general, config.seed)
    train_tokens = splits["train"]["tokens"] / (1 - config.data.replay)
    rows = int(train_tokens // seq_len)
    step_tokens = batch * config.train.grad_accum * seq_len
    out = {
        "splits": splits,
        "replay_tokens": int(train_tokens - splits["train"]["tokens"]),
        "packing_efficiency": rows * seq_len / train_tokens,  # the rest is the dropped tail of an epoch
        # every token but a row's first is predicted; instruction/chat: only response tokens
        "loss_token_share": splits["train"]["loss_share"] * (seq_len - 1) / seq_len,
        "rows_per_epoch": rows,
        "tokens_per_step": step_tokens,
        "epochs": config.train.max_steps * step_tokens / max(rows * seq_len, 1),
        "example": _example(tokenizer, train_docs, seq_len, config.data),
    }
    out.update(_cost(config, tokenizer, timed_steps, log))
    out["seconds_per_epoch"] = rows * seq_len / out["tokens_per_s"]
    out["seconds_for_max_steps"] = config.train.max_steps * step_tokens / out["tokens_per_s"]
    return out


def _count(tokenizer, docs: list[str], seed: int, config=None, totals: dict | None = None) -> dict:
    """Documents, tokens (estimated from a sample for large splits) and the share that carries loss.
    `totals`: {"documents", "characters"} of the whole split when `docs` is a sample of it."""
    sample = docs
    if len(docs) > SAMPLE_DOCS:
        sample = [docs[i] for i in np.random.default_rng(seed).choice(len(docs), SAMPLE_DOCS, replace=False)]
    pairs = data.encode(tokenizer, sample, config)
    tokens = sum(len(ids) for ids, _ in pairs)
    share = sum(int((labels != data.IGNORE_INDEX).sum()) for _, labels in pairs) / max(tokens, 1)
    totals = totals or {"documents": len(docs), "characters": sum(len(d) for d in docs)}
    estimated = len(sample) < totals["documents"]
    if estimated:  # tokens per character of the sample, times the split's characters
        tokens = int(tokens / max(sum(len(d) for d in sample), 1) * totals["characters"])
    return {"documents": totals["documents"], "tokens": int(tokens), "estimated": estimated, "loss_share": share}


def _example(tokenizer, docs: list[str], seq_len: int, config=None) -> str:
    """The first training row as the model sees it: document boundaries (EOS) and the tokens that
    carry no loss (prompts, in the instruction and chat formats) marked."""
    pairs = data.encode(tokenizer, docs[:8], config)
    ids = np.concatenate([p[0] for p in pairs])[:seq_len]
    labels = np.concatenate([p[1] for p in pairs])[:seq_len]
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] == data.IGNORE_INDEX) != (labels[start] == data.IGNORE_INDEX):
            text = _decode_marking_eos(tokenizer, ids[start:end])
            pieces.append(f"[no loss: {text}]" if labels[start] == data.IGNORE_INDEX else text)
            start = end
    return " ".join(piece for piece in pieces if piece).strip()


def _decode_marking_eos(tokenizer, ids: np.ndarray) -> str:
    parts, start = [], 0
    for end in [*np.flatnonzero(ids == tokenizer.eos_token_id).tolist(), len(ids)]:
        parts.append(tokenizer.decode(ids[start:end].tolist()).strip())
        start = end + 1
    return " [EOS] ".join(parts).strip()


RUNTIME_MB = 450  # Python, torch, transformers and peft loaded, before any weights (measured: ~450 MB)


def _cost(config: Config, tokenizer, timed_steps: int, log) -> dict:
    """Trainable parameters, a memory estimate and tokens/s of the real training step on this machine."""
    acc = models.make_accelerator(config.train.mixed_precision)
    from accelerate.utils import set_seed

    set_seed(config.seed)  # the adapter starts as the run's does (method.auto_layers measures it)
    model = methods.apply(config.method, models.load_model(config.model, log=log), config.train.max_steps)
    choice = _choose_layers(config, tokenizer, model.to(acc.device), acc) if config.method.auto_layers else {}
    model = choice.pop("model", model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch, seq_len = config.train.batch_size, config.data.seq_len
    # the logits of one loss chunk (or of the whole batch without chunking), fp32, and their gradient
    logit_rows = min(CHUNK_TOKENS, batch * seq_len) if config.train.chunked_loss else batch * seq_len
    logits = 2 * logit_rows * model.config.vocab_size * 4
    optimizer = trainable * 4 * 3  # fp32 gradient and two Adam moments
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    forward = acc.prepare(training_forward(model, config.train, acc.mixed_precision))
    timed_batch = min(batch, 2)  # tokens/s barely depends on the batch here; keep the preview quick
    rows = torch.randint(0, len(tokenizer), (timed_batch, seq_len), device=acc.device)
    forward.train()
    times, kept = [], {}

    def keep(tensor):  # what autograd keeps for backward: each storage once
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    for step in range(timed_steps + 1):  # the first step warms up, is not timed, and is measured
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if step == 0 else nullcontext():
            loss = forward(rows, rows)
        acc.backward(loss)
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    tokens_per_s = timed_batch * seq_len / (sum(times[1:]) / max(len(times) - 1, 1))
    # activations scale with the rows per micro-batch (weights, which autograd also "keeps", do not)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in kept.items() if ptr not in weights) * batch / timed_batch
    estimate = (weight_bytes + logits + activations + optimizer) / 2**20 + RUNTIME_MB
    return {"trainable_params": trainable, "memory_estimate_mb": estimate,
            "tokens_per_s": tokens_per_s, "adapted_modules": methods.adapted_modules(model), **choice}  # fmt: skip


def _choose_layers(config: Config, tokenizer, model, acc) -> dict:
    """method.auto_layers as the run will do it: its training rows, its gradient probe, its choice."""
    from peftkit.data.training import build_training_data
    from peftkit.loss import documents_kept_apart
    from peftkit.methods import layer_choice

    separate = config.data.separate_documents and documents_kept_apart(model)
    training = build_training_data(config, tokenizer, acc, separate, log=lambda _: None)
    model, choice = layer_choice.reapply(config, model, training, acc, log=lambda _: None)
    return {"model": model, **choice}


def format_preview(p: dict, config: Config) -> str:
    from peftkit.evaluation.render import layer_bars

    def duration(seconds: float) -> str:
        return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"

    lines = [f"{'split':<12}{'documents':>10}{'tokens':>14}"]
    for name, s in p["splits"].items():
        lines.append(f"{name:<12}{s['documents']:>10,}{('~' if s['estimated'] else '') + format(s['tokens'], ','):>14}")
    if p["replay_tokens"]:
        lines.append(f"{'replay':<12}{'':>10}{p['replay_tokens']:>14,}   general text mixed in (data.replay)")
    lines += [
        f"packing: {p['rows_per_epoch']:,} rows of {config.data.seq_len} per epoch, {p['packing_efficiency']:.2%} of "
        f"the tokens used (the rest is an epoch's last partial row), no padding",
        f"loss on {p['loss_token_share']:.2%} of the tokens (format {config.data.format}"
        + ("; every token but a row's first)" if config.data.format == "text" else "; responses only)"),
        f"{config.method.name}: {p['trainable_params']:,} trainable parameters",
        f"adapted: {', '.join(p['adapted_modules']['names']) or 'no module (virtual tokens)'} "
        f"({p['adapted_modules']['count']} weights; method.target_modules={','.join(config.method.target_modules)})",
        f"memory estimate: ~{p['memory_estimate_mb']:,.0f} MB for batch {config.train.batch_size} x "
        f"{config.data.seq_len}: weights, optimizer state, loss logits and the activations one eager step kept "
        f"for backward (measured; compiled layers keep fewer), and {RUNTIME_MB} MB for Python and the libraries; "
        "the allocator can hold ~20% more at peak",
        f"speed: {p['tokens_per_s']:,.0f} tokens/s measured on this machine (eagerly; train.compile is often "
        f"faster) -> one epoch "
        f"{duration(p['seconds_per_epoch'])}; train.max_steps={config.train.max_steps} "
        f"({p['epochs']:.2f} epochs) {duration(p['seconds_for_max_steps'])} plus evaluation",
        *(
            [
                f"method.auto_layers={config.method.auto_layers}: blocks {p['chosen_layers']} (each block's share of the "
                "adapter's gradient on the first training batches):"
            ]
            + [f"  {bar}" for bar in layer_bars(p)]
            if p.get("layer_scores")
            else []
        ),
        "first training row:",
        "  " + p["example"][:600].replace("\n", " ") + (" ..." if len(p["example"]) > 600 else ""),
    ]
    return "\n".join(lines)
