"""ctypes binding of kivi_attention.c: decode attention read straight from KIVI's codes, the
value quantizer and Hadamard rotation the module path and the whole-layer executor share, and the
per-layer descriptors of that executor (native/layers.py)."""
from __future__ import annotations

import ctypes

import torch

from leanlm import native
from leanlm.kv.quantized import S8_TABLE, s8_zero_unit

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "kivi_decode_attention": ([_P, _I, _I, _I, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _P,
                               _I, _I, _I, _P, _F, _P, _P, _P, _I, _P, _P, _P, _P, _I, _F, _P], _I),
    "kivi_rotate_f32": ([_P, _L, _L, _I, _I, _P], None),
    "kivi_quant_values": ([_P, _L, _L, _I, _I, _I, _I, _P, _F, _P, _P, _P, _P], None),
    "kivi_layer_step": ([_P, _P, _P, _I, _L, _P, _P, _I, _P, _P], _I),
    "kivi_set_segment": ([_I], None),
}
_fns: dict | None = None
MAX_HEAD_DIM, MAX_GROUP = 256, 16  # kivi_attention.c's MAXD and MAXG
_S8 = S8_TABLE.contiguous()  # one table for every call: descriptors hold its address


def _lib() -> dict | None:
    global _fns
    if not native.enabled():
        return None
    if _fns is None:
        fns = {n: native.function("kivi_attention", n, a, r) for n, (a, r) in _SIGNATURES.items()}
        _fns = fns if all(f is not None for f in fns.values()) else {}
    return _fns or None


def set_segment(tokens: int) -> None:
    """Tokens per segment of a long row in kivi_decode_attention (default 2048; whole blocks):
    longer rows are split across threads and merged. Tests set it low to reach the merge."""
    lib = _lib()
    if lib:
        lib["kivi_set_segment"](int(tokens))


def kernel():
    lib = _lib()
    return lib["kivi_decode_attention"] if lib else None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def native_f32(x: torch.Tensor) -> bool:
    """Whether the shared native write-side functions apply to x: float32 on the CPU, eager."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and _lib() is not None)


def rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x [..., D] float32 times R [D, D] float32 per head, as a new tensor (kivi_rotate_f32: the
    executor's own rotation, so both paths round alike)."""
    D = x.shape[-1]
    out, R = x.contiguous().clone(), R.contiguous()  # (a name for R: a temporary's memory is freed before the call)
    _lib()["kivi_rotate_f32"](out.data_ptr(), out.numel() // D, D, 1, D, R.data_ptr())
    return out


def quant_values(codec, layer: int, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Values x [T, H, D] float32 into `slots` [T] of codec's layer: codes, scales and zeros
    (kivi_quant_values: asym_quantize / asym_quantize8 computed in C)."""
    T, H, D = x.shape
    x, slots = x.contiguous(), slots.to(torch.int64).contiguous()
    s8 = codec.scale_bits == 8
    _lib()["kivi_quant_values"](x.data_ptr(), T, H * D, H, D, codec.vgroup, codec.vbits,
                                _S8.data_ptr() if s8 else None, s8_zero_unit(codec.vbits) if s8 else 0.0,
                                slots.data_ptr(), codec.vc[layer].data_ptr(), codec.vs[layer].data_ptr(),
                                codec.vz[layer].data_ptr())


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
    rc = fn(qf.data_ptr(), B, Hq, codec.num_kv_heads, D, tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), codec.block_size,
            codec.kc[layer].data_ptr(), codec.ks[layer].data_ptr(), codec.kz[layer].data_ptr(), _ptr(kn),
            codec.vc[layer].data_ptr(), codec.vs[layer].data_ptr(), codec.vz[layer].data_ptr(),
            codec.bits, codec.vbits, codec.vgroup,
            _S8.data_ptr() if s8 else None, s8_zero_unit(codec.vbits) if s8 else 0.0,
            codec.res_row.data_ptr(),
            codec.rk[layer].data_ptr(), codec.rv[layer].data_ptr(), int(codec.res_dtype == torch.bfloat16),
            _ptr(codec.rope_cos), _ptr(codec.rope_sin),
            _ptr(codec.kperm[layer] if plan else None), _ptr(codec.kgbits[layer] if plan else None),
            plan.bytes_per_head if plan else 0, D ** -0.5, out.data_ptr())
    if rc != 0:
        return None
    return out.to(q.dtype)


# -- the whole-layer executor's side (native/layers.py) ------------------------------------------

class _KiviLayer(ctypes.Structure):
    _fields_ = [(n, _L) for n in ("Hq", "H", "D", "bs", "kbits", "vbits", "vgroup", "kbytes", "res_bf16",
                                   "rotate_qk")] + [("vzunit", _F), ("scale", _F)] + [
        (n, _P) for n in ("s8_table", "kc", "ks", "kz", "kn", "vc", "vs", "vz", "res_row", "rk", "rv",
                          "rope_cos", "rope_sin", "kperm", "kgbits", "rot", "rot_t")]


class _KiviStep(ctypes.Structure):
    _fields_ = [("res_at", _P), ("n_full", _L), ("full_blocks", _P), ("flush_src", _P)]


def executor_supports(codec, num_heads: int) -> bool:
    """Whether the executor can run this codec's decode steps (float32 compute on the CPU, keys
    per channel: not ktok)."""
    # the sizes kivi_decode_attention handles (MAXD, MAXG): past them it returns -1, which the
    # module path answers with the torch read path but the executor could not undo mid-step
    return (_lib() is not None and codec.device.type == "cpu" and codec.dtype == torch.float32
            and not codec.ktoken and num_heads % codec.num_kv_heads == 0
            and codec.head_dim <= MAX_HEAD_DIM and num_heads // codec.num_kv_heads <= MAX_GROUP)


def layer_descriptors(codec, num_heads: int) -> tuple[list[_KiviLayer], list]:
    """One descriptor per layer (pointers into codec's tensors) and the tensors they point into."""
    s8 = codec.scale_bits == 8
    rot = codec.rotation
    rot_t = rot.T.contiguous() if rot is not None else None
    rot = rot.contiguous() if rot is not None else None
    refs = [rot, rot_t, _S8]
    plan = codec.key_plan
    out = []
    for i in range(codec.num_layers):
        kn = codec.kn[i] if codec.knorm else None
        kperm, kgbits = (codec.kperm[i], codec.kgbits[i]) if plan else (None, None)
        out.append(_KiviLayer(
            num_heads, codec.num_kv_heads, codec.head_dim, codec.block_size, codec.bits, codec.vbits,
            codec.vgroup, plan.bytes_per_head if plan else 0, int(codec.res_dtype == torch.bfloat16),
            int(codec.rotate_qk), s8_zero_unit(codec.vbits) if s8 else 0.0, codec.head_dim ** -0.5,
            _S8.data_ptr() if s8 else None, codec.kc[i].data_ptr(), codec.ks[i].data_ptr(), codec.kz[i].data_ptr(),
            _ptr(kn), codec.vc[i].data_ptr(), codec.vs[i].data_ptr(), codec.vz[i].data_ptr(),
            codec.res_row.data_ptr(), codec.rk[i].data_ptr(), codec.rv[i].data_ptr(),
            _ptr(codec.rope_cos), _ptr(codec.rope_sin), _ptr(kperm), _ptr(kgbits), _ptr(rot), _ptr(rot_t)))
        refs += [codec.kc[i], codec.ks[i], codec.kz[i], kn, codec.vc[i], codec.vs[i], codec.vz[i],
                 codec.rk[i], codec.rv[i], kperm, kgbits]
    refs += [codec.res_row, codec.rope_cos, codec.rope_sin]
    return out, refs


def step_address() -> int:
    """kivi_layer_step's address, for ops.c's attend function pointer."""
    return ctypes.cast(_lib()["kivi_layer_step"], _P).value


def step_plan(codec, slots: torch.Tensor) -> tuple[_KiviStep, list] | None:
    """This step's plan for the executor, from the codec's write plan: each row's residual index
    (-1: none), and for the blocks that fill, where each of their tokens' keys comes from (a row of
    this step, or -1 - its residual index); None where the executor does not cover the step
    (knorm keys of a filling block: their norms are left to torch)."""
    plan = codec._plan_for(slots)
    n_full = plan.full_blocks.numel()
    if n_full and codec.knorm:
        return None
    res_at = torch.full((slots.numel(),), -1, dtype=torch.int64)
    res_at[plan.res_src] = plan.res_dst
    keep = [res_at]
    step = _KiviStep(res_at.data_ptr(), n_full, None, None)
    if n_full:
        # KiviCodec.write's key order: cat(old residual tokens, new rows).index_select(order)
        src = torch.cat((-1 - plan.old_idx, plan.new_idx)).index_select(0, plan.order).contiguous()
        blocks = plan.full_blocks.contiguous()
        keep += [src, blocks]
        step.full_blocks, step.flush_src = blocks.data_ptr(), src.data_ptr()
    return step, keep
