"""Load a base model and tokenizer (transformers folder or catalog asset) and pick its dtype."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch

from peftkit import assets
from peftkit.config import ModelConfig
from peftkit.errors import PeftkitError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fast_bf16() -> bool:
    """True where bf16 matrix multiply is native: CUDA with bf16, or a CPU with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()) or bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if fast_bf16() else torch.float32
    return DTYPES[name]


def make_accelerator(
    mixed_precision: str = "auto",
    log_with: list[str] | None = None,
    project_dir: Path | None = None,
    collective_timeout_s: float | None = None,
):
    """An Accelerator on the GPU if there is one, else explicitly on the CPU.

    Choosing the CPU explicitly matters: without it a multi-process launch on a machine without
    GPUs does not form a process group, and each process trains alone (accelerate 1.15).
    `log_with`: Accelerate trackers, writing under `project_dir` (TensorBoard: project_dir/tb).
    `collective_timeout_s`: how long one collective waits for the other processes (the process group's timeout).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if mixed_precision == "auto":
        mixed_precision = "bf16" if fast_bf16() else "no"
    trackers = {"log_with": list(log_with), "project_dir": str(project_dir)} if log_with else {}
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))] if collective_timeout_s else []
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, kwargs_handlers=handlers, **trackers
    )


def model_path(config: ModelConfig, log=lambda _: None) -> Path:
    path = assets.resolve(config.name_or_path, log=log)
    if not (path / "config.json").exists():
        raise PeftkitError(
            f"model.name_or_path: {path} is not a transformers model folder (no config.json); "
            "give a folder saved with save_pretrained or 'asset:smollm2-135m-instruct'"
        )
    if not any(path.glob("*.safetensors")) and not (config.allow_pickle and any(path.glob("*.bin"))):
        raise PeftkitError(
            f"model.name_or_path: {path} has no .safetensors weights; pickled weights can run code, so peftkit "
            "reads them only with --model.allow_pickle=true (or convert them with save_pretrained)"
        )
    return path


def load_tokenizer(config: ModelConfig, log=lambda _: None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(config, log), trust_remote_code=config.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise PeftkitError(f"model.name_or_path: the tokenizer of {config.name_or_path} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, dtype: torch.dtype | None = None, log=lambda _: None):
    """Load the base causal LM from safetensors only; `dtype` overrides `config.dtype` (merge uses fp32)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or resolve_dtype(config.dtype)
    path = model_path(config, log)
    safetensors = any(path.glob("*.safetensors"))  # else allow_pickle was given: transformers uses weights_only
    extra = {"quantization_config": quantization_config(config, dtype)} if config.quantization != "none" else {}
    adapter = stage_adapter(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32 if adapter else dtype,  # merged in fp32, then cast: no rounding of the update
            use_safetensors=safetensors,
            trust_remote_code=config.trust_remote_code,
            **extra,
        )
        return _merged(model, adapter, config).to(dtype) if adapter else model
    except (RuntimeError, ValueError, ImportError) as err:
        if not extra:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeftkitError(f"model.quantization={config.quantization}: bitsandbytes cannot quantize on this machine "
                           f"({first}); set model.quantization=none (peftkit doctor shows what works)") from None  # fmt: skip


def stage_adapter(config: ModelConfig) -> Path | None:
    """model.adapter's folder (a run folder's adapter/), or None when unset."""
    if not config.adapter:
        return None
    path = Path(config.adapter).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise PeftkitError(f"model.adapter={config.adapter}: no adapter_config.json there nor in its adapter/; "
                           "give a PEFT adapter folder or a finished run folder")  # fmt: skip
    return path


def _merged(model, adapter: Path, config: ModelConfig):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError, AttributeError) as err:  # AttributeError: prompt tuning (no merge)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PeftkitError(f"model.adapter={config.adapter}: cannot be merged into or does not fit {config.name_or_path} ({first}); "
                           "give the adapter of a run on this base model") from None  # fmt: skip


def quantization_config(config: ModelConfig, dtype: torch.dtype):
    """bitsandbytes settings for model.quantization: NF4 with double quantization (QLoRA), or LLM.int8."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise PeftkitError(f"model.quantization={config.quantization} needs bitsandbytes ({err}); "
                           "pip install bitsandbytes, or set model.quantization=none") from None  # fmt: skip
    if config.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True)
