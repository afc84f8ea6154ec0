"""`peftkit doctor`: what this machine offers peftkit, and what is cached."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from peftkit import assets
from peftkit.manifest import PACKAGES


def report(verify: bool = False) -> dict:
    """What this machine offers; with `verify`, every prepared asset's files checked against their sha256."""
    import torch

    from peftkit.models import fast_bf16

    cpu = torch.cpu
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {},
        "cpu": {
            "cores": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()),
            "amx": bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()),
            "torch_threads": torch.get_num_threads(),
        },
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "bf16_fast": fast_bf16(),
        "cache": str(assets.cache_dir()),
        "assets": {name: _asset_state(name, verify) for name in assets.CATALOG},
    }
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    try:
        import bitsandbytes  # noqa: F401

        info["bitsandbytes"] = "importable (4-bit and 8-bit run on CPU with bitsandbytes >= 0.50)"
    except Exception as err:  # any import failure is the answer, not a crash
        info["bitsandbytes"] = f"not usable: {err}"
    return info


def _asset_state(name: str, verify: bool) -> str:
    """'prepared', 'not fetched', or what is wrong (sizes always; sha256 of every file with `verify`)."""
    folder = assets.prepared_path(name)
    if assets.legacy_marker(folder):
        return "prepared by an older peftkit (its manifest is written on the next use)"
    problem = assets.damage(folder, full=verify)
    if problem == "not prepared":
        return "not fetched"
    if problem:
        return f"damaged: {problem} (the next use prepares it again)"
    return "prepared, sha256 verified" if verify else "prepared"


def format_doctor(info: dict) -> str:
    cpu = info["cpu"]
    lines = [
        f"python {info['python']} on {info['platform']}",
        "packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in info["packages"].items()),
        f"cpu: {cpu['cores']} cores, {cpu['capability']}, avx512_bf16={cpu['avx512_bf16']}, amx={cpu['amx']}, "
        f"torch threads {cpu['torch_threads']}",
        f"gpus: {', '.join(info['gpus']) or 'none'}",
        f"bf16 compute: {'fast (model.dtype=auto picks bf16)' if info['bf16_fast'] else 'slow here (auto picks fp32)'}",
        f"bitsandbytes: {info['bitsandbytes']}",
        f"asset cache: {info['cache']}",
    ]
    lines += [f"  {name}: {state}" + (f" (peftkit fetch {name})" if state == "not fetched" else "")
              for name, state in info["assets"].items()]  # fmt: skip
    return "\n".join(lines)
