"""EngineConfig: what the user chose (model, dtype, device, limits), validated in one place."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise ValueError(f"dtype {value} is not supported; allowed: float32, bfloat16, float16")
    if value == "auto":
        return torch.float32
    if value not in DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[value]


def parse_device(value: str | torch.device) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {value!r} is not valid; allowed: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {value!r} is not supported; allowed: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {value!r} requested but no CUDA device is available (torch "
                         f"{torch.__version__}); use device='cpu'")
    return device


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 1e12, "tb": 1e12}


def parse_memory(value: str | int | float | None) -> int | float | None:
    """'2GiB', '512MiB', '1.5GB', 2147483648 -> bytes (int); '0.4' or 0.4 -> a fraction (float) of
    the memory available when the cache is built; None -> the default budget."""
    if value is None:
        return None
    import re

    text = str(value).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", text)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"kv cache memory {value!r} is not understood; give a size like 2GiB, 512MiB, "
                         f"1.5GB or a number of bytes, or a fraction of available memory in (0, 1)")
    number = float(m.group(1))
    if m.group(2) == "" and 0 < number < 1:
        return number
    size = int(number * _UNITS[m.group(2)])
    if size <= 0:
        raise ValueError(f"kv cache memory must be positive, got {value!r}")
    return size


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "cpu"
    seed: int = 0
    max_model_len: int | None = None       # default: the model's max_position_embeddings
    max_num_seqs: int = 64                 # sequences decoded together
    max_num_batched_tokens: int = 2048     # tokens per step (prefill chunks + decodes)
    compile: bool = False                  # torch.compile the forward (slow first call)
    kv_cache_memory: str | int | float | None = None  # '2GiB', bytes, or a fraction of free memory
    block_size: int | None = None          # tokens per KV block (default 16, or the kv spec's group)
    enable_prefix_caching: bool = True
    quant: str | None = None               # weight quantization spec, e.g. 'rtn:int8', 'rtn:int4:g32'
    quant_head: bool = False               # also quantize the LM head (default: compute dtype)
    kv: str | None = None                  # KV cache codec spec, e.g. 'fp8:e4m3', 'kivi:4', 'bfp:8:reorder'
    spec: str | None = None                # speculative decoding, e.g. 'ngram:n=3:k=8', 'early-exit:8'
    spec_max_batch: int = 4                # no drafting in steps with more decoding sequences
    spec_calibrate: bool = True            # measure the cost model's β and draft cost at load

    def __post_init__(self):
        self.torch_dtype = parse_dtype(self.dtype)
        self.torch_device = parse_device(self.device)
        self.kv_cache_bytes = parse_memory(self.kv_cache_memory)
        self.quant_spec = None
        if self.quant is not None:
            from leanlm.quant.spec import QuantSpec

            self.quant_spec = QuantSpec.parse(self.quant)
        if self.quant_head and self.quant is None:
            raise ValueError("quant_head=True (--quant-head) quantizes the LM head with the --quant spec; "
                             "give one, e.g. --quant rtn:int8 --quant-head")
        self.kv_spec = None
        if self.kv is not None:
            from leanlm.kv.spec import KVSpec

            self.kv_spec = KVSpec.parse(self.kv)
        self.spec_config = None
        if self.spec is not None:
            from leanlm.spec.config import SpecConfig

            self.spec_config = SpecConfig.parse(self.spec)
            self.spec = str(self.spec_config)
        group = self.kv_spec.group if self.kv_spec is not None else None
        if self.block_size is None:
            self.block_size = group or 16
        elif group is not None and group != self.block_size:
            raise ValueError(f"kv spec {self.kv!r} groups keys over {group} tokens, which must equal "
                             f"block_size, got block_size={self.block_size!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "spec_max_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
