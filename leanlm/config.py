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

    def __post_init__(self):
        self.torch_dtype = parse_dtype(self.dtype)
        self.torch_device = parse_device(self.device)
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
