/* The small float32 operations of a decoder layer at decode / verification sizes, one call each.

Why: with the weights on the packed kernels (sgemm.c, qgemm.c), a float32 decode step of
SmolLM2-135M spent ~12 of its ~29 ms outside the matmuls, in ~25 torch ops per layer that each
cost 5-35 us of dispatch on a few hundred floats (F.rms_norm alone ~34 us: it decomposes into six
ops). Speculative decoding pays that for every draft token as well. Each function here is one
ctypes call of a few microseconds.

Every function handles rows independently with the same sequence of operations whatever the
number of rows, so results are batch-invariant (speculative verification of k+1 rows equals k+1
single-token steps bit for bit, as with the matmuls). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* Sum of a[i] * b[i] in a fixed order: VW lanes, then the lanes in order (the compiler may not
   reorder a scalar float sum itself, which would leave it one FMA at a time). Loads go through
   the (4-byte aligned) vector type: a memcpy into a 64-byte vector compiled to two 32-byte stores and a
   64-byte reload, a store-forwarding stall that made attention 10x slower. */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
    if (n >= VW) {
        vf acc = {0};
        for (; i + VW <= n; i += VW) {
            acc += *(const vf *)(a + i) * *(const vf *)(b + i);
        }
        for (int l = 0; l < VW; l++) s += acc[l];
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[m] = x[m] / rms(x[m]) * w, rms = sqrt(mean(x^2) + eps); x, out [M, N] (out may be x). */
void rmsnorm_f32(const float *x, int M, int N, const float *w, float eps, float *out) {
    #pragma omp parallel for schedule(static) if (M >= 64)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * N;
        float *o = out + (size_t)m * N;
        const float ss = dot(xr, xr, N);
        const float r = 1.f / sqrtf(ss / N + eps);
        for (int i = 0; i < N; i++) o[i] = xr[i] * r * w[i];
    }
}

/* The residual add fused with the next norm: sum[m] = x[m] + h[m]; out[m] = rmsnorm(sum[m]) * w. */
void add_rmsnorm_f32(const float *x, const float *h, int M, int N, const float *w, float eps,
                     float *sum, float *out) {
    #pragma omp parallel for schedule(static) if (M >= 64)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * N, *hr = h + (size_t)m * N;
        float *sr = sum + (size_t)m * N, *o = out + (size_t)m * N;
        for (int i = 0; i < N; i++) sr[i] = xr[i] + hr[i];
        const float r = 1.f / sqrtf(dot(sr, sr, N) / N + eps);
        for (int i = 0; i < N; i++) o[i] = sr[i] * r * w[i];
    }
}

/* gate_up [M, 2I] (gate then up) -> out [M, I] = silu(gate) * up. */
void silu_mul_f32(const float *gu, int M, int I, float *out) {
    #pragma omp parallel for schedule(static) if ((long)M * I >= 65536)
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * I, *u = g + I;
        float *o = out + (size_t)m * I;
        int i = 0;
        for (; i + VW <= I; i += VW) {
            const vf gv = *(const vf *)(g + i);
            *(vf *)(o + i) = gv / (1.f + exp_vf(-gv)) * *(const vf *)(u + i);
        }
        for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* The loops of a half-split rotation of H heads of D per row; INNER computes v[i], v[i + half]
   from a = v[i], b = v[i + half] and the row's tables c, s. */
#define ROPE_ROWS(...)                                                          \
    const int half = D / 2;                                                     \
    for (int m = 0; m < M; m++) {                                               \
        const float *c = cos + (size_t)m * D, *s = sin_signed + (size_t)m * D;  \
        for (int h = 0; h < H; h++) {                                           \
            float *v = x + (size_t)m * row_stride + (size_t)h * D;              \
            for (int i = 0; i < half; i++) {                                    \
                const float a = v[i], b = v[i + half];                          \
                __VA_ARGS__                                                     \
            }                                                                   \
        }                                                                       \
    }

/* Half-split (NeoX / HF Llama) rotary embedding, in place, on H heads of D per row:
   x[m] starts at x + m * row_stride; cos, sin_signed [M, D] (sin with its first half negated):
   x = x * cos + cat(x2, x1) * sin_signed. */
void rope_f32(float *x, int M, int H, int D, long row_stride, const float *cos,
              const float *sin_signed) {
    ROPE_ROWS(v[i] = a * c[i] + b * s[i]; v[i + half] = b * c[i + half] + a * s[i + half];)
}

/* The same rotation rounded as torch's RotaryEmbedding.apply rounds it (x * cos, cat(x2, x1) *
   sin_signed and their sum each rounded to float32, no fused multiply-add): the whole-layer
   executor rotates q with it where the module path rotates q in torch (kivi prerope), so the
   two paths stay equal bit for bit. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void rope_unfused_f32(float *x, int M, int H, int D, long row_stride, const float *cos,
                      const float *sin_signed) {
    ROPE_ROWS(const float a1 = a * c[i], b1 = b * s[i], b2 = b * c[i + half], a2 = a * s[i + half];
              v[i] = a1 + b1; v[i + half] = b2 + a2;)
}
#pragma GCC pop_options

/* VW cache values from float32 pages, or from bfloat16 pages widened exactly (bits << 16) */
static inline vf loadv(const void *base, size_t i, int bf16) {
    if (!bf16) return *(const vf *)((const float *)base + i);
    const u32xvf w = __builtin_convertvector(*(const u16xvf *)((const uint16_t *)base + i), u32xvf) << 16;
    return (vf)w;  /* a bit cast, in registers */
}

static inline float load1(const void *base, size_t i, int bf16) {
    if (!bf16) return ((const float *)base)[i];
    uint32_t w = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
}

#define MAX_DV 16  /* head dims up to 256 (16 x 16 floats) take the vector paths */

/* o = sum_t w[t] v_t * inv over a row's L cached values (head h): nv vectors of VW per value.
   Inlined with a constant nv (D = 64) its accumulators live in registers. */
static inline __attribute__((always_inline)) void weighted_values(
        const float *w, int L, const long *tab, int bs, int Hkv, int h, int D, int nv,
        const void *vc, int bf16, float inv, float *o) {
    vf acc[16 * MAX_DV / VW];
    for (int j = 0; j < nv; j++) acc[j] = (vf){0};
    for (int t0 = 0, b = 0; t0 < L; t0 += bs, b++) {
        const int n = L - t0 < bs ? L - t0 : bs;
        if (tab[b] < 0) continue;  /* evicted */
        const size_t vb = ((size_t)tab[b] * bs * Hkv + h) * D;
        for (int i = 0; i < n; i++) {
            const size_t vv = vb + (size_t)i * Hkv * D;
            const float wt = w[t0 + i];
            for (int j = 0; j < nv; j++) acc[j] += wt * loadv(vc, vv + VW * j, bf16);
        }
    }
    for (int j = 0; j < nv; j++) *(vf *)(o + VW * j) = acc[j] * inv;
}
#define MAX_G 16   /* query heads per KV head handled together */

/* Attention of R query rows over a paged cache, each row on its own context:
   q [R, Hq, D] (rows q_stride floats apart); kc, vc [slots, Hkv, D], float32, or bfloat16 when
   `bf16` (widened exactly as it is read); row r attends to the first lens[r] tokens of the blocks
   tables[r, :] (slot = block * bs + offset; a negative block id: evicted, its tokens skipped);
   out [R, Hq, D]. The G = Hq / Hkv query heads of a KV head share its keys (GQA) and are scored
   together, each key read once. Softmax in float32 with the max subtracted, as SDPA. */
int paged_attention_f32(const float *q, long q_stride, int R, int Hq, int Hkv, int D,
                        const void *kc, const void *vc, int bf16, const long *tables, int nblk,
                        const long *lens, int bs, float scale, float *out) {
    const int G = Hq / Hkv;
    const int fast = D % 16 == 0 && D <= 16 * MAX_DV && G <= MAX_G;
    if (bf16 && D > 16 * MAX_DV) return -1;  /* a bf16 key row is widened into a 256-float buffer */
    int err = 0;
    #pragma omp parallel for schedule(dynamic, 1) collapse(2) if ((long)R * Hkv >= 2)
    for (int r = 0; r < R; r++)
        for (int h = 0; h < Hkv; h++) {
            const int L = (int)lens[r];
            const long *tab = tables + (size_t)r * nblk;
            const float *qh = q + (size_t)r * q_stride + (size_t)h * G * D;
            float *oh = out + ((size_t)r * Hq + (size_t)h * G) * D;
            float *p = malloc(sizeof(float) * (size_t)G * (L > 0 ? L : 1));  /* scores [G][L] */
            if (!p) {
                err = 1;  /* reported after the loop (no early exit from an OpenMP loop) */
                continue;
            }
            /* scores: token by token, block by block (no division per token) */
            for (int t0 = 0, b = 0; t0 < L; t0 += bs, b++) {
                const int n = L - t0 < bs ? L - t0 : bs;
                if (tab[b] < 0) {  /* evicted (kv stream:...): its tokens get no weight */
                    for (int g = 0; g < G; g++)
                        for (int i = 0; i < n; i++) p[(size_t)g * L + t0 + i] = -INFINITY;
                    continue;
                }
                const size_t kb = ((size_t)tab[b] * bs * Hkv + h) * D;
                for (int i = 0; i < n; i++) {
                    const size_t kv = kb + (size_t)i * Hkv * D;
                    if (fast && D == 64) {  /* the key in 64 / VW registers, read once */
                        vf k[64 / VW];
                        for (int j = 0; j < 64 / VW; j++) k[j] = loadv(kc, kv + VW * j, bf16);
                        for (int g = 0; g < G; g++) {
                            const float *qv = qh + (size_t)g * D;
                            vf a = k[0] * *(const vf *)qv;
                            for (int j = 1; j < 64 / VW; j++) a += k[j] * *(const vf *)(qv + VW * j);
                            p[(size_t)g * L + t0 + i] = hsum_vf(a) * scale;
                        }
                    } else if (!bf16) {
                        for (int g = 0; g < G; g++)
                            p[(size_t)g * L + t0 + i] = dot(qh + (size_t)g * D, (const float *)kc + kv, D) * scale;
                    } else {
                        float kf[16 * MAX_DV];
                        for (int d = 0; d < D; d++) kf[d] = load1(kc, kv + d, 1);
                        for (int g = 0; g < G; g++)
                            p[(size_t)g * L + t0 + i] = dot(qh + (size_t)g * D, kf, D) * scale;
                    }
                }
            }
            float inv[MAX_G > 1 ? MAX_G : 1];
            for (int g = 0; g < G; g++) {
                float *pg = p + (size_t)g * L, mx = -INFINITY;
                for (int t = 0; t < L; t++) mx = pg[t] > mx ? pg[t] : mx;
                const float sum = exp_shift_sum(pg, L, mx);
                if (g < MAX_G) inv[g] = 1.f / sum;
                if (!fast) {  /* generic head dims: one query at a time, in memory */
                    float *o = oh + (size_t)g * D;
                    for (int i = 0; i < D; i++) o[i] = 0.f;
                    for (int t0 = 0, b = 0; t0 < L; t0 += bs, b++) {
                        const int n = L - t0 < bs ? L - t0 : bs;
                        if (tab[b] < 0) continue;
                        const size_t vb = ((size_t)tab[b] * bs * Hkv + h) * D;
                        for (int i = 0; i < n; i++)
                            for (int d = 0; d < D; d++) o[d] += pg[t0 + i] * load1(vc, vb + (size_t)i * Hkv * D + d, bf16);
                    }
                    for (int d = 0; d < D; d++) o[d] /= sum;
                }
            }
            if (fast && D == 64)  /* weighted values, 64 / VW accumulators in registers */
                for (int g = 0; g < G; g++)
                    weighted_values(p + (size_t)g * L, L, tab, bs, Hkv, h, 64, 64 / VW, vc, bf16, inv[g],
                                    oh + (size_t)g * D);
            else if (fast)  /* other head dims: up to 256 / VW accumulators (in memory without AVX-512) */
                for (int g = 0; g < G; g++)
                    weighted_values(p + (size_t)g * L, L, tab, bs, Hkv, h, D, D / VW, vc, bf16, inv[g],
                                    oh + (size_t)g * D);
            free(p);
        }
    return err ? -2 : 0;
}


/* ---- whole decoder layers ------------------------------------------------------------------
   The layers of a Llama-family model for a step of M rows (decode tokens and short chunks) in
   one call: the functions above plus the packed matmuls (passed in as function pointers from
   sgemm.c / qgemm.c), in exactly the order the Python modules call them, so the result is bit
   for bit what the module path computes; what disappears is ~150 us of Python per layer. */

typedef void (*sgemm_fn)(const float *, int, int, const float *, int, float *, const float *);
typedef void (*qgemm_fn)(const float *, int, int, const signed char *, int, const float *, float *,
                         const float *);

typedef struct {
    long kind;               /* 0: float32 panels (sgemm), 1: int8 panels + scales (qgemm) */
    long N, K;
    const void *w;
    const float *scale, *bias;
} linear_t;

/* A layer's attention on a cache the executor does not lay out itself (a KV codec: kivi):
   given the step's rows after the qkv projection and RoPE (qkv [M, stride], q then k then v), it
   stores k and v and writes the attention output [M, Hq, D]; `layer` is its descriptor, `step`
   the codec's per-step plan. Returns 0 or an error code. */
typedef int (*attend_fn)(const void *layer, const void *step, float *qkv, int M, long stride,
                         const long *slots, const long *tables, int nblk, const long *lens, float *out);

typedef struct {
    linear_t qkv, o, gate_up, down;
    const float *norm_in, *norm_post;
    void *kc, *vc;           /* this layer's cache, [slots, Hkv, D] (cache kind 0 or 1) */
    long cache_kind;         /* 0: float32 pages, 1: bfloat16 pages, 2: the model's attend() on `attn` */
    const void *attn;        /* kind 2: the codec's descriptor of this layer */
} layer_t;

typedef struct {
    long H, Hq, Hkv, D, I, bs;
    float eps, scale;        /* scale: the attention's, as the Python path passes it (D ** -0.5) */
    sgemm_fn sgemm;
    qgemm_fn qgemm;
    attend_fn attend;        /* cache kind 2 */
    long rope_q_only;        /* keys enter the cache before RoPE (kivi prerope): rotate q alone,
                                rounded as torch rounds it (rope_unfused_f32) */
} model_t;

static void linear(const model_t *c, const linear_t *l, const float *x, int M, float *y) {
    if (l->kind == 0) c->sgemm(x, M, (int)l->K, (const float *)l->w, (int)l->N, y, l->bias);
    else c->qgemm(x, M, (int)l->K, (const signed char *)l->w, (int)l->N, l->scale, y, l->bias);
}

/* x [M, H] is updated in place through layers[0..n); cos, sin_signed [M, D]; slots [M] where each
   row's K/V goes; row m attends to its first lens[m] tokens of tables[m, :nblk]; work holds
   M * (4H + QKV + Q + 3I) floats; step: the codec's plan for kind-2 layers. Returns 0, -2 when
   attention could not allocate its scores, or the attend function's error. */
int decoder_layers_f32(float *x, int M, const model_t *c, const layer_t *layers, int n,
                        const float *cos, const float *sin_signed, const long *slots,
                        const long *tables, int nblk, const long *lens, float *work, const void *step) {
    const long H = c->H, D = c->D, Q = c->Hq * D, KV = c->Hkv * D, QKV = Q + 2 * KV, I = c->I;
    float *h = work, *qkv = h + M * H, *attn = qkv + M * QKV, *o = attn + M * Q;
    float *x2 = o + M * H, *gu = x2 + M * H, *act = gu + M * 2 * I, *d = act + M * I;
    for (int li = 0; li < n; li++) {
        const layer_t *L = layers + li;
        rmsnorm_f32(x, M, (int)H, L->norm_in, c->eps, h);
        linear(c, &L->qkv, h, M, qkv);
        if (c->rope_q_only) rope_unfused_f32(qkv, M, (int)c->Hq, (int)D, QKV, cos, sin_signed);
        else rope_f32(qkv, M, (int)(c->Hq + c->Hkv), (int)D, QKV, cos, sin_signed);
        if (L->cache_kind == 2) {
            const int rc = c->attend(L->attn, step, qkv, M, QKV, slots, tables, nblk, lens, attn);
            if (rc) return rc;
        } else {
            const int bf = L->cache_kind == 1;
            for (int m = 0; m < M; m++) {
                const float *row = qkv + (size_t)m * QKV;
                const size_t at = (size_t)slots[m] * KV;
                if (bf)
                    for (long i = 0; i < KV; i++) {
                        ((uint16_t *)L->kc)[at + i] = f2bf(row[Q + i]);
                        ((uint16_t *)L->vc)[at + i] = f2bf(row[Q + KV + i]);
                    }
                else
                    for (long i = 0; i < KV; i++) {
                        ((float *)L->kc)[at + i] = row[Q + i];
                        ((float *)L->vc)[at + i] = row[Q + KV + i];
                    }
            }
            if (paged_attention_f32(qkv, QKV, M, (int)c->Hq, (int)c->Hkv, (int)D, L->kc, L->vc, bf, tables,
                                    nblk, lens, (int)c->bs, c->scale, attn))
                return -2;
        }
        linear(c, &L->o, attn, M, o);
        add_rmsnorm_f32(x, o, M, (int)H, L->norm_post, c->eps, x2, h);
        linear(c, &L->gate_up, h, M, gu);
        silu_mul_f32(gu, M, (int)I, act);
        linear(c, &L->down, act, M, d);
        for (long i = 0; i < M * H; i++) x[i] = x2[i] + d[i];
    }
    return 0;
}
