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

/* packed codes of one token and head -> D floats (layouts of pack_codes in kv/quantized.py) */
static inline void unpack(const uint8_t *p, int bits, int D, float *out) {
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
        uint64_t w = 0;                                                                  \
        memcpy(&w, p, B); /* a constant size: inlined; little-endian host (x86, arm64) */ \
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

static inline void load_row(const void *base, int bf16, size_t idx, int D, float *out) {
    if (bf16) { const uint16_t *r = (const uint16_t *)base + idx; for (int d = 0; d < D; d++) out[d] = bf2f(r[d]); }
    else memcpy(out, (const float *)base + idx, sizeof(float) * D);
}

#define MAXD 256
#define MAXG 16

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* sum of a[d] * b[d] in a fixed order: 16 lanes, then a tree over the lanes. A plain scalar loop
   is one dependent FMA at a time (the compiler may not reorder a float sum), which made the score
   pass latency-bound: ~4 cycles per element instead of ~1/16. */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
    if (n >= 16) {
        v16 acc = {0};
        for (; i + 16 <= n; i += 16) acc += *(const v16 *)(a + i) * *(const v16 *)(b + i);
        v8 h = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7)
             + __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
        v4 c = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
        s = (c[0] + c[2]) + (c[1] + c[3]);
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

/* q [B, Hq, D] float32; tables [B, nblk] block ids; lens [B] tokens each query attends to;
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
    int err = 0;
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int64_t L = lens[b];
            const int32_t *hperm = kperm ? kperm + (size_t)h * D : NULL;      /* kmix: this head's layout */
            const uint8_t *hgbits = kperm ? kgbits + (size_t)h * (D / 8) : NULL;
            float *sc = malloc(sizeof(float) * G * (L > 0 ? L : 1));
            if (!sc) { err = 1; continue; }
            float qs[MAXG][MAXD], c0[MAXG], buf[MAXD], acc[MAXG][MAXD], mx[MAXG], sum[MAXG];
            const float *qh = q + ((size_t)b * Hq + (size_t)h * G) * D;
            for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, blk++) {   /* scores */
                const int64_t block = tables[(size_t)b * nblk + blk], row = res_row[block];
                const int nt = L - t0 < bs ? (int)(L - t0) : bs;
                if (row >= 0) {
                    for (int t = 0; t < nt; t++) {
                        load_row(rk, res_bf16, (((size_t)row * bs + t) * H + h) * D, D, buf);
                        if (rope_cos)
                            rope_row(buf, rope_cos + (size_t)(t0 + t) * D, rope_sin + (size_t)(t0 + t) * D, D);
                        for (int g = 0; g < G; g++)
                            sc[(size_t)g * L + t0 + t] = dot(qh + g * D, buf, D) * scale;
                    }
                    continue;
                }
                const size_t kbase = ((size_t)block * H + h) * D;
                float s_c[MAXD], z_c[MAXD];
                for (int d = 0; d < D; d++) scale_zero(ks, kz, kbase + d, NULL, 0.f, &s_c[d], &z_c[d]);
                if (rope_cos) {  /* dequantize, rotate to the position, then the dots */
                    for (int t = 0; t < nt; t++) {
                        const size_t tok = ((size_t)block * bs + t) * H + h;
                        unpack_key(kc + tok * P, kbits, hperm, hgbits, D, buf);
                        for (int d = 0; d < D; d++) buf[d] = buf[d] * s_c[d] + z_c[d];
                        rope_row(buf, rope_cos + (size_t)(t0 + t) * D, rope_sin + (size_t)(t0 + t) * D, D);
                        for (int g = 0; g < G; g++)
                            sc[(size_t)g * L + t0 + t] = dot(qh + g * D, buf, D) * scale;
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
                for (int t = 0; t < nt; t++) {
                    const size_t tok = ((size_t)block * bs + t) * H + h;
                    unpack_key(kc + tok * P, kbits, hperm, hgbits, D, buf);
                    const float norm = kn ? h2f(kn[tok]) : 1.f;
                    for (int g = 0; g < G; g++)
                        sc[(size_t)g * L + t0 + t] = (dot(qs[g], buf, D) + c0[g]) * norm * scale;
                }
            }
            for (int g = 0; g < G; g++) {                                 /* softmax */
                float m = -INFINITY, z = 0.f;
                for (int64_t t = 0; t < L; t++) m = sc[(size_t)g * L + t] > m ? sc[(size_t)g * L + t] : m;
                for (int64_t t = 0; t < L; t++) { float e = expf(sc[(size_t)g * L + t] - m); sc[(size_t)g * L + t] = e; z += e; }
                mx[g] = m; sum[g] = z;
                for (int d = 0; d < D; d++) acc[g][d] = 0.f;
            }
            for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, blk++) {   /* values */
                const int64_t block = tables[(size_t)b * nblk + blk], row = res_row[block];
                const int nt = L - t0 < bs ? (int)(L - t0) : bs;
                for (int t = 0; t < nt; t++) {
                    const size_t tok = ((size_t)block * bs + t) * H + h;
                    if (row >= 0) load_row(rv, res_bf16, (((size_t)row * bs + t) * H + h) * D, D, buf);
                    else {
                        unpack(vc + tok * PV, vbits, D, buf);
                        for (int c = 0; c < ng; c++) {
                            float s, z;
                            scale_zero(vs, vz, tok * ng + c, s8_table, vzunit, &s, &z);
                            for (int d = c * vgroup; d < (c + 1) * vgroup; d++) buf[d] = buf[d] * s + z;
                        }
                    }
                    for (int g = 0; g < G; g++) {
                        const float p = sc[(size_t)g * L + t0 + t];
                        for (int d = 0; d < D; d++) acc[g][d] += p * buf[d];
                    }
                }
            }
            for (int g = 0; g < G; g++) {
                float *o = out + ((size_t)b * Hq + (size_t)h * G + g) * D;
                const float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
                for (int d = 0; d < D; d++) o[d] = acc[g][d] * inv;
            }
            (void)mx;
            free(sc);
        }
    return err ? -2 : 0;
}
