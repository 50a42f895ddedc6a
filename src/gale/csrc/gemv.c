/* Matrix-vector products over weights kept in llama.cpp's 32-wide blocks, activations and sums in fp32.
 *
 * y[v, r] = sum_c W[r, c] * x[v, c] for a few vectors v (decode: one token per sequence), reading each
 * weight block once for all of them. Weights stay 4- or 8-bit in memory; nothing is rounded on the
 * activation side (llama.cpp rounds activations to 8 bits, which derails small models).
 *
 * Layouts (per row r, block b of 32 columns):
 *   Q4: qs[r][b][16] nibbles (low nibble = column j, high = column j + 16), fp16 scale d and offset m:
 *       W = d * q + m (Q4_1; Q4_0 is loaded as m = -8 d).
 *   Q8: qs[r][b][32] int8, fp16 scale d: W = d * q.
 * With sum_j W x_j = d * sum_j q x_j + m * sum_j x_j, the offset costs one product per block per vector.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GALE_AVX2 1
#endif

#define MAX_VECTORS 8

static inline float h2f(uint16_t h) {
#ifdef GALE_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

#ifdef GALE_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Sum of each 32-block of each vector: the Q4 offset term. */
static void block_sums(const float *x, int64_t n, int64_t cols, float *out) {
    int64_t nb = cols / 32;
    for (int64_t v = 0; v < n; v++)
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += x[v * cols + b * 32 + j];
            out[v * nb + b] = s;
        }
}

#ifdef GALE_AVX2
/* The 32 weights of a block as four vectors of 8 floats (before scale and offset). */
static inline void unpack_q4(const uint8_t *q, __m256 w[4]) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m128i raw = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void unpack_q8(const int8_t *q, __m256 w[4]) {
    for (int k = 0; k < 4; k++)
        w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * k))));
}

static inline __m256 dot32(const __m256 w[4], const float *x) {
    __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), s);
    s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), s);
    return _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), s);
}
#endif

/* One output row for n vectors. q8: int8 blocks of 32 bytes (m unused); else nibble blocks of 16 bytes. */
static inline void row_dot(int q8, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *x,
                           const float *xs, int64_t nb, int64_t cols, int64_t n, float *out) {
    int64_t bytes = q8 ? 32 : 16;
#ifdef GALE_AVX2
    __m256 w[4];
    if (n == 1) { /* decode at batch 1: keep everything in registers */
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        float off = 0.f;
        int64_t b = 0;
        for (; b + 1 < nb; b += 2) {
            if (q8) unpack_q8((const int8_t *)qs + b * bytes, w); else unpack_q4(qs + b * bytes, w);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(d[b])), dot32(w, x + b * 32), acc0);
            if (q8) unpack_q8((const int8_t *)qs + (b + 1) * bytes, w); else unpack_q4(qs + (b + 1) * bytes, w);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(d[b + 1])), dot32(w, x + (b + 1) * 32), acc1);
            if (!q8) off += h2f(m[b]) * xs[b] + h2f(m[b + 1]) * xs[b + 1];
        }
        for (; b < nb; b++) {
            if (q8) unpack_q8((const int8_t *)qs + b * bytes, w); else unpack_q4(qs + b * bytes, w);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(d[b])), dot32(w, x + b * 32), acc0);
            if (!q8) off += h2f(m[b]) * xs[b];
        }
        out[0] = hsum(_mm256_add_ps(acc0, acc1)) + off;
        return;
    }
    __m256 acc[MAX_VECTORS];
    float off[MAX_VECTORS] = {0};
    for (int64_t v = 0; v < n; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (q8) unpack_q8((const int8_t *)qs + b * bytes, w); else unpack_q4(qs + b * bytes, w);
        __m256 vd = _mm256_set1_ps(h2f(d[b]));
        float mb = q8 ? 0.f : h2f(m[b]);
        for (int64_t v = 0; v < n; v++) {
            acc[v] = _mm256_fmadd_ps(vd, dot32(w, x + v * cols + b * 32), acc[v]);
            if (!q8) off[v] += mb * xs[v * nb + b];
        }
    }
    for (int64_t v = 0; v < n; v++) out[v] = hsum(acc[v]) + off[v];
#else
    float acc[MAX_VECTORS] = {0}, w[32];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = qs + b * bytes;
        for (int j = 0; j < 16 && !q8; j++) {
            w[j] = (float)(q[j] & 0x0f);
            w[j + 16] = (float)(q[j] >> 4);
        }
        for (int j = 0; j < 32 && q8; j++) w[j] = (float)((const int8_t *)q)[j];
        float db = h2f(d[b]), mb = q8 ? 0.f : h2f(m[b]);
        for (int64_t v = 0; v < n; v++) {
            const float *xb = x + v * cols + b * 32;
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += w[j] * xb[j];
            acc[v] += db * s + (q8 ? 0.f : mb * xs[v * nb + b]);
        }
    }
    for (int64_t v = 0; v < n; v++) out[v] = acc[v];
#endif
}

static void gemv(int q8, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *x, float *y,
                 int64_t rows, int64_t cols, int64_t n, int threads) {
    int64_t nb = cols / 32, bytes = q8 ? 32 : 16;
    float *xs = NULL;
    if (!q8) {
        xs = malloc(sizeof(float) * n * nb);
        block_sums(x, n, cols, xs);
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        float out[MAX_VECTORS];
        row_dot(q8, qs + r * nb * bytes, d + r * nb, q8 ? NULL : m + r * nb, x, xs, nb, cols, n, out);
        for (int64_t v = 0; v < n; v++) y[v * rows + r] = out[v];
    }
    free(xs);
}

void gale_q4_gemv(const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *x, float *y,
                  int64_t rows, int64_t cols, int64_t n, int threads) {
    gemv(0, qs, d, m, x, y, rows, cols, n, threads);
}

void gale_q8_gemv(const int8_t *qs, const uint16_t *d, const float *x, float *y, int64_t rows, int64_t cols,
                  int64_t n, int threads) {
    gemv(1, (const uint8_t *)qs, d, NULL, x, y, rows, cols, n, threads);
}

/* fp32 copy of the weights, for many vectors at once (prefill), where a GEMM beats re-reading blocks. */
void gale_q4_dequant(const uint8_t *qs, const uint16_t *d, const uint16_t *m, float *w, int64_t rows,
                     int64_t cols, int threads) {
    int64_t nb = cols / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = qs + (r * nb + b) * 16;
            float db = h2f(d[r * nb + b]), mb = h2f(m[r * nb + b]);
            float *out = w + r * cols + b * 32;
            for (int j = 0; j < 16; j++) {
                out[j] = db * (float)(q[j] & 0x0f) + mb;
                out[j + 16] = db * (float)(q[j] >> 4) + mb;
            }
        }
}

void gale_q8_dequant(const int8_t *qs, const uint16_t *d, float *w, int64_t rows, int64_t cols, int threads) {
    int64_t nb = cols / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            float db = h2f(d[r * nb + b]);
            for (int j = 0; j < 32; j++) w[r * cols + b * 32 + j] = db * (float)qs[(r * nb + b) * 32 + j];
        }
}
