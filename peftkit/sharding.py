"""FSDP2 sharding of the base model and its adapter across the processes of a run.

`train.sharding=fsdp` (or a launch with `distributed_type: FSDP`, recipes/accelerate/fsdp.yaml) shards
every decoder layer and then the rest of the model with `torch.distributed.fsdp.fully_shard` over a
one-dimensional device mesh of all processes: each process keeps 1/world of every weight, frozen base
and adapter alike, and a layer's full weights exist only while it runs. The same code runs on CPUs
(gloo) and GPUs (NCCL); peftkit applies FSDP2 itself rather than through Accelerate's FSDP plugin,
which on CPUs is silently ignored (accelerate 1.15 trains plain DDP there).

Checkpoints stay in the unsharded format: the adapter and the optimizer state are gathered to full
tensors before they are written (every process takes part, the main one writes), and put back into
shards when loaded, so a checkpoint written by 2 sharded processes resumes on 1 unsharded process and
the other way round. Only the adapter's and the optimizer's tensors are gathered, never the frozen base.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from peftkit.errors import PeftkitError


def launched_sharded() -> bool:
    """Did `accelerate launch` get an FSDP config (distributed_type: FSDP)? It says so in the environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def claim_launch_config() -> bool:
    """Whether the launch config asks for sharding. If it does, take it for peftkit's FSDP2 and keep
    Accelerate from building its own FSDP plugin (which would wrap the model a second time on GPUs);
    refuse the settings peftkit does not honour. Call before the Accelerator is made."""
    if not launched_sharded():
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise PeftkitError(
            f"accelerate launch config: fsdp_version {version}; peftkit shards with FSDP2 only: set "
            "fsdp_config.fsdp_version: 2 (see recipes/accelerate/fsdp.yaml)"
        )
    unsupported = {
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "every process loads the base, then shards it",
        "FSDP_SYNC_MODULE_STATES": "every process loads the same weights",
        "FSDP_OFFLOAD_PARAMS": "CPU offload of the shards is not implemented",
        "FSDP_ACTIVATION_CHECKPOINTING": "use --train.gradient_checkpointing=true",
    }
    for key, why in unsupported.items():
        if os.environ.get(key, "false").lower() == "true":
            name = "fsdp_" + key.removeprefix("FSDP_").lower()
            raise PeftkitError(
                f"accelerate launch config: {name}: true is not supported by peftkit's FSDP2 ({why}); "
                f"set fsdp_config.{name}: false (see recipes/accelerate/fsdp.yaml)"
            )
    os.environ["ACCELERATE_USE_FSDP"] = "false"  # the processes are launched; the sharding is peftkit's
    return True


def wanted(config, accelerator, launched: bool, log) -> bool:
    """FSDP2 for this run: asked for (train.sharding=fsdp or the launch config) with processes to shard across;
    refused in one line where it cannot work."""
    asked = launched or config.train.sharding == "fsdp"
    if asked and accelerator.num_processes == 1:
        log("train.sharding=fsdp: one process, nothing to shard across; training unsharded")
    if not asked or accelerator.num_processes == 1:
        return False
    from peftkit.methods import converts_on_save

    if config.model.quantization != "none":
        raise PeftkitError(
            f"train.sharding=fsdp with model.quantization={config.model.quantization}: FSDP2 gathers bitsandbytes' "
            "quantized weights as plain tensors without their quantization state (bitsandbytes#1945, "
            "accelerate#3983), which crashes or trains wrong; use QLoRA with train.sharding=none (DDP), or shard "
            "an unquantized base (docs/distribution.md)"
        )
    if config.method.name in ("prompt_tuning", "prefix_tuning"):
        raise PeftkitError(f"train.sharding=fsdp with method.name={config.method.name}: peft saves and loads virtual "
                           "tokens by running their encoder on whole weights; use train.sharding=none (DDP)")  # fmt: skip
    if config.method.name == "adalora":
        raise PeftkitError("train.sharding=fsdp with method.name=adalora: its rank allocation reads whole "
                           "weights and gradients; use train.sharding=none (DDP)")  # fmt: skip
    if converts_on_save(config.method):
        raise PeftkitError(
            f"train.sharding=fsdp with method.init={config.method.init}: converting PiSSA/OLoRA to plain LoRA at "
            "save reads the whole base weights in one process; use method.init=default, or train.sharding=none"
        )
    return True


def is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def shard(forward: nn.Module, model: nn.Module, device: torch.device) -> int:
    """Shard `forward` (the training forward of peft `model`: the root) with each of the model's decoder
    layers as its own unit; returns the number of layers. Every process calls this, with the same model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from peftkit.runtime import decoder_layers

    if not dist.is_initialized():
        raise PeftkitError("train.sharding=fsdp needs a multi-process launch (accelerate launch or torchrun)")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = decoder_layers(decoder)
    if layers is None:
        raise PeftkitError(
            f"train.sharding=fsdp: no list of decoder layers found in {type(base).__name__}; "
            "this model cannot be sharded layer by layer (use DDP)"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # a layer's whole weights are freed after its forward and gathered again for backward (a launch config's
    # fsdp_reshard_after_forward: false keeps them: faster, more memory)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(forward, mesh=mesh)
    return len(layers)


def shard_training_forward(forward: nn.Module, model: nn.Module, accelerator, sample, log) -> None:
    """`shard`, then one call of the root (FSDP2 sets itself up on it, before evaluation calls the model).

    Whether evaluation may use the chunked loss is decided here, on the same row everywhere, before the
    weights are split: decided later, on each process's own first rows, one process could check (two
    extra forward calls, each gathering every layer) while another did not, and their gathers would
    no longer pair up."""
    from peftkit.loss import chunked_matches

    with torch.no_grad(), accelerator.autocast():
        chunked_matches(model, sample.input_ids.to(accelerator.device), sample.labels.to(accelerator.device))
    layers = shard(forward, model, accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        forward(**sample.to(accelerator.device).model_inputs())
    forward.reshard()  # the root keeps its weights whole after a forward (no backward here to free them)
    log(f"train.sharding=fsdp: {layers} decoder layers and the rest sharded over {accelerator.num_processes} processes")


@contextmanager
def unsharded_root(forward: nn.Module):
    """Inside, the root's own weights (embeddings, final norm, output layer) are whole, so the model can be
    called other than through `forward` (evaluation calls the peft model); the layers gather themselves.
    Every process must make the same calls inside. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(forward, FSDPModule):
        yield
        return
    forward.unshard()
    try:
        yield
    finally:
        forward.reshard()


@contextmanager
def gradient_sync(forward: nn.Module, sync: bool):
    """Accumulation: reduce-scatter gradients only on the last micro-batch (FSDP2's counterpart of no_sync)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(forward, FSDPModule):
        forward.set_requires_gradient_sync(sync)
    yield


def release_memory() -> None:
    """Return freed tensors' memory (the shards, once training is over) before something large is loaded."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process calls it, in the same order)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value`, a whole tensor, laid out as `param` is: this process's shard of it for a sharded `param`."""
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    # every process holds the whole value (read from the same file): each keeps its part, nothing is sent
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The model's adapter tensors (every state-dict entry named after the adapter, and every trainable
    parameter), whole and on the CPU, keyed as in `model.state_dict()`. Every process calls this."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    keys = sorted(k for k in state if k in trainable or f".{adapter}." in k or k.endswith(f".{adapter}"))
    return {key: full(state[key]).detach().cpu() for key in keys}


def optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with sharded state (AdamW's moments) gathered whole: the same format as an
    unsharded run's. Every process calls this."""
    state = optimizer.state_dict()
    for index in sorted(state["state"]):
        state["state"][index] = {
            k: full(v).cpu() if torch.is_tensor(v) else v for k, v in state["state"][index].items()
        }
    return state


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a whole (unsharded-format) optimizer state, each tensor the shape of its parameter laid out as the
    parameter is."""
    optimizer.load_state_dict(state)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
    for group in inner.param_groups:
        for param in group["params"]:
            if not is_dtensor(param) or param not in inner.state:
                continue
            moments = inner.state[param]
            for key, value in moments.items():
                if torch.is_tensor(value) and not is_dtensor(value) and value.shape == param.shape:
                    moments[key] = like(value.to(param.dtype if value.is_floating_point() else value.dtype), param)
