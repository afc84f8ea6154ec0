"""Inference: a merged model folder, or a run folder's base model with one or several adapters.

Several adapters are loaded onto one copy of the base model and switched with `set_adapter`, so
comparing them costs one base-model load. Chat models get their chat template applied. A .gguf file runs
in llama.cpp when its Python bindings are installed (the prompt rendered by the file's own tokenizer and
chat template), otherwise in transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from peftkit import models
from peftkit.config import Config, ModelConfig
from peftkit.errors import PeftkitError


def _render(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    return tokenizer(prompt, return_tensors="pt").input_ids


def load(target: Path, adapters: list[Path]):
    """(model, tokenizer, adapter names): `target` is a merged model folder or a run folder."""
    target = Path(target)
    if target.suffix == ".gguf" and target.is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target.parent, gguf_file=target.name)
        model = AutoModelForCausalLM.from_pretrained(target.parent, gguf_file=target.name, dtype=torch.float32)
        return _with_adapters(model, tokenizer, adapters)
    if (target / "config.yaml").exists() and (target / "adapter").is_dir():
        model_config = Config.from_yaml(target / "config.yaml").model
        adapters = [target / "adapter", *adapters]
    elif (target / "config.json").exists():
        model_config = ModelConfig(name_or_path=str(target), dtype="fp32")
    else:
        raise PeftkitError(
            f"{target}: neither a peftkit run folder (config.yaml + adapter/), a model folder nor a .gguf file"
        )
    return _with_adapters(models.load_model(model_config), models.load_tokenizer(model_config), adapters)


def _with_adapters(model, tokenizer, adapters: list[Path]):
    names = []
    for index, adapter in enumerate(adapters):
        adapter = Path(adapter)
        adapter = adapter / "adapter" if (adapter / "adapter").is_dir() else adapter
        if not (adapter / "adapter_config.json").exists():
            raise PeftkitError(f"--adapter {adapter}: no adapter_config.json (a PEFT adapter folder or a run folder)")
        name = f"adapter{index}"
        if index == 0:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
        else:
            model.load_adapter(adapter, adapter_name=name)
        names.append(name)
    model.eval()
    return model, tokenizer, names


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True, stream: bool = False) -> str:
    """Greedy continuation of `prompt` (through the chat template for chat models)."""
    from transformers import TextStreamer

    input_ids = _render(tokenizer, prompt, chat)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, streamer=streamer)  # fmt: skip
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def run(target: Path, prompt: str, adapters: list[Path], max_new_tokens: int, chat: bool, stream: bool) -> dict:
    """Answer `prompt` with each adapter in turn (or the model alone); returns {label: text}."""
    from peftkit.export import llama_cpp_check

    target = Path(target)
    if target.suffix == ".gguf" and target.is_file() and not adapters and llama_cpp_check.available():
        label = f"{target} ({llama_cpp_check.version()})"
        if stream:
            print(f"--- {label}", flush=True)
        text = _with_llama_cpp(target, prompt, max_new_tokens, chat)
        if stream:
            print(text, flush=True)
        return {label: text}
    model, tokenizer, names = load(target, adapters)
    answers = {}
    for name in names or [None]:
        label = name or str(target)
        if name:
            model.set_adapter(name)
        if stream:
            print(f"--- {label}", flush=True)
        answers[label] = generate(model, tokenizer, prompt, max_new_tokens, chat, stream)
    return answers


def _with_llama_cpp(target: Path, prompt: str, max_new_tokens: int, chat: bool) -> str:
    """Greedy continuation computed by llama.cpp on the file; the prompt rendered by the file's tokenizer."""
    from transformers import AutoTokenizer

    from peftkit.export import llama_cpp_run

    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # ggml's gdb backtrace on an assertion can hang
    tokenizer = AutoTokenizer.from_pretrained(target.parent, gguf_file=target.name)
    ids = _render(tokenizer, prompt, chat)[0].tolist()
    try:
        llm = llama_cpp_run.load(target, len(ids) + max_new_tokens + 1, torch.get_num_threads())
    except llama_cpp_run.LoadError as err:
        raise PeftkitError(f"{target}: llama.cpp cannot load the file ({err})") from err
    try:
        out = llama_cpp_run.greedy(llm, ids, {tokenizer.eos_token_id}, max_new_tokens, eog=True)
    finally:
        llm.close()
    return tokenizer.decode(out, skip_special_tokens=True)
