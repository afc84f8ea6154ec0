"""Running a GGUF file in llama.cpp through its Python bindings (`llama-cpp-python`).

The export's check runs this file as a script in a child process (`python llama_cpp_run.py SCRATCH`): an
assertion inside llama.cpp aborts the process it runs in, and that must not be peftkit's. It imports nothing
from peftkit (nor torch), so the child starts in well under a second; `peftkit generate FILE.gguf` uses
`load` and `greedy` in its own process.
"""

from __future__ import annotations

import ctypes
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REFUSED = 3
"""The child's exit status when llama.cpp refuses to load the file (reply.json says why)."""


class LoadError(Exception):
    """llama.cpp refused the file; the message is its own reason (e.g. unknown pre-tokenizer type)."""


def load(path: Path, n_ctx: int, threads: int, verbose: bool = False):
    """The file loaded by llama.cpp, logits kept for every position. `verbose=True` keeps stderr open while
    loading (the bindings point it at /dev/null otherwise), so an assertion there still says why."""
    try:
        from llama_cpp import Llama
    except Exception as err:  # noqa: BLE001 - OSError for a missing library, anything its import raises
        raise LoadError(f"llama-cpp-python does not import: {str(err).splitlines()[0][:160]}") from err

    with _captured_log() as log:
        try:
            return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=verbose)
        except (ValueError, RuntimeError) as err:
            said = [line.strip() for line in log if "error" in line.lower() or "unknown" in line.lower()]
            raise LoadError(said[-1] if said else str(err)) from err


def forward(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (from an empty context)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], stop: set[int], tokens: int, eog: bool = False) -> list[int]:
    """llama.cpp's greedy continuation of `ids`: the argmax of its logits, one token at a time, up to a stop id
    (and, with `eog`, up to any token llama.cpp itself ends generation at, e.g. an end-of-turn token)."""
    import llama_cpp

    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop or (eog and llama_cpp.llama_vocab_is_eog(llm._model.vocab, token)):
            break
        out.append(token)
        llm.eval([token])
    return out


@contextmanager
def _captured_log():
    """llama.cpp's log lines while loading (its reason for refusing a file is only logged), then its own logger."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def main(scratch: Path) -> int:
    """Answer scratch/request.json (file, texts to tokenize, prompts to run): reply.json and logits.npz."""
    request = json.loads((scratch / "request.json").read_text())
    n_ctx = max(len(p) for p in request["prompts"]) + request["tokens"] + 64
    try:
        llm = load(Path(request["path"]), n_ctx, request["threads"], verbose=True)  # stderr is captured
    except LoadError as err:
        (scratch / "reply.json").write_text(json.dumps({"error": str(err)}))
        return REFUSED
    stop = set(request["stop"])
    tokens = [llm.tokenize(text.encode(), add_bos=True, special=False) for text in request["texts"]]
    logits = {f"p{i}": forward(llm, ids) for i, ids in enumerate(request["prompts"])}
    runs = [greedy(llm, ids, stop, request["tokens"]) for ids in request["prompts"]]
    llm.close()
    np.savez(scratch / "logits.npz", **logits)
    (scratch / "reply.json").write_text(json.dumps({"tokens": tokens, "greedy": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
