"""The training loss: next-token cross-entropy without the full logits, its self-check, and the
training forward built from them.

A causal LM's loss is usually computed from logits over the whole vocabulary for every position:
for SmolLM2 (49,152 tokens) a batch of 8 x 512 tokens makes 805 MB of fp32 logits, plus their
bf16 copy and gradient, which dominates a LoRA run's memory. Here the decoder's last hidden states
go through the output layer a chunk of positions at a time, under activation checkpointing, so at
most one chunk of logits exists at once, in the forward pass and in the backward pass alike.

`TrainingForward` is the module Accelerate prepares (DDP needs the whole training forward to pass
through the wrapped module). Prompt-learning methods, whose forward prepends virtual tokens, and
models whose loss is not plain cross-entropy over `lm_head(hidden)` (checked once per model, on a
real batch) take the model's own forward instead. `setup_training_forward` puts the pieces
together for a run: the check, compilation (`peftkit.runtime`), threads and the log line.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftkit.data import IGNORE_INDEX

CHUNK_TOKENS = 512  # positions per output-layer chunk: 512 x 49152 fp32 logits = 100 MB
CHECK_TOLERANCE = 1e-3  # relative difference allowed between the chunked loss and the model's own loss

_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> chunked loss == its own


def _base(model):
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model):
    """(decoder, output layer) of a causal LM, or None where the chunked loss cannot be used."""
    from peftkit.methods import is_prompt_learning

    if is_prompt_learning(getattr(model, "module", model)):
        return None
    base = _base(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or decoder is base or head is None:
        return None
    return decoder, head


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, ignore_index=IGNORE_INDEX, reduction="sum")


_compiled_chunk_nll = None


def _compiled():
    """`_chunk_nll` compiled: fp32 upcast, log-softmax and its gradient fused over the vocabulary."""
    global _compiled_chunk_nll
    if _compiled_chunk_nll is None:
        _compiled_chunk_nll = torch.compile(_chunk_nll)
    return _compiled_chunk_nll


def nll_sum(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_TOKENS, compiled: bool = False
) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of `labels` given `hidden` = the decoder's output.

    Equal to `F.cross_entropy(head(hidden)[:, :-1], labels[:, 1:], reduction="sum")`, but only
    `chunk` positions' logits exist at a time; with gradients enabled each chunk is recomputed in
    the backward pass instead of being kept. `compiled`: each chunk runs through torch.compile.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    loss = _compiled() if compiled else _chunk_nll

    def part(h, y):
        return loss(head, h, y)

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], target[start : start + chunk]
        total = total + (checkpoint(part, h, y, use_reentrant=False) if grad else part(h, y))
    return total


def hidden_states(decoder: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return decoder(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


def model_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's own mean next-token loss (its forward materialises every logit)."""
    return model(input_ids=input_ids, labels=labels, use_cache=False, **kwargs).loss


def transforms_logits(config) -> str | None:
    """The config key by which this family changes logits after the output layer (Gemma 2/3's final
    softcapping, Granite's logits_scaling, Cohere's logit_scale), or None. A check on one batch of small
    logits could miss such a change (softcapping barely moves logits far below its cap), so it is read here."""
    for key, neutral in (("final_logit_softcapping", None), ("logits_scaling", 1.0), ("logit_scale", 1.0)):
        value = getattr(config, key, None)
        if value is not None and value != neutral:
            return key
    return None


def regularised(model) -> bool:
    """Does the model's own forward add a penalty to the loss (AdaLoRA's orthogonality term)?"""
    from peftkit.methods.adalora import is_adalora

    return is_adalora(getattr(model, "module", model))


def chunked_matches(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> bool:
    """Does the chunked loss reproduce the model's own loss on this batch? Checked once per model; a family
    that transforms its logits (`transforms_logits`) keeps its own loss."""
    parts = decoder_and_head(model)
    if parts is None or transforms_logits(_base(model).config) or regularised(model):
        return False
    if not (labels[:, 1:] != IGNORE_INDEX).any():
        return False  # nothing to compare on this batch; decide on a later one
    key = _base(model)
    if key not in _verified:
        with torch.no_grad():
            n = (labels[:, 1:] != IGNORE_INDEX).sum()
            ours = nll_sum(parts[1], hidden_states(parts[0], input_ids, **kwargs), labels) / n
            theirs = model_loss(model, input_ids, labels, **kwargs).float()
        _verified[key] = bool(torch.isclose(ours, theirs, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE))
    return _verified[key]


_separates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> position ids keep documents apart


def documents_kept_apart(model) -> bool:
    """Do position ids that restart at each document keep packed documents from attending to each other?

    transformers turns restarting positions into a block-diagonal causal mask for most families (with no
    cache); others (ALiBi models such as Bloom, Falcon) ignore them or only shift the rotary phase, and then
    a packed row's second document would read the first with wrong positions. Checked once per model on a
    fixed two-document probe (no random numbers drawn): the second document's logits, packed behind the first
    with restarting positions, must be far closer to its logits alone than when it plainly reads the first
    (a scale-free test, so bf16 rounding does not decide it)."""
    from peftkit.methods import is_prompt_learning

    if is_prompt_learning(getattr(model, "module", model)):
        return False
    key = _base(model)
    if key not in _separates:
        vocab = key.get_input_embeddings().num_embeddings
        first = torch.arange(8).unsqueeze(0) * 5 % vocab
        second = (torch.arange(8).unsqueeze(0) * 7 + 3) % vocab
        device = next(key.parameters()).device
        row, positions = torch.cat([first, second], 1).to(device), torch.arange(8).repeat(1, 2).to(device)
        was_training = key.training
        key.eval()
        with torch.no_grad():
            alone = key(input_ids=second.to(device), use_cache=False).logits.float()
            packed = key(input_ids=row, position_ids=positions, use_cache=False).logits[:, 8:].float()
            plain = key(input_ids=row, use_cache=False).logits[:, 8:].float()
        key.train(was_training)
        _separates[key] = bool((packed - alone).abs().max() < 0.1 * (plain - alone).abs().max())
    return _separates[key]


class TrainingForward(nn.Module):
    """input_ids, labels -> mean next-token loss over the labelled positions of the batch.

    `chunked=True` computes it from hidden states chunk by chunk (see `nll_sum`); otherwise, or
    where the model does not allow it, through the model's own forward. `autocast=True` (the
    forward runs under autocast): adapter layers leave their inputs in the compute dtype instead of
    casting them to their fp32 weights' dtype, so no fp32 copy of each input is kept for backward;
    autocast still runs their matmuls in bf16 against the fp32 weights.
    """

    def __init__(
        self, peft_model: nn.Module, chunked: bool = True, autocast: bool = False, compiled_loss: bool = False
    ):
        super().__init__()
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.peft_model = peft_model
        self.chunked = chunked
        # peft's switch exists on most tuner layers (not IA3's in peft 0.21): leave all or none alone
        tuners = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        self.autocast = autocast and all(hasattr(m, "cast_input_dtype_enabled") for m in tuners)
        self.compiled_loss = compiled_loss  # the loss chunk through torch.compile (the trainer compiles)
        # the part of the last loss that is a penalty on the weights, not prediction (AdaLoRA's orthogonality term):
        # backpropagated, but left out of the training loss that is logged and compared with validation
        self.penalty = torch.zeros(())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        from peft.helpers import disable_input_dtype_casting

        with disable_input_dtype_casting(self.peft_model, active=self.autocast):
            penalised = regularised(self.peft_model)  # its penalty comes with the model's own loss only
            parts = decoder_and_head(self.peft_model) if self.chunked and not penalised else None
            if penalised:
                out = self.peft_model(input_ids=input_ids, labels=labels, use_cache=False, **kwargs)
                with torch.no_grad():
                    logits = out.logits[:, :-1].float()
                    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                         ignore_index=IGNORE_INDEX)  # fmt: skip
                self.penalty = out.loss.detach() - ce
                return out.loss
            if parts is None:
                return model_loss(self.peft_model, input_ids, labels, **kwargs)
            decoder, head = parts
            n = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            return nll_sum(head, hidden_states(decoder, input_ids, **kwargs), labels, compiled=self.compiled_loss) / n


def training_forward(
    model: nn.Module, train, mixed_precision: str, chunked: bool | None = None, compiled_loss: bool = False
) -> TrainingForward:
    """The TrainingForward for `train` (TrainConfig) settings, activation checkpointing switched on in
    `model` where asked; `chunked` overrides train.chunked_loss (after a failed check)."""
    if train.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return TrainingForward(
        model,
        chunked=train.chunked_loss if chunked is None else chunked,
        autocast=mixed_precision in ("bf16", "fp16"),
        compiled_loss=compiled_loss,
    )


def setup_training_forward(model, train, accelerator, sample, log) -> tuple[TrainingForward, bool]:
    """The run's TrainingForward and whether its decoder layers were compiled.

    `sample`: a training Batch of one row, on which the chunked loss is checked against the model's
    own before it is trusted. `train`: TrainConfig.
    """
    from peftkit import assets, runtime

    chunked = train.chunked_loss
    if chunked:
        with accelerator.autocast():
            chunked = chunked_matches(
                model, sample.input_ids.to(accelerator.device), sample.labels.to(accelerator.device)
            )
        if not chunked:
            key = transforms_logits(_base(model).config)
            why = f"it transforms its logits ({key})" if key else "or it prepends virtual tokens"
            why = "AdaLoRA adds its orthogonality penalty in the model's own forward" if regularised(model) else why
            log(
                f"train.chunked_loss: this model's loss is not plain cross-entropy over its output layer ({why}); "
                "using its own forward, which holds every logit"
            )
    compiled = False
    wanted, why = runtime.compile_wanted(train.compile, model)
    if wanted:
        cache = assets.cache_dir() / "inductor"
        count = runtime.compile_layers(model, cache)
        compiled = count > 0
        log(
            f"compiling {count} decoder layers (regional torch.compile; cached in {cache})"
            if count
            else "train.compile: no decoder layer list found; running eagerly"
        )
    elif train.compile != "false":
        log(f"not compiling: {why}")
    threads = runtime.set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    precision = accelerator.mixed_precision if accelerator.mixed_precision in ("bf16", "fp16") else "fp32"
    log(
        f"training forward: {'chunked' if chunked else 'full-logit'} loss, {precision} autocast, {threads} threads "
        "per process" + (", activation checkpointing" if train.gradient_checkpointing else "")
    )
    return training_forward(model, train, accelerator.mixed_precision, chunked, compiled), compiled
