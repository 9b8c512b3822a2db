"""A random-weight twin of a checkpoint, for timing it on a machine its weights cannot be copied to.

Decode and throughput speed depend on the tensors' shapes, not their values. The GPU machines here
take at most 64 MiB per call, and the embedded model's GGUF is 98 MB. So the checkpoint travels as
a kit of its small files: config.json, the tokenizer files and shapes.json (every tensor's name,
shape and dtype). On the other machine `make` writes the same tensors with random values: norms at 1,
biases at 0, other weights N(0, 0.02^2). greedy output of a twin is not the model's (use
ignore_eos, as the benchmarks do), but its timings are.

    python benchmarks/shape_twin.py kit KIT [--from CHECKPOINT_DIR]   # default: the embedded model
    python benchmarks/shape_twin.py make KIT TWIN_DIR
    leanlm bench throughput --model TWIN_DIR ...
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHAPES = "shapes.json"
WEIGHTS = "model.safetensors"


def kit(src: Path, dst: Path) -> None:
    """Copy src's small files to dst and list its tensors in dst/shapes.json."""
    weights = sorted(src.glob("*.safetensors"))
    if not (src / "config.json").is_file() or not weights:
        raise SystemExit(f"{src} is not a checkpoint directory: it needs config.json and *.safetensors")
    dst.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for path in weights:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, dst / path.name)
    (dst / SHAPES).write_text(json.dumps(shapes, indent=0))
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"kit at {dst}: {len(shapes)} tensors listed, {size / 2**20:.1f} MiB")


def random_tensor(name: str, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    if "norm" in name:
        return torch.ones(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * 0.02


def make(src: Path, dst: Path, seed: int = 0) -> Path:
    """Write the twin of kit src into dst (float32 tensors, one safetensors file)."""
    if not (src / SHAPES).is_file():
        raise SystemExit(f"{src} has no {SHAPES}: make a kit first (`kit {src}`)")
    shapes = json.loads((src / SHAPES).read_text())
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, s["shape"], gen) for name, s in shapes.items()}
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name != SHAPES:
            shutil.copy(path, dst / path.name)
    save_file(tensors, str(dst / WEIGHTS))
    params = sum(t.numel() for t in tensors.values())
    print(f"twin at {dst}: {len(tensors)} tensors, {params / 1e6:.1f}M parameters")
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kit", help="the checkpoint's small files and tensor shapes, to copy elsewhere")
    k.add_argument("kit", type=Path)
    k.add_argument("--from", dest="src", type=Path, default=None,
                   help="checkpoint directory (default: the embedded model, converted from its GGUF)")
    m = sub.add_parser("make", help="a random-weight checkpoint from a kit")
    m.add_argument("kit", type=Path)
    m.add_argument("twin", type=Path)
    m.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "kit":
        src = args.src
        if src is None:
            from leanlm.models.embedded import resolve_embedded
            src = resolve_embedded()
        kit(src, args.kit)
    else:
        make(args.kit, args.twin, args.seed)


if __name__ == "__main__":
    main(sys.argv[1:])
