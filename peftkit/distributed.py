"""What a multi-process run does when one of its processes dies or stalls.

Every collective (the gradient all-reduce, the evaluation gathers, the barriers around checkpoints) waits
for all processes. A process that is killed closes its connections, and the others' next collective
fails at once; one that stalls (a machine that froze, a network that dropped) is waited for until the
process group's timeout, `train.collective_timeout`. Either way the survivors stop with one line naming
the last complete checkpoint, which checkpoints' atomic writes keep intact, and `--train.resume=true`
continues from it exactly. The launcher (torchrun, under `accelerate launch`) also sends SIGTERM to the
survivors as soon as it sees one process end, sometimes before their next collective fails: that SIGTERM
becomes the same line rather than a silent death.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

import torch

from peftkit import checkpoint
from peftkit.errors import RunAborted

# what gloo and NCCL say when a peer is gone or silent (torch 2.13 raises them as RuntimeError)
_LOST = re.compile(r"gloo|nccl|connection (reset|closed)|timed out|timeout|broken pipe|peer", re.I)


def lost_peer(err: BaseException, processes: int) -> bool:
    """Whether `err`, raised in a run of `processes` processes, is a collective that lost another process."""
    if processes < 2:
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(err, dist_error) or (isinstance(err, RuntimeError) and bool(_LOST.search(str(err))))


def slowest(accelerator, *values: float) -> tuple[float, ...]:
    """Each value's largest across the processes (a collective: every process calls it); as given for one."""
    if accelerator.num_processes < 2:
        return values
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return tuple(accelerator.gather(local[None]).max(dim=0).values.tolist())


def run_aborted(err: BaseException, run_dir: Path, last_checkpoint: Path | None, timeout: str) -> RunAborted:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # gloo's source-file prefix says nothing to the user
    kept = f"the last complete checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was complete yet"
    return RunAborted(
        f"another process of this run stopped or did not answer within train.collective_timeout={timeout} "
        f"({first}); {kept}; once every process can run again, continue with --train.resume=true "
        f"(output_dir {run_dir})"
    )


class LauncherStopped(RuntimeError):
    """The launcher's SIGTERM to this process of a multi-process run."""


@contextlib.contextmanager
def peers_watched(run_dir: Path, timeout: str):
    """Inside: in a run of several processes (WORLD_SIZE, set by the launcher), a collective that lost another
    process, or the launcher's SIGTERM, raises one RunAborted naming the last complete checkpoint."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))

    def aborted(err: BaseException) -> RunAborted:
        return run_aborted(err, run_dir, checkpoint.latest_valid(run_dir), timeout)

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # one line; a second SIGTERM ends the process plainly
        raise aborted(LauncherStopped("the launcher stopped this process with SIGTERM, as it does when another ends"))

    previous = None
    if processes > 1 and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except Exception as err:
        if lost_peer(err, processes):
            raise aborted(err) from err
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
