"""Inter-process locks: one process builds a shared cache entry while the others wait; one run owns a folder.

Both are `filelock` locks, which on Linux and macOS are `flock`/`fcntl` locks: the operating system
releases them when their process dies, however it dies, so a lock left by a killed process never blocks
the next one and there is no stale-lock file to clean up. The lock files of caches and run folders stay
(empty); the one beside a merge or export output is removed when the output is done.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from peftkit.errors import PeftkitError


@contextmanager
def building(lock_path: Path, what: str) -> Iterator[None]:
    """Hold the build lock of `what`; a process that has to wait says so on one line (stderr)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process preparing {what} (lock {lock_path})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class OutputLock:
    """Claims an output for this process: a run folder (lock file `RUN_DIR/.peftkit.lock`) or the folder
    or file that `merge --out` / `export --out` writes (a hidden sibling lock file, since those outputs are
    replaced whole). The lock file's `.owner` beside it names the owner's pid and command.

    A second process aimed at the same output is refused in one line that names the owner. An output whose
    owner was killed is free again (the OS dropped the lock), so `--train.resume=true` takes it over.
    """

    NAME = ".peftkit.lock"

    def __init__(self, target: Path, action: str, inside: bool):
        target = Path(target)
        self.target = target
        self.path = target / self.NAME if inside else target.with_name(f".{target.name}{self.NAME}")
        self.owner = self.path.with_name(self.path.name + ".owner")
        self.action = action
        self.inside = inside
        self._lock = FileLock(str(self.path))

    @classmethod
    def run_folder(cls, run_dir: Path, action: str = "peftkit train") -> OutputLock:
        return cls(run_dir, action, inside=True)

    @classmethod
    def output(cls, out: Path, action: str) -> OutputLock:
        return cls(out, action, inside=False)

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise PeftkitError(
                f"{self.target} is in use by another process ({self._owner()}); wait for it to finish, "
                "stop it, or choose another output"
            ) from None
        self.owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}: {self.action}\n")
        return self

    def _owner(self) -> str:
        try:
            return self.owner.read_text().strip()
        except OSError:
            return "owner unknown"

    def release(self) -> None:
        if self._lock.is_locked:
            self.owner.unlink(missing_ok=True)
            if not self.inside:  # nothing left beside the user's output; a run folder keeps its (empty) lock file
                # unlinked while still held: a process that opened it in this instant may also win, which the
                # refusal-only protocol (no process waits for an output) makes a microsecond-wide window
                self.path.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


LOCK_FILES = (OutputLock.NAME, OutputLock.NAME + ".owner")
