"""Export a (merged) model folder to GGUF, and check the file before keeping it.

The file is written with the `gguf` package's writer under llama.cpp's architecture and tensor names, with
the tensor transforms llama.cpp's converter applies to that family (`families.py`) and the tokenizer,
special tokens and chat template as metadata (`vocab.py`). It is then loaded back with transformers' GGUF
loader and compared with the source model (`check.py`): the same tokenisation of the check texts, logits
within the quantisation's tolerance and the same greedy next token; where llama.cpp's Python bindings are
installed, llama.cpp loads it too and must pass the same comparison (`llama_cpp_check.py`). A file that
fails is deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from peftkit.errors import PeftkitError
from peftkit.export import check, families, llama_cpp_check, vocab, writer
from peftkit.export.check import CHECK_INPUTS, TOKENIZER_CHECK, TOLERANCE  # noqa: F401
from peftkit.export.families import FAMILIES, REFUSED, loader_families, support_table  # noqa: F401
from peftkit.locking import OutputLock


def export_gguf(model_dir: Path, out: Path, quant: str = "f16", overwrite: bool = False, log=print) -> dict:
    """Write `model_dir` (a Hugging Face model folder, e.g. the output of `peftkit merge`) as one GGUF file.

    Args:
        model_dir: folder with config.json, weights and tokenizer, of a family in `FAMILIES`.
        out: the .gguf file to write; it appears only once it has passed the check.
        quant: "f32", "f16" or "q8_0" (see `TOLERANCE`).
        overwrite: replace `out` if it exists.
        log: where the one-line summary and the greedy continuations go.

    Returns:
        The check: path, quant, max and relative |logit diff|, continuations, config fields rebuilt differently.
    """
    with OutputLock.output(Path(out), "peftkit export"):  # one export per output file
        return _export_gguf(Path(model_dir), Path(out), quant, overwrite, log)


def _export_gguf(model_dir: Path, out: Path, quant: str, overwrite: bool, log) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if quant not in TOLERANCE:
        raise PeftkitError(f"--quant {quant}: choose one of {', '.join(TOLERANCE)}")
    if not (model_dir / "config.json").exists():
        raise PeftkitError(f"{model_dir}: no config.json; export takes a model folder (e.g. from `peftkit merge`)")
    if out.exists() and not overwrite:
        raise PeftkitError(f"{out} already exists; choose another file or pass --overwrite")
    if out.suffix != ".gguf":
        raise PeftkitError(f"{out}: the output file name must end in .gguf")
    config = AutoConfig.from_pretrained(model_dir)
    family = _family(config, model_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = vocab.tokenizer_metadata(tokenizer, model_dir, config.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked alone in a scratch folder, so the reload cannot pick up the source
    # folder's config.json or tokenizer.json instead of the file's own metadata.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        partial = scratch / out.name
        writer.write(family, model, config, tokens, partial, quant, name=model_dir.name)
        source = check.source_side(model, tokenizer)  # one forward and continuation per check input, for both
        result = check.check(model, tokenizer, partial, quant, source)
        readers = ["transformers' GGUF reader"]
        if llama_cpp_check.available():
            result["llama_cpp"] = llama_cpp_check.check(tokenizer, partial, quant, source)
            readers.append(result["llama_cpp"]["reader"])
        os.replace(partial, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    same = sum(c["same"] for c in result["continuations"])
    log(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {quant}, {config.model_type} as {family.arch}, "
        f"{tokens.description}); checked by {' and '.join(readers)}"
    )
    log(
        f"  transformers: max |logit diff| {result['max_abs_logit_diff']:.2e} ({result['relative']:.1e} of max "
        f"|logit|, tolerance {TOLERANCE[quant]:.0e}); same {check.CONTINUATION_TOKENS}-token greedy continuation "
        f"for {same} of {len(result['continuations'])} prompts"
    )
    if "llama_cpp" in result:
        lc = result["llama_cpp"]
        log(
            f"  llama.cpp: same tokenisation; max |logit diff| {lc['max_abs_logit_diff']:.2e} ({lc['relative']:.1e}, "
            f"tolerance {llama_cpp_check.TOLERANCE[quant]:.0e}); the source's top token at {lc['top1_agreement']:.0%} "
            f"of positions; same greedy continuation for {sum(c['same'] for c in lc['continuations'])} of "
            f"{len(lc['continuations'])} prompts"
        )
    else:
        log("  llama.cpp: not checked (pip install llama-cpp-python to have llama.cpp load the file too)")
    if result["rebuilt_differently"]:
        log(f"  note: transformers' GGUF loader rebuilds {', '.join(result['rebuilt_differently'])}")
    for i, c in enumerate(result["continuations"]):
        theirs = (
            f"\n    llama.cpp: {result['llama_cpp']['continuations'][i]['llama_cpp']!r}"
            if "llama_cpp" in result
            else ""
        )
        log(f"  {c['prompt']!r}\n    source: {c['source']!r}\n    gguf:   {c['gguf']!r}{theirs}")
    return {
        "path": str(out),
        "quant": quant,
        "family": config.model_type,
        "tokenizer": tokens.kind,
        "pre_tokenizer": tokens.pre,
        "readers": readers,
        **result,
    }


def _family(config, model_dir: Path) -> families.Family:
    model_type = config.model_type
    if model_type not in FAMILIES:
        why = REFUSED.get(families.loader_name(model_type), "transformers' GGUF loader cannot read it back")
        raise PeftkitError(
            f"{model_dir}/config.json: model_type {model_type!r} cannot be exported to GGUF ({why}); "
            f"GGUF export supports {families.supported()}"
        )
    for scope, params in _rope_sets(config):
        if params.get("rope_type", "default") != "default":
            raise PeftkitError(
                f"{model_dir}/config.json: rope_type {params['rope_type']!r}{scope} is not supported by the export "
                "(transformers' GGUF loader rebuilds plain RoPE, so the file could not be checked)"
            )
    try:
        FAMILIES[model_type].metadata(config)
    except PeftkitError as err:
        raise PeftkitError(f"{model_dir}/config.json: {err}") from err
    return FAMILIES[model_type]


def _rope_sets(config):
    params = getattr(config, "rope_parameters", None) or {}
    if all(isinstance(value, dict) for value in params.values()) and params:
        return [(f" ({name})", value) for name, value in params.items()]
    return [("", params)]
