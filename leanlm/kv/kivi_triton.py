"""KIVI on a GPU: Triton kernels for the two per-layer operations of a decode step.

- `decode_attention`: one query token per row attends to its blocks straight from the codes, the
  same computation as native/kivi_attention.c on the CPU: key codes per channel (fp16 scale and
  zero per block), value codes per token and channel group (fp16, or s8 scale codes through
  S8_TABLE with int8 zeros), blocks still filling read from their full-precision residual row,
  pre-RoPE keys rotated to their positions, online softmax over blocks.
- `quant_values`: the values of a step's tokens quantized into their slots (asym_quantize8: the
  s8 scale search over S8_TABLE in float64, then the codes), packed as pack_codes packs them.

Why: without them a decode step on CUDA is ~110 torch ops per layer (unpack, scale, RoPE,
residual merge, masked attention, the s8 search), each a kernel launch; the engine then made
fewer than 55 tok/s at batch 4 on an H200, below the bf16 cache at batch 1. Each kernel here is
one launch per layer.

Triton is imported lazily and only where present (the GPU image has it; CPU installs do not need
it). Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (numpy), which is how the tests
check them against the torch path on machines without a GPU."""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from leanlm.kv.quantized import S8_MIN, _s8, s8_zero_unit

# Tests set this (with TRITON_INTERPRET=1 before the kernels' first import) to run the kernels on
# CPU tensors through Triton's interpreter; the engine on a CPU otherwise never takes them.
INTERPRET_ON_CPU = False


# The first launch that fails (triton present but unable to compile for this GPU, say): the
# kernels are then left alone for the rest of the process and the torch path takes over
_failure: str | None = None


@functools.lru_cache(maxsize=1)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels():
    from leanlm.kv import kivi_triton_kernels

    return kivi_triton_kernels


def _launch(name: str, grid: tuple[int, int], *args, **constexprs) -> bool:
    """kernels.NAME[grid](*args, **constexprs); False (and a warning, once) if it raises: a kernel
    that does not compile or launch here must not take the engine down with it."""
    global _failure
    try:
        getattr(_kernels(), name)[grid](*args, **constexprs)
        return True
    except Exception as e:  # noqa: BLE001 (compiler, driver and import errors alike)
        _failure = f"{type(e).__name__}: {e}"
        warnings.warn(f"KIVI Triton kernel {name!r} failed ({_failure}); KIVI uses torch ops from now on",
                      RuntimeWarning, stacklevel=3)
        return False


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(codec, device: torch.device | None = None) -> bool:
    """Whether these kernels cover this codec on this device: CUDA (or the interpreter), per-channel
    keys without norms or mixed widths, power-of-two block, head and group sizes."""
    device = device or codec.device
    if (not (device.type == "cuda" or device.type == "cpu" and INTERPRET_ON_CPU) or _failure is not None
            or not _have_triton() or torch.compiler.is_compiling()):
        return False
    fits = codec.__dict__.get("_triton_fits")
    if fits is None:  # (asked twice per layer and step: decided once per codec)
        fits = codec._triton_fits = _fits(codec)
    return fits


def _fits(codec) -> bool:
    if os.environ.get("LEANLM_TRITON", "1").strip().lower() in ("0", "false", "no", "off"):
        return False  # the torch path, for comparisons
    D, bs = codec.head_dim, codec.block_size
    return (not codec.ktoken and not codec.knorm and codec.key_plan is None and _pow2(D) and D >= 16
            and _pow2(bs) and bs >= 16 and codec.bits in (2, 3, 4, 8) and codec.vbits in (2, 3, 4, 8)
            and _pow2(codec.vgroup) and codec.vgroup >= 8
            and (codec.rope_cos is None or tuple(codec.rope_cos.shape[1:]) == (D,)))


def decode_attention(codec, layer: int, q: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor) -> torch.Tensor | None:
    """q [B, Hq, D] (rotated as the codec rotates), tables [B, nblk] block ids (-1: evicted),
    lens [B] tokens each row sees, its own included -> [B, Hq, D] in q's dtype (None if the
    kernel failed: the caller uses torch ops)."""
    B, Hq, D = q.shape
    H = codec.num_kv_heads
    G = Hq // H
    qf = q.float().contiguous()
    tables, lens = tables.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    s8 = _s8(q.device)
    prerope = codec.rope_cos is not None
    cos, sin = (codec.rope_cos, codec.rope_sin) if prerope else (qf, qf)  # (unused without prerope)
    s8_codes = codec.scale_bits == 8
    ok = _launch("attention", (B, H), qf, tables, lens, out, codec.kc[layer], codec.ks[layer], codec.kz[layer],
                 codec.vc[layer], codec.vs[layer], codec.vz[layer], s8, codec.res_row,
                 codec.rk[layer], codec.rv[layer], cos, sin, tables.shape[1], D ** -0.5,
                 s8_zero_unit(codec.vbits) if s8_codes else 0.0,
                 H=H, G=G, BG=max(16, 1 << (G - 1).bit_length()), D=D, BS=codec.block_size,
                 KBITS=codec.bits, VBITS=codec.vbits, VGROUP=codec.vgroup, S8=s8_codes, PREROPE=prerope)
    return out.to(q.dtype) if ok else None


def quant_values(codec, layer: int, v: torch.Tensor, slots: torch.Tensor) -> bool:
    """Values v [T, H, D] into `slots` of codec's layer (s8 scales only; False where this kernel
    does not apply or failed, and the caller quantizes with torch)."""
    if codec.scale_bits != 8:
        return False
    T, H, D = v.shape
    s8, s8d = _s8(v.device), _s8(v.device, torch.float64)
    per = 8 if codec.vbits == 3 else 8 // codec.vbits
    return _launch("quantize", (T, H), v.float().contiguous(), slots.to(torch.int64).contiguous(), codec.vc[layer],
                   codec.vs[layer], codec.vz[layer], s8, s8d, s8_zero_unit(codec.vbits), S8MIN=S8_MIN,
                   H=H, D=D, VBITS=codec.vbits, VGROUP=codec.vgroup, PER=per)
