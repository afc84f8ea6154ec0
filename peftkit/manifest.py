"""RUN_DIR/manifest.json: what it takes to reproduce a run.

The resolved config, package versions, sha256 of the data files and of the base model's weights,
the git commit of the working directory if any, the seed, the process count and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from peftkit import assets
from peftkit.config import Config
from peftkit.hashing import sha256_file_memo

PACKAGES = ("peftkit", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "safetensors",
            "tokenizers", "numpy")  # fmt: skip


def _hashes(ref: str, pattern: str) -> dict[str, str]:
    if not ref:
        return {}
    path = assets.resolve(ref)
    files = sorted(path.glob(pattern)) if path.is_dir() else [path]
    return {str(f): sha256_file_memo(f) for f in files if f.is_file()}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def build(config: Config, processes: int) -> dict:
    return {
        "config": config.to_dict(),
        "seed": config.seed,
        "processes": processes,
        "packages": {name: _version(name) for name in PACKAGES},
        "data_files": {**_hashes(config.data.source, "*.jsonl"), **_hashes(config.data.general_source, "*.jsonl")},
        "base_model_files": _hashes(config.model.name_or_path, "*.safetensors"),
        "git_commit": _git_commit(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


def write_manifest(run_dir: Path, config: Config, processes: int) -> None:
    (Path(run_dir) / "manifest.json").write_text(json.dumps(build(config, processes), indent=2))
