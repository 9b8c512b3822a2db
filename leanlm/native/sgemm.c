/* Float32 y[M,N] = x[M,K] W^T (+ bias) for the small M of decoding and speculative verification.

Why: MKL's sgemm is tuned for large M. At M = 1 it reads the weights at memory speed, but at
M = 2..16 (a verification of k drafts, a small decode batch) it gets slower almost linearly in M
(SmolLM2-135M's 30 layers: 16 ms at M=1, 35 ms at M=9), although the weights, the bytes that
bound the step, are the same. Here W is repacked once into 16-column panels, [N/16][K][16], so
each step streams every weight once per tile of up to 12 rows: one vector load of 16 weights
feeds up to 12 FMAs, and M = 9 costs about 1.3x M = 1 instead of 2.2x.

Every output row is computed by the same sequence of FMAs whatever M and the tiling are (k in
order, one accumulator per 16 columns), so results are batch-invariant: a row's logits do not
depend on which other rows share the call. Speculative verification of k+1 tokens therefore
gives bit-identical logits to k+1 single-token decode steps.

Written with GCC vector extensions rather than intrinsics so it builds for any target, in
vectors of the target's width (VW floats): one panel row of 16 floats is PV = 16 / VW of them.
GCC lowers a 64-byte vector on a CPU without AVX-512 through the stack, so a 16-float accumulator
type there made every FMA a load and a store (512-row prefill on an AVX2 EPYC ran 40x slower
than torch's sgemm).

Tile sizes by register file: the mr x nb x PV accumulators and the nb x PV weight vectors of one
k must stay in registers. AVX-512 has 32 registers of 16 floats: 12 rows x 2 panels, or 4 x 4.
AVX2 has 16 of 8: 6 rows x 1 panel (12 accumulators, 2 weights, one broadcast) is BLIS's Haswell
tile, used for prefill; decode batches of up to 8 rows run as tiles of at most 4 rows over 2
panels (16 accumulators, the weights fed to the FMAs straight from memory), or 1-2 rows over 4:
one panel per tile was a single weight stream per core, and M = 4 cost 1.6x M = 1 although the
weight bytes, which bound the step, are the same (now 1.25x; M = 8 1.2x faster too). */
#include <stddef.h>

#include "vec.h"  /* VW and vf: the target's vector width */

#if VW == 16  /* AVX-512 */
#define MAX_MR 12
static inline int panels_per_tile(int rows) { return rows <= 4 ? 4 : 2; }
#else
#define MAX_MR 6
static inline int panels_per_tile(int rows) { return rows <= 2 ? 4 : (rows <= 4 ? 2 : 1); }
#endif
#define PV (16 / VW)
#define MAX_NB 4


static inline __attribute__((always_inline)) void tile(
        const float *x, int K, int mr, const float *wp, int nb, float *y, int N, int n0,
        const float *bias) {
    vf acc[MAX_MR][MAX_NB * PV];
    const size_t panel = (size_t)K * 16;
    const int nv = nb * PV;
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nv; j++) acc[m][j] = (vf){0};
    for (int k = 0; k < K; k++) {
        vf w[MAX_NB * PV];
        for (int j = 0; j < nv; j++)
            w[j] = *(const vf *)(wp + (j / PV) * panel + (size_t)k * 16 + (j % PV) * VW);
        for (int m = 0; m < mr; m++) {
            const float xs = x[(size_t)m * K + k];
            for (int j = 0; j < nv; j++) acc[m][j] += xs * w[j];
        }
    }
    for (int j = 0; j < nv; j++) {
        const int c = n0 + (j / PV) * 16 + (j % PV) * VW, cols = N - c < VW ? N - c : VW;
        if (cols <= 0) continue;
        vf b = {0};
        if (bias)
            for (int i = 0; i < cols; i++) b[i] = bias[c + i];
        for (int m = 0; m < mr; m++) {
            vf r = acc[m][j] + b;
            float *out = y + (size_t)m * N + c;
            if (cols == VW) *(vf *)out = r;
            else for (int i = 0; i < cols; i++) out[i] = r[i];
        }
    }
}

/* One tile with compile-time sizes (each case becomes its own fully unrolled kernel). */
static void run_tile(const float *x, int K, int mr, const float *wp, int nb, float *y, int N,
                     int n0, const float *bias) {
    switch (mr * 8 + nb) {
#define T(MR, NB) case MR * 8 + NB: tile(x, K, MR, wp, NB, y, N, n0, bias); break;
    T(1, 1) T(1, 2) T(1, 4) T(2, 1) T(2, 2) T(2, 4) T(3, 1) T(3, 2) T(3, 4)
    T(4, 1) T(4, 2) T(4, 4) T(5, 1) T(5, 2) T(5, 4) T(6, 1) T(6, 2) T(6, 4)
#if MAX_MR > 6
    T(7, 1) T(7, 2) T(8, 1) T(8, 2) T(9, 1) T(9, 2) T(10, 1) T(10, 2)
    T(11, 1) T(11, 2) T(12, 1) T(12, 2)
#endif
#undef T
    }
}

/* x [M, K] row-major, wp the packed weight [ceil(N/16)][K][16] (zero-padded columns),
   y [M, N] row-major, bias [N] or NULL. */
void sgemm_packed(const float *x, int M, int K, const float *wp, int N, float *y,
                  const float *bias) {
    const int panels = (N + 15) / 16;
    const int cap = (VW == 8 && M <= 8) ? 4 : MAX_MR;  /* rows per tile at most (see the top) */
    const int mt = M <= cap ? M : (M + ((M + cap - 1) / cap) - 1) / ((M + cap - 1) / cap);  /* balanced */
    const int nb_max = panels_per_tile(mt);
    const int groups = (panels + nb_max - 1) / nb_max, mtiles = (M + mt - 1) / mt;
    #pragma omp parallel for schedule(static) collapse(2) if ((long)M * N * K > 65536)
    for (int g = 0; g < groups; g++)
        for (int t = 0; t < mtiles; t++) {
            const int p = g * nb_max, m0 = t * mt;
            const int mr = M - m0 < mt ? M - m0 : mt;
            int left = panels - p < nb_max ? panels - p : nb_max;
            const float *xt = x + (size_t)m0 * K;
            float *yt = y + (size_t)m0 * N;
            for (int q = p; left > 0;) {  /* a group of 3 panels runs as 2 + 1 */
                const int nb = left >= 4 ? 4 : (left >= 2 ? 2 : 1);
                run_tile(xt, K, mr, wp + (size_t)q * K * 16, nb, yt, N, q * 16, bias);
                q += nb;
                left -= nb;
            }
        }
}
