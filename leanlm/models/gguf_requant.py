"""Re-encode a GGUF file's weight matrices in another GGML type (Q8_0, Q4_0, Q4_1, F16, BF16, F32),
keeping every metadata field, the tokenizer and the 1-D tensors (norms) as they are.

This is how the llama.cpp peer gets "the same weights" at the type leanlm is compared with: the
embedded SmolLM2 file is Q4_1 (its 2-D weights are what leanlm loads, dequantized), so its Q8_0
copy encodes exactly the float weights leanlm's INT8 runs quantize. The token embedding keeps the
source's type (llama.cpp's own quantize does the same for small models' tied embeddings), so the
two files differ only in the decoder's linear layers. Written atomically (temp file, rename).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

TARGET_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32")


def matrix_types(reader, skip: tuple[str, ...] = ("token_embd.weight",)) -> set[str]:
    """GGML type names of a GGUF reader's 2-D tensors (the embedding left out by default)."""
    import gguf

    return {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors
            if len(t.shape) >= 2 and t.name not in skip}


def requantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str,
                    keep: tuple[str, ...] = ("token_embd.weight",)) -> Path:
    """Write `dst`: `src` with every 2-D tensor but those named in `keep` re-encoded as `qtype`."""
    import gguf

    if qtype not in TARGET_TYPES:
        raise ValueError(f"GGUF type {qtype!r} is not supported here; allowed: {', '.join(TARGET_TYPES)}")
    target = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer adds these itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = int(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}", gguf.LlamaFileType.ALL_F32)
                            if qtype != "F32" else gguf.LlamaFileType.ALL_F32)
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        for t in reader.tensors:
            data, ttype = t.data, t.tensor_type
            if len(t.shape) >= 2 and t.name not in keep and ttype != target:
                dense = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                data, ttype = gguf.quants.quantize(dense, target), target
            writer.add_tensor(t.name, data, raw_dtype=ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst
