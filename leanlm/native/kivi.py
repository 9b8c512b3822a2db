"""ctypes binding of kivi_attention.c: decode attention read straight from KIVI's codes."""
from __future__ import annotations

import ctypes

import torch

from leanlm import native
from leanlm.kv.quantized import S8_TABLE, s8_zero_unit

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_fn = None


def kernel():
    global _fn
    if _fn is None and native.enabled():
        _fn = native.function("kivi_attention", "kivi_decode_attention",
                              [_P, _I, _I, _I, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _P,
                               _I, _I, _I, _P, _F, _P, _P, _P, _I, _P, _P, _P, _P, _I, _F, _P], _I)
    return _fn if native.enabled() else None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def decode_attention(codec, layer: int, q: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor) -> torch.Tensor | None:
    """q [B, Hq, D] (one token per sequence, already rotated if the codec rotates), tables
    [B, nblk] block ids, lens [B] cached tokens each query sees (its own included) -> [B, Hq, D],
    or None when the kernel does not cover this case (the caller then uses the torch path)."""
    fn = kernel()
    if fn is None or codec.ktoken or codec.device.type != "cpu" or codec.dtype not in (torch.float32, torch.bfloat16):
        return None
    B, Hq, D = q.shape
    qf = q.float().contiguous()
    tables, lens = tables.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    out = torch.empty(B, Hq, D, dtype=torch.float32)
    kn = codec.kn[layer] if codec.knorm else None
    plan = codec.key_plan  # kmix: per-channel key widths
    s8 = codec.scale_bits == 8  # values: uint8 scale codes into S8_TABLE, int8 zeros in units of the scale
    table = S8_TABLE.contiguous() if s8 else None
    rc = fn(qf.data_ptr(), B, Hq, codec.num_kv_heads, D, tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), codec.block_size,
            codec.kc[layer].data_ptr(), codec.ks[layer].data_ptr(), codec.kz[layer].data_ptr(), _ptr(kn),
            codec.vc[layer].data_ptr(), codec.vs[layer].data_ptr(), codec.vz[layer].data_ptr(),
            codec.bits, codec.vbits, codec.vgroup,
            _ptr(table), s8_zero_unit(codec.vbits) if s8 else 0.0,
            codec.res_row.data_ptr(),
            codec.rk[layer].data_ptr(), codec.rv[layer].data_ptr(), int(codec.res_dtype == torch.bfloat16),
            _ptr(codec.rope_cos), _ptr(codec.rope_sin),
            _ptr(codec.kperm[layer] if plan else None), _ptr(codec.kgbits[layer] if plan else None),
            plan.bytes_per_head if plan else 0, D ** -0.5, out.data_ptr())
    if rc != 0:
        return None
    return out.to(q.dtype)
