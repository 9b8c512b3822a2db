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
#include <stdlib.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* Sum of a[i] * b[i] in a fixed order: 16 lanes, then the lanes in order (the compiler may not
   reorder a scalar float sum itself, which would leave it one FMA at a time). Loads go through
   the (4-byte aligned) vector type: a memcpy into a v16 compiled to two 32-byte stores and a
   64-byte reload, a store-forwarding stall that made attention 10x slower. */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
    if (n >= 16) {
        v16 acc = {0};
        for (; i + 16 <= n; i += 16) {
            acc += *(const v16 *)(a + i) * *(const v16 *)(b + i);
        }
        for (int l = 0; l < 16; l++) s += acc[l];
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

typedef int v16i __attribute__((vector_size(64)));

/* exp(x) for 16 floats: x = n ln2 + r (|r| <= ln2 / 2), exp(r) by its degree-6 Taylor polynomial
   (relative error < 2e-7 on that range), 2^n built in the exponent bits. libm's expf is scalar
   here (GCC vectorises it only under -ffast-math), which made SiLU ~8% of a 512-token prefill. */
static inline v16 exp16(v16 x) {
    const v16i over = x > 88.f, under = x < -87.f;  /* clamp: 2^n stays a normal float */
    x = (v16)((over & (v16i)((v16){0} + 88.f)) | (under & (v16i)((v16){0} - 87.f))
              | (~(over | under) & (v16i)x));
    const v16 t = x * 1.44269504f + 0.5f;
    v16i n = __builtin_convertvector(t, v16i);
    n -= (v16i)(__builtin_convertvector(n, v16) > t) & 1;  /* floor for negative t */
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;  /* ln2 in two parts (Cephes) */
    v16 p = (v16){0} + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    return p * (v16)((n + 127) << 23);
}

/* gate_up [M, 2I] (gate then up) -> out [M, I] = silu(gate) * up. */
void silu_mul_f32(const float *gu, int M, int I, float *out) {
    #pragma omp parallel for schedule(static) if ((long)M * I >= 65536)
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * I, *u = g + I;
        float *o = out + (size_t)m * I;
        int i = 0;
        for (; i + 16 <= I; i += 16) {
            const v16 gv = *(const v16 *)(g + i);
            *(v16 *)(o + i) = gv / (1.f + exp16(-gv)) * *(const v16 *)(u + i);
        }
        for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* Half-split (NeoX / HF Llama) rotary embedding, in place, on H heads of D per row:
   x[m] starts at x + m * row_stride; cos, sin_signed [M, D] (sin with its first half negated):
   x = x * cos + cat(x2, x1) * sin_signed. */
void rope_f32(float *x, int M, int H, int D, long row_stride, const float *cos,
              const float *sin_signed) {
    const int half = D / 2;
    for (int m = 0; m < M; m++) {
        const float *c = cos + (size_t)m * D, *s = sin_signed + (size_t)m * D;
        for (int h = 0; h < H; h++) {
            float *v = x + (size_t)m * row_stride + (size_t)h * D;
            for (int i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

#define MAX_DV 16  /* head dims up to 256 accumulate in registers */
#define MAX_G 16   /* query heads per KV head handled together */

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* The 16 lanes summed as a fixed tree (8 + 8, 4 + 4, ...): short dependency chains. */
static inline float hsum(v16 a) {
    v8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* Attention of R query rows over a paged float32 cache, each row on its own context:
   q [R, Hq, D] (rows q_stride floats apart); kc, vc [slots, Hkv, D]; row r attends to the first lens[r] tokens of the blocks
   tables[r, :] (slot = block * bs + offset); out [R, Hq, D]. The G = Hq / Hkv query heads of a KV
   head share its keys (GQA) and are scored together, each key read once. Softmax in float32 with
   the max subtracted, as SDPA. */
int paged_attention_f32(const float *q, long q_stride, int R, int Hq, int Hkv, int D,
                        const float *kc, const float *vc, const long *tables, int nblk,
                        const long *lens, int bs, float scale, float *out) {
    const int G = Hq / Hkv;
    const int fast = D % 16 == 0 && D <= 16 * MAX_DV && G <= MAX_G;
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
                const float *kb = kc + ((size_t)tab[b] * bs * Hkv + h) * D;
                for (int i = 0; i < n; i++) {
                    const float *kv = kb + (size_t)i * Hkv * D;
                    if (fast && D == 64) {
                        const v16 k0 = *(const v16 *)kv, k1 = *(const v16 *)(kv + 16),
                                  k2 = *(const v16 *)(kv + 32), k3 = *(const v16 *)(kv + 48);
                        for (int g = 0; g < G; g++) {
                            const float *qv = qh + (size_t)g * D;
                            const v16 a = k0 * *(const v16 *)qv + k1 * *(const v16 *)(qv + 16)
                                        + k2 * *(const v16 *)(qv + 32) + k3 * *(const v16 *)(qv + 48);
                            p[(size_t)g * L + t0 + i] = hsum(a) * scale;
                        }
                    } else {
                        for (int g = 0; g < G; g++)
                            p[(size_t)g * L + t0 + i] = dot(qh + (size_t)g * D, kv, D) * scale;
                    }
                }
            }
            float inv[MAX_G > 1 ? MAX_G : 1];
            for (int g = 0; g < G; g++) {
                float *pg = p + (size_t)g * L, mx = -INFINITY, sum = 0.f;
                for (int t = 0; t < L; t++) mx = pg[t] > mx ? pg[t] : mx;
                for (int t = 0; t < L; t++) {
                    pg[t] = expf(pg[t] - mx);
                    sum += pg[t];
                }
                if (g < MAX_G) inv[g] = 1.f / sum;
                if (!fast) {  /* generic head dims: one query at a time, in memory */
                    float *o = oh + (size_t)g * D;
                    for (int i = 0; i < D; i++) o[i] = 0.f;
                    for (int t0 = 0, b = 0; t0 < L; t0 += bs, b++) {
                        const int n = L - t0 < bs ? L - t0 : bs;
                        const float *vb = vc + ((size_t)tab[b] * bs * Hkv + h) * D;
                        for (int i = 0; i < n; i++)
                            for (int d = 0; d < D; d++) o[d] += pg[t0 + i] * vb[(size_t)i * Hkv * D + d];
                    }
                    for (int d = 0; d < D; d++) o[d] /= sum;
                }
            }
            if (fast)  /* weighted values, in registers, one query at a time */
                for (int g = 0; g < G; g++) {
                    const float *pg = p + (size_t)g * L;
                    v16 acc[MAX_DV];
                    const int nv = D / 16;
                    for (int j = 0; j < nv; j++) acc[j] = (v16){0};
                    for (int t0 = 0, b = 0; t0 < L; t0 += bs, b++) {
                        const int n = L - t0 < bs ? L - t0 : bs;
                        const float *vb = vc + ((size_t)tab[b] * bs * Hkv + h) * D;
                        for (int i = 0; i < n; i++) {
                            const float *vv = vb + (size_t)i * Hkv * D, w = pg[t0 + i];
                            for (int j = 0; j < nv; j++) acc[j] += w * *(const v16 *)(vv + 16 * j);
                        }
                    }
                    for (int j = 0; j < nv; j++) *(v16 *)(oh + (size_t)g * D + 16 * j) = acc[j] * inv[g];
                }
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

typedef struct {
    linear_t qkv, o, gate_up, down;
    const float *norm_in, *norm_post;
    float *kc, *vc;          /* this layer's cache, [slots, Hkv, D] float32 */
} layer_t;

typedef struct {
    long H, Hq, Hkv, D, I, bs;
    float eps, scale;        /* scale: the attention's, as the Python path passes it (D ** -0.5) */
    sgemm_fn sgemm;
    qgemm_fn qgemm;
} model_t;

static void linear(const model_t *c, const linear_t *l, const float *x, int M, float *y) {
    if (l->kind == 0) c->sgemm(x, M, (int)l->K, (const float *)l->w, (int)l->N, y, l->bias);
    else c->qgemm(x, M, (int)l->K, (const signed char *)l->w, (int)l->N, l->scale, y, l->bias);
}

/* x [M, H] is updated in place through layers[0..n); cos, sin_signed [M, D]; slots [M] where each
   row's K/V goes; row m attends to its first lens[m] tokens of tables[m, :nblk]; work holds
   M * (4H + QKV + Q + 3I) floats. Returns 0, or -2 when attention could not allocate its scores. */
int decoder_layers_f32(float *x, int M, const model_t *c, const layer_t *layers, int n,
                        const float *cos, const float *sin_signed, const long *slots,
                        const long *tables, int nblk, const long *lens, float *work) {
    const long H = c->H, D = c->D, Q = c->Hq * D, KV = c->Hkv * D, QKV = Q + 2 * KV, I = c->I;
    float *h = work, *qkv = h + M * H, *attn = qkv + M * QKV, *o = attn + M * Q;
    float *x2 = o + M * H, *gu = x2 + M * H, *act = gu + M * 2 * I, *d = act + M * I;
    for (int li = 0; li < n; li++) {
        const layer_t *L = layers + li;
        rmsnorm_f32(x, M, (int)H, L->norm_in, c->eps, h);
        linear(c, &L->qkv, h, M, qkv);
        rope_f32(qkv, M, (int)(c->Hq + c->Hkv), (int)D, QKV, cos, sin_signed);
        for (int m = 0; m < M; m++) {
            const float *row = qkv + (size_t)m * QKV;
            for (long i = 0; i < KV; i++) {
                L->kc[slots[m] * KV + i] = row[Q + i];
                L->vc[slots[m] * KV + i] = row[Q + KV + i];
            }
        }
        if (paged_attention_f32(qkv, QKV, M, (int)c->Hq, (int)c->Hkv, (int)D, L->kc, L->vc, tables,
                                nblk, lens, (int)c->bs, c->scale, attn))
            return -2;
        linear(c, &L->o, attn, M, o);
        add_rmsnorm_f32(x, o, M, (int)H, L->norm_post, c->eps, x2, h);
        linear(c, &L->gate_up, h, M, gu);
        silu_mul_f32(gu, M, (int)I, act);
        linear(c, &L->down, act, M, d);
        for (long i = 0; i < M * H; i++) x[i] = x2[i] + d[i];
    }
    return 0;
}
