"""KVSpec: the `--kv SPEC` string, parsed once, round-tripping to its canonical form.

    fp16 | bf16 | fp32                 plain storage in that dtype (read back in the compute dtype)
    fp8:e4m3 | fp8:e5m2                FP8 with a power-of-two scale per token and KV head
    kivi:BITS[:gG][:rR][:sinkS][:vVBITS][:cC][:s8][:prerope][:rotate][:ktok|:knorm][:kmix]
                                       KIVI: BITS 8, 4, 3 or 2 (or int8 / int4 / int3 / int2); keys per
                                       channel over groups of G tokens (G = the cache block size),
                                       values per token over groups of C channels (default 32) with
                                       VBITS bits (default BITS); blocks fewer than R tokens
                                       (default G: the block being filled) from the end and the
                                       first S tokens (sinkS, default 0) are also read in full
                                       precision (R, S multiples of G; R > G or S > 0 need
                                       prefix caching off);
                                       `s8`: every group's scale and zero in 8 bits each (a
                                       log-grid scale code, an int8 zero in units of the scale)
                                       instead of fp16 (s16, the default);
                                       `prerope`: keys cached before RoPE (KVQuant), rotated to their
                                       positions on every read;
                                       `rotate`: a per-head Walsh-Hadamard rotation of q, k, v before
                                       the cache (undone on the attention output), q.k unchanged;
                                       with prerope, of v only;
                                       `kmix` (with prerope and vVBITS): BITS is the average key
                                       bits per channel (e.g. 3.5), spread over the channels by
                                       a calibration run at load (kv/kmix.py);
                                       `ktok`: keys per token over C channels too, as values;
                                       `knorm`: per-token key norms, per-channel unit directions
    bfp:MANTISSA[:bBLOCK][:reorder]    block floating point, MANTISSA 2..16 bits (sign included),
                                       a shared exponent per BLOCK channels (default 16)
    xquant:BITS[:gG][:cl]              XQuant: the SVD latent of [K_pre | V] (or, with cl, deltas of
                                       the residual stream between layers), BITS 8, 4, 3 or 2, per
                                       token over groups of G channels (default 32)
    stream:WINDOW[:sinkS][+INNER]      StreamingLLM-style eviction on top of any codec INNER (default bf16):
                                       a query in block i sees the first S tokens (default: one block)
                                       and the WINDOW tokens before its own block (WINDOW, S multiples
                                       of the block size); older blocks are freed, so a sequence holds
                                       at most S + WINDOW + one block of tokens however long it grows
    minicache[:START][:T][:GAMMA][+INNER]
                                       MiniCache: layers START.. (default: the middle) merged in
                                       adjacent pairs (SLERP factor T, default 0.6; tokens with
                                       angular distance / pi > GAMMA, default 0.05, retained), the
                                       shared directions stored by INNER (default bf16; e.g. kivi:4)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

ALLOWED = ("fp16, bf16, fp32, fp8:e4m3, fp8:e5m2, kivi:BITS[:gG][:rR][:sinkS][:vVBITS][:cC][:s8][:prerope][:rotate][:ktok|:knorm][:kmix] "
           "(BITS, VBITS 8, 4, 3 or 2; R, S multiples of G, R >= G; s8: 8-bit value scales and zeros; "
           "prerope: keys cached before RoPE; kmix: BITS the average of per-channel key bits, e.g. "
           "kivi:3.5:g128:v4:c64:s8:prerope:rotate:kmix), "
           "bfp:MANTISSA[:bBLOCK][:reorder] (MANTISSA 2..16), xquant:BITS[:gG][:cl] (BITS 8, 4, 3 or 2), "
           "minicache[:START][:T][:GAMMA][+INNER] (T, GAMMA in [0, 1]; INNER one of the above but xquant), "
           "stream:WINDOW[:sinkS][+INNER] (WINDOW, S tokens, multiples of the block size; INNER any of the above)")
PLAIN = ("fp16", "bf16", "fp32")
FP8 = ("e4m3", "e5m2")
KIVI_BITS = (8, 4, 3, 2)
BFP_DEFAULT_BLOCK = 16
XQUANT_DEFAULT_GROUP = 32
MAX_KMIX_BITS = 8  # what a kmix codec's nominal bits are (its plan sets the real widths)


@dataclass(frozen=True)
class KVSpec:
    kind: str                    # 'plain', 'fp8', 'kivi', 'bfp'
    dtype: str = ""              # plain: fp16/bf16/fp32; fp8: e4m3/e5m2
    bits: int = 0                # kivi code bits; bfp mantissa bits
    group: int | None = None     # kivi: tokens per key group (= block size); None: the engine's block size
    block: int = BFP_DEFAULT_BLOCK  # bfp: channels sharing an exponent
    reorder: bool = False        # bfp: permute key channels so outliers share blocks
    vbits: int = 0               # kivi: value bits (0: = bits)
    vgroup: int = 0              # kivi: channels per value group (0: the default, 32)
    rotate: bool = False         # kivi: Hadamard-rotate q, k, v per head before the cache
    ktoken: bool = False         # kivi: keys per token over channel groups too (QuaRot-style, with rotate)
    knorm: bool = False          # kivi: per-token key norms (fp16), per-channel quantized directions
    residual: int = 0            # kivi: full-precision window R in tokens (0: R = G, the partial block)
    sink: int = 0                # kivi: first S tokens of each sequence kept in full precision
    scale8: bool = False         # kivi: 8-bit scale codes and int8 zeros instead of fp16 (s8)
    prerope: bool = False        # kivi: keys cached before RoPE, rotated on read (KVQuant)
    kmix: bool = False           # kivi: bits = average key bits, spread per channel by calibration
    cl: bool = False             # xquant: cross-layer deltas of the residual stream
    start: int | None = None     # minicache: first merged layer (None: the middle)
    t: float = 0.6               # minicache: SLERP factor
    gamma: float = 0.05          # minicache: retention threshold (angular distance / pi)
    inner: "KVSpec | None" = None  # minicache: how the merged directions are stored
    window: int = 0              # stream: tokens before a query's block it still sees (0: no eviction)
    stream_sink: int | None = None  # stream: first tokens always seen (None: one block)

    @classmethod
    def parse(cls, text: str) -> "KVSpec":
        if not isinstance(text, str):
            raise ValueError(f"kv spec must be a string, got {text!r}; allowed: {ALLOWED}")
        head, plus, rest = text.strip().lower().partition("+")
        try:
            if head.split(":")[0] == "stream":
                spec = cls._stream(head.split(":")[1:], cls.parse(rest or "bf16") if plus else cls("plain", dtype="bf16"))
            elif head.split(":")[0] == "minicache":
                spec = cls._minicache(head.split(":")[1:], cls.parse(rest or "bf16") if plus else cls("plain", dtype="bf16"))
            else:
                spec = cls._parse(text.strip().lower().split(":"))
        except ValueError as e:
            raise ValueError(f"kv spec {text!r} is not valid: {e}; allowed: {ALLOWED}") from None
        if spec is None:
            raise ValueError(f"kv spec {text!r} is not understood; allowed: {ALLOWED}")
        return spec

    @classmethod
    def _stream(cls, opts: list[str], inner: "KVSpec") -> "KVSpec":
        if inner.window:
            raise ValueError(f"stream appears twice ({inner})")
        if not opts or not re.fullmatch(r"\d+", opts[0]) or int(opts[0]) < 1:
            raise ValueError(f"stream needs WINDOW, a number of tokens >= 1 (got {':'.join(opts) or 'nothing'})")
        if len(opts) > 2 or len(opts) == 2 and not re.fullmatch(r"sink\d+", opts[1]):
            raise ValueError(f"stream options {opts[1:]}: expected only sinkS (S tokens always seen)")
        return replace(inner, window=int(opts[0]), stream_sink=int(opts[1][4:]) if len(opts) == 2 else None)

    @classmethod
    def _minicache(cls, opts: list[str], inner: "KVSpec") -> "KVSpec":
        if inner.window:
            raise ValueError(f"stream evicts blocks of the whole cache: write it first (stream:W+minicache+...), not inside ({inner})")
        if inner.kind in ("minicache", "xquant"):
            raise ValueError(f"minicache stores its directions with a per-layer codec, not {inner}")
        if inner.prerope:
            raise ValueError(f"minicache merges keys after RoPE; its inner codec cannot cache them before ({inner})")
        start = None
        if opts and re.fullmatch(r"\d+", opts[0]):
            start, opts = int(opts[0]), opts[1:]
        values = []
        for o in opts:
            try:
                values.append(float(o))
            except ValueError:
                raise ValueError(f"minicache option {o!r}: expected START (an integer), then T and GAMMA "
                                 "(numbers in [0, 1])") from None
        if len(values) > 2 or not all(0 <= x <= 1 for x in values):
            raise ValueError(f"minicache T and GAMMA {opts} must be at most two numbers in [0, 1]")
        t, gamma = (values + [0.6, 0.05][len(values):])[:2]
        return cls("minicache", start=start, t=t, gamma=gamma, inner=inner, group=inner.group,
                   reorder=inner.reorder)

    @classmethod
    def _parse(cls, parts: list[str]) -> "KVSpec | None":
        head, opts = parts[0], parts[1:]
        if head in PLAIN and not opts:
            return cls("plain", dtype=head)
        if head == "fp8" and len(opts) == 1 and opts[0] in FP8:
            return cls("fp8", dtype=opts[0])
        if head == "kivi" and opts:
            kmix = "kmix" in opts[1:]
            bits = _mixed_bits(opts[0]) if kmix else _bits(opts[0], "kivi")
            sinks = [x for x in opts[1:] if x.startswith("sink")]
            if len(sinks) > 1 or sinks and not re.fullmatch(r"sink\d+", sinks[0]):
                raise ValueError(f"kivi option {sinks[-1]!r}: expected sinkS once (S tokens, a multiple "
                                 "of the group G, kept in full precision at the start of each sequence)")
            sink = int(sinks[0][4:]) if sinks else 0
            o = _options([x for x in opts[1:] if not x.startswith("sink") and x != "kmix"],
                         {"g": "group", "r": "residual", "v": "value bits", "c": "value group",
                          "s": "scale bits"},
                         ("rotate", "ktok", "knorm", "prerope"))
            group, residual, vbits = o.get("g"), o.get("r"), o.get("v", 0)
            if o.get("s", 16) not in (8, 16):
                raise ValueError(f"kivi scale bits s{o['s']} must be s8 (8-bit scale and zero) or s16 (fp16, the default)")
            if "prerope" in o and ("ktok" in o or "knorm" in o):
                raise ValueError("kivi prerope keeps keys per channel with no norms: it excludes ktok and knorm")
            if kmix and not ("prerope" in o and vbits):
                raise ValueError("kivi kmix needs prerope and the value bits vVBITS (BITS is then the "
                                 "average key bits, e.g. kivi:3.5:g128:v4:c64:s8:prerope:kmix)")
            if vbits and vbits not in KIVI_BITS:
                raise ValueError(f"kivi value bits v{vbits} must be v8, v4, v3 or v2")
            if residual is not None and group and residual < group:
                raise ValueError(f"kivi r{residual} must be >= the group g{group} (the block being "
                                 "filled is always in full precision)")
            for name, n in (("r", residual), ("sink", sink)):
                if n and group and n % group:
                    raise ValueError(f"kivi {name}{n} must be a multiple of the group g{group} "
                                     f"(full blocks are kept in full precision)")
            if group is None and residual is not None:  # kivi:4:r32 alone: R = G = 32, as before
                group = residual
            return cls("kivi", bits=bits, group=group, vbits=0 if vbits == bits and not kmix else vbits,
                       vgroup=o.get("c", 0), rotate="rotate" in o, ktoken="ktok" in o,
                       knorm="knorm" in o, residual=0 if residual == group else (residual or 0),
                       sink=sink, scale8=o.get("s") == 8, prerope="prerope" in o, kmix=kmix)
        if head == "xquant" and opts:
            o = _options(opts[1:], {"g": "group"}, ("cl",))
            return cls("xquant", bits=_bits(opts[0], "xquant"), block=o.get("g", XQUANT_DEFAULT_GROUP), cl="cl" in o)
        if head == "bfp" and opts:
            if not re.fullmatch(r"\d+", opts[0]) or not 2 <= int(opts[0]) <= 16:
                raise ValueError(f"bfp mantissa {opts[0]!r} must be 2..16 bits")
            o = _options(opts[1:], {"b": "block"}, ("reorder",))
            return cls("bfp", bits=int(opts[0]), block=o.get("b", BFP_DEFAULT_BLOCK), reorder="reorder" in o)
        return None

    def __str__(self) -> str:
        if self.window:
            sink = f":sink{self.stream_sink}" if self.stream_sink is not None else ""
            return f"stream:{self.window}{sink}+{replace(self, window=0, stream_sink=None)}"
        if self.kind == "minicache":
            return ("minicache" + (f":{self.start}" if self.start is not None else "")
                    + f":{self.t:g}:{self.gamma:g}+{self.inner}")
        if self.kind == "plain":
            return self.dtype
        if self.kind == "fp8":
            return f"fp8:{self.dtype}"
        if self.kind == "kivi":
            return (f"kivi:{self.bits:g}" + (f":g{self.group}" if self.group else "")
                    + (f":r{self.residual}" if self.residual else "") + (f":sink{self.sink}" if self.sink else "")
                    + (f":v{self.vbits}" if self.vbits else "") + (f":c{self.vgroup}" if self.vgroup else "")
                    + (":s8" if self.scale8 else "") + (":prerope" if self.prerope else "")
                    + (":rotate" if self.rotate else "") + (":ktok" if self.ktoken else "")
                    + (":knorm" if self.knorm else "") + (":kmix" if self.kmix else ""))
        if self.kind == "xquant":
            return f"xquant:{self.bits}:g{self.block}" + (":cl" if self.cl else "")
        return f"bfp:{self.bits}:b{self.block}" + (":reorder" if self.reorder else "")


def _bits(text: str, codec: str) -> int:
    m = re.fullmatch(r"(?:int)?(\d+)", text)
    if m is None or int(m.group(1)) not in KIVI_BITS:
        raise ValueError(f"{codec} bits {text!r} must be 8, 4, 3 or 2")
    return int(m.group(1))


def _mixed_bits(text: str) -> float:
    """kmix's average key bits: a number in [2, 8] (whole bytes per head are checked at load)."""
    try:
        bits = float(text)
    except ValueError:
        raise ValueError(f"kivi kmix average key bits {text!r} must be a number in [2, 8]") from None
    if not 2 <= bits <= 8:
        raise ValueError(f"kivi kmix average key bits {text!r} must be in [2, 8]")
    return bits


def _options(opts: list[str], numeric: dict[str, str], flags: tuple[str, ...]) -> dict:
    """Options like g32 (letter + positive integer, named in `numeric`) and bare flags, each at
    most once -> {letter or flag: value}."""
    out: dict = {}
    for o in opts:
        key = o if o in flags else o[:1]
        if key in out or not (o in flags or (key in numeric and re.fullmatch(r"[a-z]\d+", o))):
            allowed = ", ".join([f"{k}N ({v})" for k, v in numeric.items()] + list(flags))
            raise ValueError(f"option {o!r}: expected {allowed}, each at most once")
        out[key] = True if o in flags else _positive(o[1:], numeric[key])
    return out


def _positive(digits: str, name: str) -> int:
    value = int(digits)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _rope_tables(spec: KVSpec, model, device):
    """(cos, sin_signed) [max_positions, D] of the model's RoPE for kivi:...:prerope, else None."""
    if not spec.prerope:
        return None
    if model is None:
        raise ValueError(f"kv spec {spec} needs the model (its RoPE tables) to rotate cached keys on read")
    return model.rope.cos.to(device), model.rope.sin_signed.to(device)


def build_codec(spec: "KVSpec | None", num_layers: int, num_blocks: int, block_size: int,
                num_kv_heads: int, head_dim: int, dtype, device, max_seqs: int, model=None, key_plan=None):
    """The codec `spec` names (None: plain storage in the compute dtype, spec 'plain'). `model`
    (its k/v projections, norms and RoPE tables) is required by xquant and kivi prerope; `key_plan`
    (kv.kmix.KeyBitPlan) by kivi kmix. bfp:...:reorder needs the
    model loaded with kv.bfp.fold_key_order applied (the engine does it)."""
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
        if spec.kmix and key_plan is None:
            raise ValueError(f"kv spec {spec} needs its calibrated key-bit plan (kv.kmix.calibrate; the engine runs it)")
        return KiviCodec(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device,
                         bits=MAX_KMIX_BITS if spec.kmix else spec.bits, max_partial=max_seqs,
                         key_plan=key_plan, vbits=spec.vbits or spec.bits,
                         vgroup=spec.vgroup or None, rotate=spec.rotate, ktoken=spec.ktoken,
                         knorm=spec.knorm, residual=spec.residual or None, sink=spec.sink,
                         scale_bits=8 if spec.scale8 else 16,
                         rope=_rope_tables(spec, model, device))
    if spec.kind == "bfp":
        from leanlm.kv.bfp import BfpCodec

        return BfpCodec(*shape, mantissa_bits=spec.bits, block=spec.block,
                        reorder=spec.reorder)
    if spec.kind == "minicache":
        from leanlm.kv.minicache import MiniCacheCodec

        def inner(layers: int):
            return build_codec(spec.inner, layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                               device, max_seqs)

        start = num_layers // 2 if spec.start is None else spec.start
        return MiniCacheCodec(inner, num_layers, slots, block_size, num_kv_heads, head_dim, dtype, device,
                              start=start, t=spec.t, gamma=spec.gamma)
    if spec.kind == "xquant":
        from leanlm.kv.xquant import XQuantCodec

        if model is None:
            raise ValueError(f"kv spec {spec} needs the model (its k/v projection weights)")
        return XQuantCodec(model, slots, block_size, dtype, device, bits=spec.bits, group=spec.block,
                           cross_layer=spec.cl)
    raise ValueError(f"kv spec {spec}: codec {spec.kind!r} is not available")
