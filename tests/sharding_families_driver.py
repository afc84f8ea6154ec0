"""Run by tests/test_sharding.py under torchrun (2 processes, gloo): for tiny random models of several
families, FSDP2-sharded LoRA training must match the same training unsharded.

Every process builds the same model (same seed), trains an unsharded copy on the whole batch as the
reference, then shards the model (`peftkit.sharding.shard`) and trains on its half of the batch. Written
to argv[1] (rank 0): per family the largest loss and adapter differences, the share of the frozen base
each process held, and the largest logit difference of an evaluation call made with the root gathered.
"""

import copy
import json
import sys
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from peftkit import MethodConfig, methods, runtime, sharding
from peftkit.loss import TrainingForward
from tests.test_families import FAMILIES, MOE

SHARDED_FAMILIES = ("llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox", "mixtral", "qwen2_moe")
COMPILED = ("llama",)  # also run with each decoder layer compiled before sharding, as train.compile does
VOCAB, STEPS = 96, 3


NO_DROPOUT = {"gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}  # random draws differ by process


def build(family: str):
    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **FAMILIES[family], **NO_DROPOUT.get(family, {}))  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    targets = ["attention", "experts"] if family in MOE else ["attention"]
    model = methods.apply(MethodConfig(r=4, alpha=8, target_modules=targets), base)
    for name, param in model.named_parameters():  # LoRA's B starts at zero: give it values, so logits move
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def train(forward, params, batches) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    out = []
    for ids in batches:
        loss = forward(input_ids=ids, labels=ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if dist.is_initialized() and sharding.is_sharded(forward):
            dist.all_reduce(total)
            total /= dist.get_world_size()
        out.append(total.item())
    return out


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.randint(0, VOCAB, (STEPS, 2 * world, 16), generator=torch.Generator().manual_seed(1))
    probe = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    results = {}
    for family, compiled in [(f, False) for f in SHARDED_FAMILIES] + [(f, True) for f in COMPILED]:
        model = build(family)
        reference = copy.deepcopy(model)
        ref_forward = TrainingForward(reference)
        ref_losses = train(ref_forward, [p for p in reference.parameters() if p.requires_grad], list(rows))
        frozen_whole = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        forward = TrainingForward(model)
        if compiled:
            assert runtime.compile_layers(model, tempfile.mkdtemp()) > 0
        sharding.shard(forward, model, torch.device("cpu"))
        with torch.no_grad():
            forward(input_ids=probe, labels=probe)  # FSDP2 sets itself up on the root's first call
        forward.reshard()
        assert all(sharding.is_dtensor(p) for p in model.parameters()), family
        frozen_here = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        mine = [batch[2 * rank : 2 * rank + 2] for batch in rows]
        losses = train(forward, [p for p in model.parameters() if p.requires_grad], mine)
        with torch.no_grad(), sharding.unsharded_root(forward):
            logits = model(input_ids=probe).logits
        ref_logits = reference(input_ids=probe).logits.detach()
        adapter = sharding.adapter_state(forward)
        ref_adapter = {k.removeprefix("peft_model."): v for k, v in sharding.adapter_state(ref_forward).items()}
        results[family + ("+compile" if compiled else "")] = {
            "losses": losses,
            "reference_losses": ref_losses,
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            "adapter_diff": max(
                (adapter[k].float() - ref_adapter[k.removeprefix("peft_model.")].float()).abs().max().item()
                for k in adapter
            ),  # fmt: skip
            "adapter_tensors": len(adapter),
            "logit_diff": (logits - ref_logits).abs().max().item(),
            "frozen_share": frozen_here / frozen_whole,
        }
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
