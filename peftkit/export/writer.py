"""Write one GGUF file: the family's metadata, the tokenizer and the tensors under llama.cpp's names.

Storage types follow llama.cpp's converter (`ModelBase.prepare_tensors`): 1-D tensors, norms, biases, MoE
routers and SSM / short convolutions stay f32 (llama.cpp's convolution kernels assert an f32 kernel: an f16
one aborted it); the rest is stored at the chosen precision, and a tensor q8_0 cannot
hold (a row length that is not a multiple of its 32-value blocks) falls back to f16, as there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peftkit.errors import PeftkitError
from peftkit.export.families import Family
from peftkit.export.vocab import Vocab
from peftkit.progress import quiet

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # general.file_type per --quant
SKIPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # buffers llama.cpp skips too
# tensor names (their part before .weight, after the block number) the converter keeps in f32
ALWAYS_F32 = ("ffn_gate_inp", "ffn_gate_inp_shexp", "position_embd", "token_types", "ssm_conv1d", "shortconv.conv")


def write(family: Family, model, config, vocab: Vocab, path: Path, quant: str, name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, family.arch)
    # transformers' loader reads a llama-architecture file named exactly "mistral" as a gguf architecture
    # that does not exist (modeling_gguf_pytorch_utils: `"mistral" in model_name`) and cannot load it
    writer.add_name(f"{name}-model" if name == "mistral" else name)
    for key, value in family.metadata(config).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[quant])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("lm_head.weight") and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd; transformers' loader ties them again when output is absent
        if hf_name.endswith(SKIPPED):
            continue
        for mapped, data in family.tensors(hf_name, tensor.detach().float().numpy(), config):
            base, suffix = mapped.rsplit(".", 1) if mapped.endswith((".weight", ".bias")) else (mapped, None)
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise PeftkitError(f"GGUF export: gguf's {family.arch} tensor map has no name for {hf_name}")
            full = f"{gguf_name}.{suffix}" if suffix else gguf_name
            _add(writer, gguf, full, np.ascontiguousarray(data, dtype=np.float32), quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=not quiet())
    writer.close()


def _add(writer, gguf, name: str, data: np.ndarray, quant: str) -> None:
    stays_f32 = (
        data.ndim <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or name.removesuffix(".weight").split(".", 2)[-1] in ALWAYS_F32
    )
    if quant == "f32" or stays_f32:
        writer.add_tensor(name, data)
    elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))
