"""The check a GGUF file must pass before it is kept: loaded back with transformers' GGUF loader, it must
tokenize the check texts identically and keep the logits within the quantization's tolerance; an f32 file
must also predict the same next token. A rounded file (f16, q8_0) may pick another next token where the
source model's top two are a near-tie: a flip needs the source's margin between the two tokens to be below
twice the max |logit diff| the tolerance already bounds, so requiring the same token would refuse a file
for the model's own near-ties, not for the file (the demo's 54-step model: q8_0 within 1.6e-2 of max |logit|,
one prompt's next token flipped). The number of prompts with the same next token is reported. Where the
loader rebuilds the model's config differently (a field GGUF does not carry), the differences are named: in
the error when the check fails, as a note when it passes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from peftkit.errors import PeftkitError
from peftkit.merge import CHECK_INPUTS

# Max |logit difference| of the reloaded GGUF against the source fp32 model, relative to the
# largest |logit| on the check inputs. Measured on SmolLM2-135M (max |logit| ~30): f32 0 (exact),
# f16 1.1e-3, q8_0 2.1e-2 of the max.
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "q8_0": 5e-2}
CONTINUATION_TOKENS = 16  # greedy tokens compared (reported, not required: q8_0 may part ways late)
TOKENIZER_CHECK = CHECK_INPUTS + ("Ünïcödé, digits 12345 and  double  spaces\n\tnewline.",)
# Config fields whose rebuilt value says nothing about the weights' computation.
NOT_COMPARED = set(
    "architectures _name_or_path transformers_version dtype torch_dtype use_cache bos_token_id eos_token_id "
    "pad_token_id initializer_range output_attentions output_hidden_states return_dict tokenizer_class "
    "id2label label2id".split()
)


def source_side(model, tokenizer) -> dict:
    """The source model's side of both readers' checks, computed once: per check input its token ids, logits
    and plain-argmax continuation."""
    stop = stop_ids(model, tokenizer)
    prompts = [tokenizer(text).input_ids for text in CHECK_INPUTS]
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0].float() for ids in prompts]
    greedy = [greedy_ids(model, ids, tokenizer, stop) for ids in prompts]
    return {"prompts": prompts, "logits": logits, "greedy": greedy, "stop": stop}


def check(model, tokenizer, path: Path, quant: str, source: dict) -> dict:
    """Reload the file with transformers' GGUF loader; compare config, tokenisation and logits with the source
    (`source_side`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": path.name}
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loader logs every metadata key it does not map
    try:
        rebuilt = config_differences(model.config, AutoConfig.from_pretrained(path.parent, **kwargs))
        if rope := [field for field in rebuilt if field.startswith("rope_parameters=")]:
            # short check texts barely show a RoPE difference (a wrong rope_theta moved logits ~1e-2), so
            # this is refused however close the logits come, like the rope types refused up front
            raise PeftkitError(f"GGUF export: the loader rebuilds {rope[0]}; nothing was written")
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).eval()
            reloaded_tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        except Exception as err:  # whatever the loader raises, the file is not usable: say so in one line
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            message = f"transformers' GGUF loader cannot read the file back ({reason}){_because(rebuilt)}"
            raise PeftkitError(f"GGUF export: {message}; nothing was written") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    for text in TOKENIZER_CHECK:
        a, b = tokenizer(text).input_ids, reloaded_tok(text).input_ids
        if a != b:
            raise PeftkitError(
                f"GGUF export: the reloaded tokenizer splits {text[:40]!r} differently ({a[:8]} vs {b[:8]}); "
                "nothing was written"
            )
    diff, scale, same_next = 0.0, 0.0, 0
    with torch.no_grad():
        for ids, x in zip(source["prompts"], source["logits"], strict=True):
            y = reloaded(torch.tensor([ids])).logits[0]
            diff = max(diff, (x - y).abs().max().item())
            scale = max(scale, x.abs().max().item())
            same_next += int(x[-1].argmax() == y[-1].argmax())
    relative = diff / scale
    same_argmax = same_next == len(CHECK_INPUTS)
    if relative > TOLERANCE[quant] or (quant == "f32" and not same_argmax):
        raise PeftkitError(
            f"GGUF export: the reloaded {quant} file differs from the source model (max |logit diff| {diff:.3g}, "
            f"{relative:.1e} of max |logit|, tolerance {TOLERANCE[quant]:.0e}, same next token on {same_next} of "
            f"{len(CHECK_INPUTS)} prompts)"
            f"{_because(rebuilt)}; nothing was written"
        )
    continuations = []
    for text, ids, ours in zip(CHECK_INPUTS, source["prompts"], source["greedy"], strict=True):
        theirs = greedy_ids(reloaded, ids, tokenizer, source["stop"])
        decoded = {
            key: tokenizer.decode(t, skip_special_tokens=True) for key, t in (("source", ours), ("gguf", theirs))
        }
        continuations.append({"prompt": text, **decoded, "same": ours == theirs})
    return {
        "max_abs_logit_diff": diff,
        "relative": relative,
        "same_next_token": same_argmax,
        "same_next_tokens": same_next,
        "continuations": continuations,
        "rebuilt_differently": rebuilt,
    }


def config_differences(source, rebuilt) -> list[str]:
    """`field=rebuilt value (model: value)` for each config field the GGUF loader rebuilds differently."""
    theirs = rebuilt.to_dict()
    known = type(source)().to_dict()  # fields the config class defines, not stray keys a config file carried
    differences = []
    for key, value in source.to_dict().items():
        if key not in known or key in NOT_COMPARED or "dropout" in key or key.startswith("_"):
            continue
        if not _same(value, theirs.get(key)):
            differences.append(f"{key}={theirs.get(key)!r} (model: {value!r})")
    return differences


def _same(a, b) -> bool:
    """Equal, with floats compared at GGUF's float32 precision."""
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):  # keys only the rebuilt side has are its explicit defaults
        return all(_same(a[k], b.get(k)) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _because(rebuilt: list[str]) -> str:
    if not rebuilt:
        return ""
    return f"; the loader rebuilds {', '.join(rebuilt[:6])}" + (" ..." if len(rebuilt) > 6 else "")


@torch.no_grad()
def greedy_ids(model, ids: list[int], tokenizer, stop: set[int]) -> list[int]:
    """The model's plain argmax continuation of `ids`, up to the first stop token: a fresh generation config, so a
    repetition penalty or suppressed tokens in the source's generation_config.json (which a GGUF file does not
    carry, and llama.cpp's argmax loop does not apply) cannot make two readers differ."""
    from transformers import GenerationConfig

    prompt = torch.tensor([ids])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plain = GenerationConfig(max_new_tokens=CONTINUATION_TOKENS, do_sample=False, pad_token_id=pad,
                             eos_token_id=sorted(stop) or None)  # fmt: skip
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=plain)
    continuation = out[0, len(ids) :].tolist()
    return next((continuation[:i] for i, t in enumerate(continuation) if t in stop), continuation)


def stop_ids(model, tokenizer) -> set[int]:
    """The source's end-of-sequence ids (its generation config's, else the tokenizer's)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])
