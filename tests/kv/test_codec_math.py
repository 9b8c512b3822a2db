"""Each quantized codec's encode/decode error against a float64 reference, with the bound its
rule implies (derived below, not fitted), and memory accounting == bytes actually allocated."""
import pytest
import torch

from leanlm.kv.bfp import BfpCodec
from leanlm.kv.codecs import PlainCodec
from leanlm.kv.quantized import Fp8Codec, KiviCodec, pack_codes, unpack_codes
from leanlm.kv.spec import KVSpec, build_codec

L, H, D, BS, NB = 2, 2, 64, 16, 6
CPU = torch.device("cpu")


def sample(n, seed=0):
    """K/V-like data: a spread of magnitudes and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, D, generator=g, dtype=torch.float64) * torch.exp(torch.randn(1, H, D, generator=g))
    x[:, :, 3] *= 40
    return x.bfloat16().float()  # bf16-representable: kivi's residual (bf16 under float32) reads back exactly


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_pack_round_trip(bits):
    q = torch.randint(0, 1 << bits, (5, 3, D), dtype=torch.uint8)
    p = pack_codes(q, bits)
    assert p.shape == (5, 3, D * bits // 8)
    assert torch.equal(unpack_codes(p, bits), q)


@pytest.mark.parametrize("fmt, mbits, sub_half", [("e4m3", 3, 2.0**-10), ("e5m2", 2, 2.0**-17)])
def test_fp8_error_bound(fmt, mbits, sub_half):
    codec = Fp8Codec(L, NB * BS, BS, H, D, torch.float32, CPU, fmt)
    x = sample(40)
    x[0] = 0  # all-zero head vectors decode to zero
    codes, e = codec.encode(x)
    xh = codec.decode(codes, e).double()
    amax, p2 = x.double().abs().amax(-1), torch.exp2(e.double())
    # e is the smallest exponent that keeps amax / 2^e within the format's max
    assert (amax / p2 <= codec.fmax).all() and ((amax / p2 > codec.fmax / 2) | (amax == 0)).all()
    # round to nearest with `mbits` mantissa bits: half an ulp, relative 2^-(mbits+1) for normals,
    # half the subnormal spacing (scaled) below
    bound = torch.maximum(x.double().abs() * 2.0**-(mbits + 1), p2.unsqueeze(-1) * sub_half)
    assert ((xh - x.double()).abs() <= bound).all()
    assert torch.equal(xh[0], torch.zeros(H, D, dtype=torch.float64))


def write_blocks(codec, n_tokens, seed=0):
    k, v = sample(n_tokens, seed), sample(n_tokens, seed + 1)
    slots = torch.arange(n_tokens)
    for layer in range(L):
        codec.write(layer, slots, k, v)
    return k, v


def asym_bound(x, s, qmax):
    """|x - (z + q s)| <= s/2, plus float32 rounding: (x - z)/s off by 2u*qmax, z + q s by u|x|."""
    return s * (0.5 + 2.0**-23 * qmax) + 2.0**-23 * x.abs()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_kivi_error_bound_and_full_precision_residual(bits):
    qmax = (1 << bits) - 1
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, bits, max_partial=2)
    n = 3 * BS + 5  # three full blocks, five tokens of a fourth still filling
    k, v = write_blocks(codec, n)
    kh, vh = codec.read_blocks(1, torch.tensor([[0, 1, 2, 3]]))
    kh, vh = kh[0, :n].double(), vh[0, :n].double()
    full = 3 * BS
    # keys: per channel over each block's 16 tokens
    ks = codec.ks[1][:3].double().repeat_interleave(BS, 0).view(full, H, D)
    kb = k[:full].double().view(3, BS, H, D)
    span = (kb.amax(1) - kb.amin(1)).repeat_interleave(BS, 0).view(full, H, D)
    # the stored scale: range / qmax rounded up to float16 (zero rounded down: +1 ulp of the min)
    lo = kb.amin(1).abs().repeat_interleave(BS, 0).view(full, H, D)
    assert (ks <= (span + lo * 2.0**-10) / qmax * (1 + 2.0**-10) + 2.0**-24).all()
    assert ((kh[:full] - k[:full].double()).abs() <= asym_bound(k[:full].double(), ks, qmax)).all()
    # values: per token over groups of 32 channels
    vs = codec.vs[1].view(-1, H, D // 32, 1)[:full].double().expand(full, H, D // 32, 32).reshape(full, H, D)
    assert ((vh[:full] - v[:full].double()).abs() <= asym_bound(v[:full].double(), vs, qmax)).all()
    # the block still filling is KIVI's residual: exact
    assert torch.equal(kh[full:], k[full:].double()) and torch.equal(vh[full:], v[full:].double())
    # ... until its last token arrives: then it is quantized and its residual row is free again
    rest, slots = sample(BS - 5, seed=7), torch.arange(n, 4 * BS)
    for layer in range(L):  # one step: every layer writes the same slot mapping
        codec.write(layer, slots, rest, rest)
    k4, _ = codec.read_slots(1, 3 * BS, BS)
    whole = torch.cat((k[full:], rest)).double()
    s4 = codec.ks[1][3].double()
    assert not torch.equal(k4.double(), whole)
    assert ((k4.double() - whole).abs() <= asym_bound(whole, s4, qmax)).all()
    assert codec.res_row[3] == -1 and len(codec._free_rows) == 2


def test_kivi_release_frees_the_residual_row():
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, 4, max_partial=1)
    write_blocks(codec, 5)
    with pytest.raises(RuntimeError, match="no free residual row"):
        codec.write(0, torch.tensor([BS]), sample(1), sample(1))
    codec.release([0])
    codec.write(0, torch.tensor([BS]), sample(1), sample(1))


@pytest.mark.parametrize("m, block", [(16, 16), (8, 16), (4, 8), (3, 16), (2, 32)])
def test_bfp_error_bound(m, block):
    codec = BfpCodec(L, NB * BS, BS, H, D, torch.float32, CPU, m, block)
    x = sample(40)
    codes, e = codec.encode(x)
    xh = codec.decode(codes, e).double()
    step = torch.exp2(e.double() - (m - 2)).repeat_interleave(block, -1)
    qmax = (1 << (m - 1)) - 1
    err = (xh - x.double()).abs()
    inside = x.double().abs() <= (qmax + 0.5) * step   # round to nearest: half a step
    assert (err[inside] <= step[inside] / 2).all()
    assert (err[~inside] < step[~inside]).all()         # the few that saturate: under a step
    # e = floor(log2 of the block's absmax)
    amax = x.double().abs().unflatten(-1, (-1, block)).amax(-1)
    assert ((torch.exp2(e.double()) <= amax) & (amax < torch.exp2(e.double() + 1))).all()


@pytest.mark.parametrize("text, per_head_layer", [
    # per token, per layer and KV head (D = 64 channels, blocks of 16 tokens), K + V:
    ("fp32", 2 * 64 * 4), ("bf16", 2 * 64 * 2), ("fp16", 2 * 64 * 2),
    ("fp8:e4m3", 2 * (64 + 1)),                                  # codes + an int8 exponent
    ("kivi:8", 2 * 64 + 2 * 2 * 64 // 16 + 2 * 2 * 2),            # codes, K (s, z) per block, V per 32
    ("kivi:4", 2 * 32 + 16 + 8), ("kivi:2", 2 * 16 + 16 + 8),     # 2 and 4 codes per byte
    ("bfp:8", 2 * (64 + 4)), ("bfp:4:b8", 2 * (32 + 8)), ("bfp:16", 2 * (128 + 4)), ("bfp:3", 2 * (64 + 4)),
    ("kivi:3", 2 * 24 + 16 + 8),                                 # 8 codes per 3 bytes
    ("kivi:4:v3:c64:rotate", 32 + 24 + 16 + 4),                  # 4-bit K, 3-bit V, one V (s, z) per head
    ("kivi:4:c64:ktok", 2 * 32 + 4 + 4),                         # K (s, z) per token and head, as V
    ("kivi:4:knorm", 2 * 32 + 16 + 8 + 2),                       # + an fp16 key norm per token and head
])
def test_memory_accounting_equals_bytes_allocated(text, per_head_layer):
    codec = build_codec(KVSpec.parse(text), L, NB, BS, H, D, torch.bfloat16, CPU, max_seqs=3)
    assert codec.bytes_per_token() == L * H * per_head_layer
    tensors = codec.tensors()
    allocated = sum(t.numel() * t.element_size() for t in tensors)
    assert codec.allocated_bytes() == allocated == NB * BS * codec.bytes_per_token() + codec.fixed_bytes()
    residual = 2 * L * 3 * BS * H * D * 2 if text.startswith("kivi") else 0  # 3 rows of bf16 K and V
    assert codec.fixed_bytes() == residual


def test_plain_codec_in_another_dtype_reads_back_in_the_compute_dtype():
    codec = PlainCodec(L, NB * BS, BS, H, D, torch.float32, CPU, storage_dtype=torch.float16, spec="fp16")
    k, v = write_blocks(codec, 20)
    kh, vh = codec.read_slots(0, 0, 20)
    assert kh.dtype == torch.float32 and not codec.exact
    assert torch.equal(kh, k.half().float()) and torch.equal(vh, v.half().float())


def test_kivi_keys_per_token_error_bound():
    """ktok: keys quantized per token over groups of C channels as they arrive, like values."""
    qmax = 15
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, 4, max_partial=2, vgroup=16, ktoken=True)
    n = 2 * BS
    k, v = write_blocks(codec, n)
    kh, _ = codec.read_slots(0, 0, n)
    ks = codec.ks[0].view(-1, H, D // 16, 1)[:n].double().expand(n, H, D // 16, 16).reshape(n, H, D)
    assert ((kh.double() - k.double()).abs() <= asym_bound(k.double(), ks, qmax)).all()
    span = k.double().view(n, H, D // 16, 16)
    span = (span.amax(-1) - span.amin(-1)).repeat_interleave(16, -1)  # each group's own range
    assert (ks <= span / qmax * (1 + 2.0**-9) + 2.0**-24 + k.double().abs() * 2.0**-10).all()


def test_kivi_key_norms_scale_quantized_directions():
    """knorm: a full block's keys are stored as fp16 norms times per-channel quantized unit
    directions: |k - n d_hat| <= n |d - d_hat| + |k| 2^-11 (the norm's fp16 rounding)."""
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, 4, max_partial=2, knorm=True)
    k, _ = write_blocks(codec, BS)
    kh, _ = codec.read_slots(0, 0, BS)
    n = k.double().norm(dim=-1, keepdim=True)
    d = (k.double() / codec.kn[0][0].double()).view(1, BS, H, D)
    ks = codec.ks[0][:1].double()
    bound = n * (1 + 2.0**-10) * asym_bound(d, ks, 15)[0] + k.double().abs() * 2.0**-10
    assert ((kh.double() - k.double()).abs() <= bound).all()
    assert ((codec.kn[0][0].double() - n).abs() <= n * 2.0**-10).all()  # the norm, to fp16's precision
    with pytest.raises(ValueError, match="knorm .* and ktok exclude each other"):
        KiviCodec(L, NB, BS, H, D, torch.float32, CPU, 4, max_partial=2, knorm=True, ktoken=True)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_s8_value_scales_error_bound(bits):
    """s8: each value group's scale is a uint8 code into S8_TABLE (2^((c - 168) / 12)) and its zero
    an int8 count of s8_zero_unit(bits) scales. Against float64: |v - v_hat| <= s / 2 (plus float32
    rounding of x - z, the division and code * s + z); the scale is the smallest table entry >= the
    range / qmax (or >= |min| / (128 u) when the zero needs it); keys keep fp16 scale and zero
    (same bound and values as without s8); bytes: one (uint8, int8) per value group."""
    from leanlm.kv.quantized import S8_TABLE, s8_zero_unit

    qmax, C = (1 << bits) - 1, 16
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, bits, max_partial=2, vgroup=C, scale_bits=8)
    ref = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, bits, max_partial=2, vgroup=C)
    n = 3 * BS
    k, v = write_blocks(codec, n)
    v[7, 1, C:2 * C] += 200.0  # a group far from 0 (more than 32 quarter steps at 2-4 bits): the zero limits the scale
    for layer in range(L):
        codec.write(layer, torch.arange(n), k, v)
    write_blocks(ref, n)
    assert codec.vs[0].dtype == torch.uint8 and codec.vz[0].dtype == torch.int8
    kh, vh = codec.read_slots(1, 0, n)
    vh, v64 = vh.double(), v.double()
    u = s8_zero_unit(bits)
    s = S8_TABLE.double()[codec.vs[1].view(-1, H, D // C, 1)[:n].long()]          # [n, H, groups, 1]
    zq = codec.vz[1].view(-1, H, D // C, 1)[:n].double()
    groups = v64.view(n, H, D // C, C)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    need = torch.maximum(torch.maximum((hi - lo) / qmax, -lo / (128 * u)),
                         torch.maximum(lo / (127 * u), torch.full_like(lo, 2.0**-14)))
    assert (s >= need).all() and (s < need * 2 ** (1 / 12) * (1 + 2.0**-20)).all()  # one grid step at most
    assert ((zq * u * s - lo).abs() <= u * s / 2 * (1 + 2.0**-20)).all()           # the zero: min, to u s / 2
    assert need[7, 1, 1] > (hi - lo)[7, 1, 1] / qmax                             # the far group: the zero's bound
    err = (vh.view(n, H, D // C, C) - groups).abs()
    bound = s * (0.5 + 2.0**-22 * (qmax + 128 * u + 2)) + 2.0**-22 * groups.abs()
    assert (err <= bound).all()
    assert (err.amax(-1, keepdim=True) > s / 4).any()  # the bound is not vacuous
    # keys: unchanged by s8
    rk, _ = ref.read_slots(1, 0, n)
    assert torch.equal(kh, rk) and codec.ks[1].dtype == torch.float16
    per_head_layer = 2 * D * bits // 8 + 2 * 2 * D // BS + 2 * D // C
    assert codec.bytes_per_token() == L * H * per_head_layer
    allocated = sum(t.numel() * t.element_size() for t in codec.tensors())
    assert codec.allocated_bytes() == allocated == NB * BS * codec.bytes_per_token() + codec.fixed_bytes()


def test_s8_costs_little_over_fp16_scales():
    """On K/V-like data, 4-bit values with 8-bit scale and zero have an RMS error within 5% of
    fp16 scale and zero (the scale rounds up by < 2^(1/12), the zero moves by < 1/8 step)."""
    errs = {}
    for sb in (16, 8):
        codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, 4, max_partial=2, vgroup=64, scale_bits=sb)
        _, v = write_blocks(codec, 4 * BS, seed=3)
        _, vh = codec.read_slots(0, 0, 4 * BS)
        errs[sb] = (vh.double() - v.double()).pow(2).mean().sqrt().item()
    assert errs[16] < errs[8] < 1.05 * errs[16]


@pytest.mark.parametrize("text, spec", [
    ("kivi:4:g64:v3:c64:s8:rotate", "kivi:4:g64:v3:c64:s8:rotate"),
    ("kivi:4:s16", "kivi:4"), ("kivi:2:g16:r48:sink16:c16:s8", "kivi:2:g16:r48:sink16:c16:s8")])
def test_s8_spec(text, spec):
    assert str(KVSpec.parse(text)) == spec
    with pytest.raises(ValueError, match=r"s4 must be s8 .* or s16") as e:
        KVSpec.parse("kivi:4:s4")
    assert "[:s8]" in str(e.value)


def rope64(x, cos, sin):
    """Half-split RoPE in float64 at positions 0..n-1 of x [n, H, D]."""
    n, half = x.shape[0], x.shape[-1] // 2
    c, s = cos[:n, None].double(), sin[:n, None].double()
    return x * c + torch.cat((x[..., half:], x[..., :half]), -1) * s


@pytest.mark.parametrize("bits", [4, 3])
def test_kivi_prerope_keys_are_quantized_before_rope_and_rotated_on_read(bits):
    """prerope: the codes hold the pre-RoPE keys (per-channel bound against them), and a read
    returns RoPE(dequantized key) at the token's position; the residual block's keys are exact
    before RoPE. A codec that rotated before quantizing, or forgot to rotate, fails one of these."""
    from leanlm.models.layers import RotaryEmbedding

    qmax = (1 << bits) - 1
    rope = RotaryEmbedding(D, 256, 10000.0, None, torch.float32)
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, bits, max_partial=2, rope=(rope.cos, rope.sin_signed))
    assert codec.rope_keys and not codec.rotate_qk and codec.spec == f"kivi:{bits}:g{BS}:prerope"
    n = 2 * BS + 3
    k, v = write_blocks(codec, n)
    kh, _ = codec.read_blocks(1, torch.tensor([[0, 1, 2]]))
    kh = kh[0, :n].double()
    full = 2 * BS
    # dequantize the codes in float64: they must be the pre-RoPE keys within the per-channel bound
    kq = unpack_codes(codec.kc[1][:2], bits).double().view(full, H, D)
    s = codec.ks[1][:2].double().repeat_interleave(BS, 0).view(full, H, D)
    z = codec.kz[1][:2].double().repeat_interleave(BS, 0).view(full, H, D)
    pre = kq * s + z
    assert ((pre - k[:full].double()).abs() <= asym_bound(k[:full].double(), s, qmax)).all()
    expected = rope64(torch.cat((pre, k[full:].double())), rope.cos, rope.sin_signed)
    torch.testing.assert_close(kh, expected, rtol=0, atol=1e-4 * float(k.abs().max()))
    assert (kh - k.double()).abs().max() > 1.0  # the read is rotated: not the stored pre-RoPE keys


def test_kivi_prerope_needs_the_model_and_excludes_key_norms():
    with pytest.raises(ValueError, match="needs the model"):
        build_codec(KVSpec.parse("kivi:4:prerope"), L, NB, BS, H, D, torch.float32, CPU, 2)
    with pytest.raises(ValueError, match="excludes ktok and knorm"):
        KVSpec.parse("kivi:4:prerope:knorm")
    with pytest.raises(ValueError, match="before"):
        KVSpec.parse("minicache+kivi:4:prerope")
    assert str(KVSpec.parse("kivi:4:g64:v3:c32:s8:rotate:prerope")) == "kivi:4:g64:v3:c32:s8:prerope:rotate"


def test_kivi_residual_is_bf16_under_float32_compute():
    """The full-precision residual is stored in bfloat16 when the model computes in float32 (half
    the fixed pool): a block still filling reads back bf16-rounded, not as written."""
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, 4, max_partial=2)
    assert codec.rk[0].dtype == torch.bfloat16 and codec.fixed_bytes() == 2 * L * 2 * BS * H * D * 2
    g = torch.Generator().manual_seed(9)
    k, v = torch.randn(5, H, D, generator=g), torch.randn(5, H, D, generator=g)
    for layer in range(L):
        codec.write(layer, torch.arange(5), k, v)
    kh, vh = codec.read_blocks(0, torch.tensor([[0]]))
    assert kh.dtype == torch.float32
    assert torch.equal(kh[0, :5], k.bfloat16().float()) and torch.equal(vh[0, :5], v.bfloat16().float())
    assert not torch.equal(kh[0, :5], k)


def test_device_constants_are_made_once_and_equal_the_tables():
    """The torch path's constant tables (S8 scales, 3-bit shifts) are cached per device: a fresh
    tensor per call was an extra op, and on CUDA a blocking host-to-device copy per layer."""
    from leanlm.kv import quantized as qz

    cpu = torch.device("cpu")
    a = qz._constant("s8", cpu, lambda: qz.S8_TABLE)
    assert qz._constant("s8", cpu, lambda: qz.S8_TABLE * 2) is a  # made once: the second maker is not called
    assert torch.equal(a, qz.S8_TABLE)
    assert torch.equal(qz._shifts3(cpu), torch.arange(0, 24, 3, dtype=torch.int32))
    q = torch.randint(0, 8, (5, 16), dtype=torch.uint8)
    assert torch.equal(qz.unpack_codes(qz.pack_codes(q, 3), 3), q)
    q2 = torch.randint(0, 4, (5, 16), dtype=torch.uint8)
    assert torch.equal(qz.unpack_codes(qz.pack_codes(q2, 2), 2), q2)
