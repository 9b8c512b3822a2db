"""Save / load weight-only quantized checkpoints: one safetensors file plus a json manifest.

Layout of a checkpoint directory (our own format; the loader reads it back into the same model
class, so tensors keep the model's own, fused, parameter names):

    model.safetensors    for each quantized Linear `L` (e.g. "layers.0.mlp.gate_up_proj"):
                           L.qcodes          uint8, codes bit-packed (formats/pack.py layout)
                           L.qscales         float16 when lossless, else float32   [N, Kp / g]
                             or L.qstored    the format's scale bytes (E8M0 / E4M3 / BFP exponent)
                                + L.qscale_table  float32 [256]: decoded scale of every byte value
                           L.qzeros          zero points: packed `bits`-bit ints when integral,
                                             else float16 / float32 as for scales
                           L.qtensor_scale   float32 (NVFP4)
                           L.bias            in the model dtype, like every other parameter
                         every other parameter (embeddings, norms, unquantized lm_head) under its
                         own name, in the model dtype
    quantization.json    format_version, spec, dtype, source, extra, per-layer metadata and, per
                         tensor, dtype / shape / nbytes / sha256 (corruption is detected, never
                         loaded into a silently wrong model)
    config.json, generation_config.json, tokenizer files   copied from the source checkpoint

Everything is bit-exact: the loaded model's QuantizedTensors equal the in-memory ones, so its
logits are identical. The directory is written atomically (temp dir next to it, then renamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from leanlm.formats import pack as packing
from leanlm.formats.base import QuantizedTensor
from leanlm.quant.spec import QuantSpec

FORMAT_VERSION = 1
MANIFEST = "quantization.json"
WEIGHTS = "model.safetensors"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja", "chat_template.json")
_CODE_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


# -- saving ------------------------------------------------------------------------------------

def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear layers holding a quantized weight (a WeightOnlyMethod with `layer.quantized`)."""
    from leanlm.quant.weight_only import WeightOnlyMethod

    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "method", None), WeightOnlyMethod)
            and getattr(m, "quantized", None) is not None}


def _compact_float(t: torch.Tensor) -> torch.Tensor:
    """float16 (or bfloat16) when that holds every value exactly, else float32: lossless."""
    t = t.float().contiguous()
    for dt in (torch.float16, torch.bfloat16):
        small = t.to(dt)
        if torch.equal(small.float(), t):
            return small
    return t


def _encode_layer(name: str, q: QuantizedTensor, bits: int, base3: bool) -> tuple[dict, dict]:
    """Tensors to store for one quantized weight, and its manifest entry."""
    codes = q.codes.cpu()
    code_dtype = {torch.int8: "int8", torch.uint8: "uint8"}.get(codes.dtype)
    if code_dtype is None:
        raise ValueError(f"{name}: codes of dtype {codes.dtype} cannot be stored (need int8 / uint8)")
    signed = codes.dtype == torch.int8
    packed = packing.pack_trits(codes) if base3 else packing.pack(codes, bits, signed=signed)
    tensors = {f"{name}.qcodes": packed}
    meta = {"format": q.format, "shape": list(q.shape), "group_size": q.group_size,
            "padded_k": int(codes.shape[1]), "bits": bits, "code_dtype": code_dtype,
            "packing": "trits" if base3 else "bits"}
    if q.stored_scales is not None:
        # The decoded scale is a function of the stored byte: keep the bytes (what the format's
        # bits_per_weight counts) plus a 256-entry table, checked to reproduce every scale.
        stored = q.stored_scales.cpu().contiguous()
        idx = stored.view(torch.uint8).long() if stored.dtype == torch.int8 else stored.long()
        table = torch.full((256,), float("nan"))
        table[idx.reshape(-1)] = q.scales.cpu().float().reshape(-1)
        if stored.dtype not in (torch.uint8, torch.int8) or not torch.equal(table[idx], q.scales.cpu().float()):
            raise ValueError(f"{name}: scales are not a function of the stored scale bytes")
        tensors[f"{name}.qstored"] = stored
        tensors[f"{name}.qscale_table"] = table
    else:
        tensors[f"{name}.qscales"] = _compact_float(q.scales.cpu())
    if q.zeros is not None:
        z = q.zeros.cpu().float()
        if torch.equal(z, z.round()) and z.min() >= 0 and z.max() < (1 << bits):
            tensors[f"{name}.qzeros"] = packing.pack(z.to(torch.int16), bits, signed=False)
            meta["zeros"] = "packed"
        else:
            tensors[f"{name}.qzeros"] = _compact_float(z)
            meta["zeros"] = "float"
    if q.tensor_scale is not None:
        tensors[f"{name}.qtensor_scale"] = q.tensor_scale.cpu().float().reshape(1)
    return tensors, meta


def _tensor_record(t: torch.Tensor) -> dict:
    data = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_quantized(model: torch.nn.Module, model_dir_src: str | os.PathLike, out_dir: str | os.PathLike,
                   spec: QuantSpec, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model`'s quantized checkpoint to `out_dir` (see the module docstring); returns it."""
    from safetensors.torch import save_file

    src, out = Path(model_dir_src), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layers to save")
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    tensors, layer_meta = {}, {}
    for name, layer in layers.items():
        fmt = layer.method.fmt
        t, meta = _encode_layer(name, layer.quantized, fmt.bits, bool(getattr(fmt, "base3", False)))
        rotation = getattr(layer.method, "rotation", None)
        if rotation is not None:  # codes are of W @ H: the loader must rotate activations alike
            meta["rotation"] = {"kind": "hadamard", "block": rotation.block}
        tensors.update(t)
        layer_meta[name] = meta
    for name, p in model.named_parameters():  # tied parameters appear once (the embedding)
        tensors[name] = p.detach().to(dtype).cpu()
    tied = getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)
    for name, m in model.named_modules():  # float32 layers packed for the native kernel
        if "packed_weight" in getattr(m, "_buffers", {}) and not (tied and name == "lm_head"):
            tensors[f"{name}.weight"] = m.weight.to(dtype).cpu()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    manifest = {"format_version": FORMAT_VERSION, "spec": str(spec),
                "dtype": str(dtype).removeprefix("torch."), "source": str(src),
                "extra": extra or {}, "layers": layer_meta,
                "tensors": {k: _tensor_record(v) for k, v in sorted(tensors.items())}}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "leanlm_quant": str(spec)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for fname in COPIED_FILES:
            if (src / fname).is_file():
                shutil.copy2(src / fname, tmp / fname)
        if not (tmp / "config.json").is_file():
            raise FileNotFoundError(f"{src} has no config.json to copy")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (allowed by the caller) is moved aside first and
    deleted only once the new directory is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "d")
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old / "d", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# -- loading -----------------------------------------------------------------------------------

def _read_verified(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the manifest, with dtype, shape and sha256 checked; nothing else allowed."""
    from safetensors import safe_open

    expected = manifest["tensors"]
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            present = set(f.keys())
            missing = sorted(set(expected) - present)
            if missing:
                raise ValueError(f"{path / WEIGHTS} is missing tensor {missing[0]!r}"
                                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
            unexpected = sorted(present - set(expected))
            if unexpected:
                raise ValueError(f"{path / WEIGHTS} has tensor {unexpected[0]!r} not in {MANIFEST}")
            out = {k: f.get_tensor(k) for k in expected}
    except ValueError:
        raise
    except Exception as e:  # a damaged header or truncated file: safetensors' own error types
        raise ValueError(f"{path / WEIGHTS} cannot be read ({type(e).__name__}: {e})") from e
    for k, rec in expected.items():
        got = _tensor_record(out[k])
        for field in ("dtype", "shape", "nbytes", "sha256"):
            if got[field] != rec[field]:
                raise ValueError(f"tensor {k!r} in {path / WEIGHTS} is corrupt: {field} is "
                                 f"{got[field]}, {MANIFEST} expects {rec[field]}")
    return out


def _decode_layer(name: str, meta: dict, t: dict[str, torch.Tensor], layer) -> QuantizedTensor:
    N, K = meta["shape"]
    g, Kp, bits = meta["group_size"], meta["padded_k"], meta["bits"]
    if (N, K) != (layer.out_features, layer.in_features):
        raise ValueError(f"{name}: {MANIFEST} shape {[N, K]} does not match the model's "
                         f"[{layer.out_features}, {layer.in_features}] (config.json)")
    if g < 1 or Kp % g or not K <= Kp < K + g:
        raise ValueError(f"{name}: group_size {g} and padded_k {Kp} are inconsistent with K={K}")
    code_dtype = _CODE_DTYPES.get(meta["code_dtype"])
    if code_dtype is None:
        raise ValueError(f"{name}: code_dtype {meta['code_dtype']!r} is not int8 / uint8")
    packed = t[f"{name}.qcodes"]
    need = (packing.packed_nbytes_trits(N * Kp) if meta["packing"] == "trits"
            else packing.packed_nbytes(N * Kp, bits))
    if packed.numel() != need:
        raise ValueError(f"{name}.qcodes has {packed.numel()} bytes, expected {need} for "
                         f"[{N}, {Kp}] {bits}-bit codes")
    if meta["packing"] == "trits":
        codes = packing.unpack_trits(packed, (N, Kp))
    else:
        codes = packing.unpack(packed, bits, (N, Kp), signed=code_dtype == torch.int8)
    codes = codes.to(code_dtype)
    groups = (N, Kp // g)
    stored = t.get(f"{name}.qstored")
    if stored is not None:
        idx = stored.view(torch.uint8).long() if stored.dtype == torch.int8 else stored.long()
        scales = t[f"{name}.qscale_table"].float()[idx]
    else:
        scales = t[f"{name}.qscales"].float()
    zeros = None
    if "zeros" in meta:
        z = t[f"{name}.qzeros"]
        zeros = (packing.unpack(z, bits, groups).float() if meta["zeros"] == "packed" else z.float())
    for label, v in (("scales", scales), ("stored scales", stored), ("zeros", zeros)):
        if v is not None and tuple(v.shape) != groups:
            raise ValueError(f"{name}: {label} have shape {tuple(v.shape)}, expected {groups}")
    ts = t.get(f"{name}.qtensor_scale")
    return QuantizedTensor(meta["format"], (N, K), g, codes, scales.contiguous(), zeros,
                           None if ts is None else ts.float().reshape(()), stored)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str = "cpu",
                   compile: bool = False):
    """(model, ModelConfig) from a checkpoint written by `save_quantized`; any inconsistency or
    corruption raises a ValueError naming the tensor or layer. compile: the model will run under
    torch.compile (layers keep torch's kernels rather than opaque native ones)."""
    from leanlm.formats.registry import get_format
    from leanlm.models.model_config import ModelConfig
    from leanlm.models.registry import MODEL_CLASSES
    from leanlm.quant.linear import default_method
    from leanlm.quant.weight_only import WeightOnlyMethod

    path, device = Path(path), torch.device(device)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / MANIFEST} cannot be read: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / MANIFEST}: format_version {manifest.get('format_version')!r} "
                         f"is not supported (expected {FORMAT_VERSION})")
    spec = QuantSpec.parse(manifest["spec"])
    layers: dict = manifest["layers"]
    tensors = _read_verified(path, manifest)

    cfg = ModelConfig.from_dir(path)
    built: set[str] = set()

    def method(name: str):
        if name in layers:
            built.add(name)
            fmt = get_format(layers[name]["format"])
            rot = layers[name].get("rotation")
            if rot is None:
                return WeightOnlyMethod(fmt, spec.group_size, native=not compile)
            from leanlm.quant.rotation import Rotation

            if rot.get("kind") != "hadamard":
                raise ValueError(f"{name}: rotation {rot!r} is not supported (expected hadamard)")
            m = WeightOnlyMethod(fmt, spec.group_size, rotate=True, rotate_block=spec.rotate_block,
                                 native=not compile)
            m.rotation = Rotation(int(rot["block"]))  # the block the codes were made with
            return m
        return default_method(dtype, device, compile)

    model = MODEL_CLASSES[cfg.architecture](cfg, dtype=dtype, method=method)
    if built != set(layers):
        raise ValueError(f"{MANIFEST} names layers the model does not have: {sorted(set(layers) - built)[:3]}")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[0] in layers and name.endswith(".weight"):
                continue  # quantized: filled below from its codes
            if name not in tensors:
                raise ValueError(f"{path / WEIGHTS} is missing parameter {name!r}")
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"parameter {name!r}: checkpoint shape {tuple(tensors[name].shape)}, "
                                 f"model {tuple(p.shape)}")
            p.copy_(tensors[name])
    model.to(device)
    for name, meta in layers.items():
        q = _decode_layer(name, meta, tensors, modules[name])
        moved = QuantizedTensor(q.format, q.shape, q.group_size,
                                *(None if v is None else v.to(device)
                                  for v in (q.codes, q.scales, q.zeros, q.tensor_scale, q.stored_scales)))
        modules[name].method.set_quantized(modules[name], moved)
    model.process_after_loading()  # kernels for the unquantized layers; quantized ones are set
    model.eval()
    return model, cfg
