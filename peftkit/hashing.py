"""sha256 of files, streamed: pins for assets, manifests for checkpoints and runs."""

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_MEMO: dict[tuple, str] = {}


def sha256_file_memo(path: Path) -> str:
    """sha256_file, remembered in this process while the file's size and modification time stay the same
    (the manifest and the evaluation cache hash the same base model files)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MEMO:
        _MEMO[key] = sha256_file(path)
    return _MEMO[key]
