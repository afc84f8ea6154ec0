"""The model asset's preparation: a GGUF file dequantized into a plain safetensors folder."""

from __future__ import annotations

from pathlib import Path

import torch

from peftkit.errors import PeftkitError


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF model into a plain safetensors folder that loads without gguf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # Loading dequantized the weights; save_pretrained refuses while the model still says it is quantized.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    sample = tokenizer("The patient presented with fever and a cough.", return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        if not torch.equal(model(sample).logits, reloaded(sample).logits):
            raise PeftkitError(f"converting {gguf_file.name}: the saved model does not reproduce the GGUF logits")
