"""Checkpoints: adapter (PEFT safetensors) + optimizer + scheduler + RNG + trainer state, written atomically.

A checkpoint is assembled in `step-N.tmp/`, listed with the sha256 of every file in
`manifest.json`, and renamed to `step-N/` only when complete, so a run killed while saving never
leaves a half-written checkpoint that resume could pick; a checkpoint whose files no longer match
its manifest is skipped for the previous one. A failed write (a full disk) leaves the previous
checkpoints as they were.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from peftkit import sharding
from peftkit.errors import PeftkitError
from peftkit.hashing import sha256_file
from peftkit.methods import adalora
from peftkit.methods.adalora import is_adalora

_STEP_DIR = re.compile(r"^step-(\d+)$")
METHOD_STATE = "method_state.pt"  # what a method needs restored besides its adapter (AdaLoRA)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / "manifest.json").exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify(path: Path) -> bool:
    """True if every file listed in the checkpoint's manifest is present with its sha256."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return all(sha256_file(path / name) == sha for name, sha in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest_valid(run_dir: Path, log=lambda _: None) -> Path | None:
    """The newest checkpoint that passes `verify`, skipping (and saying so) damaged ones."""
    for step, path in reversed(checkpoints(run_dir)):
        if verify(path):
            return path
        log(f"checkpoint step-{step} does not match its manifest (damaged?); trying an older one")
    return None


def save_adapter(accelerator, model, out_dir: Path, initial: Path | None = None) -> None:
    """Write the adapter of `model` (as prepared by Accelerate) to `out_dir` in standard PEFT format.

    Every process must call this: under FSDP2 (`peftkit.sharding`) and DeepSpeed the weights may be sharded
    across processes and are gathered here (a collective); only the main process writes.
    `initial`: the adapter as initialised by PiSSA/OLoRA, to convert to plain LoRA on the original base.
    """
    sharded = sharding.is_sharded(model)
    state_dict = sharding.adapter_state(model) if sharded else accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    peft_model = _peft_model(accelerator, model)
    if peft_model is not unwrapped:
        state_dict = {k.removeprefix("peft_model."): v for k, v in state_dict.items()}
    if accelerator.is_main_process:
        # the conversion loads the initial adapter into the live model, so it reads the model's own state
        extra = {"path_initial_model_for_weight_conversion": str(initial)} if initial else {"state_dict": state_dict}
        peft_model.save_pretrained(out_dir, **extra)


def _peft_model(accelerator, model):
    unwrapped = accelerator.unwrap_model(model)
    return getattr(unwrapped, "peft_model", unwrapped)  # the trainer prepares its TrainingForward


def save(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, accelerator) -> Path:
    """Write checkpoint `step` (every process calls this; only the main process writes shared files)."""
    final = run_dir / "checkpoints" / f"step-{step}"
    partial = final.with_name(final.name + ".tmp")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, partial / f"rng-{accelerator.process_index}.pt")
        save_adapter(accelerator, model, partial / "adapter")
        # sharded moments are gathered whole (every process takes part): the same file as an unsharded run's
        optimizer_state = sharding.optimizer_state(optimizer) if sharding.is_sharded(model) else None
        peft_model = _peft_model(accelerator, model)
        if accelerator.is_main_process:
            if is_adalora(peft_model):  # the full-rank weights, ranks and scores peft's adapter folder lacks
                torch.save(adalora.checkpoint_state(peft_model), partial / METHOD_STATE)
            torch.save(optimizer_state or optimizer.state_dict(), partial / "optimizer.pt")
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            (partial / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {str(p.relative_to(partial)): sha256_file(p) for p in sorted(partial.rglob("*")) if p.is_file()}
            (partial / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        previous = [p.name for _, p in checkpoints(run_dir)]
        raise PeftkitError(
            f"could not write checkpoint {final} ({err.strerror or err}); is the disk full? "
            f"Earlier checkpoints are intact ({', '.join(previous) or 'none yet'})"
        ) from None
    accelerator.wait_for_everyone()
    return final


def check_supported(accelerator) -> None:
    """Refuse DeepSpeed ZeRO-3 before training: its sharded parameters are not gathered for checkpoints or
    restored into (resume, best-step restore); FSDP2 (`train.sharding=fsdp`) is the way to shard."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise PeftkitError(
            "DeepSpeed ZeRO-3 is not supported (its sharded weights are not checkpointed or restored; see "
            "docs/distribution.md); shard with FSDP2 instead: --train.sharding=fsdp or "
            "recipes/accelerate/fsdp.yaml (ZeRO-2 keeps working: recipes/accelerate/deepspeed_zero2.yaml)"
        )


def load(path: Path, peft_model, optimizer, scheduler, accelerator) -> dict:
    """Restore adapter, optimizer, scheduler and this process's RNG; return the trainer state."""
    load_adapter_weights(peft_model, path / "adapter")
    sharding.load_optimizer_state(optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():  # absent when resuming on more processes than saved: those keep the seeded RNG
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Load a saved adapter into `peft_model`; into a sharded one each process keeps its part of each tensor."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = adapter_dir / "adapter_model.safetensors"
    if not file.exists():
        raise PeftkitError(f"{adapter_dir}: no adapter_model.safetensors; the checkpoint is incomplete")
    if (adapter_dir.parent / METHOD_STATE).exists():  # a checkpoint of AdaLoRA: its full-rank state
        adalora.load_checkpoint_state(peft_model, torch.load(adapter_dir.parent / METHOD_STATE, weights_only=True))
        return
    weights = load_file(file)
    if sharding.is_sharded(peft_model):
        current = get_peft_model_state_dict(peft_model)  # the same keys, laid out as the live model's
        weights = {k: sharding.like(v, current[k]) if k in current else v for k, v in weights.items()}
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise PeftkitError(f"{file}: weights do not match this adapter config ({result.unexpected_keys[:3]} ...)")


def prune(run_dir: Path, keep: int, best_step: int | None) -> None:
    """Delete all but the newest `keep` checkpoints, never the best one."""
    found = checkpoints(run_dir)
    for step, path in found[:-keep]:
        if step != best_step:
            shutil.rmtree(path)
