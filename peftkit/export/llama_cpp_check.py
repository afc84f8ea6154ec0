"""The export's second reader: llama.cpp itself, through its Python bindings (`llama-cpp-python`), when they
are installed. transformers' GGUF reader does not validate everything llama.cpp reads (it took a
pre-tokenizer name llama.cpp refuses), so a file is kept only once llama.cpp has loaded it, tokenized the
check texts exactly like the source tokenizer, and computed logits on the check inputs that stay within the
quantization's tolerance of the source model's (see check.py for why a rounded file may flip a near-tie;
llama.cpp's f16 KV cache makes every file a rounded one, so there is no same-next-token requirement here).
The greedy continuations llama.cpp produces are compared with the source's and reported, with the share of
the check inputs' positions where llama.cpp's top token is the source's (a steadier measure for q8_0 than
16-token continuations, which part ways for good at the first near-tie).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from peftkit.errors import PeftkitError
from peftkit.export import check as hf_check
from peftkit.export.check import CHECK_INPUTS, TOKENIZER_CHECK
from peftkit.export.llama_cpp_run import REFUSED
from peftkit.export.pretokenizers import CHECK_TEXT

# Max |logit diff| of llama.cpp's forward on the file against the source fp32 model, relative to the largest
# |logit| on the check inputs. llama.cpp keeps its KV cache in f16 by default (so even an f32 file is not
# exact) and rounds the activations in q8_0 matmuls to 8-bit blocks, so its tolerances are wider than
# transformers' reader's (check.TOLERANCE). Measured on the tiny test Llama (random / briefly trained):
# f32 7.3e-4 / 4.9e-4, f16 1.7e-3 / 8.2e-4, q8_0 4.6e-2 / 2.2e-2; on SmolLM2-135M see docs/deployment.md.
TOLERANCE = {"f32": 5e-3, "f16": 2e-2, "q8_0": 1e-1}
CHILD_TIMEOUT_S = 600  # the whole q8_0 export of SmolLM2-135M, both readers, took 38 s


def available() -> bool:
    """Whether llama.cpp's Python bindings are installed and import (`pip install llama-cpp-python`); an install
    whose shared library does not load counts as absent, and the export says it was not checked."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        importlib.import_module("llama_cpp")
    except Exception:  # noqa: BLE001 - OSError for a missing library, anything its import raises
        return False
    return True


def version() -> str:
    from importlib.metadata import version as installed

    return f"llama.cpp (llama-cpp-python {installed('llama-cpp-python')})"


def check(tokenizer, path: Path, quant: str, source: dict) -> dict:
    """Have llama.cpp run the file in a child process (an assertion inside llama.cpp aborts its process, which
    must not be peftkit's); compare its tokenisation, logits and greedy continuations with the source's
    (`check.source_side`)."""
    texts = [*TOKENIZER_CHECK, CHECK_TEXT]
    theirs = _run_child(path, texts, source["prompts"], source["stop"])
    for text, tokens in zip(texts, theirs["tokens"], strict=True):
        ours = tokenizer(text).input_ids
        if ours != tokens:
            first = next((i for i, (a, b) in enumerate(zip(ours, tokens, strict=False)) if a != b), len(tokens))
            raise PeftkitError(
                f"GGUF export: llama.cpp splits {text[:40]!r} differently from the source tokenizer (from token "
                f"{first}: {ours[first : first + 6]} vs {tokens[first : first + 6]}); nothing was written"
            )
    diff, scale, same_next, agree, positions, continuations = 0.0, 0.0, 0, 0, 0, []
    ours_all = (source["prompts"], source["logits"], source["greedy"])
    runs = zip(CHECK_INPUTS, *ours_all, theirs["logits"], theirs["greedy"], strict=True)
    for text, ids, x, ours, y, their_tokens in runs:
        x = x.numpy()
        diff = max(diff, float(np.abs(x - y[:, : x.shape[1]]).max()))
        scale = max(scale, float(np.abs(x).max()))
        same_next += int(x[-1].argmax()) == int(y[-1].argmax())
        agree += int((x.argmax(-1) == y[:, : x.shape[1]].argmax(-1)).sum())
        positions += len(ids)
        continuations.append(
            {
                "prompt": text,
                "source": tokenizer.decode(ours, skip_special_tokens=True),
                "llama_cpp": tokenizer.decode(their_tokens, skip_special_tokens=True),
                "same": ours == their_tokens,
            }
        )
    relative = diff / scale
    # no same-next-token requirement, not even at f32: llama.cpp's f16 KV cache makes no file exact, and a flip
    # is only possible where the source's top-two margin is within twice the max |logit diff| bounded here
    if relative > TOLERANCE[quant]:
        raise PeftkitError(
            f"GGUF export: llama.cpp's logits on the {quant} file differ from the source model (max |logit diff| "
            f"{diff:.3g}, {relative:.1e} of max |logit|, tolerance {TOLERANCE[quant]:.0e}, same next token on "
            f"{same_next} of {len(CHECK_INPUTS)} prompts); nothing was written"
        )
    return {
        "reader": version(),
        "max_abs_logit_diff": diff,
        "relative": relative,
        "same_next_tokens": same_next,
        "top1_agreement": agree / positions,
        "continuations": continuations,
    }


def _run_child(path: Path, texts: list[str], prompts: list[list[int]], stop: set[int]) -> dict:
    """Tokens of `texts`, logits and greedy continuations of `prompts`, computed by llama.cpp in a child."""
    request = {"path": str(path), "texts": texts, "prompts": prompts, "stop": sorted(stop),
               "tokens": hf_check.CONTINUATION_TOKENS, "threads": torch.get_num_threads()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="peftkit-llama-cpp-") as scratch:
        (Path(scratch) / "request.json").write_text(json.dumps(request))
        # ggml prints a backtrace through gdb on an assertion unless told not to (it can hang there)
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        try:
            done = subprocess.run([sys.executable, str(Path(__file__).with_name("llama_cpp_run.py")), scratch],
                                  capture_output=True, text=True, errors="replace", env=env,
                                  timeout=CHILD_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise PeftkitError(
                f"GGUF export: llama.cpp did not finish running the file in {CHILD_TIMEOUT_S} s; nothing was written"
            ) from err
        reply = Path(scratch) / "reply.json"
        if done.returncode == 0 and reply.exists():
            result = json.loads(reply.read_text())
            with np.load(Path(scratch) / "logits.npz") as arrays:
                result["logits"] = [arrays[f"p{i}"] for i in range(len(prompts))]
            return result
        if done.returncode == REFUSED:
            reason = json.loads(reply.read_text())["error"]
            raise PeftkitError(f"GGUF export: llama.cpp cannot load the file ({reason}); nothing was written")
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if "GGML_ASSERT" in line or "error" in line.lower()), None)
        said = said or (lines[-1] if lines else f"exit status {done.returncode}")
        raise PeftkitError(f"GGUF export: llama.cpp crashed running the file ({said[:200]}); nothing was written")
