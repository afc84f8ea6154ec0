"""The run folder: refusing to clobber a run, resetting it for a fresh start, trimming its log on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.locking import LOCK_FILES

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "report.json",
    "report.md",
    "report.html",
    "loss_curves.png",
    "manifest.json",
    "adapter",
    "checkpoints",
)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, to start a new run over an existing one."""
    existing = run_dir.is_dir() and any(p.name not in LOCK_FILES for p in run_dir.iterdir())
    if resume and not (run_dir / "config.yaml").exists():
        raise PeftkitError(f"{run_dir}: no peftkit run to resume (no config.yaml); start without --train.resume")
    if existing and not resume:
        if not overwrite:
            raise PeftkitError(
                f"output_dir {run_dir} already holds files; continue that run with --train.resume=true, replace it "
                "with --train.overwrite=true, or choose another --output_dir"
            )
        if not (run_dir / "config.yaml").exists():
            raise PeftkitError(f"output_dir {run_dir} is not a peftkit run folder; refusing to overwrite it")


def reset_run_dir(run_dir: Path, fresh: bool) -> None:
    """Create the run folder; for a fresh start, remove the files of the run it replaces."""
    if fresh and run_dir.is_dir():
        for name in RUN_FILES:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (and a line cut short by a kill),
    so the log reads as one run."""
    if path.exists():
        kept = []
        for line in path.read_text().split("\n"):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue
        path.write_text("".join(line + "\n" for line in kept))
