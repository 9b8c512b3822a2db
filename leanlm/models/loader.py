"""Checkpoint files -> tensors. Safetensors only (single or sharded); pickle checkpoints are
refused because unpickling runs arbitrary code."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: malformed safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not there: {missing[:3]}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [n for n in _PICKLE_NAMES if (path / n).exists()] + [p.name for p in path.glob("*.bin")]
    if pickles:
        raise ValueError(
            f"{path}: only pickle checkpoints found ({pickles[0]}); leanlm loads safetensors only, "
            f"because loading pickle files can execute arbitrary code. Convert it with "
            f"`transformers` (save_pretrained(..., safe_serialization=True)) first.")
    raise ValueError(f"{path}: no *.safetensors weights found")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in checkpoint_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: corrupt or unreadable safetensors file ({e})") from None
