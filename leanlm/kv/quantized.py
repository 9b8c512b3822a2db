"""Quantized KV codecs: FP8 with a power-of-two scale per token and head, and KIVI.

FP8 (`fp8:e4m3`, `fp8:e5m2`). The scale is 2^e per token and KV head, e chosen so the head's
largest |x| lands in (max/2, max] (e4m3fn max 448, e5m2 57344). Why this choice: a float format
has the same relative precision everywhere, so the scale only has to keep values out of
saturation and out of the subnormals; a power of two does that exactly (scaling is lossless),
costs one int8 per token and head, needs no calibration, and - unlike a scale per block of
tokens - no full-precision residual, since each token is encoded alone when it is written.

KIVI (`kivi:BITS[:gG][:rR][:sinkS][:vVBITS][:cC][:s8][:rotate][:ktok|:knorm]`, Liu et al. 2024). Keys are quantized per channel over
groups of G tokens, values (with VBITS bits) per token over groups of C channels (default V_GROUP),
asymmetrically (min-max, fp16 scale and zero). Scales cost 32 bits per group: 32/G bits per key
element and 32/C per value element, which is why kivi:4 at G=16, C=32 is only 2.9x a bf16 cache
and a >= 4x codec needs 3-bit codes and larger groups (e.g. kivi:4:g64:v3:c64).
`rotate` multiplies q, k and v of every head by the orthonormal, symmetric Walsh-Hadamard matrix
H before the cache (QuaRot's online rotation): (qH)(kH)^T = qk^T, and attention over vH gives
out H, undone by one more H on the output; it spreads outlier channels over the head, so a
per-token value group (and a key group) sees a flatter range. `ktok` quantizes keys per token over
C channels too (QuaRot's layout; worse than per-channel on SmolLM2). `knorm` stores each token's key
norm per head (fp16, 2 bytes) and quantizes the unit key directions per channel over the block: the
attention sink's huge key no longer sets the range of its block's channels (MiniCache's
direction/magnitude split gave the idea). Two [T, H, D] x [D, D] matmuls per
layer on the step's new tokens, none over the cached context.
G is the cache block size: the block a sequence is still filling is KIVI's full-precision
residual (kept in a pool of `max_partial` rows, one per running sequence) and the block is
quantized when its last token is written, so full - and hence prefix-cached - blocks are always
quantized. Values are quantized as they arrive; the residual overlay hides them until their block
is full. INT4 codes are packed two per byte, INT2 four per byte.

8-bit value scales (`s8`). Each value group's scale is a uint8 code c of S8_TABLE[c] =
2^((c - 168) / 12) (a log grid, 2^-14 .. ~152, steps of 5.9%: no per-token base to store, the
same relative precision at every magnitude) and its zero an int8 count of quarter steps (whole
steps at 8 bits): 16 bits per group instead of 32, so 0.25 bit per value at C = 64 instead of
0.5. The bound stays |x - x_hat| <= s / 2 (asym_quantize8). Keys keep fp16 scale and zero:
8-bit key scales cost far more than the bits they save on SmolLM2 (1024 WikiText tokens,
kivi:4:g64:v3:c64:rotate +3.7% over bf16; with 8-bit scale and int8 zero on keys too +7.4%,
with 8-bit key scales and fp16 zeros +5.2%; 8-bit value scales alone +3.4%): a key channel far
from 0 with a narrow range needs a zero finer than int8 steps can place, and the keys' error
goes straight into every score of the block. Over the first 4 WikiText windows the value-only
s8 codec measured +5.3% (fp16 scales: +4.0% in an earlier session; docs/BENCHMARKS.md). The fused kernel reads the codes and the
S8_TABLE floats the torch path uses.

Pre-RoPE keys (`prerope`, KVQuant, Hooper et al. 2024). The model hands the cache its keys before
RoPE and every read rotates them to their positions (0.. from the sequence's first block; the
native kernel rotates each dequantized key before its dot products). Why: a key channel before
RoPE keeps one sign and range over the tokens of a block, so a per-channel scale fits it; after
RoPE each channel pair turns with the position, fastest in the high-frequency pairs, and its
range over 64 tokens becomes the pair's whole magnitude circle. On SmolLM2 4-bit keys over 64-token
groups cost +0.6% perplexity instead of +1.9% (4 WikiText windows, values exact, a simulation of
this codec); see docs/BENCHMARKS.md. With `rotate` the Hadamard rotation then applies to values only (it does not
commute with RoPE; q is left as it is).

Window and sinks (`rR` with R > G, `sinkS`; R, S multiples of G). Full blocks are still quantized
when they fill, but a block stays in full precision too while fewer than R tokens of its sequence
start at or after it (the partial block and the last R/G - 1 full blocks), and the first S/G
blocks of every sequence (the attention sink) stay so for good: `full_precision_blocks`. Always,
block b is read from rk/rv[layer][res_row[b]] iff res_row[b] >= 0, else from its codes. Which
blocks are one sequence's is not in the slot mapping, so the cache must call
`plan_step(seqs, slot_mapping)` every step (the slots-only plan raises for these specs). Rows:
max_num_seqs * (R + S) / G, fixed bytes. Prefix caching: a block's full-precision copy is per
block, so all readers of a shared block see one state; a window's state depends on each
reader's length and a sink's copy would have to outlive its writer for cached blocks, so a
sequence whose first step reuses cached blocks it should read in full precision is refused
(RuntimeError): these specs need enable_prefix_caching=False.
"""
from __future__ import annotations

import torch

from leanlm.kv import kmix
from leanlm.kv.cache import decode_attention as cache_decode_attention
from leanlm.kv.codecs import KVCodec
from leanlm.models.layers import RotaryEmbedding

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
V_GROUP = 32  # channels per value group (KIVI's group size), or the whole head if it does not divide


def pow2_exponent(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """Smallest integer e with amax * 2^-e <= fmax, as int8 (clamped to [-127, 127])."""
    fm, fe = torch.frexp(torch.tensor(fmax))          # fmax = fm * 2^fe, fm in [0.5, 1)
    m, e = torch.frexp(amax.float())                  # amax = m * 2^e (exact)
    e = e - int(fe) + (m > float(fm)).to(e.dtype)
    return e.clamp(-127, 127).to(torch.int8)


class TokenwiseCodec(KVCodec):
    """A codec that encodes each token alone (no residual): `codes` [num_slots, 2 (K, V), Hkv, ...]
    and `exps` [num_slots, 2, Hkv, ...] per layer; subclasses give encode / decode."""

    codes: list[torch.Tensor]
    exps: list[torch.Tensor]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self):
        return self.codes + self.exps

    def write(self, layer, slots, k, v) -> None:
        codes, e = self.encode(torch.stack((k, v), dim=1))
        self.codes[layer].index_copy_(0, slots, codes)
        self.exps[layer].index_copy_(0, slots, e)

    def read_blocks(self, layer, block_tables):
        B, nblk = block_tables.shape
        bs = self.block_size
        rows = block_tables.reshape(-1)
        codes = self.codes[layer].view(-1, bs, *self.codes[layer].shape[1:]).index_select(0, rows)
        e = self.exps[layer].view(-1, bs, *self.exps[layer].shape[1:]).index_select(0, rows)
        kv = self.decode(codes, e).view(B, nblk * bs, 2, self.num_kv_heads, self.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

    def read_slots(self, layer, first_slot, length):
        sl = slice(first_slot, first_slot + length)
        kv = self.decode(self.codes[layer][sl], self.exps[layer][sl])
        return kv[:, 0], kv[:, 1]


class Fp8Codec(TokenwiseCodec):
    def __init__(self, num_layers: int, num_slots: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, fmt: str):
        self.spec, self.fp8 = f"fp8:{fmt}", FP8[fmt]
        self.fmax = float(torch.finfo(self.fp8).max)
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype, self.num_layers = dtype, num_layers
        # codes as uint8 (index_copy_ has no float8 kernel on CPU), viewed as float8 to decode
        self.codes = [torch.zeros(num_slots, 2, num_kv_heads, head_dim, dtype=torch.uint8, device=device)
                      for _ in range(num_layers)]
        self.exps = [torch.zeros(num_slots, 2, num_kv_heads, dtype=torch.int8, device=device)
                     for _ in range(num_layers)]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (uint8 codes [..., D], int8 exponents [...])."""
        x = x.float()
        e = pow2_exponent(x.abs().amax(-1), self.fmax)
        codes = torch.ldexp(x, -e.unsqueeze(-1).float()).to(self.fp8)  # exact scaling, RNE rounding
        return codes.view(torch.uint8), e

    def decode(self, codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return torch.ldexp(codes.view(self.fp8).float(), e.unsqueeze(-1).float()).to(self.dtype)

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + 1)


# -- KIVI -------------------------------------------------------------------------------------------

_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _constant(name: str, device: torch.device, make) -> torch.Tensor:
    """A constant tensor on `device`, made once. Made per call, each is an extra op, and on CUDA a
    table like S8_TABLE would be a blocking host-to-device copy, several per layer and step."""
    t = _CONSTANTS.get((name, device))
    if t is None:
        t = _CONSTANTS[(name, device)] = make().to(device)
    return t


def _s8(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """S8_TABLE on `device` (float64 for the scale search's comparisons)."""
    return _constant(f"s8 {dtype}", device, lambda: S8_TABLE.to(dtype))


def _shifts3(device: torch.device) -> torch.Tensor:
    """The bit offsets of eight 3-bit codes in a 24-bit word."""
    return _constant("shifts3", device, lambda: torch.arange(0, 24, 3, dtype=torch.int32))


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] in [0, 2^bits) -> [..., D * bits / 8], code i of a byte at bit bits*i.
    3-bit codes go eight to three bytes (a 24-bit word, little-endian)."""
    if bits == 8:
        return q
    if bits == 3:
        q = q.view(*q.shape[:-1], -1, 8).to(torch.int32)
        word = (q << _shifts3(q.device)).sum(-1, keepdim=True)
        bytes3 = _constant("bytes3", q.device, lambda: torch.tensor([0, 8, 16], dtype=torch.int32))
        return (word >> bytes3 & 255).to(torch.uint8).flatten(-2)
    per = 8 // bits
    q = q.view(*q.shape[:-1], -1, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def unpack_codes(p: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return p
    if bits == 3:
        b = p.view(*p.shape[:-1], -1, 3).to(torch.int32)
        word = b[..., 0:1] | b[..., 1:2] << 8 | b[..., 2:3] << 16
        return (word >> _shifts3(p.device) & 7).to(torch.uint8).flatten(-2)
    shifts = _constant(f"shifts{bits}", p.device, lambda: torch.arange(0, 8, bits, dtype=torch.uint8))
    return ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _f16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x (float32/64) rounded to float16 toward +inf (direction=inf) or -inf, returned as float32."""
    r = x.to(torch.float16)
    off = r.double() < x.double() if direction > 0 else r.double() > x.double()
    return torch.where(off, torch.nextafter(r, torch.full_like(r, direction)), r).float()


def asym_quantize(x: torch.Tensor, dim: int, bits: "int | torch.Tensor"):
    """Min-max asymmetric quantization of float32 x over `dim`: codes (uint8, shaped like x), and
    float16 scale s and zero z (dim kept, size 1) with x ~ z + code * s. `bits` may be a tensor
    broadcasting against the kept shape (a bit width per channel: kivi kmix).

    z is the min rounded down and s rounded up to float16, so [z, z + qmax * s] still covers the
    max: every |x - x_hat| <= s / 2 (plus float32 rounding); s >= the smallest float16 so a
    constant group does not divide by zero. Values beyond float16's +-65504 are not supported."""
    qmax = (1 << bits) - 1 if isinstance(bits, int) else (2.0 ** bits.to(x.device) - 1)
    z = _f16_toward(x.amin(dim, keepdim=True), float("-inf"))
    hi = x.amax(dim, keepdim=True)
    s = _f16_toward(((hi.double() - z.double()) / qmax).clamp(min=2.0**-24), float("inf"))
    q = torch.round((x - z) / s)
    q = (q.clamp_(0, qmax) if isinstance(qmax, int) else torch.minimum(q.clamp_(min=0), qmax)).to(torch.uint8)
    return q, s.half(), z.half()


# 8-bit scales (`s8`): a scale is the code c in 0..255 of S8_TABLE[c] = 2^((c - 168) / 12), a
# logarithmic grid from 2^-14 to 2^7.25 (about 152) with steps of 2^(1/12) (5.9%): no base to
# store, the same relative precision at every magnitude. The zero is an int8 z in units u of the
# scale (u = s8_zero_unit(bits)), x ~ code * s + z * u * s: z = round(min / (u s)) moves the grid's
# start off the min by at most u s / 2 <= s / 2, which keeps the min-max bound |x - x_hat| <= s / 2
# for s >= (max - min) / qmax (the grid's qmax + 1 points then reach half a step past both ends).
# On SmolLM2's K/V (1024 WikiText tokens, per-channel keys over 64 tokens, values per token over
# 64 channels, with or without rotate) the squared error is 6-8% above fp16 scale and zero at
# 2, 3 and 4 bits, nearly all of it the scale's rounding up to the 2^(1/12) grid.
S8_OFFSET, S8_STEPS = 168, 12
S8_TABLE = torch.exp2((torch.arange(256, dtype=torch.float64) - S8_OFFSET) / S8_STEPS).float()
S8_MIN, S8_MAX = float(S8_TABLE[0]), float(S8_TABLE[-1])


def s8_zero_unit(bits: int) -> float:
    """The zero's unit as a fraction of the scale: a quarter step for 2-4-bit codes (int8 then
    reaches 32 steps, about 2 ranges at 4 bits, from 0), a whole step for 8-bit codes (half a
    range; the unit must stay <= 1 step for the s / 2 bound)."""
    return 0.25 if bits <= 4 else 1.0


def asym_quantize8(x: torch.Tensor, dim: int, bits: int):
    """Min-max asymmetric quantization of float32 x over `dim` with 8-bit scale and zero: codes
    (uint8, shaped like x), scale codes (uint8) and zeros (int8) (dim kept, size 1) with
    x ~ (code + z * u) * S8_TABLE[scale code], u = s8_zero_unit(bits).

    The stored scale is the smallest table entry >= max((max - min) / qmax, -min / (128 u),
    min / (127 u), 2^-14): the range as in asym_quantize (rounded up by < 2^(1/12) instead of to
    fp16), or larger where the zero would leave int8 (a 4-bit group more than ~2 ranges from 0). Error: |x - x_hat| <= s / 2 plus float32 rounding, for scales up to
    S8_MAX; a group needing more saturates (its codes clip)."""
    qmax, zunit = (1 << bits) - 1, s8_zero_unit(bits)
    lo, hi = x.amin(dim, keepdim=True).double(), x.amax(dim, keepdim=True).double()
    need = torch.maximum(torch.maximum((hi - lo) / qmax, -lo / (128 * zunit)),
                         torch.maximum(lo / (127 * zunit), torch.full_like(lo, S8_MIN)))
    table = _s8(x.device)
    sc = torch.searchsorted(_s8(x.device, torch.float64), need).clamp_(max=255)
    s = table[sc]
    z = torch.round(lo / (s.double() * zunit)).clamp_(-128, 127)
    q = torch.round((x - z.float() * (s * zunit)) / s).clamp_(0, qmax).to(torch.uint8)
    return q, sc.to(torch.uint8), z.to(torch.int8)


def dequant_scale_zero(s: torch.Tensor, z: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (scale, zero) -> float32 (s, z) with x_hat = code * s + z: fp16 pairs as they are,
    8-bit ones (uint8 scale code, int8 zero in units of s8_zero_unit(bits) scales) through S8_TABLE."""
    if s.dtype == torch.uint8:
        sf = _s8(s.device)[s.long()]
        return sf, z.float() * (sf * s8_zero_unit(bits))
    return s.float(), z.float()


def full_precision_blocks(length: int, block_size: int, residual: int, sink: int) -> list[int]:
    """Indices (in the sequence) of the blocks a sequence of `length` tokens reads in full
    precision: the first sink / G blocks, and every block fewer than `residual` tokens of the
    sequence start at or after (its window: the partial block plus the last R/G - 1 full blocks
    when the length is not a multiple of G, the last R/G - 1 full blocks when it is). R = G: only
    the partial block, as without a window."""
    nblk = -(-length // block_size)
    first_recent = max(0, (length - residual) // block_size + 1)
    return sorted(set(range(min(sink // block_size, nblk))) | set(range(first_recent, nblk)))


class _WritePlan:
    """Where one step's new tokens go, worked out once per step (every layer writes the same
    slots): tokens of blocks left partial go to residual rows; blocks that become full are
    quantized from their earlier tokens (in a residual row) and the new ones."""

    def __init__(self, slots: torch.Tensor, device):
        self.slots = slots
        self.res_dst: list[int] = []      # flat residual index (row * bs + offset) per token kept
        self.res_src: list[int] = []      # its index in the batch
        self.full_blocks: list[int] = []  # blocks that become full this step
        self.old_idx: list[int] = []      # their earlier tokens: flat residual indices
        self.new_idx: list[int] = []      # their new tokens: batch indices
        self.order: list[int] = []        # token order of the full blocks in cat(old, new)

    def finish(self, device) -> "_WritePlan":
        n_old = len(self.old_idx)
        self.order = [i if kind == 0 else n_old + i for kind, i in self.order]
        for name in ("res_dst", "res_src", "full_blocks", "old_idx", "new_idx", "order"):
            setattr(self, name, torch.tensor(getattr(self, name), dtype=torch.long, device=device))
        return self


def fill_random(codec: "KiviCodec", g: torch.Generator) -> None:
    """Random contents for every tensor of a KIVI cache (kernel tests and benchmarks): uint8 codes
    and 8-bit scale codes over their whole range, int8 zeros in [-8, 8), float scales positive,
    zeros and residual rows ~ N(0, 1/4)."""
    positive = {id(t) for t in codec.ks + codec.vs}
    for t in codec.tensors():
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=g))
        elif t.dtype == torch.int8:
            t.copy_(torch.randint(-8, 8, t.shape, generator=g))
        else:
            r = torch.randn(t.shape, generator=g) * 0.5
            t.copy_(r.abs() if id(t) in positive else r)


class KiviCodec(KVCodec):
    blockwise = True  # quantizes whole blocks as they fill
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, bits: int, max_partial: int,
                 vbits: int | None = None, vgroup: int | None = None, rotate: bool = False,
                 ktoken: bool = False, knorm: bool = False, residual: int | None = None,
                 sink: int = 0, scale_bits: int = 16,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None, key_plan=None):
        if key_plan is not None and (rope is None or not vbits):
            raise ValueError("kivi kmix (mixed key bits) needs prerope and explicit value bits (vVBITS)")
        vbits = vbits or bits
        if rope is not None and (ktoken or knorm):
            raise ValueError("kivi prerope keeps keys per channel with no norms: it excludes ktok and knorm")
        if scale_bits not in (8, 16):
            raise ValueError(f"kivi scale bits s{scale_bits} must be s8 or s16")
        residual = residual or block_size
        if residual < block_size or residual % block_size:
            raise ValueError(f"kivi window r{residual} must be a multiple of the block size "
                             f"{block_size} (r{block_size}, r{2 * block_size}, ...)")
        if sink < 0 or sink % block_size:
            raise ValueError(f"kivi sink{sink} must be a multiple of the block size {block_size} "
                             f"(sink0, sink{block_size}, ...)")
        if knorm and ktoken:
            raise ValueError("kivi knorm (per-token key norms, per-channel directions) and ktok exclude each other")
        if head_dim % 8:
            raise ValueError(f"kivi needs head_dim divisible by 8 (packed codes), head_dim is {head_dim}")
        if vgroup is not None and head_dim % vgroup:
            raise ValueError(f"kivi value group c{vgroup} must divide head_dim {head_dim}")
        self.vgroup = vgroup or (V_GROUP if head_dim % V_GROUP == 0 else head_dim)
        self.spec = (f"kivi:{key_plan.avg_bits if key_plan else bits:g}:g{block_size}"
                     + (f":r{residual}" if residual != block_size else "")
                     + (f":sink{sink}" if sink else "") + (f":v{vbits}" if vbits != bits else "")
                     + (f":c{self.vgroup}" if vgroup else "") + (":s8" if scale_bits == 8 else "")
                     + (":prerope" if rope is not None else "") + (":rotate" if rotate else "")
                     + (":ktok" if ktoken else "") + (":knorm" if knorm else "") + (":kmix" if key_plan else ""))
        self.bits, self.vbits, self.ktoken, self.knorm = bits, vbits, ktoken, knorm
        self.scale_bits = scale_bits
        # s8: uint8 scale codes and int8 zeros (asym_quantize8) instead of fp16 scale and zero
        sdt, zdt = (torch.uint8, torch.int8) if scale_bits == 8 else (torch.float16, torch.float16)
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype, self.num_layers, self.device = dtype, num_layers, torch.device(device)
        if rotate:
            from leanlm.quant.rotation import hadamard_matrix

            self.rotation = hadamard_matrix(head_dim, dtype=dtype, device=device)
        # prerope (KVQuant): keys arrive and are stored before RoPE, where each channel keeps one
        # scale across tokens (RoPE turns a steady channel pair into one oscillating with the
        # position); reads rotate them to their positions. The Hadamard rotation then applies to
        # values only: it does not commute with RoPE.
        self.rope_keys = rope is not None
        self.rotate_qk = not self.rope_keys
        self.rope_cos = self.rope_sin = None
        if rope is not None:  # float32, padded by a block: a read covers whole blocks past the last position
            pad = lambda t: torch.cat((t.float(), t.new_zeros(block_size, t.shape[1], dtype=torch.float32)))
            self.rope_cos, self.rope_sin = (pad(t).to(device).contiguous() for t in rope)
        bs, H, D, P, PV = block_size, num_kv_heads, head_dim, head_dim * bits // 8, head_dim * vbits // 8
        # kmix: each channel's bits from the calibrated plan (kv/kmix.py), packed by groups of 8
        self.key_plan = key_plan
        if key_plan is not None:
            if len(key_plan.perm) != num_layers or tuple(key_plan.perm[0].shape) != (num_kv_heads, head_dim):
                raise ValueError(f"kivi kmix plan for {len(key_plan.perm)} layers x {tuple(key_plan.perm[0].shape)} "
                                 f"does not fit {num_layers} layers x ({num_kv_heads}, {head_dim})")
            P = key_plan.bytes_per_head
            self.kbits_c = [key_plan.channel_bits(l).to(device).unsqueeze(0) for l in range(num_layers)]  # [1, H, D]
            # for the kernel: channel order and group bits, int32 / uint8, contiguous
            self.kperm = [t.to(device=device, dtype=torch.int32).contiguous() for t in key_plan.perm]
            self.kgbits = [t.to(device=device, dtype=torch.uint8).contiguous() for t in key_plan.bits]

        def zeros(*shape, dt):
            return [torch.zeros(*shape, dtype=dt, device=device) for _ in range(num_layers)]

        self.kc, self.vc = zeros(num_blocks, bs, H, P, dt=torch.uint8), zeros(num_blocks, bs, H, PV, dt=torch.uint8)
        ng = D // self.vgroup
        kshape = (num_blocks, bs, H, ng, 1) if ktoken else (num_blocks, 1, H, D)
        # s8: keys per channel keep fp16 scale and zero (see the module docstring); ktok keys are as values
        kdt = (sdt, zdt) if ktoken else (torch.float16, torch.float16)
        self.ks, self.kz = zeros(*kshape, dt=kdt[0]), zeros(*kshape, dt=kdt[1])
        # knorm: each token's key norm per head (fp16); the per-channel codes hold the unit direction
        self.kn = zeros(num_blocks, bs, H, 1, dt=torch.float16) if knorm else []
        self.vs, self.vz = zeros(num_blocks, bs, H, ng, 1, dt=sdt), zeros(num_blocks, bs, H, ng, 1, dt=zdt)
        # the residual: full-precision K/V of blocks still filling, one row per running sequence;
        # with a window (R > G) or sinks, also of each sequence's last R/G - 1 full blocks and
        # first S/G blocks: at most R/G + S/G rows per sequence (rows freed in a step are reused
        # in the same step: write() reads a filling block's old row before writing new tokens)
        self.residual, self.sink = residual, sink
        self.seq_aware = residual > block_size or sink > 0
        rows = max_partial * (residual + sink) // block_size
        # in bfloat16 under float32 compute: the bf16 cache's precision (KIVI keeps fp16) at half
        # the bytes of a fixed pool that otherwise takes a large share of a small budget
        self.res_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
        self.rk, self.rv = zeros(rows, bs, H, D, dt=self.res_dtype), zeros(rows, bs, H, D, dt=self.res_dtype)
        self.res_row = torch.full((num_blocks,), -1, dtype=torch.long, device=device)  # block -> row
        self._rows: dict[int, int] = {}
        self._free_rows = list(range(rows - 1, -1, -1))
        self._plan: _WritePlan | None = None
        self._held: dict[int, set[int]] = {}  # seq_aware: sequence (id of its block list) -> blocks with rows
        self._owner: dict[int, int] = {}      # block -> the sequence holding its row

    def tensors(self):
        # res_row (8 bytes per block) is bookkeeping, like the block tables, not K/V storage
        return self.kc + self.vc + self.ks + self.kz + self.kn + self.vs + self.vz + self.rk + self.rv

    def bytes_per_token(self) -> int | float:
        H, D, bs = self.num_kv_heads, self.head_dim, self.block_size
        codes = (self.key_plan.bytes_per_head if self.key_plan else D * self.bits // 8) + D * self.vbits // 8
        pair = 2 * self.scale_bits // 8                       # bytes of one (scale, zero)
        per_group = pair * D // self.vgroup                   # (scale, zero) per token and group
        scales = (per_group if self.ktoken else 2 * 2 * D / bs) + per_group  # K (fp16) per block, or as V; V
        scales += 2 if self.knorm else 0
        per_token = self.num_layers * H * (codes + scales)
        return int(per_token) if per_token == int(per_token) else per_token

    def fixed_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.rk + self.rv)

    # -- bookkeeping of partial blocks (once per step) ---------------------------------------------
    def release(self, blocks: list[int]) -> None:
        self._held.pop(id(blocks), None)  # a sequence's whole table: it is done (or preempted)
        for b in blocks:
            row = self._rows.pop(b, None)
            if row is not None:
                self._free_rows.append(row)
                self.res_row[b] = -1
            held = self._held.get(self._owner.pop(b, None))
            if held is not None:
                held.discard(b)

    def plan_step(self, seqs, slots: torch.Tensor) -> None:
        """The step's write plan from its sequences (each with .kv.blocks, .start, .n, tokens laid
        out in `seqs` order as in `slots`): a window or sinks need to know which blocks are one
        sequence's and where they sit in it, which the slots alone do not tell. The paged cache
        calls this in prepare(); without a window or sinks the slots suffice and it is a no-op."""
        if not self.seq_aware:
            return
        bs, rows = self.block_size, self._rows
        plan = _WritePlan(slots, self.device)
        t0 = 0
        for s in seqs:
            blocks, start, n = s.kv.blocks, s.start, s.n
            end, sid = start + n, id(blocks)
            held = self._held.get(sid)
            if held is None:
                held = self._held[sid] = set()
                borrowed = [j for j in full_precision_blocks(end, bs, self.residual, self.sink) if j < start // bs]
                if borrowed:  # its first tokens come from the prefix cache: see the module docstring
                    raise RuntimeError(
                        f"kivi {self.spec}: a sequence starting at token {start} reuses cached blocks "
                        f"{[blocks[j] for j in borrowed]} that it reads in full precision (sink or window), "
                        "but a block's full-precision copy lives only while the sequence that wrote it "
                        "holds it; use enable_prefix_caching=False with kivi sinkS / rR > G")
            want = {blocks[j] for j in full_precision_blocks(end, bs, self.residual, self.sink)}
            old_rows = {b: rows[b] for b in held}
            for b in held - want:  # out of the window: read from its codes from now on
                self._free_rows.append(rows.pop(b))
                self.res_row[b] = -1
                self._owner.pop(b, None)
            held &= want
            for j in range(start // bs, -(-end // bs)):
                b, lo, hi = blocks[j], max(start, j * bs), min(end, (j + 1) * bs)  # tokens lo..hi-1
                off, new = lo - j * bs, range(t0 + lo - start, t0 + hi - start)
                if hi == (j + 1) * bs:  # the block fills: quantize its keys (earlier tokens from its row)
                    if off:
                        row = old_rows.get(b)
                        if row is None:
                            raise RuntimeError(f"kivi: block {b} written from offset {off} but its first "
                                               "tokens are not in the residual (blocks must fill in order)")
                        plan.order += [(0, len(plan.old_idx) + t) for t in range(off)]
                        plan.old_idx += [row * bs + t for t in range(off)]
                    plan.order += [(1, len(plan.new_idx) + t) for t in range(len(new))]
                    plan.new_idx += new
                    plan.full_blocks.append(b)
                if b in want:
                    if b not in rows:
                        if not self._free_rows:
                            raise RuntimeError("kivi: no free residual row (more sequences than max_num_seqs)")
                        rows[b] = self._free_rows.pop()
                        self.res_row[b] = rows[b]
                        held.add(b)
                        self._owner[b] = sid
                    plan.res_dst += range(rows[b] * bs + off, rows[b] * bs + hi - j * bs)
                    plan.res_src += new
            t0 += n
        # blocks that filled and left the window in this step gave their rows back above, before
        # their old tokens are read: safe, since write() reads old rows before writing new tokens
        self._plan = plan.finish(self.device)

    def _plan_for(self, slots: torch.Tensor) -> _WritePlan:
        if self._plan is not None and self._plan.slots is slots:
            return self._plan
        if self.seq_aware:
            raise RuntimeError(f"kivi {self.spec}: a window (rR > G) or sinks need the cache to call "
                               "codec.plan_step(seqs, slot_mapping) in each step's prepare()")
        bs, s = self.block_size, slots.tolist()
        plan, freed, starts = _WritePlan(slots, self.device), [], []
        i = 0
        while i < len(s):
            b, off = divmod(s[i], bs)
            j = i  # the run of this sequence's tokens in block b
            while j + 1 < len(s) and s[j + 1] == s[j] + 1 and s[j + 1] % bs:
                j += 1
            last = off + j - i
            row = self._rows.get(b)
            if off > 0 and row is None:
                raise RuntimeError(f"kivi: block {b} written from offset {off} but its first tokens "
                                   "are not in the residual (blocks must fill in order)")
            if last == bs - 1:  # the block is full: quantize it, its residual row is free again
                if row is not None:
                    plan.order += [(0, len(plan.old_idx) + t) for t in range(off)]
                    plan.old_idx += [row * bs + t for t in range(off)]
                    freed.append(b)
                plan.order += [(1, len(plan.new_idx) + t) for t in range(j - i + 1)]
                plan.new_idx += range(i, j + 1)
                plan.full_blocks.append(b)
            elif row is not None:
                plan.res_dst += range(row * bs + off, row * bs + last + 1)
                plan.res_src += range(i, j + 1)
            else:
                starts.append((b, off, last, i, j))
            i = j + 1
        # rows of blocks that fill in this step are free for blocks that start in it (a prefill
        # chunk crossing a block boundary holds both for a moment): write() reads a filling
        # block's old row before it writes any new token into the rows
        self.release(freed)
        for b, off, last, i, j in starts:
            if not self._free_rows:
                raise RuntimeError("kivi: no free residual row (more sequences filling a block "
                                   "than max_num_seqs)")
            row = self._rows[b] = self._free_rows.pop()
            self.res_row[b] = row
            plan.res_dst += range(row * bs + off, row * bs + last + 1)
            plan.res_src += range(i, j + 1)
        self._plan = plan.finish(self.device)
        return self._plan

    # -- per layer ---------------------------------------------------------------------------------
    def write(self, layer, slots, k, v) -> None:
        plan = self._plan_for(slots)
        bs, H, D = self.block_size, self.num_kv_heads, self.head_dim
        T = k.shape[0]
        # values (and, with ktok, keys): per token over channel groups, quantized as they arrive;
        # float32 on the CPU through the C quantizer the native executor uses (the same codes as
        # _write_tokens, tested), so a token's codes do not depend on which path its step took
        from leanlm.kv import kivi_triton  # (both import this module)
        from leanlm.native import kivi as native_kivi

        vf = v.float()
        if native_kivi.native_f32(vf):
            native_kivi.quant_values(self, layer, vf, slots)
        elif not (kivi_triton.supports(self, v.device) and kivi_triton.quant_values(self, layer, vf, slots)):
            self._write_tokens(v, slots, self.vbits, self.vc[layer], self.vs[layer], self.vz[layer])
        if self.ktoken:
            self._write_tokens(k, slots, self.bits, self.kc[layer], self.ks[layer], self.kz[layer])
        rk, rv = self.rk[layer].view(-1, H, D), self.rv[layer].view(-1, H, D)
        if plan.full_blocks.numel() and not self.ktoken:  # keys of full blocks: per channel over the block's tokens
            keys = k.index_select(0, plan.new_idx)
            if plan.old_idx.numel():  # read the residual before this step's writes reuse its rows
                keys = torch.cat((rk.index_select(0, plan.old_idx).to(keys.dtype), keys)).index_select(0, plan.order)
            keys = keys.float().view(-1, bs, H, D)
            if self.knorm:  # a token with a huge key (the attention sink) no longer sets its channels' range
                norm = keys.norm(dim=-1, keepdim=True).clamp(min=2.0**-14).half()
                self.kn[layer].index_copy_(0, plan.full_blocks, norm)
                keys = keys / norm.float()
            if self.key_plan is not None:  # each channel at its own bits
                q, s, z = asym_quantize(keys, 1, self.kbits_c[layer])
                packed = kmix.pack(q, self.key_plan.perm[layer], self.key_plan.bits[layer])
            else:
                q, s, z = asym_quantize(keys, 1, self.bits)  # fp16 scale and zero, s8 or not
                packed = pack_codes(q, self.bits)
            self.kc[layer].index_copy_(0, plan.full_blocks, packed)
            self.ks[layer].index_copy_(0, plan.full_blocks, s)
            self.kz[layer].index_copy_(0, plan.full_blocks, z)
        if plan.res_dst.numel():
            rk.index_copy_(0, plan.res_dst, k.index_select(0, plan.res_src).to(self.res_dtype))
            rv.index_copy_(0, plan.res_dst, v.index_select(0, plan.res_src).to(self.res_dtype))

    def _write_tokens(self, x, slots, bits, codes, scales, zeros) -> None:
        T, H, D = x.shape
        q, s, z = self._quantize(x.float().view(T, H, D // self.vgroup, self.vgroup), -1, bits)
        codes.view(-1, H, D * bits // 8).index_copy_(0, slots, pack_codes(q.view(T, H, D), bits))
        scales.view(-1, H, D // self.vgroup, 1).index_copy_(0, slots, s)
        zeros.view(-1, H, D // self.vgroup, 1).index_copy_(0, slots, z)

    def _quantize(self, x, dim, bits):
        return (asym_quantize8 if self.scale_bits == 8 else asym_quantize)(x, dim, bits)

    def _read_tokens(self, rows, bits, codes, scales, zeros) -> torch.Tensor:
        bs, H, D = self.block_size, self.num_kv_heads, self.head_dim
        q = unpack_codes(codes.index_select(0, rows), bits).float().view(-1, bs, H, D // self.vgroup, self.vgroup)
        s, z = dequant_scale_zero(scales.index_select(0, rows), zeros.index_select(0, rows), bits)
        return (q * s + z).view(-1, bs, H, D)

    def read_blocks(self, layer, block_tables):
        B, nblk = block_tables.shape
        bs, H, D = self.block_size, self.num_kv_heads, self.head_dim
        rows = block_tables.reshape(-1)
        if self.ktoken:
            k = self._read_tokens(rows, self.bits, self.kc[layer], self.ks[layer], self.kz[layer])
        else:
            kq = self._key_codes(layer, self.kc[layer].index_select(0, rows)).float()
            s, z = dequant_scale_zero(self.ks[layer].index_select(0, rows), self.kz[layer].index_select(0, rows),
                                      self.bits)
            k = kq * s + z
            if self.knorm:
                k = k * self.kn[layer].index_select(0, rows).float()
        v = self._read_tokens(rows, self.vbits, self.vc[layer], self.vs[layer], self.vz[layer])
        k, v = k.to(self.dtype), v.to(self.dtype)
        res = self.res_row.index_select(0, rows)
        if rows.device.type == "cpu":  # only the blocks still filling: their full-precision residual
            partial = (res >= 0).nonzero().squeeze(1)
            if partial.numel():
                k[partial] = self.rk[layer].index_select(0, res[partial]).to(self.dtype)
                v[partial] = self.rv[layer].index_select(0, res[partial]).to(self.dtype)
        else:  # on a GPU nonzero() waits for the device (30 stalls a step): select instead
            filling = (res >= 0).view(-1, 1, 1, 1)
            row = res.clamp(min=0)
            k = torch.where(filling, self.rk[layer].index_select(0, row).to(self.dtype), k)
            v = torch.where(filling, self.rv[layer].index_select(0, row).to(self.dtype), v)
        k = k.view(B, nblk * bs, H, D)
        if self.rope_keys:  # every row starts at position 0 of its sequence
            k = self._rope(k)
        return k, v.view(B, nblk * bs, H, D)

    def _key_codes(self, layer: int, packed: torch.Tensor) -> torch.Tensor:
        if self.key_plan is not None:
            return kmix.unpack(packed, self.key_plan.perm[layer], self.key_plan.bits[layer])
        return unpack_codes(packed, self.bits)

    def _rope(self, k: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys [B, n, H, D] at positions 0..n-1 -> rotated (float32 tables, as the kernel)."""
        n = k.shape[1]
        return RotaryEmbedding.apply(k.float(), (self.rope_cos[:n, None], self.rope_sin[:n, None])).to(k.dtype)

    fused_decode = True

    def decode_attention(self, layer, q, block_tables, lens):
        """One query per sequence attending to its blocks straight from the codes: the native
        kernel (leanlm/native/kivi_attention.c) on a CPU, the Triton one (kv/kivi_triton.py) on a
        GPU, else all rows dequantized through read_blocks in one masked attention."""
        from leanlm.kv import kivi_triton
        from leanlm.native.kivi import decode_attention

        out = decode_attention(self, layer, q, block_tables, lens)
        if out is None and kivi_triton.supports(self, q.device):
            out = kivi_triton.decode_attention(self, layer, q, block_tables, lens)
        return out if out is not None else self._decode_attention_torch(layer, q, block_tables, lens)

    def _decode_attention_torch(self, layer, q, block_tables, lens):
        """decode_attention without the native kernel (a GPU, no compiler): every row dequantized
        through read_blocks and one masked attention over all rows. The paged cache would otherwise
        take one read and attention per distinct length; on a GPU, where each op is a launch, the
        op count of a step grew with the batch (4,868 aten ops at B = 4 against bf16's 1,278)."""
        kept = block_tables >= 0  # stream eviction marks dropped blocks -1 (read block 0, masked)
        keys, values = self.read_blocks(layer, block_tables.clamp(min=0))
        n = keys.shape[1]
        mask = ((torch.arange(n, device=q.device) < lens.to(q.device).unsqueeze(1))
                & kept.repeat_interleave(self.block_size, dim=1)).view(-1, 1, 1, n)
        return cache_decode_attention(q, keys.transpose(1, 2), values.transpose(1, 2), mask)

    def read_slots(self, layer, first_slot, length):
        bs = self.block_size  # adjacent blocks start at a block boundary
        first = first_slot // bs
        blocks = torch.arange(first, first + -(-length // bs), device=self.device).unsqueeze(0)
        k, v = self.read_blocks(layer, blocks)
        return k[0, :length], v[0, :length]
