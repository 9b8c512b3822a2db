/* Decode attention straight from KIVI's quantized cache (leanlm/kv/quantized.py), one query
token per sequence.

Why: the torch path dequantizes every cached token of every layer into a float tensor at every
step (unpack, scale, offset: several passes over L x H x D elements) before attention reads it
again, which made a 4x-smaller cache ~4x slower to decode than the bf16 one. Here scores and the
weighted value sum are computed from the codes in one pass, reading 4 bits per element instead
of 16:
  keys, per channel over a block (k = s_c * code + z_c):  q.k = sum_c (q_c s_c) code_c + q.z
    - q*s and q.z are computed once per block and shared by the block's tokens;
  values, per token over channel groups (v = s_g * code + z_g): accumulated as p_t * v.
With `s8` (8-bit scales) a scale is the uint8 code of an entry of the table s8_table (256
floats, KiviCodec's S8_TABLE, passed in so both paths use the same floats) and a zero the int8
count of units u * s (u = vzunit): z = zc * (s * u), as dequant_scale_zero computes it. s8 is
for values only: keys per channel keep fp16 scale and zero.
Blocks still in full precision (res_row[block] >= 0: the one being filled, a window or sink
block) are read from the residual rows as stored. Query heads sharing a KV head are handled
together, so each code is unpacked once per KV head. Parallel over (sequence, KV head). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

typedef _Float16 hvf __attribute__((vector_size(VW * 2), aligned(2)));  /* VW fp16 values */

static inline float h2f(uint16_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }

/* scale and zero i of a group: fp16 pairs (s8_table NULL) or (uint8 code, int8 zero in units of unit * s) */
static inline void scale_zero(const void *s, const void *z, size_t i, const float *s8_table, float unit,
                              float *so, float *zo) {
    if (s8_table) {
        const float sc = s8_table[((const uint8_t *)s)[i]];
        *so = sc;
        *zo = (float)((const int8_t *)z)[i] * (sc * unit);
    } else {
        *so = h2f(((const uint16_t *)s)[i]);
        *zo = h2f(((const uint16_t *)z)[i]);
    }
}

/* 16 codes of B bits (2B bytes, code i at bit B*i of the little-endian word, as pack_codes lays
   them out) -> 16 floats: the word's two halves broadcast to 8 lanes each, shifted per lane. */

/* n <= 8 little-endian bytes as a word, from whole loads of 4, 2 and 1 bytes: a memcpy of an odd
   size into a zeroed word went through the stack (two narrow stores, one wide reload: a
   store-forwarding stall that took a quarter of the kernel's time) */
static inline uint64_t load_le(const uint8_t *p, int n) {
    uint64_t w = 0;
    int at = 0;
    if (n >= 8) { memcpy(&w, p, 8); return w; }
    if (n >= 4) { uint32_t x; memcpy(&x, p, 4); w = x; at = 4; }
    if (n - at >= 2) { uint16_t x; memcpy(&x, p + at, 2); w |= (uint64_t)x << (8 * at); at += 2; }
    if (n - at >= 1) w |= (uint64_t)p[at] << (8 * at);
    return w;
}

#if VW == 16
#define CODES(B)                                                                                \
    static inline vf codes_##B(const uint8_t *p) {                                              \
        const uint64_t w = load_le(p, 2 * B);                                                   \
        const uint32_t lo = (uint32_t)(w & ((1ull << (8 * B)) - 1)), hi = (uint32_t)(w >> (8 * B)); \
        const u32xvf v = (u32xvf){lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi}  \
            >> (u32xvf){0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B,                         \
                        0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B};                        \
        return __builtin_convertvector((vfi)(v & ((1u << B) - 1)), vf); /* signed: one cvtdq2ps */ \
    }
#else  /* 8 codes of B bits: one B-byte word broadcast to 8 lanes, shifted per lane */
#define CODES(B)                                                                                \
    static inline vf codes_##B(const uint8_t *p) {                                              \
        const uint32_t w = (uint32_t)load_le(p, B);                                             \
        const u32xvf v = (u32xvf){w, w, w, w, w, w, w, w} >> (u32xvf){0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B}; \
        return __builtin_convertvector((vfi)(v & ((1u << B) - 1)), vf); /* signed: one cvtdq2ps */ \
    }
#endif
CODES(2)
CODES(3)
CODES(4)

/* Vector j of a row of 64 codes of `bits` bits (a constant where inlined). Eight 3-bit codes are
   3 bytes, which took a 2- and a 1-byte load, a shift and an or before the broadcast; all but the
   row's last vector read 4 bytes instead (the extra byte is the next vector's), the last the 4
   bytes ending with its own, shifted 8 bits further. */
static inline vf codes_row(const uint8_t *row, const int bits, int j) {
    const uint8_t *p = row + VW * bits / 8 * j;
#if VW == 8
    if (bits == 3) {
        const int last = j == 64 / VW - 1;
        uint32_t w;
        memcpy(&w, p - last, 4);
        const u32xvf v = ((u32xvf){0} + w) >> ((u32xvf){0, 3, 6, 9, 12, 15, 18, 21} + 8 * last);
        return __builtin_convertvector((vfi)(v & 7), vf);
    }
#endif
    return bits == 4 ? codes_4(p) : bits == 3 ? codes_3(p) : codes_2(p);
}

/* packed codes of one token and head -> D floats (layouts of pack_codes in kv/quantized.py) */
static inline void unpack(const uint8_t *p, int bits, int D, float *out) {
    if (D % 16 == 0 && bits >= 2 && bits <= 4) {  /* VW codes (VW * bits / 8 bytes) at a time */
        for (int c = 0; c < D / VW; c++) {
            const uint8_t *pc = p + VW * bits / 8 * c;
            *(vf *)(out + VW * c) = bits == 4 ? codes_4(pc) : bits == 3 ? codes_3(pc) : codes_2(pc);
        }
        return;
    }
    switch (bits) {
    case 8: for (int d = 0; d < D; d++) out[d] = p[d]; break;
    case 4: for (int j = 0; j < D / 2; j++) { out[2 * j] = p[j] & 15; out[2 * j + 1] = p[j] >> 4; } break;
    case 2:
        for (int j = 0; j < D / 4; j++)
            for (int i = 0; i < 4; i++) out[4 * j + i] = (p[j] >> (2 * i)) & 3;
        break;
    case 3:
        for (int j = 0; j < D / 8; j++) {
            const uint32_t w = p[3 * j] | (uint32_t)p[3 * j + 1] << 8 | (uint32_t)p[3 * j + 2] << 16;
            for (int i = 0; i < 8; i++) out[8 * j + i] = (w >> (3 * i)) & 7;
        }
        break;
    }
}

/* kivi kmix: a head's key codes at mixed widths (kv/kmix.py): group j of 8 channels
   (perm[8j..8j+7]) is one little-endian word of gbits[j] bytes, code i at bit gbits[j] * i */
#define MIXED_GROUP(B)                                                                   \
    case B: {                                                                            \
        const uint64_t w = load_le(p, B); /* little-endian host (x86, arm64) */          \
        for (int i = 0; i < 8; i++) out[pj[i]] = (float)((w >> (B * i)) & ((1u << B) - 1)); \
        p += B;                                                                          \
        break;                                                                           \
    }

static inline void unpack_mixed(const uint8_t *p, const int32_t *perm, const uint8_t *gbits, int D, float *out) {
    for (int j = 0; j < D / 8; j++) {
        const int32_t *pj = perm + 8 * j;
        switch (gbits[j]) {
            MIXED_GROUP(2) MIXED_GROUP(3) MIXED_GROUP(4) MIXED_GROUP(5)
            MIXED_GROUP(6) MIXED_GROUP(7) MIXED_GROUP(8)
        }
    }
}

/* one token and head's key codes: uniform widths, or kmix's mixed widths when perm is set */
static inline void unpack_key(const uint8_t *p, int kbits, const int32_t *perm, const uint8_t *gbits, int D,
                              float *out) {
    if (perm) unpack_mixed(p, perm, gbits, D, out);
    else unpack(p, kbits, D, out);
}

#if defined(__AVX2__)
#include <immintrin.h>
/* kmix keys in registers (64-channel heads). Channel c's code sits at bit offset o_c of the head's
   P bytes (its group's byte offset + the group's width x its index in the group); with widths
   <= 8 its two bytes o_c >> 3 and the next hold it. So each natural octet of channels (one
   8-float vector) is: the 16-byte chunks of the row broadcast to both lanes, per chunk a byte
   shuffle that moves each channel's two bytes into its 32-bit lane (vpshufb; bytes of other
   chunks zeroed), OR, then a per-lane shift and mask, and one int -> float conversion. The tables
   come from perm / gbits once per (sequence, head), so the codes are the integers unpack_mixed
   stores, without its 64 scalar stores and the vector reloads that waited on them (kmix's
   attention cost 2x the uniform widths' on AVX2). Chunks start at 16 c, the last at P - 16, so
   no load passes the row's end. */
typedef struct {
    __m256i ctl[4][8], shift[8], mask[8];
    int nchunk, start[4];
} kmix_lut;

static void kmix_lut_build(kmix_lut *t, const int32_t *perm, const uint8_t *gbits, int P) {
    t->nchunk = (P + 15) / 16;
    for (int c = 0; c < t->nchunk; c++) t->start[c] = 16 * c + 16 <= P ? 16 * c : P - 16;
    uint8_t ctl[4][256];  /* 4 bytes per channel */
    int32_t shift[64], mask[64];
    memset(ctl, 0x80, sizeof ctl);  /* 0x80: vpshufb writes a zero byte */
    for (int g = 0, off = 0; g < 8; off += 8 * gbits[g], g++)
        for (int i = 0; i < 8; i++) {
            const int ch = perm[8 * g + i], bit = off + gbits[g] * i;
            shift[ch] = bit & 7;
            mask[ch] = (1 << gbits[g]) - 1;
            for (int k = 0; k < 2; k++) {  /* the channel's two bytes into bytes 0, 1 of its lane */
                const int byte = (bit >> 3) + k;
                if (byte >= P) continue;   /* the row ends: the code ends in its first byte */
                const int c = byte / 16 < t->nchunk - 1 ? byte / 16 : t->nchunk - 1;
                ctl[c][4 * ch + k] = (uint8_t)(byte - t->start[c]);  /* lane-local index, < 16 */
            }
        }
    for (int v = 0; v < 8; v++) {
        for (int c = 0; c < t->nchunk; c++)
            t->ctl[c][v] = _mm256_loadu_si256((const __m256i *)(ctl[c] + 32 * v));
        t->shift[v] = _mm256_loadu_si256((const __m256i *)(shift + 8 * v));
        t->mask[v] = _mm256_loadu_si256((const __m256i *)(mask + 8 * v));
    }
}

/* the 64 channels of one token's kmix codes (p: its P bytes) as 8 vectors of 8 floats */
static inline __attribute__((always_inline)) void kmix_codes64(const uint8_t *p, const kmix_lut *t, __m256 *x) {
    __m256i ch[4];
    for (int c = 0; c < t->nchunk; c++)
        ch[c] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + t->start[c])));
    for (int v = 0; v < 8; v++) {
        __m256i w = _mm256_shuffle_epi8(ch[0], t->ctl[0][v]);
        for (int c = 1; c < t->nchunk; c++) w = _mm256_or_si256(w, _mm256_shuffle_epi8(ch[c], t->ctl[c][v]));
        x[v] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, t->shift[v]), t->mask[v]));
    }
}
#else
typedef struct { int unused; } kmix_lut;
#endif

static inline void load_row(const void *base, int bf16, size_t idx, int D, float *out) {
    if (bf16) { const uint16_t *r = (const uint16_t *)base + idx; for (int d = 0; d < D; d++) out[d] = bf2f(r[d]); }
    else memcpy(out, (const float *)base + idx, sizeof(float) * D);
}

/* A block's quantized values (64 channels, `bits` a constant where inlined) weighed into the
   accumulators of up to 3 query heads (nh, a constant where inlined): acc[i] += sum_t p_i[t] v_t,
   without dequantizing into memory. v = s code + z per group of vgroup (a multiple of VW)
   channels, so sum_t p_t v_t = sum_t (p_t s_t) code_t + sum_t p_t z_t: the scales go into the
   weights first (wbuf[i][c][t] = p_i[t] s_{t,c}, 3 x 64/vgroup x nt floats) and the zeros into one
   sum per head and group. Then SV vectors of channels at a time, each token's codes unpacked once
   for all heads: 3 x SV accumulators, SV codes and the weights' broadcasts stay in registers
   (SV = 2 with AVX2's 16; a slice of 32 channels spilled five accumulators to the stack, and
   each token's FMAs then waited on a store). Before, a block was dequantized into a buffer and
   read back once per head: the value pass was half the kernel's time on AVX2. */
static inline __attribute__((always_inline)) void weigh_codes64(
        const uint8_t *v0, size_t vstep, const int bits, int nt, int vgroup, const void *vs, const void *vz,
        size_t g0, size_t gstep, const float *s8_table, float vzunit, const float *const *pw, const int nh,
        float *const *acc, float *wbuf) {
    enum { SV = 2, SLW = SV * VW, NSL = 64 / SLW };  /* vgroup: a multiple of SLW */
    const int ng = 64 / vgroup;
    float zs[3][64 / SLW];
    for (int i = 0; i < nh; i++)
        for (int c = 0; c < ng; c++) zs[i][c] = 0.f;
    for (int t = 0; t < nt; t++)
        for (int c = 0; c < ng; c++) {
            float sc, z;
            scale_zero(vs, vz, g0 + (size_t)t * gstep + c, s8_table, vzunit, &sc, &z);
            for (int i = 0; i < nh; i++) {
                const float w = pw[i][t];
                wbuf[((size_t)i * ng + c) * nt + t] = w * sc;
                zs[i][c] += w * z;
            }
        }
    for (int sl = 0; sl < NSL; sl++) {
        const int c = sl * SLW / vgroup;  /* the slice's group */
        const float *w[3];
        vf a[3][SV];
        for (int i = 0; i < nh; i++) {
            w[i] = wbuf + ((size_t)i * ng + c) * nt;
            for (int k = 0; k < SV; k++) a[i][k] = (vf){0};
        }
        for (int t = 0; t < nt; t++) {
            const uint8_t *p = v0 + (size_t)t * vstep;
            vf code[SV];
            for (int k = 0; k < SV; k++) code[k] = codes_row(p, bits, sl * SV + k);
            for (int i = 0; i < nh; i++) {
                const float wi = w[i][t];
                for (int k = 0; k < SV; k++) a[i][k] += wi * code[k];
            }
        }
        for (int i = 0; i < nh; i++)
            for (int k = 0; k < SV; k++) {
                float *o = acc[i] + sl * SLW + VW * k;
                *(vf *)o += a[i][k] + zs[i][c];
            }
    }
}

#define MAXD 256
#define MAXG 16


/* sum of a[d] * b[d] in a fixed order: VW lanes, then a tree over the lanes. A plain scalar loop
   is one dependent FMA at a time (the compiler may not reorder a float sum), which made the score
   pass latency-bound: ~4 cycles per element instead of ~1/16. */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
    if (n >= VW) {
        vf acc = {0};
        for (; i + VW <= n; i += VW) acc += *(const vf *)(a + i) * *(const vf *)(b + i);
        s = hsum_vf(acc);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* RoPE of one pre-RoPE key row (kivi prerope) at the position whose tables are cos, sin (the
   model's half-split cos and sign-folded sin): out[d] = x[d] cos[d] + x[(d + D/2) % D] sin[d] */
static inline void rope_row(float *x, const float *cos, const float *sin, int D) {
    float tmp[MAXD];
    const int half = D / 2;
    for (int d = 0; d < half; d++) tmp[d] = x[d] * cos[d] + x[d + half] * sin[d];
    for (int d = half; d < D; d++) tmp[d] = x[d] * cos[d] + x[d - half] * sin[d];
    memcpy(x, tmp, sizeof(float) * D);
}

/* the largest of p[0..L) (VW lanes, then the tail) */
static inline float max_of(const float *p, int64_t L) {
    float m = -INFINITY;
    int64_t t = 0;
    if (L >= VW) {
        vf a = *(const vf *)p;
        for (t = VW; t + VW <= L; t += VW) {
            const vf x = *(const vf *)(p + t);
            a = (vf)(((vfi)x & (x > a)) | ((vfi)a & ~(x > a)));
        }
        for (int l = 0; l < VW; l++) m = a[l] > m ? a[l] : m;
    }
    for (; t < L; t++) m = p[t] > m ? p[t] : m;
    return m;
}

/* Token t's key (codes p) times each query head, lane by lane: dv[g * ds] holds the VW partial
   sums. Pre-RoPE keys (c, sn: the token's RoPE rows): the key dequantized (x = sv code + zv),
   rotated to its position and dotted with q_g (rows qstride apart). Post-RoPE keys (c NULL): the
   codes dotted with q_g s (per-block scales folded into q; the zeros' term is added later).
   bits (a constant where inlined): 2-4 unpack VW codes at a time straight into registers; 0 goes
   through unpack_key (kmix's mixed widths). */
static inline __attribute__((always_inline)) void key_dots64(
        const uint8_t *p, const int bits, const int32_t *perm, const uint8_t *gbits, int kbits,
        const kmix_lut *lut, const vf *sv, const vf *zv, const float *c, const float *sn, const float *q,
        int qstride, int G, vf *dv, int ds) {
    enum { NV = 64 / VW };
    vf x[NV], r[NV];
    if (bits)
        for (int j = 0; j < NV; j++) x[j] = codes_row(p, bits, j);
#if defined(__AVX2__)
    else if (lut) {
        __m256 o[8];
        kmix_codes64(p, lut, o);
#if VW == 8
        for (int j = 0; j < NV; j++) x[j] = (vf)o[j];
#else  /* two octets per 16-float vector */
        for (int j = 0; j < NV; j++) x[j] = __builtin_shufflevector((v8)o[2 * j], (v8)o[2 * j + 1],
                                                                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
    }
#endif
    else {
        float buf[64];
        unpack_key(p, kbits, perm, gbits, 64, buf);
        for (int j = 0; j < NV; j++) x[j] = *(const vf *)(buf + VW * j);
    }
    if (c) {
        for (int j = 0; j < NV; j++) x[j] = x[j] * sv[j] + zv[j];
        /* rope_row: first half x1 cos + x2 sin, second half x2 cos + x1 sin (sin signed) */
        for (int j = 0; j < NV; j++)
            r[j] = x[j] * *(const vf *)(c + VW * j) + x[(j + NV / 2) % NV] * *(const vf *)(sn + VW * j);
    } else
        for (int j = 0; j < NV; j++) r[j] = x[j];
    for (int g = 0; g < G; g++) {  /* two chains of FMAs each: half the latency */
        const float *qg = q + (size_t)g * qstride;
        vf e = r[0] * *(const vf *)qg, o = r[1] * *(const vf *)(qg + VW);
        for (int j = 2; j < NV; j += 2) {
            e += r[j] * *(const vf *)(qg + VW * j);
            o += r[j + 1] * *(const vf *)(qg + VW * (j + 1));
        }
        dv[(size_t)g * ds] = e + o;
    }
}

#if VW == 8
/* the lane sums of eight 8-lane vectors as one vector {sum a0, ..., sum a7}: 8 shuffles and 7
   adds for eight dot products (one hsum4 and three scalar stores per token and 3 heads were a
   quarter of the kernel) */
static inline vf sum8(const vf *a) {
#define LO(x, y) __builtin_shufflevector(x, y, 0, 8, 1, 9, 4, 12, 5, 13)     /* unpcklps */
#define HI(x, y) __builtin_shufflevector(x, y, 2, 10, 3, 11, 6, 14, 7, 15)   /* unpckhps */
#define S44(x, y) __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13)    /* shufps 0x44 */
#define SEE(x, y) __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15)  /* shufps 0xee */
    const vf h01 = LO(a[0], a[1]) + HI(a[0], a[1]), h23 = LO(a[2], a[3]) + HI(a[2], a[3]);
    const vf h45 = LO(a[4], a[5]) + HI(a[4], a[5]), h67 = LO(a[6], a[7]) + HI(a[6], a[7]);
    const vf q0 = S44(h01, h23) + SEE(h01, h23), q1 = S44(h45, h67) + SEE(h45, h67);
    return __builtin_shufflevector(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
#undef LO
#undef HI
#undef S44
#undef SEE
}
#endif

/* 64-channel keys: the scores of a block's nt tokens for the G query heads sharing the KV head,
   (dots + c0[g]) * norm * scale with key_dots64's dots. k0: the first token's codes, kstep bytes
   apart; pre-RoPE: s_c, z_c the block's key scales and zeros, c, sn the first token's RoPE rows,
   c0 NULL; post-RoPE: c NULL, q = q s (rows MAXD apart), c0[g] = q_g . z, kn the first token's
   norm (knstep apart) or NULL. sc [G][L] from the block's first token. With 8-float vectors, 8
   tokens' partial sums are reduced together (sum8). */
static inline __attribute__((always_inline)) void scores64(
        const uint8_t *k0, size_t kstep, const int bits, const int32_t *perm, const uint8_t *gbits,
        int kbits, const kmix_lut *lut, int nt, const float *s_c, const float *z_c, const float *c, const float *sn,
        const float *q, int qstride, const float *c0, const uint16_t *kn, size_t knstep, int G,
        float scale, float *sc, int64_t L) {
    enum { NV = 64 / VW };
    vf sv[NV], zv[NV];
    if (c)
        for (int j = 0; j < NV; j++) sv[j] = *(const vf *)(s_c + VW * j), zv[j] = *(const vf *)(z_c + VW * j);
    int t = 0;
#define KEY(T, DV, DS) key_dots64(k0 + (size_t)(T) * kstep, bits, perm, gbits, kbits, lut, sv, zv, \
                                  c ? c + (size_t)(T) * 64 : NULL, c ? sn + (size_t)(T) * 64 : NULL, \
                                  q, qstride, G, DV, DS)
#if VW == 8
    for (; t + 8 <= nt; t += 8) {
        vf dv[MAXG][8], norm = (vf){0} + 1.f;
        for (int u = 0; u < 8; u++) {
            KEY(t + u, &dv[0][u], 8);
            if (kn) norm[u] = h2f(kn[(size_t)(t + u) * knstep]);
        }
        for (int g = 0; g < G; g++)
            *(vf *)(sc + (size_t)g * L + t) = (sum8(dv[g]) + (c0 ? c0[g] : 0.f)) * norm * scale;
    }
#endif
    for (; t < nt; t++) {
        vf d[MAXG + 3];
        KEY(t, d, 1);
        for (int g = G; g < G + 3; g++) d[g] = (vf){0};  /* hsum4's lanes past G */
        const float norm = kn ? h2f(kn[(size_t)t * knstep]) : 1.f;
        for (int g0 = 0; g0 < G; g0 += 4) {
            const int ng4 = G - g0 < 4 ? G - g0 : 4;
            const v4 sums = hsum4(d[g0], d[g0 + 1], d[g0 + 2], d[g0 + 3]);
            for (int i = 0; i < ng4; i++)
                sc[(size_t)(g0 + i) * L + t] = (sums[i] + (c0 ? c0[g0 + i] : 0.f)) * norm * scale;
        }
    }
#undef KEY
}

static int seg_tokens = 2048;  /* tokens per segment of a long row (rounded down to whole blocks) */
void kivi_set_segment(int tokens) { seg_tokens = tokens > 0 ? tokens : 2048; }

/* the segments a row of L tokens is split into (at least one) */
static inline int segments(int64_t L, int64_t seglen) { return L > seglen ? (int)((L + seglen - 1) / seglen) : 1; }

/* q [B, Hq, D] float32; tables [B, nblk] block ids (negative: evicted, skipped); lens [B] tokens
   each query attends to (evicted blocks' tokens included);
   kc [blocks, bs, H, D*kbits/8], ks/kz [blocks, 1, H, D] fp16, kn [blocks, bs, H] fp16 or NULL,
   vc [blocks, bs, H, D*vbits/8], vs/vz [blocks, bs, H, D/vgroup] fp16;
   with s8_table (not NULL), vs are uint8 codes into it and vz int8 zeros in units of vzunit
   scales (keys' ks/kz stay fp16);
   res_row [blocks], rk/rv [rows, bs, H, D] (float32, or bfloat16 when res_bf16);
   kperm [H, D] int32 and kgbits [H, D/8] uint8, or NULL: keys at mixed widths per channel group
   (kmix; kc's last dim is then the plan's bytes per head, passed as kbytes);
   rope_cos/rope_sin [positions, D] float32, or NULL: with them keys are stored before RoPE and
   each key (token t of a row sits at position t) is rotated after dequantizing, then dotted with q;
   out [B, Hq, D] float32. Returns 0, or -1 for sizes it does not handle. */
int kivi_decode_attention(const float *q, int B, int Hq, int H, int D,
                          const int64_t *tables, int nblk, const int64_t *lens, int bs,
                          const uint8_t *kc, const void *ks, const void *kz, const uint16_t *kn,
                          const uint8_t *vc, const void *vs, const void *vz,
                          int kbits, int vbits, int vgroup,
                          const float *s8_table, float vzunit,
                          const int64_t *res_row, const void *rk, const void *rv, int res_bf16,
                          const float *rope_cos, const float *rope_sin,
                          const int32_t *kperm, const uint8_t *kgbits, int kbytes,
                          float scale, float *out) {
    const int G = Hq / H;
    if (D > MAXD || G > MAXG || G * H != Hq || D % vgroup || D % 8) return -1;
    const int P = kperm ? kbytes : D * kbits / 8, PV = D * vbits / 8, ng = D / vgroup;
    /* values in registers (weigh_codes64): 64-channel heads at 2-4 bits, groups of whole slices */
    const int fusedv = D == 64 && vbits >= 2 && vbits <= 4 && vgroup % (2 * VW) == 0;
    int err = 0;
    /* Long rows are split into segments of seg_tokens (whole blocks), each its own work item with
       its own softmax, merged after the loop (flash-decoding): at batch 1 the (sequence, KV head)
       items were 3 for 2 threads, and a long row's scores and codes outgrew the caches. A row
       within one segment is computed exactly as before, so results up to seg_tokens are
       unchanged; the split depends only on the row's length, never on the batch. */
    const int64_t seglen = (int64_t)(seg_tokens / bs > 0 ? seg_tokens / bs : 1) * bs;
    int S = 1;
    for (int b = 0; b < B; b++) {
        const int n = segments(lens[b], seglen);
        if (n > S) S = n;
    }
    float *part = S > 1 ? malloc(sizeof(float) * (size_t)B * H * S * G * (D + 2)) : NULL;  /* max, sum, acc */
    if (S > 1 && !part) return -2;
    #pragma omp parallel for collapse(3) schedule(dynamic)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int s = 0; s < S; s++) {
            const int64_t L = lens[b];
            const int nseg = segments(L, seglen);
            if (s >= nseg) continue;
            const int64_t tb = s * seglen, te = tb + seglen < L ? tb + seglen : L, Ls = te - tb;  /* this segment */
            const int32_t *hperm = kperm ? kperm + (size_t)h * D : NULL;      /* kmix: this head's layout */
            const uint8_t *hgbits = kperm ? kgbits + (size_t)h * (D / 8) : NULL;
            const kmix_lut *klut = NULL;  /* kmix keys unpacked in registers (AVX2), else through memory */
#if defined(__AVX2__)
            kmix_lut lut;
            if (hperm && D == 64 && P >= 16 && P <= 64) {
                kmix_lut_build(&lut, hperm, hgbits, P);
                klut = &lut;
            }
#endif
            float *sc = malloc(sizeof(float) * G * (Ls > 0 ? Ls : 1));  /* the segment's scores, [G][Ls] */
            float *vbuf = malloc(sizeof(float) * (size_t)bs * D);  /* one block's values */
            if (!sc || !vbuf) { free(sc); free(vbuf); err = 1; continue; }
            float qs[MAXG][MAXD], c0[MAXG], buf[MAXD], acc[MAXG][MAXD], sum[MAXG], mx[MAXG];
            const float *qh = q + ((size_t)b * Hq + (size_t)h * G) * D;
            for (int64_t t0 = tb, blk = tb / bs; t0 < te; t0 += bs, blk++) {   /* scores */
                const int64_t block = tables[(size_t)b * nblk + blk];
                const int nt = L - t0 < bs ? (int)(L - t0) : bs;
                if (block < 0) {  /* evicted (kv stream:...): its tokens get no weight */
                    for (int g = 0; g < G; g++)
                        for (int t = 0; t < nt; t++) sc[(size_t)g * Ls + (t0 - tb) + t] = -INFINITY;
                    continue;
                }
                const int64_t row = res_row[block];
                if (row >= 0) {
                    for (int t = 0; t < nt; t++) {
                        load_row(rk, res_bf16, (((size_t)row * bs + t) * H + h) * D, D, buf);
                        if (rope_cos)
                            rope_row(buf, rope_cos + (size_t)(t0 + t) * D, rope_sin + (size_t)(t0 + t) * D, D);
                        for (int g = 0; g < G; g++)
                            sc[(size_t)g * Ls + (t0 - tb) + t] = dot(qh + g * D, buf, D) * scale;
                    }
                    continue;
                }
                const size_t kbase = ((size_t)block * H + h) * D;
                float s_c[MAXD], z_c[MAXD];
                if (D % 16 == 0)  /* VW fp16 -> float at a time (one scalar conversion each was
                                     a dependency chain through one register: 8% of the kernel) */
                    for (int d = 0; d < D; d += VW) {
                        *(vf *)(s_c + d) = __builtin_convertvector(*(const hvf *)((const uint16_t *)ks + kbase + d), vf);
                        *(vf *)(z_c + d) = __builtin_convertvector(*(const hvf *)((const uint16_t *)kz + kbase + d), vf);
                    }
                else
                    for (int d = 0; d < D; d++) scale_zero(ks, kz, kbase + d, NULL, 0.f, &s_c[d], &z_c[d]);
                if (rope_cos && D == 64) {  /* as below, in registers: NV vectors of VW per row */
                    const uint8_t *k0 = kc + ((size_t)block * bs * H + h) * P;
                    const size_t kstep = (size_t)H * P;
                    const float *c = rope_cos + (size_t)t0 * 64, *sn = rope_sin + (size_t)t0 * 64;
                    float *s0 = sc + (t0 - tb);
#define PRE(B, PERM, GB) scores64(k0, kstep, B, PERM, GB, kbits, klut, nt, s_c, z_c, c, sn, qh, 64, NULL, NULL, 0, G, \
                                     scale, s0, Ls)
                    switch (hperm ? 0 : kbits) {  /* a constant width per copy; 0: unpack_key */
                    case 2: PRE(2, NULL, NULL); break;
                    case 3: PRE(3, NULL, NULL); break;
                    case 4: PRE(4, NULL, NULL); break;
                    default: PRE(0, hperm, hgbits);
                    }
#undef PRE
                    continue;
                }
                if (rope_cos) {  /* dequantize, rotate to the position, then the dots */
                    for (int t = 0; t < nt; t++) {
                        const size_t tok = ((size_t)block * bs + t) * H + h;
                        unpack_key(kc + tok * P, kbits, hperm, hgbits, D, buf);
                        for (int d = 0; d < D; d++) buf[d] = buf[d] * s_c[d] + z_c[d];
                        rope_row(buf, rope_cos + (size_t)(t0 + t) * D, rope_sin + (size_t)(t0 + t) * D, D);
                        for (int g = 0; g < G; g++)
                            sc[(size_t)g * Ls + (t0 - tb) + t] = dot(qh + g * D, buf, D) * scale;
                    }
                    continue;
                }
                for (int g = 0; g < G; g++) {
                    float c = 0.f;
                    for (int d = 0; d < D; d++) {
                        qs[g][d] = qh[g * D + d] * s_c[d];
                        c += qh[g * D + d] * z_c[d];
                    }
                    c0[g] = c;
                }
                if (D == 64 && !hperm && kbits >= 2 && kbits <= 4) {  /* in registers */
                    const size_t tok0 = (size_t)block * bs * H + h;
                    const uint16_t *kn0 = kn ? kn + tok0 : NULL;
#define POST(B) scores64(kc + tok0 * P, (size_t)H * P, B, NULL, NULL, kbits, NULL, nt, NULL, NULL, NULL, NULL, qs[0], \
                              MAXD, c0, kn0, H, G, scale, sc + (t0 - tb), Ls)
                    switch (kbits) {  /* a constant width per copy */
                    case 2: POST(2); break;
                    case 3: POST(3); break;
                    default: POST(4);
                    }
#undef POST
                    continue;
                }
                for (int t = 0; t < nt; t++) {
                    const size_t tok = ((size_t)block * bs + t) * H + h;
                    unpack_key(kc + tok * P, kbits, hperm, hgbits, D, buf);
                    const float norm = kn ? h2f(kn[tok]) : 1.f;
                    for (int g = 0; g < G; g++)
                        sc[(size_t)g * Ls + (t0 - tb) + t] = (dot(qs[g], buf, D) + c0[g]) * norm * scale;
                }
            }
            for (int g = 0; g < G; g++) {                                 /* softmax */
                float *sg = sc + (size_t)g * Ls;
                mx[g] = max_of(sg, Ls);
                /* a segment whose blocks are all evicted has no weight (and -inf - -inf is NaN) */
                sum[g] = mx[g] == -INFINITY ? 0.f : exp_shift_sum(sg, Ls, mx[g]);
                for (int d = 0; d < D; d++) acc[g][d] = 0.f;
            }
            for (int64_t t0 = tb, blk = tb / bs; t0 < te; t0 += bs, blk++) {   /* values */
                const int64_t block = tables[(size_t)b * nblk + blk];
                if (block < 0) continue;  /* evicted: zero weight */
                const int64_t row = res_row[block];
                const int nt = L - t0 < bs ? (int)(L - t0) : bs;
                if (row < 0 && fusedv) {  /* codes straight into the heads' accumulators */
                    const size_t tok0 = ((size_t)block * bs) * H + h;
                    for (int g0 = 0; g0 < G; g0 += 3) {
                        const int nh = G - g0 < 3 ? G - g0 : 3;
                        const float *pw[3];
                        float *ac[3];
                        for (int i = 0; i < nh; i++) pw[i] = sc + (size_t)(g0 + i) * Ls + (t0 - tb), ac[i] = acc[g0 + i];
#define WEIGH(B, NH) weigh_codes64(vc + tok0 * PV, (size_t)H * PV, B, nt, vgroup, vs, vz, tok0 * ng, (size_t)H * ng, \
                                   s8_table, vzunit, pw, NH, ac, vbuf)
                        switch (vbits * 4 + nh) {  /* constant widths and head counts per copy */
                        case 9: WEIGH(2, 1); break;  case 10: WEIGH(2, 2); break;  case 11: WEIGH(2, 3); break;
                        case 13: WEIGH(3, 1); break; case 14: WEIGH(3, 2); break; case 15: WEIGH(3, 3); break;
                        case 17: WEIGH(4, 1); break; case 18: WEIGH(4, 2); break; default: WEIGH(4, 3);
                        }
#undef WEIGH
                    }
                    continue;
                }
                /* the block's values (dequantized, or its residual rows) once, then each query
                   head's weighted sum over them with its accumulators in registers */
                for (int t = 0; t < nt; t++) {
                    float *vt = vbuf + (size_t)t * D;
                    const size_t tok = ((size_t)block * bs + t) * H + h;
                    if (row >= 0) load_row(rv, res_bf16, (((size_t)row * bs + t) * H + h) * D, D, vt);
                    else {
                        unpack(vc + tok * PV, vbits, D, vt);
                        for (int c = 0; c < ng; c++) {
                            float s, z;
                            scale_zero(vs, vz, tok * ng + c, s8_table, vzunit, &s, &z);
                            for (int d = c * vgroup; d < (c + 1) * vgroup; d++) vt[d] = vt[d] * s + z;
                        }
                    }
                }
                for (int g = 0; g < G; g++) {
                    const float *pg = sc + (size_t)g * Ls + (t0 - tb);
                    if (D == 64) {
                        enum { NV = 64 / VW };
                        vf a[NV];
                        for (int j = 0; j < NV; j++) a[j] = *(vf *)(acc[g] + VW * j);
                        for (int t = 0; t < nt; t++) {
                            const float *vt = vbuf + (size_t)t * 64, w = pg[t];
                            for (int j = 0; j < NV; j++) a[j] += w * *(const vf *)(vt + VW * j);
                        }
                        for (int j = 0; j < NV; j++) *(vf *)(acc[g] + VW * j) = a[j];
                    } else
                        for (int t = 0; t < nt; t++)
                            for (int d = 0; d < D; d++) acc[g][d] += pg[t] * vbuf[(size_t)t * D + d];
                }
            }
            for (int g = 0; g < G; g++) {
                if (nseg > 1) {  /* merged below */
                    float *pp = part + ((((size_t)b * H + h) * S + s) * G + g) * (D + 2);
                    pp[0] = mx[g], pp[1] = sum[g];
                    memcpy(pp + 2, acc[g], sizeof(float) * D);
                    continue;
                }
                float *o = out + ((size_t)b * Hq + (size_t)h * G + g) * D;
                const float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
                for (int d = 0; d < D; d++) o[d] = acc[g][d] * inv;
            }
            free(vbuf);
            free(sc);
        }
    if (S > 1 && !err)  /* merge the segments of long rows: out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s */
        for (int b = 0; b < B; b++) {
            const int nseg = segments(lens[b], seglen);
            if (nseg == 1) continue;
            for (int hg = 0; hg < Hq; hg++) {
                const int h = hg / G, g = hg % G;
                const float *p0 = part + ((((size_t)b * H + h) * S) * G + g) * (D + 2);
                const size_t stride = (size_t)G * (D + 2);
                float m = -INFINITY, l = 0.f, o[MAXD] = {0};
                for (int s = 0; s < nseg; s++) m = p0[s * stride] > m ? p0[s * stride] : m;
                for (int s = 0; s < nseg; s++) {
                    const float *pp = p0 + s * stride;
                    if (pp[0] == -INFINITY) continue;  /* all evicted */
                    const float w = expf(pp[0] - m);
                    l += w * pp[1];
                    for (int d = 0; d < D; d++) o[d] += w * pp[2 + d];
                }
                float *dst = out + ((size_t)b * Hq + hg) * D;
                const float inv = l > 0.f ? 1.f / l : 0.f;
                for (int d = 0; d < D; d++) dst[d] = o[d] * inv;
            }
        }
    free(part);
    return err ? -2 : 0;
}


/* ---- the write side, and one layer's whole attention step for the whole-layer executor ----
   The module path (kv/paged.py, KiviCodec.write) calls the same functions for the same work, so
   the executor (ops.c's decoder_layers_f32 with this file's kivi_layer_step) equals it bit for
   bit, and every step stores what any other step would have stored for the same token. */

/* x [M rows, `stride` floats apart], H heads of D each from the row start: each head times R
   [D, D] (row vector times matrix), in place; the sum over i runs in order for every head. */
void kivi_rotate_f32(float *x, long M, long stride, int H, int D, const float *R) {
    float acc[MAXD];
    for (long m = 0; m < M; m++)
        for (int h = 0; h < H; h++) {
            float *xh = x + m * stride + (long)h * D;
            if (D == 64) {  /* the same FMAs in the same order, the accumulators in registers (in
                               memory, each FMA waited on the previous row's store: 2% of a decode
                               step, on one thread) */
                enum { NV = 64 / VW };
                vf a[NV];
                for (int j = 0; j < NV; j++) a[j] = (vf){0};
                for (int i = 0; i < 64; i++) {
                    const float xi = xh[i];
                    for (int j = 0; j < NV; j++) a[j] += xi * *(const vf *)(R + (size_t)i * 64 + VW * j);
                }
                for (int j = 0; j < NV; j++) *(vf *)(xh + VW * j) = a[j];
                continue;
            }
            for (int j = 0; j < D; j++) acc[j] = 0.f;
            for (int i = 0; i < D; i++) {
                const float xi = xh[i];
                const float *r = R + (size_t)i * D;
                for (int j = 0; j < D; j++) acc[j] += xi * r[j];
            }
            memcpy(xh, acc, sizeof(float) * D);
        }
}

/* the float16 next to h toward +inf (up) or -inf, as torch.nextafter */
static inline _Float16 f16_next(_Float16 h, int up) {
    uint16_t u;
    memcpy(&u, &h, 2);
    if ((u & 0x7fff) == 0) u = up ? 0x0001 : 0x8001;
    else if (!(u & 0x8000) == !!up) u++;
    else u--;
    memcpy(&h, &u, 2);
    return h;
}

/* x rounded to float16 toward +inf (up) or -inf: kv/quantized.py's _f16_toward */
static inline _Float16 f16_toward(double x, int up) {
    _Float16 r = (_Float16)x;
    if (up ? (double)r < x : (double)r > x) r = f16_next(r, up);
    return r;
}

static inline void pack_row(const uint8_t *q, int bits, int D, uint8_t *p) {
    switch (bits) {
    case 8: memcpy(p, q, D); break;
    case 4: for (int j = 0; j < D / 2; j++) p[j] = q[2 * j] | q[2 * j + 1] << 4; break;
    case 2: for (int j = 0; j < D / 4; j++) p[j] = q[4 * j] | q[4 * j + 1] << 2 | q[4 * j + 2] << 4 | q[4 * j + 3] << 6; break;
    case 3:
        for (int j = 0; j < D / 8; j++) {
            uint32_t w = 0;
            for (int i = 0; i < 8; i++) w |= (uint32_t)q[8 * j + i] << (3 * i);
            p[3 * j] = w & 255; p[3 * j + 1] = (w >> 8) & 255; p[3 * j + 2] = (w >> 16) & 255;
        }
        break;
    }
}

/* Per-token value quantization (KiviCodec._write_tokens): rows t of x (`stride` floats apart,
   H heads of D) into slots[t]: codes [slots, H, D*bits/8], per group of vgroup channels a scale
   and zero: fp16 (s8_table NULL, asym_quantize) or a uint8 code into s8_table and an int8 zero in
   units of zunit scales (asym_quantize8). The same operations in the same precision as the torch
   functions (double where they use double, no fused multiply-add), so the codes are theirs. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
/* asym_quantize with fp16 scale and zero (kv/quantized.py) of the n values x[0], x[stride], ...
   whose min and max are lo, hi: codes to q[0], q[stride], ..., the scale's and zero's float16
   bits to *s, *z. The zero is the min rounded down to fp16, the scale the range over qmax rounded
   up (at least 2^-24), as torch computes them (double where it uses double). */
static void asym_f16(const float *x, int n, long stride, float lo, float hi, int qmax, uint8_t *q,
                     uint16_t *s, uint16_t *z) {
    const _Float16 z16 = f16_toward(lo, 0);
    const float zf = (float)z16;
    double need = ((double)hi - (double)zf) / qmax;
    need = need < 0x1p-24 ? 0x1p-24 : need;
    const _Float16 s16 = f16_toward(need, 1);
    const float sf = (float)s16;
    for (int i = 0; i < n; i++) {
        const float c = nearbyintf((x[(size_t)i * stride] - zf) / sf);
        q[(size_t)i * stride] = (uint8_t)(c < 0.f ? 0.f : c > qmax ? qmax : c);
    }
    memcpy(s, &s16, 2);
    memcpy(z, &z16, 2);
}

void kivi_quant_values(const float *x, long T, long stride, int H, int D, int vgroup, int bits,
                       const float *s8_table, float zunit, const int64_t *slots,
                       uint8_t *codes, void *scales, void *zeros) {
    const int qmax = (1 << bits) - 1, ng = D / vgroup, PV = D * bits / 8;
    uint8_t q[MAXD];
    for (long t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            const float *xh = x + t * stride + (long)h * D;
            const size_t head = (size_t)slots[t] * H + h;
            for (int g = 0; g < ng; g++) {
                const float *xg = xh + g * vgroup;
                float lo = xg[0], hi = xg[0];
                for (int i = 1; i < vgroup; i++) { lo = xg[i] < lo ? xg[i] : lo; hi = xg[i] > hi ? xg[i] : hi; }
                const size_t at = head * ng + g;
                if (s8_table) {
                    const double dlo = lo, dhi = hi;
                    double need = fmax(fmax((dhi - dlo) / qmax, -dlo / (128 * (double)zunit)),
                                       fmax(dlo / (127 * (double)zunit), (double)s8_table[0]));
                    int sc = 0;  /* the first entry >= need (the table increases), else 255 */
                    for (int step = 128; step; step >>= 1)
                        if (sc + step <= 255 && (double)s8_table[sc + step - 1] < need) sc += step;
                    const float s = s8_table[sc];
                    double zd = nearbyint(dlo / ((double)s * zunit));
                    zd = zd < -128 ? -128 : zd > 127 ? 127 : zd;
                    const float su = s * zunit, off = (float)zd * su;
                    for (int i = 0; i < vgroup; i++) {
                        float c = nearbyintf((xg[i] - off) / s);
                        q[g * vgroup + i] = (uint8_t)(c < 0.f ? 0.f : c > qmax ? qmax : c);
                    }
                    ((uint8_t *)scales)[at] = (uint8_t)sc;
                    ((int8_t *)zeros)[at] = (int8_t)zd;
                } else
                    asym_f16(xg, vgroup, 1, lo, hi, qmax, q + g * vgroup, (uint16_t *)scales + at,
                             (uint16_t *)zeros + at);
            }
            pack_row(q, bits, D, codes + head * PV);
        }
}
/* x [T, C] -> per column c over the T rows: asym_quantize(x, 0, bits[c]) with fp16 scale and
   zero (kv/quantized.py), codes [T, C], scale / zero as float16 bits [C]. */
static void quantize_channels(const float *x, int T, long C, const int *bits, uint8_t *codes,
                              uint16_t *scales, uint16_t *zeros) {
    for (long c = 0; c < C; c++) {
        float lo = x[c], hi = x[c];
        for (int t = 1; t < T; t++) {
            const float v = x[(size_t)t * C + c];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        asym_f16(x + c, T, C, lo, hi, (1 << bits[c]) - 1, codes + c, scales + c, zeros + c);
    }
}
#pragma GCC pop_options

/* One layer of a kivi cache, for kivi_layer_step (built by leanlm/native/kivi.py). */
typedef struct {
    long Hq, H, D, bs, kbits, vbits, vgroup, kbytes, res_bf16, rotate_qk;
    float vzunit, scale;
    const float *s8_table;          /* NULL: fp16 value scales */
    uint8_t *kc; void *ks, *kz; const uint16_t *kn;  /* written when a block fills */
    uint8_t *vc; void *vs, *vz;
    const int64_t *res_row; void *rk, *rv;
    const float *rope_cos, *rope_sin;   /* prerope, or NULL */
    const int32_t *kperm; const uint8_t *kgbits;  /* kmix, or NULL */
    const float *rot, *rot_t;       /* the Hadamard rotation and its transpose, or NULL */
} kivi_layer_t;

typedef struct {
    const int64_t *res_at;          /* [M]: each row's flat residual index (row * bs + offset), or -1
                                       for a row whose block fills in this step and leaves the residual */
    long n_full;                    /* blocks that fill in this step: their keys are quantized */
    const int64_t *full_blocks;     /* [n_full] */
    const int64_t *flush_src;       /* [n_full, bs]: token t of block i is row src (>= 0) of this
                                       step, or residual flat index -src - 1 (written earlier) */
} kivi_step_t;

/* The keys of the blocks that fill in this step, per channel over each block's tokens
   (KiviCodec.write: asym_quantize over dim 1 with fp16 scale and zero, the bits of each channel
   with kmix, pack_codes or kmix.pack), computed as torch computes them. Reads the residual rows
   of those blocks, so it runs before this step's residual writes reuse them. */
static int flush_keys(const kivi_layer_t *d, const kivi_step_t *st, const float *qkv, long stride, long Q) {
    const int H = (int)d->H, D = (int)d->D, bs = (int)d->bs;
    const long KV = (long)H * D;
    const int P = d->kperm ? (int)d->kbytes : D * (int)d->kbits / 8;
    float *keys = malloc(sizeof(float) * (size_t)bs * KV);
    uint8_t *codes = malloc((size_t)bs * KV);
    int *cbits = malloc(sizeof(int) * (size_t)KV);
    if (!keys || !codes || !cbits) { free(keys); free(codes); free(cbits); return -2; }
    for (long i = 0; i < KV; i++) cbits[i] = (int)d->kbits;
    if (d->kperm)  /* kmix: channel perm[8j + i] of head h has the bits of its group j */
        for (int h = 0; h < H; h++)
            for (int j = 0; j < D / 8; j++)
                for (int i = 0; i < 8; i++)
                    cbits[(long)h * D + d->kperm[(long)h * D + 8 * j + i]] = d->kgbits[(long)h * (D / 8) + j];
    for (long fb = 0; fb < st->n_full; fb++) {
        const int64_t block = st->full_blocks[fb];
        for (int t = 0; t < bs; t++) {
            const int64_t src = st->flush_src[fb * bs + t];
            if (src >= 0) memcpy(keys + (size_t)t * KV, qkv + src * stride + Q, sizeof(float) * KV);
            else load_row(d->rk, (int)d->res_bf16, (size_t)(-src - 1) * KV, (int)KV, keys + (size_t)t * KV);
        }
        quantize_channels(keys, bs, KV, cbits, codes, (uint16_t *)d->ks + block * KV, (uint16_t *)d->kz + block * KV);
        for (int t = 0; t < bs; t++)
            for (int h = 0; h < H; h++) {
                const uint8_t *q = codes + (size_t)t * KV + (size_t)h * D;
                uint8_t *out = (uint8_t *)d->kc + (((size_t)block * bs + t) * H + h) * P;
                if (!d->kperm) { pack_row(q, (int)d->kbits, D, out); continue; }
                const int32_t *perm = d->kperm + (long)h * D;
                for (int j = 0; j < D / 8; j++) {  /* kmix.pack: group j's 8 codes as a word of gbits[j] bytes */
                    const int b = d->kgbits[(long)h * (D / 8) + j];
                    uint64_t w = 0;
                    for (int i = 0; i < 8; i++) w |= (uint64_t)q[perm[8 * j + i]] << (b * i);
                    for (int k = 0; k < b; k++) *out++ = (uint8_t)(w >> (8 * k));
                }
            }
    }
    free(keys); free(codes); free(cbits);
    return 0;
}

/* The attention of one layer for M decode rows whose tokens all go to residual rows (no block
   fills in this step: the key quantization of a full block stays on the module path):
   qkv [M, stride] after the projection and RoPE (q only, with prerope) -> out [M, Hq, D].
   As PagedKVCache.attend: rotate (v; q and k unless prerope), store the values' codes and the
   residual rows, attend from the codes, rotate the output back. */
int kivi_layer_step(const kivi_layer_t *d, const kivi_step_t *st, float *qkv, int M, long stride,
                    const int64_t *slots, const int64_t *tables, int nblk, const int64_t *lens, float *out) {
    const int Hq = (int)d->Hq, H = (int)d->H, D = (int)d->D;
    const long Q = (long)Hq * D, KV = (long)H * D;
    if (d->rot) {
        kivi_rotate_f32(qkv + Q + KV, M, stride, H, D, d->rot);
        if (d->rotate_qk) kivi_rotate_f32(qkv, M, stride, Hq + H, D, d->rot);
    }
    kivi_quant_values(qkv + Q + KV, M, stride, H, D, (int)d->vgroup, (int)d->vbits, d->s8_table, d->vzunit,
                      slots, d->vc, d->vs, d->vz);
    if (st->n_full) {
        const int rc = flush_keys(d, st, qkv, stride, Q);
        if (rc) return rc;
    }
    for (int m = 0; m < M; m++) {
        const int64_t at = st->res_at[m];
        if (at < 0) continue;  /* its block filled: its key is in the codes now */
        const float *k = qkv + (size_t)m * stride + Q, *v = k + KV;
        if (d->res_bf16)
            for (long i = 0; i < KV; i++) {
                ((uint16_t *)d->rk)[at * KV + i] = f2bf(k[i]);
                ((uint16_t *)d->rv)[at * KV + i] = f2bf(v[i]);
            }
        else {
            memcpy((float *)d->rk + at * KV, k, sizeof(float) * KV);
            memcpy((float *)d->rv + at * KV, v, sizeof(float) * KV);
        }
    }
    float *qc = malloc(sizeof(float) * (size_t)M * Q);
    if (!qc) return -2;
    for (int m = 0; m < M; m++) memcpy(qc + (size_t)m * Q, qkv + (size_t)m * stride, sizeof(float) * Q);
    const int rc = kivi_decode_attention(qc, M, Hq, H, D, tables, nblk, lens, (int)d->bs,
                                         d->kc, d->ks, d->kz, d->kn, d->vc, d->vs, d->vz,
                                         (int)d->kbits, (int)d->vbits, (int)d->vgroup, d->s8_table, d->vzunit,
                                         d->res_row, d->rk, d->rv, (int)d->res_bf16, d->rope_cos, d->rope_sin,
                                         d->kperm, d->kgbits, (int)d->kbytes, d->scale, out);
    free(qc);
    if (rc) return rc;
    if (d->rot) kivi_rotate_f32(out, M, Q, Hq, D, d->rot_t);
    return 0;
}
