"""Model names -> local checkpoint directories, and building a loaded model.

A model is: the embedded alias (or nothing), a HF checkpoint directory, or a .gguf file (converted
once into the cache). Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

from leanlm.models.llama import LlamaForCausalLM, MethodFactory
from leanlm.models.loader import iter_tensors
from leanlm.models.model_config import SUPPORTED_ARCHITECTURES, ModelConfig

DEFAULT_MODEL = "smollm2-135m"
MODEL_CLASSES = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def resolve_model(name: str | Path | None) -> Path:
    """Return a local HF-format checkpoint directory for `name`."""
    if name is not None and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from leanlm.models import embedded  # only now: it knows about the GGUF packages and the cache

    if name is None or str(name) == embedded.EMBEDDED_ALIAS:
        return embedded.resolve_embedded()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return embedded.gguf_to_cached_checkpoint(path)
    raise ValueError(f"unknown model {str(name)!r}: give a HF checkpoint directory, a .gguf file, "
                     f"or the embedded alias {embedded.EMBEDDED_ALIAS!r}")


def load_model(path: Path, dtype: torch.dtype, device: torch.device,
               method: MethodFactory | None = None, prepare=None) -> tuple[LlamaForCausalLM, ModelConfig]:
    """`prepare(model)` runs on the float weights before quantization (e.g. the bfp key-order fold)."""
    cfg = ModelConfig.from_dir(path)
    model = MODEL_CLASSES[cfg.architecture](cfg, dtype=dtype, method=method)
    model.load_weights(iter_tensors(path))
    model.to(device)
    if prepare is not None:
        prepare(model)
    model.process_after_loading()
    model.eval()
    return model, cfg
