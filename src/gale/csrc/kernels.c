/* CPU kernels over weights kept in llama.cpp's 32-wide blocks; activations and sums stay fp32.
 *
 * 1. Matrix-vector products (gale_gemv) and dequantization (gale_dequant) of one block matrix.
 * 2. gale_decode: every layer of a decode step (one new token per sequence) in one call, so a token
 *    costs one Python call instead of ~40 torch ops per layer (each 3-10 us on a small CPU). It computes
 *    what model.py's Attention/FeedForward do for a decode step, over the engine's rolling KV cache, and
 *    tests compare the two.
 *
 * y[v, r] = sum_c W[r, c] * x[v, c] for a few vectors v (decode: one token per sequence), reading each
 * weight block once for all of them. Weights stay 4- or 8-bit in memory; nothing is rounded on the
 * activation side (llama.cpp rounds activations to 8 bits, which derails small models).
 *
 * Weights are read in GGUF's own block records (so a memory-mapped file is used in place, no copy), per row
 * r and block b of 32 columns:
 *   Q4_0 {fp16 d, qs[16]}, 18 bytes: W = d * q - 8 d;   Q4_1 {fp16 d, fp16 m, qs[16]}, 20 bytes: W = d * q + m;
 *   Q8_0 {fp16 d, int8 qs[32]}, 34 bytes: W = d * q.   Nibbles: low = column j, high = column j + 16.
 *
 * Several vectors (batched decode) share each block, dequantized once to fp32 in registers, by fp32 FMAs.
 * A single vector (decode at batch 1) takes an integer inner loop that keeps fp32 accuracy: each 32-block
 * of x is split as x = s * (hi + lo / 2^15) with int16 hi, lo and an fp32 scale s (~30 bits, finer than
 * the fp32 rounding of x * (1/s) itself), and both halves go through vpmaddwd with the 4/8-bit weights.
 * Measured against double-precision sums it is as exact as the fp32 path (tests/test_quant.py), and 2x
 * faster here: converting nibbles to fp32 was the cost. With sum_j W x_j = d * sum_j q x_j + m * sum_j x_j
 * the offset costs one product per block. Blocks whose largest |x| is below 1e-30 count as zeros (their
 * products are below fp32's resolution of any sum they join).
 */
#include <math.h>
#include <omp.h>
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

/* e^x for 8 lanes (Cephes' expf polynomial, within 2 ulp of expf): softmax and SiLU call it ~10^5 times a
 * token, where libm's scalar expf cost more than the attention's products. NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(88.3f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* x[i] = e^(x[i] - shift); returns their sum. */
static float exp_shifted(float *x, int64_t n, float shift) {
    int64_t i = 0;
    float sum = 0.f;
#ifdef GALE_AVX2
    __m256 acc = _mm256_setzero_ps(), sh = _mm256_set1_ps(shift);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; i < n; i++) sum += x[i] = expf(x[i] - shift);
    return sum;
}

/* g[i] = silu(g[i]) * u[i], the SwiGLU gate. */
static void swiglu(float *g, const float *u, int64_t n) {
    int64_t i = 0;
#ifdef GALE_AVX2
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        __m256 silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

enum { GALE_Q4_0 = 0, GALE_Q4_1 = 1, GALE_Q8_0 = 2 };

static inline int64_t block_bytes(int64_t kind) { return kind == GALE_Q8_0 ? 34 : kind == GALE_Q4_1 ? 20 : 18; }

/* The block's quantized values, scale d and offset m (0 for Q8_0). */
static inline const uint8_t *block_qs(int64_t kind, const uint8_t *blk) { return blk + (kind == GALE_Q4_1 ? 4 : 2); }
static inline float block_d(const uint8_t *blk) {
    uint16_t h;
    memcpy(&h, blk, 2);
    return h2f(h);
}
static inline float block_m(int64_t kind, const uint8_t *blk, float d) {
    if (kind == GALE_Q8_0) return 0.f;
    if (kind == GALE_Q4_0) return -8.f * d;
    uint16_t h;
    memcpy(&h, blk + 2, 2);
    return h2f(h);
}

/* The block's 32 weights d * q + m in fp32 (scalar code paths: dequantization, the portable row loop). */
static inline void block_weights(int64_t kind, const uint8_t *blk, float w[32]) {
    const uint8_t *q = block_qs(kind, blk);
    float d = block_d(blk), m = block_m(kind, blk, d);
    if (kind == GALE_Q8_0) {
        for (int j = 0; j < 32; j++) w[j] = d * (float)((const int8_t *)q)[j] + m;
        return;
    }
    for (int j = 0; j < 16; j++) {
        w[j] = d * (float)(q[j] & 0x0f) + m;
        w[j + 16] = d * (float)(q[j] >> 4) + m;
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

/* The int16 values of a block's columns (n[k] = columns 8k..8k+7) stored in the order the weight unpacking
 * below produces them: columns 0, 2, .., 14 | 1, 3, .., 15 | 16, 18, .., 30 | 17, 19, .., 31. */
static inline void store_paired(int16_t *dst, __m256i n01, __m256i n23) {
    const __m128i evens_odds = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    __m128i e0 = _mm_shuffle_epi8(_mm256_castsi256_si128(n01), evens_odds);
    __m128i e1 = _mm_shuffle_epi8(_mm256_extracti128_si256(n01, 1), evens_odds);
    __m128i e2 = _mm_shuffle_epi8(_mm256_castsi256_si128(n23), evens_odds);
    __m128i e3 = _mm_shuffle_epi8(_mm256_extracti128_si256(n23, 1), evens_odds);
    _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi64(e0, e1));
    _mm_storeu_si128((__m128i *)(dst + 8), _mm_unpackhi_epi64(e0, e1));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm_unpacklo_epi64(e2, e3));
    _mm_storeu_si128((__m128i *)(dst + 24), _mm_unpackhi_epi64(e2, e3));
}

/* x [cols] -> per block: hi/lo int16 halves (store_paired order), scale s and the fp32 block sum (Q4
 * offsets). */
static void split_int16(const float *x, int64_t cols, int16_t *hi, int16_t *lo, float *scale, float *sums) {
    const __m256 sign = _mm256_set1_ps(-0.f), frac = _mm256_set1_ps(32768.f);
    for (int64_t b = 0; b < cols / 32; b++) {
        const float *xb = x + b * 32;
        __m256 v[4], mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(xb + 8 * k);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[k]));
            sum = _mm256_add_ps(sum, v[k]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        int tiny = !(top >= 1e-30f); /* also NaN: the block's products are then zero, not garbage */
        scale[b] = tiny ? 0.f : top / 32767.f;
        sums[b] = hsum(sum);
        __m256 inv = _mm256_set1_ps(tiny ? 0.f : 32767.f / top);
        __m256i hp[2], lp[2];
        for (int k = 0; k < 4; k += 2) {
            __m256 t0 = _mm256_mul_ps(v[k], inv), t1 = _mm256_mul_ps(v[k + 1], inv);
            __m256 h0 = _mm256_round_ps(t0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256 h1 = _mm256_round_ps(t1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i l0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(t0, h0), frac));
            __m256i l1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(t1, h1), frac));
            /* packs interleaves 128-bit lanes: permute back to column order */
            hp[k / 2] = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(h0), _mm256_cvtps_epi32(h1)), 0xd8);
            lp[k / 2] = _mm256_permute4x64_epi64(_mm256_packs_epi32(l0, l1), 0xd8);
        }
        store_paired(hi + b * 32, hp[0], hp[1]);
        store_paired(lo + b * 32, lp[0], lp[1]);
    }
}

/* One output row (its blocks at `row`), one vector split by split_int16. 128-bit operations: this CPU
 * family splits 256-bit ones, and widening nibbles across 128-bit lanes cost more than the products.
 * A block's 16 bytes, read as eight 16-bit lanes, hold columns (2k, 2k + 16) in byte 2k and (2k + 1,
 * 2k + 17) in byte 2k + 1: masks and shifts give four vectors of columns in store_paired's order. */
static inline float row_dot_int16(int64_t kind, const uint8_t *row, const int16_t *hi, const int16_t *lo,
                                  const float *scale, const float *sums, int64_t nb) {
    int64_t bytes = block_bytes(kind);
    const __m128i nibble = _mm_set1_epi16(0x000f);
    const __m128 frac = _mm_set1_ps(1.f / 32768.f);
    __m128 acc0 = _mm_setzero_ps(), acc1 = _mm_setzero_ps();
    float off = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bytes, *qs = block_qs(kind, blk);
        float d = block_d(blk);
        __m128i w[4];
        if (kind == GALE_Q8_0) { /* sign-extend the low and high byte of each lane */
            __m128i r0 = _mm_loadu_si128((const __m128i *)qs), r1 = _mm_loadu_si128((const __m128i *)(qs + 16));
            w[0] = _mm_srai_epi16(_mm_slli_epi16(r0, 8), 8);
            w[1] = _mm_srai_epi16(r0, 8);
            w[2] = _mm_srai_epi16(_mm_slli_epi16(r1, 8), 8);
            w[3] = _mm_srai_epi16(r1, 8);
        } else {
            __m128i raw = _mm_loadu_si128((const __m128i *)qs);
            w[0] = _mm_and_si128(raw, nibble);
            w[1] = _mm_and_si128(_mm_srli_epi16(raw, 8), nibble);
            w[2] = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
            w[3] = _mm_srli_epi16(raw, 12);
            off += block_m(kind, blk, d) * sums[b];
        }
        const __m128i *h = (const __m128i *)(hi + b * 32), *l = (const __m128i *)(lo + b * 32);
        __m128i sh = _mm_add_epi32(_mm_add_epi32(_mm_madd_epi16(w[0], _mm_loadu_si128(h)), _mm_madd_epi16(w[1], _mm_loadu_si128(h + 1))),
                                   _mm_add_epi32(_mm_madd_epi16(w[2], _mm_loadu_si128(h + 2)), _mm_madd_epi16(w[3], _mm_loadu_si128(h + 3))));
        __m128i sl = _mm_add_epi32(_mm_add_epi32(_mm_madd_epi16(w[0], _mm_loadu_si128(l)), _mm_madd_epi16(w[1], _mm_loadu_si128(l + 1))),
                                   _mm_add_epi32(_mm_madd_epi16(w[2], _mm_loadu_si128(l + 2)), _mm_madd_epi16(w[3], _mm_loadu_si128(l + 3))));
        __m128 t = _mm_fmadd_ps(_mm_cvtepi32_ps(sl), frac, _mm_cvtepi32_ps(sh));
        if (b & 1)
            acc1 = _mm_fmadd_ps(_mm_set1_ps(d * scale[b]), t, acc1);
        else
            acc0 = _mm_fmadd_ps(_mm_set1_ps(d * scale[b]), t, acc0);
    }
    __m128 s = _mm_add_ps(acc0, acc1);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s))) + off;
}
#endif

/* One output row (its blocks at `row`) for N vectors, activations in fp32: each block is dequantized once
 * (d * q + m, the loaders' values) and multiplied into every vector. N is a compile-time constant at each
 * call (row_dot's switch), so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_dot_n(int64_t kind, const uint8_t *row, const float *x,
                                                            int64_t nb, int64_t cols, const int N, float *out) {
    int64_t bytes = block_bytes(kind);
#ifdef GALE_AVX2
    __m256 w[4], acc[MAX_VECTORS];
    for (int v = 0; v < N; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bytes, *qs = block_qs(kind, blk);
        if (kind == GALE_Q8_0) unpack_q8((const int8_t *)qs, w); else unpack_q4(qs, w);
        float d = block_d(blk);
        __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(block_m(kind, blk, d));
        for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(w[k], vd, vm);
        for (int k = 0; k < 4; k++)
            for (int v = 0; v < N; v++)
                acc[v] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + v * cols + b * 32 + 8 * k), acc[v]);
    }
    for (int v = 0; v < N; v++) out[v] = hsum(acc[v]);
#else
    float acc[MAX_VECTORS] = {0}, w[32];
    for (int64_t b = 0; b < nb; b++) {
        block_weights(kind, row + b * bytes, w);
        for (int v = 0; v < N; v++) {
            const float *xb = x + v * cols + b * 32;
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += w[j] * xb[j];
            acc[v] += s;
        }
    }
    for (int v = 0; v < N; v++) out[v] = acc[v];
#endif
}

static void row_dot(int64_t kind, const uint8_t *row, const float *x, int64_t nb, int64_t cols, int64_t n,
                    float *out) {
    switch (n) {
#define GALE_ROW_DOT(N) case N: row_dot_n(kind, row, x, nb, cols, N, out); break;
    GALE_ROW_DOT(1) GALE_ROW_DOT(2) GALE_ROW_DOT(3) GALE_ROW_DOT(4)
    GALE_ROW_DOT(5) GALE_ROW_DOT(6) GALE_ROW_DOT(7) GALE_ROW_DOT(8)
#undef GALE_ROW_DOT
    }
}


/* One block matrix in GGUF records, rows = output features (kind: GALE_Q4_0/Q4_1/Q8_0). Mirrored by
 * quant.py's _QMat. */
typedef struct {
    int64_t kind;
    const uint8_t *blocks;
    int64_t rows, cols;
} gale_qmat;

/* y[v] = W x[v] for up to MAX_VECTORS vectors: each block is read once for all of them. */
static void gemv_pass(const gale_qmat *w, const float *x, float *y, int64_t n, int threads) {
    int64_t rows = w->rows, cols = w->cols, nb = cols / 32, stride = nb * block_bytes(w->kind);
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        float out[MAX_VECTORS];
        row_dot(w->kind, w->blocks + r * stride, x, nb, cols, n, out);
        for (int64_t v = 0; v < n; v++) y[v * rows + r] = out[v];
    }
}

/* y[i] = x W[i]^T for `count` matrices of the same input width (q/k/v, or gate/up: one input), x [n, cols]
 * -> y[i] [n, rows_i]. One vector is split to int16 once for all of them and the matrices' rows run in one
 * parallel region without barriers between them; more vectors go in passes of MAX_VECTORS. */
static void gemv_shared(const gale_qmat *const *ws, float *const *ys, int count, const float *x, int64_t n,
                        int threads) {
    int64_t cols = ws[0]->cols;
#ifdef GALE_AVX2
    if (n == 1) {
        int64_t nb = cols / 32, work = 0;
        int16_t *hi = malloc(sizeof(int16_t) * cols), *lo = malloc(sizeof(int16_t) * cols);
        float *scale = malloc(sizeof(float) * nb), *xs = malloc(sizeof(float) * nb);
        split_int16(x, cols, hi, lo, scale, xs);
        for (int i = 0; i < count; i++) work += ws[i]->rows * cols;
#pragma omp parallel num_threads(threads) if (work >= 65536)
        for (int i = 0; i < count; i++) {
            const gale_qmat *w = ws[i];
            int64_t stride = nb * block_bytes(w->kind);
            float *y = ys[i];
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < w->rows; r++)
                y[r] = row_dot_int16(w->kind, w->blocks + r * stride, hi, lo, scale, xs, nb);
        }
        free(hi); free(lo); free(scale); free(xs);
        return;
    }
#endif
    for (int i = 0; i < count; i++)
        for (int64_t v = 0; v < n; v += MAX_VECTORS)
            gemv_pass(ws[i], x + v * cols, ys[i] + v * ws[i]->rows, n - v < MAX_VECTORS ? n - v : MAX_VECTORS,
                      threads);
}

/* y = x W^T for n vectors x [n, cols] -> y [n, rows]. */
void gale_gemv(const gale_qmat *w, const float *x, float *y, int64_t n, int threads) {
    gemv_shared(&w, &y, 1, x, n, threads);
}

/* fp32 rows of W: all of them (index NULL, n = rows) or rows index[0..n) (embedding lookups). */
void gale_dequant(const gale_qmat *w, const int64_t *index, int64_t n, float *out, int threads) {
    int64_t cols = w->cols, nb = cols / 32, bytes = block_bytes(w->kind);
#pragma omp parallel for schedule(static) num_threads(threads) if (n * cols >= 65536)
    for (int64_t i = 0; i < n; i++) {
        int64_t r = index ? index[i] : i;
        for (int64_t b = 0; b < nb; b++)
            block_weights(w->kind, w->blocks + (r * nb + b) * bytes, out + i * cols + b * 32);
    }
}

/* ---- decode step ---- */

typedef struct {
    const float *attn_norm, *ffn_norm;
    gale_qmat wq, wk, wv, wo, w1, w2, w3;
} gale_layer;

typedef struct {
    int64_t n_layers, dim, hidden, n_heads, n_kv_heads, head_dim;
    double eps;
} gale_dims;

/* sum_i a[i] b[i] in fp32, eight lanes at a time (a plain loop would not vectorize: reassociation). */
static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef GALE_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[j] = scale * q . k[j] for n keys (rows of hd floats); eight keys per pass share one reduction. */
static void scores(const float *q, const float *k, int64_t n, int64_t hd, float scale, float *out) {
    int64_t j = 0;
#ifdef GALE_AVX2
    for (; hd % 8 == 0 && j + 8 <= n; j += 8) {
        __m256 a[8];
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
            __m256 qi = _mm256_loadu_ps(q + i);
            for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + (j + t) * hd + i), a[t]);
        }
        /* transpose-reduce: lane t of the result is the sum of a[t] */
        __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
#endif
    for (; j < n; j++) out[j] = dot(q, k + j * hd, hd) * scale;
}

/* out[i] = sum_j p[j] v[j][i] for n rows of hd floats, 32 columns at a time held in registers. */
static void weighted_sum(const float *p, const float *v, int64_t n, int64_t hd, float *out) {
    int64_t i = 0;
#ifdef GALE_AVX2
    for (; i + 32 <= hd; i += 32) {
        __m256 a[8]; /* two keys in flight: a[0..3] even rows, a[4..7] odd rows */
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            __m256 p0 = _mm256_broadcast_ss(p + j), p1 = _mm256_broadcast_ss(p + j + 1);
            for (int t = 0; t < 4; t++) {
                a[t] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v + j * hd + i + 8 * t), a[t]);
                a[t + 4] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v + (j + 1) * hd + i + 8 * t), a[t + 4]);
            }
        }
        for (; j < n; j++)
            for (int t = 0; t < 4; t++)
                a[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(v + j * hd + i + 8 * t), a[t]);
        for (int t = 0; t < 4; t++) _mm256_storeu_ps(out + i + 8 * t, _mm256_add_ps(a[t], a[t + 4]));
    }
#endif
    for (; i < hd; i++) {
        float s = 0.f;
        for (int64_t j = 0; j < n; j++) s += p[j] * v[j * hd + i];
        out[i] = s;
    }
}

static void rms_norm(const float *x, const float *w, float *out, int64_t n, int64_t dim, double eps) {
    for (int64_t v = 0; v < n; v++) {
        const float *xv = x + v * dim;
        float ss = dot(xv, xv, dim);
        float scale = 1.f / sqrtf(ss / (float)dim + (float)eps);
        for (int64_t i = 0; i < dim; i++) out[v * dim + i] = xv[i] * scale * w[i];
    }
}

/* Rotate interleaved pairs of each head by its position's (cos, sin) pairs: table [positions, head_dim/2, 2]. */
static void rope(float *x, const float *table, const int64_t *positions, int64_t n, int64_t heads, int64_t head_dim) {
    for (int64_t v = 0; v < n; v++)
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + (v * heads + h) * head_dim;
            const float *r = table + positions[v] * head_dim;
            for (int64_t j = 0; j < head_dim / 2; j++) {
                float a = p[2 * j], b = p[2 * j + 1], c = r[2 * j], s = r[2 * j + 1];
                p[2 * j] = a * c - b * s;
                p[2 * j + 1] = a * s + b * c;
            }
        }
}

/* Every layer of a decode step for n sequences, one new token each, then the final norm: hidden states
 * h [n, dim] in place. rot: RoPE's rotations of every position up to the largest one, [.., head_dim/2, 2].
 * Cache layer l: kc[l], vc[l] = [slots, n_kv_heads, alloc, head_dim]; position p is stored at index
 * p % capacity of its sequence's slot (alloc >= min(p + 1, capacity)). Written first, then attended: with
 * the engine's cache every stored entry of a sequence is inside its window (capacity <= window, or the
 * cache refuses to outgrow capacity), so the query attends entries 0 .. min(p + 1, capacity) - 1. */
void gale_decode(const gale_dims *c, const gale_layer *layers, float *const *kc, float *const *vc, int64_t alloc,
                 int64_t capacity, int64_t n, const int64_t *slots, const int64_t *positions, const float *rot,
                 const float *norm, float *h, int threads) {
    int64_t dim = c->dim, hd = c->head_dim, H = c->n_heads, KV = c->n_kv_heads, group = H / KV;
    int64_t qd = H * hd, kd = KV * hd, big = c->hidden > dim ? c->hidden : dim;
    float *xn = malloc(sizeof(float) * n * big), *q = malloc(sizeof(float) * n * qd);
    float *k = malloc(sizeof(float) * n * kd), *v = malloc(sizeof(float) * n * kd);
    float *att = malloc(sizeof(float) * n * qd), *tmp = malloc(sizeof(float) * n * dim);
    float *g = malloc(sizeof(float) * n * c->hidden), *u = malloc(sizeof(float) * n * c->hidden);
    float *scores_buf = malloc(sizeof(float) * threads * capacity);
    int64_t parts = (2 * threads + n * KV - 1) / (n * KV); /* key ranges per (sequence, KV head) */
    float *part_out = malloc(sizeof(float) * n * H * parts * hd);
    float *part_max = malloc(sizeof(float) * n * H * parts), *part_sum = malloc(sizeof(float) * n * H * parts);
    float scale = 1.f / sqrtf((float)hd);
    for (int64_t l = 0; l < c->n_layers; l++) {
        const gale_layer *L = layers + l;
        rms_norm(h, L->attn_norm, xn, n, dim, c->eps);
        const gale_qmat *qkv_w[3] = {&L->wq, &L->wk, &L->wv}, *ffn_w[2] = {&L->w1, &L->w3};
        float *qkv_y[3] = {q, k, v}, *ffn_y[2] = {g, u};
        gemv_shared(qkv_w, qkv_y, 3, xn, n, threads);
        rope(q, rot, positions, n, H, hd);
        rope(k, rot, positions, n, KV, hd);
        for (int64_t s = 0; s < n; s++)
            for (int64_t kh = 0; kh < KV; kh++) {
                int64_t at = ((slots[s] * KV + kh) * alloc + positions[s] % capacity) * hd;
                memcpy(kc[l] + at, k + (s * KV + kh) * hd, sizeof(float) * hd);
                memcpy(vc[l] + at, v + (s * KV + kh) * hd, sizeof(float) * hd);
            }
        /* Flash-decoding: an item is (sequence, KV head, key range) and serves the whole query group, so
         * each K/V row is read once per group and the threads get equal shares; ranges merge below. */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t it = 0; it < n * KV * parts; it++) {
            int64_t s = it / (KV * parts), kh = it / parts % KV, p = it % parts;
            int64_t keys = positions[s] + 1 < capacity ? positions[s] + 1 : capacity;
            int64_t first = keys * p / parts, len = keys * (p + 1) / parts - first;
            const float *kb = kc[l] + ((slots[s] * KV + kh) * alloc + first) * hd;
            const float *vb = vc[l] + ((slots[s] * KV + kh) * alloc + first) * hd;
            float *sc = scores_buf + omp_get_thread_num() * capacity;
            for (int64_t hq = kh * group; hq < (kh + 1) * group; hq++) {
                int64_t row = (s * H + hq) * parts + p;
                float mx = -INFINITY, sum;
                scores(q + (s * H + hq) * hd, kb, len, hd, scale, sc);
                for (int64_t j = 0; j < len; j++) mx = sc[j] > mx ? sc[j] : mx;
                sum = exp_shifted(sc, len, mx);
                weighted_sum(sc, vb, len, hd, part_out + row * hd); /* zeros when len == 0 */
                part_max[row] = mx;
                part_sum[row] = sum;
            }
        }
        for (int64_t sh = 0; sh < n * H; sh++) { /* merge the ranges' softmaxes (empty ranges weigh 0) */
            const float *pm = part_max + sh * parts, *ps = part_sum + sh * parts, *po = part_out + sh * parts * hd;
            float mx = -INFINITY, norm = 0.f, w[parts], *o = att + sh * hd;
            for (int64_t p = 0; p < parts; p++) mx = pm[p] > mx ? pm[p] : mx;
            for (int64_t p = 0; p < parts; p++) norm += ps[p] * (w[p] = ps[p] > 0.f ? expf(pm[p] - mx) : 0.f);
            for (int64_t i = 0; i < hd; i++) {
                float acc = 0.f;
                for (int64_t p = 0; p < parts; p++) acc += w[p] * po[p * hd + i];
                o[i] = acc / norm;
            }
        }
        gale_gemv(&L->wo, att, tmp, n, threads);
        for (int64_t i = 0; i < n * dim; i++) h[i] += tmp[i];
        rms_norm(h, L->ffn_norm, xn, n, dim, c->eps);
        gemv_shared(ffn_w, ffn_y, 2, xn, n, threads);
        swiglu(g, u, n * c->hidden);
        gale_gemv(&L->w2, g, tmp, n, threads);
        for (int64_t i = 0; i < n * dim; i++) h[i] += tmp[i];
    }
    rms_norm(h, norm, h, n, dim, c->eps);
    free(xn); free(q); free(k); free(v); free(att); free(tmp); free(g); free(u);
    free(scores_buf); free(part_out); free(part_max); free(part_sum);
}
