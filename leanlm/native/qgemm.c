/* y[M,N] = x[M,K] (W q)^T * scale[N] (+ bias) for symmetric per-output-channel INT8 weights and
float32 activations, at the small M of decoding, drafting and speculative verification.

Why: torch's CPU int8 weight-only matmul (_weight_int8pack_mm) is fast only with bfloat16
activations, so a float32 model rounds every activation to bfloat16 for it, and even then it
reads the codes at ~11 GB/s on the machines measured (9 ms per token for SmolLM2-135M's 106 MB of
int8 linears, against ~13 ms for the 4x larger float32 weights on sgemm.c). This kernel is
sgemm.c's with int8 panels: W is repacked once into 16-column panels [N/16][K][16] of int8 codes,
each step streams every code once per tile of up to 12 rows, widening 16 codes to floats in
registers, and applies the per-channel scale once at the end. Activations stay float32.

Every output row gets the same sequence of FMAs whatever M is (k in order, one accumulator per 16
columns), so a row's result does not depend on the other rows in the call (batch-invariant), as
in sgemm.c: a self-speculative int8 draft decodes the same tokens alone or in a batch. */
#include <stddef.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "vec.h"  /* VW and vf: the target's vector width */

/* Vectors of the target's width (VW floats; one 16-code panel row is PV of them): GCC lowers a
   64-byte vector without AVX-512 through the stack (see sgemm.c). Tile sizes by register file, as
   in sgemm.c: AVX-512 takes 12 rows x 2 panels and 8 panels at one or two rows (8 independent FMA
   chains hide the FMA latency that 4 left exposed; the widening adds two instructions per 16
   codes); AVX2's 16 registers of 8 floats take 6 x 1 for prefill, and decode batches of up to 8
   rows tiles of at most 4 rows x 2 panels, or 1 x 4 (as in sgemm.c: M = 4 and 8 1.13-1.15x
   faster than with one panel per tile; 2 rows stay at 2 panels, which 4 made slower here). */
#if VW == 16  /* AVX-512 */
#define MAX_MR 12
static inline int panels_per_tile(int rows) { return rows <= 2 ? 8 : rows <= 4 ? 4 : 2; }
#else
#define MAX_MR 6
static inline int panels_per_tile(int rows) { return rows == 1 ? 4 : (rows <= 4 ? 2 : 1); }
#endif
#define PV (16 / VW)
#define MAX_NB 8
#define PF_K 64  /* prefetch distance in k (1 KB per panel) */

typedef signed char vfi8 __attribute__((vector_size(VW), aligned(1)));

/* VW int8 codes -> VW floats. GCC 12 scalarises the generic conversion (one movsx per code),
   which made the kernel 7x slower than torch's; AVX-512 and AVX2 do it in two instructions. */
static inline __attribute__((always_inline)) vf widen(const signed char *p) {
#ifdef __AVX512F__
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    return __builtin_convertvector(__builtin_convertvector(*(const vfi8 *)p, vfi), vf);
#endif
}

static inline __attribute__((always_inline)) void tile(
        const float *x, int K, int mr, const signed char *wp, int nb, float *y, int N, int n0,
        const float *scale, const float *bias) {
    vf acc[MAX_MR][MAX_NB * PV];
    const size_t panel = (size_t)K * 16;
    const int nv = nb * PV;
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nv; j++) acc[m][j] = (vf){0};
    for (int k = 0; k < K; k++) {
        if ((k & 3) == 0)  /* one 64-byte line per panel every 4 k: fetch the line PF_K ahead */
            for (int j = 0; j < nb; j++) __builtin_prefetch(wp + j * panel + (size_t)(k + PF_K) * 16);
        vf w[MAX_NB * PV];
        for (int j = 0; j < nv; j++)
            w[j] = widen(wp + (j / PV) * panel + (size_t)k * 16 + (j % PV) * VW);
        for (int m = 0; m < mr; m++) {
            const float xs = x[(size_t)m * K + k];
            for (int j = 0; j < nv; j++) acc[m][j] += xs * w[j];
        }
    }
    for (int j = 0; j < nv; j++) {
        const int c = n0 + (j / PV) * 16 + (j % PV) * VW, cols = N - c < VW ? N - c : VW;
        if (cols <= 0) continue;
        vf s = {0}, b = {0};
        for (int i = 0; i < cols; i++) s[i] = scale[c + i];
        if (bias)
            for (int i = 0; i < cols; i++) b[i] = bias[c + i];
        for (int m = 0; m < mr; m++) {
            vf r = acc[m][j] * s + b;
            float *out = y + (size_t)m * N + c;
            if (cols == VW) *(vf *)out = r;
            else for (int i = 0; i < cols; i++) out[i] = r[i];
        }
    }
}

static void run_tile(const float *x, int K, int mr, const signed char *wp, int nb, float *y,
                     int N, int n0, const float *scale, const float *bias) {
    switch (mr * 16 + nb) {
#define T(MR, NB) case MR * 16 + NB: tile(x, K, MR, wp, NB, y, N, n0, scale, bias); break;
    T(1, 8) T(2, 8) T(1, 1) T(1, 2) T(1, 4) T(2, 1) T(2, 2) T(2, 4) T(3, 1) T(3, 2) T(3, 4)
    T(4, 1) T(4, 2) T(4, 4) T(5, 1) T(5, 2) T(5, 4) T(6, 1) T(6, 2) T(6, 4)
#if MAX_MR > 6
    T(7, 1) T(7, 2) T(8, 1) T(8, 2) T(9, 1) T(9, 2) T(10, 1) T(10, 2)
    T(11, 1) T(11, 2) T(12, 1) T(12, 2)
#endif
#undef T
    }
}

/* x [M, K] row-major float32, wp the packed codes [ceil(N/16)][K][16] (zero-padded columns),
   scale [N] float32, y [M, N] row-major, bias [N] or NULL. */
void qgemm_i8_packed(const float *x, int M, int K, const signed char *wp, int N,
                     const float *scale, float *y, const float *bias) {
    const int panels = (N + 15) / 16;
    const int cap = (VW == 8 && M <= 8) ? 4 : MAX_MR;  /* rows per tile at most (see above) */
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
            for (int q = p; left > 0;) {
                const int nb = left >= 8 && nb_max == 8 ? 8 : left >= 4 ? 4 : (left >= 2 ? 2 : 1);
                run_tile(xt, K, mr, wp + (size_t)q * K * 16, nb, yt, N, q * 16, scale, bias);
                q += nb;
                left -= nb;
            }
        }
}
