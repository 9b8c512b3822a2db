"""The Triton kernels of kv/kivi_triton.py (see there). A module of their own because triton.jit
decides at decoration whether a kernel is compiled for the GPU or run by the interpreter
(TRITON_INTERPRET=1): importing this module is that decision, made once per process."""
import triton
import triton.language as tl

# round half to even without libdevice (the interpreter has none): adding 1.5 * 2^mantissa
# pushes x to where the spacing of floats is 1, so the addition itself rounds (|x| < 2^22 / 2^51)
_RINT32 = tl.constexpr(12582912.0)
_RINT64 = tl.constexpr(6755399441055744.0)


@triton.jit
def unpack(ptr, base, chan, BITS: tl.constexpr, NBYTES: tl.constexpr):
    """Codes of channels `chan` of the packed rows at `base` (pack_codes' layout: code i at bit
    BITS * i of the row's little-endian bit string; a 3-bit code may straddle two bytes)."""
    bitpos = chan * BITS
    byte = bitpos // 8
    word = tl.load(ptr + base + byte).to(tl.int32)
    if BITS == 3:
        nxt = tl.load(ptr + base + byte + 1, mask=byte + 1 < NBYTES, other=0).to(tl.int32)
        word = word | (nxt << 8)
    return (word >> (bitpos % 8)) & ((1 << BITS) - 1)


@triton.jit
def keys(kc, ks, kz, b, t, h, chan, H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
         KBITS: tl.constexpr):
    """Dequantized keys [BS, len(chan)] of block b, head h: code * scale + zero per channel."""
    KP: tl.constexpr = D * KBITS // 8
    code = unpack(kc, ((b * BS + t[:, None]) * H + h) * KP, chan[None, :], KBITS, KP)
    s = tl.load(ks + (b * H + h) * D + chan).to(tl.float32)
    z = tl.load(kz + (b * H + h) * D + chan).to(tl.float32)
    return code.to(tl.float32) * s[None, :] + z[None, :]


@triton.jit
def values(vc, vs, vz, s8, vzunit, b, t, h, chan, H: tl.constexpr, D: tl.constexpr,
           BS: tl.constexpr, VBITS: tl.constexpr, VGROUP: tl.constexpr, S8: tl.constexpr):
    """Dequantized values [BS, D] of block b, head h: per token and channel group."""
    VP: tl.constexpr = D * VBITS // 8
    NG: tl.constexpr = D // VGROUP
    code = unpack(vc, ((b * BS + t[:, None]) * H + h) * VP, chan[None, :], VBITS, VP)
    at = ((b * BS + t[:, None]) * H + h) * NG + chan[None, :] // VGROUP
    if S8:
        sf = tl.load(s8 + tl.load(vs + at).to(tl.int32))
        zf = tl.load(vz + at).to(tl.float32) * (sf * vzunit)
    else:
        sf = tl.load(vs + at).to(tl.float32)
        zf = tl.load(vz + at).to(tl.float32)
    return code.to(tl.float32) * sf + zf


@triton.jit
def attention(q, tables, lens, out, kc, ks, kz, vc, vs, vz, s8, res_row, rk, rv, cos, sin,
              nblk, scale, vzunit,
              H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
              BS: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, VGROUP: tl.constexpr,
              S8: tl.constexpr, PREROPE: tl.constexpr):
    """One program per (row, KV head): its G query heads against the row's blocks."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    qrow = (row * H * G + h * G + g)[:, None] * D + d[None, :]
    qv = tl.load(q + qrow, mask=g[:, None] < G, other=0.0).to(tl.float32) * scale
    n = tl.load(lens + row)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    other = (d + D // 2) % D  # rotate_half's partner channel (the sin table carries the sign)
    for j in range(0, nblk):  # (the table's width; a row's own length ends it below)
        b = tl.load(tables + row * nblk + j)
        # stream eviction marks dropped blocks -1: skipped, as the C kernel does
        if (b >= 0) & (j * BS < n):
            r = tl.load(res_row + b)
            if r >= 0:  # still filling: the full-precision residual row
                at = ((r * BS + t[:, None]) * H + h) * D
                k = tl.load(rk + at + d[None, :]).to(tl.float32)
                k2 = tl.load(rk + at + other[None, :]).to(tl.float32)
                v = tl.load(rv + at + d[None, :]).to(tl.float32)
            else:
                k = keys(kc, ks, kz, b, t, h, d, H, D, BS, KBITS)
                k2 = keys(kc, ks, kz, b, t, h, other, H, D, BS, KBITS)
                v = values(vc, vs, vz, s8, vzunit, b, t, h, d, H, D, BS, VBITS, VGROUP, S8)
            pos = j * BS + t
            if PREROPE:
                c = tl.load(cos + pos[:, None] * D + d[None, :])
                s = tl.load(sin + pos[:, None] * D + d[None, :])
                k = k * c + k2 * s
            sc = tl.dot(qv, tl.trans(k), input_precision="ieee")
            sc = tl.where((pos < n)[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
    tl.store(out + qrow, acc / l_i[:, None], mask=g[:, None] < G)


@triton.jit
def quantize(x, slots, vc, vs, vz, s8, s8d, vzunit, S8MIN: tl.constexpr,
             H: tl.constexpr, D: tl.constexpr, VBITS: tl.constexpr, VGROUP: tl.constexpr,
             PER: tl.constexpr):
    """One program per (token, KV head): its D values as D / VGROUP groups, each min-max
    quantized with an s8 scale (asym_quantize8), packed PER codes to a word."""
    tok = tl.program_id(0)
    h = tl.program_id(1)
    NG: tl.constexpr = D // VGROUP
    NW: tl.constexpr = VGROUP // PER  # words per group
    grp = tl.arange(0, NG)[:, None, None]
    w = tl.arange(0, NW)[None, :, None]
    i = tl.arange(0, PER)[None, None, :]
    chan = grp * VGROUP + w * PER + i
    xv = tl.load(x + (tok * H + h) * D + chan).to(tl.float32)
    lo = tl.min(tl.min(xv, 2), 1).to(tl.float64)  # [NG]
    hi = tl.max(tl.max(xv, 2), 1).to(tl.float64)
    QMAX: tl.constexpr = (1 << VBITS) - 1
    need = tl.maximum(tl.maximum((hi - lo) / QMAX, -lo / (128 * vzunit)),
                      tl.maximum(lo / (127 * vzunit), tl.full([NG], S8MIN, tl.float64)))
    # searchsorted(S8_TABLE, need): the number of entries below need, by bisection
    code = tl.zeros([NG], tl.int32)
    for step in tl.static_range(8):
        below = tl.load(s8d + code + ((128 >> step) - 1)) < need
        code = tl.where(below, code + (128 >> step), code)
    code = tl.minimum(code, 255)
    s = tl.load(s8 + code)
    z = (lo / (s.to(tl.float64) * vzunit) + _RINT64) - _RINT64
    z = tl.minimum(tl.maximum(z, -128.0), 127.0).to(tl.float32)
    zs = (z * (s * vzunit))[:, None, None]
    qv = ((xv - zs) / s[:, None, None] + _RINT32) - _RINT32
    qv = tl.minimum(tl.maximum(qv, 0.0), QMAX).to(tl.int32)
    word = tl.sum(qv << (i * VBITS), 2)  # [NG, NW]
    slot = tl.load(slots + tok)
    VP: tl.constexpr = D * VBITS // 8
    wat = ((slot * H + h) * VP + (tl.arange(0, NG)[:, None] * NW + tl.arange(0, NW)[None, :])
           * (PER * VBITS // 8))
    if VBITS == 3:  # eight codes in a 24-bit word, three bytes little-endian
        tl.store(vc + wat, (word & 255).to(tl.uint8))
        tl.store(vc + wat + 1, ((word >> 8) & 255).to(tl.uint8))
        tl.store(vc + wat + 2, ((word >> 16) & 255).to(tl.uint8))
    else:
        tl.store(vc + wat, word.to(tl.uint8))
    at = (slot * H + h) * NG + tl.arange(0, NG)
    tl.store(vs + at, code.to(tl.uint8))
    tl.store(vz + at, z.to(tl.int8))
