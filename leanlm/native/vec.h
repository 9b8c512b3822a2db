/* Helpers shared by the native kernels (included by ops.c and kivi_attention.c; the build cache
   key covers this header, see native/__init__.py): GCC vector types, bfloat16 rounding, a
   fixed-order lane sum, and exp a vector at a time. */
#ifndef LEANLM_VEC_H
#define LEANLM_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* vf: the target's own vector of VW floats. Without AVX-512, GCC keeps a 64-byte vector in
   memory, not in registers: every operation on it is a store and a reload, which made the
   attention and GEMM kernels 5-40x slower on an AVX2 CPU. The kernels loop over vf; with AVX-512
   it is the 16-float vector they were first written with, and the same operations. */
#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
typedef int vfi __attribute__((vector_size(VW * 4)));
typedef uint32_t u32xvf __attribute__((vector_size(VW * 4)));
typedef uint16_t u16xvf __attribute__((vector_size(VW * 2), aligned(2)));

/* a vector's two 8-lane halves added (with 8 lanes, the vector itself) */
#if VW == 16
#define HALVES(x) (__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) \
                   + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15))
#else
#define HALVES(x) (x)
#endif

/* float32 -> bfloat16, round to nearest even (torch's .to(torch.bfloat16); NaN stays a quiet NaN) */
static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* The lanes summed as a fixed tree (8 + 8, 4 + 4, ...): short dependency chains. */
static inline float hsum_vf(vf a) {
    const v8 b = HALVES(a);
    const v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* The lane sums of four vectors at once, {hsum_vf(a), ..., hsum_vf(d)} bit for bit (the same
   tree), with the shuffles shared (one reduction per query head and key was a long dependency
   chain each). */
static inline v4 hsum4(vf a, vf b, vf c, vf d) {
    const v8 a8 = HALVES(a), b8 = HALVES(b), c8 = HALVES(c), d8 = HALVES(d);
    const v8 ab = __builtin_shufflevector(a8, b8, 0, 1, 2, 3, 8, 9, 10, 11)
                + __builtin_shufflevector(a8, b8, 4, 5, 6, 7, 12, 13, 14, 15);  /* a 4 | b 4 */
    const v8 cd = __builtin_shufflevector(c8, d8, 0, 1, 2, 3, 8, 9, 10, 11)
                + __builtin_shufflevector(c8, d8, 4, 5, 6, 7, 12, 13, 14, 15);  /* c 4 | d 4 */
    const v8 e = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13)
               + __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);  /* a 2, c 2 | b 2, d 2 */
    const v4 f = __builtin_shufflevector(e, e, 0, 2, 4, 6) + __builtin_shufflevector(e, e, 1, 3, 5, 7);
    return __builtin_shufflevector(f, f, 0, 2, 1, 3);  /* f = a, c, b, d */
}
#undef HALVES

/* exp(x) lane by lane: x = n ln2 + r (|r| <= ln2 / 2), exp(r) by its degree-6 Taylor polynomial
   (relative error < 2e-7 on that range), 2^n built in the exponent bits. libm's expf is scalar
   here (GCC vectorises it only under -ffast-math): it made SiLU ~8% of a 512-token prefill, and
   attention's softmax (one expf per query head and cached token) ~half of a decode step's
   attention. Inputs below -87 give exp(-87) ~ 1.6e-38 instead of 0 (softmax: negligible). */
static inline vf exp_vf(vf x) {
    const vfi over = x > 88.f, under = x < -87.f;  /* clamp: 2^n stays a normal float */
    x = (vf)((over & (vfi)((vf){0} + 88.f)) | (under & (vfi)((vf){0} - 87.f))
             | (~(over | under) & (vfi)x));
    const vf t = x * 1.44269504f + 0.5f;
    vfi n = __builtin_convertvector(t, vfi);
    n -= (vfi)(__builtin_convertvector(n, vf) > t) & 1;  /* floor for negative t */
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;  /* ln2 in two parts (Cephes) */
    vf p = (vf){0} + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    return p * (vf)((n + 127) << 23);
}

/* Softmax numerators in place: p[t] = exp(p[t] - mx) for t < L; returns their sum (VW lanes,
   then the tail, in a fixed order: the same for a row whatever the batch). A -inf score (a
   masked token) gives 0. */
static inline float exp_shift_sum(float *p, long L, float mx) {
    vf acc = {0};
    long t = 0;
    for (; t + VW <= L; t += VW) {
        const vf x = *(const vf *)(p + t) - mx;
        const vf e = exp_vf(x);
        const vf y = (vf)((vfi)e & (x > -INFINITY));
        *(vf *)(p + t) = y;
        acc += y;
    }
    float s = hsum_vf(acc);
    for (; t < L; t++) {
        p[t] = expf(p[t] - mx);
        s += p[t];
    }
    return s;
}

#endif
