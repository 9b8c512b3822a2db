"""KVSpec: the `--kv SPEC` string, parsed once, round-tripping to its canonical form.

    fp16 | bf16 | fp32                 plain storage in that dtype (read back in the compute dtype)
    fp8:e4m3 | fp8:e5m2                FP8 with a power-of-two scale per token and KV head
    kivi:BITS[:gG][:rR]                KIVI: BITS 8, 4 or 2 (or int8 / int4 / int2); keys per channel
                                       over groups of G tokens (G = the cache block size), values per
                                       token; the not-yet-full block is the full-precision residual,
                                       so R, when given, must equal G
    bfp:MANTISSA[:bBLOCK][:reorder]    block floating point, MANTISSA 2..16 bits (sign included),
                                       a shared exponent per BLOCK channels (default 16)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ALLOWED = ("fp16, bf16, fp32, fp8:e4m3, fp8:e5m2, kivi:BITS[:gG][:rR] (BITS 8, 4 or 2; R = G), "
           "bfp:MANTISSA[:bBLOCK][:reorder] (MANTISSA 2..16)")
PLAIN = ("fp16", "bf16", "fp32")
FP8 = ("e4m3", "e5m2")
KIVI_BITS = (8, 4, 2)
BFP_DEFAULT_BLOCK = 16


@dataclass(frozen=True)
class KVSpec:
    kind: str                    # 'plain', 'fp8', 'kivi', 'bfp'
    dtype: str = ""              # plain: fp16/bf16/fp32; fp8: e4m3/e5m2
    bits: int = 0                # kivi code bits; bfp mantissa bits
    group: int | None = None     # kivi: tokens per key group (= block size); None: the engine's block size
    block: int = BFP_DEFAULT_BLOCK  # bfp: channels sharing an exponent
    reorder: bool = False        # bfp: permute key channels so outliers share blocks

    @classmethod
    def parse(cls, text: str) -> "KVSpec":
        if not isinstance(text, str):
            raise ValueError(f"kv spec must be a string, got {text!r}; allowed: {ALLOWED}")
        parts = text.strip().lower().split(":")
        try:
            spec = cls._parse(parts)
        except ValueError as e:
            raise ValueError(f"kv spec {text!r} is not valid: {e}; allowed: {ALLOWED}") from None
        if spec is None:
            raise ValueError(f"kv spec {text!r} is not understood; allowed: {ALLOWED}")
        return spec

    @classmethod
    def _parse(cls, parts: list[str]) -> "KVSpec | None":
        head, opts = parts[0], parts[1:]
        if head in PLAIN and not opts:
            return cls("plain", dtype=head)
        if head == "fp8" and len(opts) == 1 and opts[0] in FP8:
            return cls("fp8", dtype=opts[0])
        if head == "kivi" and opts:
            m = re.fullmatch(r"(?:int)?(\d+)", opts[0])
            if m is None or int(m.group(1)) not in KIVI_BITS:
                raise ValueError(f"kivi bits {opts[0]!r} must be 8, 4 or 2")
            group = residual = None
            for o in opts[1:]:
                if re.fullmatch(r"g\d+", o) and group is None:
                    group = _positive(o[1:], "group")
                elif re.fullmatch(r"r\d+", o) and residual is None:
                    residual = _positive(o[1:], "residual")
                else:
                    raise ValueError(f"option {o!r}: expected gG or rR, each at most once")
            if residual is not None and residual != (group or residual):
                raise ValueError(f"r{residual} != g{group}: in the paged cache the full-precision "
                                 f"residual is the not-yet-full block of G tokens, so R must equal G")
            return cls("kivi", bits=int(m.group(1)), group=group or residual)
        if head == "bfp" and opts:
            if not re.fullmatch(r"\d+", opts[0]) or not 2 <= int(opts[0]) <= 16:
                raise ValueError(f"bfp mantissa {opts[0]!r} must be 2..16 bits")
            block, reorder = None, False
            for o in opts[1:]:
                if re.fullmatch(r"b\d+", o) and block is None:
                    block = _positive(o[1:], "block")
                elif o == "reorder" and not reorder:
                    reorder = True
                else:
                    raise ValueError(f"option {o!r}: expected bBLOCK or reorder, each at most once")
            return cls("bfp", bits=int(opts[0]), block=block or BFP_DEFAULT_BLOCK, reorder=reorder)
        return None

    def __str__(self) -> str:
        if self.kind == "plain":
            return self.dtype
        if self.kind == "fp8":
            return f"fp8:{self.dtype}"
        if self.kind == "kivi":
            return f"kivi:{self.bits}" + (f":g{self.group}" if self.group else "")
        return f"bfp:{self.bits}:b{self.block}" + (":reorder" if self.reorder else "")


def _positive(digits: str, name: str) -> int:
    value = int(digits)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def build_codec(spec: "KVSpec | None", num_layers: int, num_blocks: int, block_size: int,
                num_kv_heads: int, head_dim: int, dtype, device, max_seqs: int, key_perm=None):
    """The codec `spec` names (None: plain storage in the compute dtype, spec 'plain'). `key_perm`
    ([layers, Hkv, D], from kv.bfp.key_channel_order) is required by bfp:...:reorder."""
    import torch

    from leanlm.kv.codecs import PlainCodec

    slots = num_blocks * block_size
    shape = (num_layers, slots, block_size, num_kv_heads, head_dim, dtype, device)
    if spec is None:
        return PlainCodec(*shape)
    if spec.kind == "plain":
        storage = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[spec.dtype]
        return PlainCodec(*shape, storage_dtype=storage, spec=str(spec))
    if spec.kind == "fp8":
        from leanlm.kv.quantized import Fp8Codec

        return Fp8Codec(*shape, fmt=spec.dtype)
    if spec.kind == "kivi":
        from leanlm.kv.quantized import KiviCodec

        if spec.group is not None and spec.group != block_size:
            raise ValueError(f"kv spec {spec}: group {spec.group} must equal the block size {block_size}")
        return KiviCodec(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device,
                         bits=spec.bits, max_partial=max_seqs)
    if spec.kind == "bfp":
        from leanlm.kv.bfp import BfpCodec

        if spec.reorder and key_perm is None:
            raise ValueError(f"kv spec {spec} needs the key channel order (kv.bfp.key_channel_order)")
        return BfpCodec(*shape, mantissa_bits=spec.bits, block=spec.block,
                        key_perm=torch.as_tensor(key_perm, device=device) if spec.reorder else None)
    raise ValueError(f"kv spec {spec}: codec {spec.kind!r} is not available")
