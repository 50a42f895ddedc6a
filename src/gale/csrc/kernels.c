/* CPU kernels over weights kept in llama.cpp's blocks; sums stay exact integers or fp32.
 *
 * 1. Matrix-vector products (gale_gemv) and dequantization (gale_dequant) of one block matrix.
 * 2. gale_decode: every layer of a decode step (one new token per sequence) in one call, so a token
 *    costs one Python call instead of ~40 torch ops per layer (each 3-10 us on a small CPU). It computes
 *    what model.py's Attention/FeedForward do for a decode step, over the engine's rolling KV cache, and
 *    tests compare the two.
 *
 * y[v, r] = sum_c W[r, c] * x[v, c] for a few vectors v (decode: one token per sequence), reading each
 * weight block once for all of them. Weights stay 4- to 8-bit in memory, read in GGUF's own block records
 * (so a memory-mapped file is used in place, no copy); the layouts are at block_weights. Activations are held
 * to 16 bits per group of 32 or 256 columns and meet the weights' own integers in exact integer products (the
 * "integer path" below; llama.cpp rounds them to 8 bits, which derails small models), or stay fp32 against
 * each block dequantized once for up to MAX_VECTORS vectors (batches of the 32-wide kinds, builds without
 * AVX2): see gemv_shared.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GALE_AVX2 1
/* VNNI's 8-bit products (vpdpbusd: 32 unsigned bytes times 32 signed bytes, summed in fours into 8 int32
 * lanes, one instruction), in its EVEX (AVX512-VNNI + VL) or VEX (AVX-VNNI) form; without VNNI two AVX2
 * instructions do the same (vpmaddubsw's pair sums stay below int16's limit for 4-bit weights). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD _mm256_dpbusd_epi32
#define GALE_VNNI 1
#elif defined(__AVXVNNI__)
#define DPBUSD _mm256_dpbusd_avx_epi32
#define GALE_VNNI 1
#else
#define GALE_VNNI 0
#define DPBUSD(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#endif
/* The eight-row kernels' sums of 4-bit (or 5-bit) weights times byte planes. Without VNNI, vpmaddubsw's int16
 * pair sums accumulate in int16 (vpaddw) and widen to int32 once per block or sub-block (WIDEN16: vpmaddwd by
 * 1, or by the sub-block's scale), not after every product: half the multiplies of DPBUSD's two-instruction
 * form. Bounds: a pair sum is at most 2 * 31 * 128 = 7936 for 5-bit weights, so four steps stay below int16's
 * 32767 (Q5_K), and 2 * 15 * 128 = 3840 for 4-bit ones, so eight do (a 32-column block of Q4_0 / Q4_1, a
 * 64-column step of Q4_K). With VNNI both are vpdpbusd's int32 sums as they are. */
#if GALE_VNNI
#define DP16 DPBUSD
#define WIDEN16(acc) (acc)
#else
#define DP16(acc, u, s) _mm256_add_epi16((acc), _mm256_maddubs_epi16((u), (s)))
#define WIDEN16(acc) _mm256_madd_epi16((acc), _mm256_set1_epi16(1))
#endif
/* AMD's cores gather slowly (Zen 4: a vpgatherdd of eight dwords took ~a fifth of rows8_q4's time per block);
 * eight scalar loads do it there (rows8_dwords, rows8_d_ps). -march=native names AMD's cores znver1..5
 * (GCC 12 calls Zen 4 znver3); Intel's gathers are fast enough (scalar loads: 0.90-1.00x there). */
#ifndef GALE_SLOW_GATHER /* a -D flag may choose (the tests build both) */
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
#define GALE_SLOW_GATHER 1
#else
#define GALE_SLOW_GATHER 0
#endif
#endif
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

enum { GALE_Q4_0 = 0, GALE_Q4_1 = 1, GALE_Q8_0 = 2, GALE_Q4_K = 3, GALE_Q5_K = 4, GALE_Q6_K = 5 };

/* Weights per block and bytes per block record, by kind (quant.py's KINDS order). */
static const int64_t BLOCK_ELEMS[] = {32, 32, 32, 256, 256, 256};
static const int64_t BLOCK_BYTES[] = {18, 20, 34, 144, 176, 210};
static inline int is_k(int64_t kind) { return kind >= GALE_Q4_K; }

static inline float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h2f(h);
}

/* The block's quantized values, scale d and offset m (0 for Q8_0): W = d * q + m (32-wide kinds). */
static inline const uint8_t *block_qs(int64_t kind, const uint8_t *blk) { return blk + (kind == GALE_Q4_1 ? 4 : 2); }
static inline float block_m(int64_t kind, const uint8_t *blk, float d) {
    if (kind == GALE_Q8_0) return 0.f;
    if (kind == GALE_Q4_0) return -8.f * d;
    return half_at(blk + 2);
}

/* Q4_K / Q5_K: the 6-bit scales and minimums of the 8 sub-blocks of 32, packed in 12 bytes (llama.cpp's
 * get_scale_min_k4): bytes 0-3 hold scales 0-3 and the top bits of scales 4-7, bytes 4-7 the same for the
 * minimums, bytes 8-11 the low nibbles of scales 4-7 (low) and minimums 4-7 (high). Unpacked with four
 * 32-bit words as llama.cpp does: out's bytes 0-7 are the scales, bytes 8-15 the minimums. */
static inline void k_scales_mins_packed(const uint8_t *packed, uint32_t out[4]) {
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    uint32_t u[3];
    memcpy(u, packed, 12);
    out[0] = u[0] & low6;
    out[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
    out[2] = u[1] & low6;
    out[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
}

static inline void k_scales_mins(const uint8_t *packed, uint8_t sc[8], uint8_t m[8]) {
    uint32_t out[4];
    k_scales_mins_packed(packed, out);
    memcpy(sc, out, 8);
    memcpy(m, out + 2, 8);
}

/* A block's weights in fp32, exactly as gguf's reference dequantizers compute them (every product of an
 * fp16 scale and a small integer is exact in fp32; Q6_K rounds once, at (d * scale) * q as gguf does).
 * Blocks of 32 (per row r and block b of 32 columns), nibbles low = column j, high = column j + 16:
 *   Q4_0 {fp16 d, qs[16]}, 18 bytes: W = d * q - 8 d;   Q4_1 {fp16 d, fp16 m, qs[16]}, 20 bytes: W = d * q + m;
 *   Q8_0 {fp16 d, int8 qs[32]}, 34 bytes: W = d * q.
 * Super-blocks of 256 (llama.cpp's block_q4_K/q5_K/q6_K):
 *   Q4_K {fp16 d, dmin, scales[12], qs[128]}: sub-block i of 32: W = d*sc_i * q - dmin*m_i, q in 0..15;
 *        qs[32j + l] holds column l of sub-block 2j (low nibble) and of sub-block 2j + 1 (high nibble).
 *   Q5_K {fp16 d, dmin, scales[12], qh[32], qs[128]}: as Q4_K, q += 16 * bit i of qh[l] (sub-block i).
 *   Q6_K {ql[128], qh[64], int8 scales[16], fp16 d}: W = d*sc_(c/16) * (q - 32), q in 0..63; in each half of
 *        128 columns, ql[l] / ql[l + 32] give the low 4 bits of columns l, l + 32 (low nibbles) and l + 64,
 *        l + 96 (high nibbles), qh[l] their top 2 bits (bits 0-1, 2-3, 4-5, 6-7). */
static void block_weights(int64_t kind, const uint8_t *blk, float *w) {
    if (kind == GALE_Q4_K || kind == GALE_Q5_K) {
        float d = half_at(blk), dmin = half_at(blk + 2);
        uint8_t sc[8], m[8];
        k_scales_mins(blk + 4, sc, m);
        const uint8_t *qh = blk + 16, *qs = blk + (kind == GALE_Q5_K ? 48 : 16);
        for (int i = 0; i < 8; i++) {
            float di = d * (float)sc[i], mi = dmin * (float)m[i];
            for (int l = 0; l < 32; l++) {
                int q = (qs[32 * (i / 2) + l] >> (4 * (i & 1))) & 0x0f;
                if (kind == GALE_Q5_K) q |= ((qh[l] >> i) & 1) << 4;
                w[32 * i + l] = di * (float)q - mi;
            }
        }
        return;
    }
    if (kind == GALE_Q6_K) {
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = half_at(blk + 208);
        for (int c = 0; c < 256; c++) {
            int half = c / 128, r = c % 128, l = r % 32, part = r / 32; /* part 0..3: columns l + 32 part */
            int low = (ql[64 * half + l + 32 * (part & 1)] >> (4 * (part >> 1))) & 0x0f;
            int top = (qh[32 * half + l] >> (2 * part)) & 3;
            w[c] = (d * (float)sc[c / 16]) * (float)((low | (top << 4)) - 32);
        }
        return;
    }
    const uint8_t *q = block_qs(kind, blk);
    float d = half_at(blk), m = block_m(kind, blk, d);
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

#endif

#ifdef GALE_AVX2
/* ---- one vector: integer products on the weights' own integers ----
 * Each group of x (32 columns for the 32-wide kinds, 256 for the super-block kinds, matching the weights'
 * scales) is written as x = s * a with int16 a = round(x / s) in [-32639, 32639] (s = max|x| / 32639: 16
 * bits, error <= 2^-16 of the group's largest value; 32639 = 127 * 257, so a = 256 h + l with h and l signed
 * bytes: the planes of the eight-row kernels). The weights' 4-8 bit integers are widened to int16 in
 * registers (one byte unpack) and meet a in vpmaddwd, exact int32 sums of pairs: two multiplies per 32
 * weights, and the blocks' scales apply once per 32 (Q6_K: 16) columns in fp32. llama.cpp rounds
 * activations to 8 bits instead, which derails small models; 16 bits keep their answers
 * (tests/test_quant.py's quality gate on the default model).
 *
 * Byte unpacking works within 128-bit lanes: of 32 weight bytes in column order, vpunpcklbw gives columns
 * [0..7 | 16..23] and vpunpckhbw [8..15 | 24..31]. So each 32 columns of a are stored in that order,
 * columns 0-7, 16-23, 8-15, 24-31: a[32 b + 8] is column 32 b + 16, a[32 b + 16] column 32 b + 8. The
 * product's int32 lanes 0-3 then sum columns 0-15 and lanes 4-7 columns 16-31 (Q6_K's two scales). */
typedef struct {
    int16_t *a;        /* [cols], each 32 columns in unpack order */
    int8_t *h, *l;     /* [cols]: a = 256 h + l, column order (the eight-row kernels) */
    float *scale;      /* [groups]: s */
    float *sum;        /* [cols / 32]: s * sum(a) of each 32 columns: Q4_1's offsets, the eight-row K minimums */
    int32_t *sum16;    /* [cols / 16]: sum(a) of each 16 columns (Q6_K's -32) */
    int32_t *sum32;    /* [cols / 32]: sum(a) of each 32 columns (Q4_K / Q5_K's minimums) */
    int32_t *minus8;   /* [cols / 32][8]: {-8 sum(a), 0, ..}, Q4_0's offset on a block's lanes (32-wide) */
} gale_xq;

#define XQ_MAX 32639.f
#define XQ_VECTORS 4 /* vectors per pass over a row: their accumulators fill the 16 registers */

/* Software prefetch of the weights (GALE_PREFETCH 0: none), to L2: quant.py sets it per CPU from measurement
 * (benchmarks/NOTES.md). Kernels that read one row at a time stream it in memory order and prefetch
 * GALE_PREFETCH bytes ahead of the block being multiplied: on Zen 5 the 14336-wide FFN down projection streamed
 * at half the narrow matrices' rate without it (the hardware prefetcher fell behind) and at their rate with it
 * (decode 1.3x); on Zen 3 the same prefetches made decode 10-20% slower. L2 rather than L1 (prefetcht1): on Zen 4
 * 1.03-1.14x for Q6_K's rows. */
#ifndef GALE_PREFETCH
#define GALE_PREFETCH 0
#endif

/* Prefetch `lines` cache lines from p + GALE_PREFETCH (a block record's bytes, lines = ceil(bytes / 64)). */
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *p, const int lines) {
#if GALE_PREFETCH
    for (int i = 0; i < lines; i++) _mm_prefetch((const char *)p + GALE_PREFETCH + 64 * i, _MM_HINT_T1);
#else
    (void)p, (void)lines;
#endif
}

/* The prefetch of the kernels that read R rows side by side (rows8_q4 and the like): the next group of R rows,
 * whose R * stride bytes follow this group's, in memory order and at this group's pace (R blocks' bytes per
 * block index b). Its R rows are R interleaved streams, which the hardware prefetchers serve poorly: on Zen 4 a
 * thread read such a pattern at ~17 GB/s from DRAM against ~31 for one sequential stream, and prefetching each
 * row GALE_PREFETCH bytes ahead did not help. Ahead of the group, in order, the DRAM sees one sequential stream
 * per thread: one GEMV from DRAM on two threads 1.08-1.68x (every kind, both 7B shapes), a 7B decode step
 * 1.21x (Q4_0) and 1.38x (Q4_K_M); into L1 (prefetcht0) 0.63-0.69x, two groups ahead the same as one. The
 * group after a thread's last (or the matrix's) is prefetched too: a hint, never a fault. */
static inline __attribute__((always_inline)) void prefetch_next_group(const uint8_t *row0, int64_t stride, const int R,
                                                                      int64_t b, const int64_t bytes) {
#if GALE_PREFETCH
    const char *p = (const char *)row0 + R * stride + b * R * bytes;
    for (int i = 0; i < (R * bytes + 63) / 64; i++) _mm_prefetch(p + 64 * i, _MM_HINT_T1);
#else
    (void)row0, (void)stride, (void)R, (void)b, (void)bytes;
#endif
}

static void xq_alloc(gale_xq *xq, int64_t cols) {
    xq->a = malloc(sizeof(int16_t) * cols);
    xq->h = malloc(cols);
    xq->l = malloc(cols);
    xq->scale = malloc(sizeof(float) * (cols / 32));
    xq->sum = malloc(sizeof(float) * (cols / 32));
    xq->sum16 = malloc(sizeof(int32_t) * (cols / 16));
    xq->sum32 = malloc(sizeof(int32_t) * (cols / 32));
    xq->minus8 = calloc(cols / 4, sizeof(int32_t));
}

static void xq_free(gale_xq *xq) {
    free(xq->a), free(xq->h), free(xq->l);
    free(xq->scale); free(xq->sum); free(xq->sum16); free(xq->sum32); free(xq->minus8);
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Largest |x[i]| of n (a multiple of 8) values. */
static inline float abs_max(const float *x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 mx = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

/* 32 int32 values (v[k]: columns 8k..8k+7) as signed bytes in column order at dst. packs works within 128-bit
 * lanes, leaving 4-byte groups in the order v0 0-3, v1 0-3, v2 0-3, v3 0-3 | v0 4-7, ...: one permute fixes it. */
static inline void store_bytes(const __m256i v[4], int8_t *dst) {
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* Columns c..c+31 of a (a[k]: columns 8k..8k+7) into the planes: h = (a + 128) >> 8, l = a - 256 h, both in
 * [-127, 127] since |a| <= 32639. */
static inline void store_planes(const __m256i a[4], gale_xq *xq, int64_t c) {
    __m256i h[4], l[4], r = _mm256_set1_epi32(128);
    for (int k = 0; k < 4; k++) {
        h[k] = _mm256_srai_epi32(_mm256_add_epi32(a[k], r), 8);
        l[k] = _mm256_sub_epi32(a[k], _mm256_slli_epi32(h[k], 8));
    }
    store_bytes(h, xq->h + c);
    store_bytes(l, xq->l + c);
}

/* A group's scale s from its largest |x| (the return value: 1 / s, what x is multiplied by before rounding).
 * Groups whose largest |x| is below 1e-30 (or NaN) count as zeros: their products are below fp32's resolution
 * of any sum they join. xq_quantize and the GEMM's gemm_quantize both take it: their integers must agree. */
static inline float group_scale(float top, float *s) {
    int tiny = !(top >= 1e-30f);
    *s = tiny ? 0.f : top / XQ_MAX;
    return tiny ? 0.f : XQ_MAX / top;
}

/* Quantize x [cols] in groups of `group` columns (32 or 256), each as group_scale says. */
static void xq_quantize(const float *x, int64_t cols, int64_t group, gale_xq *xq) {
    for (int64_t g = 0; g < cols / group; g++) {
        const float *xg = x + g * group;
        float s;
        __m256 inv = _mm256_set1_ps(group_scale(abs_max(xg, group), &s));
        for (int64_t c = 0; c < group; c += 32) {
            __m256i a[4];
            for (int k = 0; k < 4; k++) a[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + c + 8 * k), inv));
            int16_t *dst = xq->a + g * group + c; /* packs interleaves 128-bit lanes; the permute undoes it */
            _mm256_storeu_si256((__m256i *)dst, _mm256_permute4x64_epi64(_mm256_packs_epi32(a[0], a[2]), 0xd8));
            _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(a[1], a[3]), 0xd8));
            int64_t i16 = (g * group + c) / 16;
            xq->sum16[i16] = hsum_i32(_mm256_add_epi32(a[0], a[1]));
            xq->sum16[i16 + 1] = hsum_i32(_mm256_add_epi32(a[2], a[3]));
            xq->sum32[i16 / 2] = xq->sum16[i16] + xq->sum16[i16 + 1];
            store_planes(a, xq, g * group + c); /* read by the eight-row kernels */
            xq->sum[i16 / 2] = s * (float)xq->sum32[i16 / 2];
            if (group == 32) xq->minus8[8 * (i16 / 2)] = -8 * xq->sum32[i16 / 2]; /* Q4_0's offsets */
        }
        xq->scale[g] = s;
    }
}

/* The 32 weights of a 32-wide block as int16 lanes in unpack order (lo: columns 0-7 and 16-23, hi: 8-15 and
 * 24-31): Q8_0's bytes widened with their sign, Q4_0 / Q4_1's nibbles as they are (0..15). */
static inline void widen_legacy(int64_t kind, const uint8_t *qs, __m256i *lo, __m256i *hi) {
    __m256i w, ext = _mm256_setzero_si256();
    if (kind == GALE_Q8_0) {
        w = _mm256_loadu_si256((const __m256i *)qs);
        ext = _mm256_cmpgt_epi8(ext, w); /* sign bytes */
    } else {
        __m128i raw = _mm_loadu_si128((const __m128i *)qs); /* low nibbles: columns 0-15, high: 16-31 */
        w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
    }
    *lo = _mm256_unpacklo_epi8(w, ext);
    *hi = _mm256_unpackhi_epi8(w, ext);
}

/* int32 lanes of w . a over 32 columns: w widened (lo, hi as above), a in unpack order. */
static inline __m256i dot32(__m256i lo, __m256i hi, const int16_t *a) {
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)a)),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(a + 16))));
}

/* Block b of a 32-wide kind into each vector's accumulator: acc[v] += d s_b[v] (q . a[v])_b (Q4_0: q - 8, its
 * -8 sum(a) added to the integer lanes from a precomputed vector), and Q4_1's offset m s_b[v] sum(a[v])_b into
 * off[v]. */
static inline __attribute__((always_inline)) void legacy_block(int64_t kind, const uint8_t *blk, const gale_xq *xq,
                                                               int64_t b, const int N, __m256 *acc, float *off) {
    __m256i lo, hi;
    widen_legacy(kind, block_qs(kind, blk), &lo, &hi);
    float d = half_at(blk), m = kind == GALE_Q4_1 ? half_at(blk + 2) : 0.f;
    for (int v = 0; v < N; v++) {
        __m256i p = dot32(lo, hi, xq[v].a + 32 * b);
        if (kind == GALE_Q4_0) p = _mm256_add_epi32(p, _mm256_loadu_si256((const __m256i *)(xq[v].minus8 + 8 * b)));
        acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(d * xq[v].scale[b]), _mm256_cvtepi32_ps(p), acc[v]);
        if (kind == GALE_Q4_1) off[v] += m * xq[v].sum[b];
    }
}

/* One row of a 32-wide kind for N vectors (N <= XQ_VECTORS, a compile-time constant at each call): each
 * block's weights are widened once for all of them; two blocks a step into two sets of accumulators, so
 * consecutive blocks do not wait on each other's additions. */
static inline __attribute__((always_inline)) void row_dot_legacy(int64_t kind, const uint8_t *row, const gale_xq *xq,
                                                                 int64_t nb, const int N, float *out) {
    const int64_t bytes = BLOCK_BYTES[kind];
    __m256 acc0[XQ_VECTORS], acc1[XQ_VECTORS];
    float off0[XQ_VECTORS], off1[XQ_VECTORS];
    for (int v = 0; v < N; v++) acc0[v] = acc1[v] = _mm256_setzero_ps(), off0[v] = off1[v] = 0.f;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        prefetch_ahead(row + b * bytes, 2); /* two blocks: 36-68 bytes */
        legacy_block(kind, row + b * bytes, xq, b, N, acc0, off0);
        legacy_block(kind, row + (b + 1) * bytes, xq, b + 1, N, acc1, off1);
    }
    if (b < nb) legacy_block(kind, row + b * bytes, xq, b, N, acc0, off0);
    for (int v = 0; v < N; v++) out[v] = hsum(_mm256_add_ps(acc0[v], acc1[v])) + off0[v] + off1[v];
}

/* The low 16 bits of each int32 lane, packed (vpmovdw with AVX-512, a byte shuffle without). */
static inline __m128i low_halves(__m256i v) {
#ifdef __AVX512VL__
    return _mm256_cvtepi32_epi16(v);
#else
    const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, pick), 0x08));
#endif
}

/* 16 bytes at p + r stride (r = 0..7) transposed in 4-byte groups: T[k] lane r = row r's bytes 4k..4k+3, from
 * rows r and r + 4 as the halves of one 256-bit vector and eight unpacks. */
static inline void transpose_rows8_16(const uint8_t *p, int64_t stride, __m256i T[4]) {
#define ROWS_PAIR(lo, hi) _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + (hi) * stride)), \
                                           _mm_loadu_si128((const __m128i *)(p + (lo) * stride)))
    __m256i y0 = ROWS_PAIR(0, 4), y1 = ROWS_PAIR(1, 5), y2 = ROWS_PAIR(2, 6), y3 = ROWS_PAIR(3, 7);
#undef ROWS_PAIR
    __m256i t0 = _mm256_unpacklo_epi32(y0, y1), t1 = _mm256_unpackhi_epi32(y0, y1);
    __m256i t2 = _mm256_unpacklo_epi32(y2, y3), t3 = _mm256_unpackhi_epi32(y2, y3);
    T[0] = _mm256_unpacklo_epi64(t0, t2), T[1] = _mm256_unpackhi_epi64(t0, t2);
    T[2] = _mm256_unpacklo_epi64(t1, t3), T[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* The same for 32 bytes: T[0..7]. */
static inline void transpose_rows8(const uint8_t *p, int64_t stride, __m256i T[8]) {
    transpose_rows8_16(p, stride, T);
    transpose_rows8_16(p + 16, stride, T + 4);
}

/* Byte offsets of rows 0..7 (row r at r stride), for gathering a field of each of eight rows. */
static inline __m256i row_offsets(int64_t stride) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)stride));
}

/* The dword at p + r stride in lane r (r = 0..7). */
static inline __m256i rows8_dwords(const uint8_t *p, int64_t stride, __m256i offsets) {
#if GALE_SLOW_GATHER
    (void)offsets;
    uint32_t d[8];
    for (int r = 0; r < 8; r++) memcpy(&d[r], p + r * stride, 4);
    return _mm256_set_epi64x((int64_t)((uint64_t)d[7] << 32 | d[6]), (int64_t)((uint64_t)d[5] << 32 | d[4]),
                             (int64_t)((uint64_t)d[3] << 32 | d[2]), (int64_t)((uint64_t)d[1] << 32 | d[0]));
#else
    return _mm256_i32gather_epi32((const int *)p, offsets, 1);
#endif
}

/* Vectors per pass of rows8_q4: 4 fills AVX-512's 32 registers (2 N integer accumulators, N fp32 ones, the
 * transposed weights); on AVX2's 16 it spills and is still 1.10-1.15x faster than 2 (Intel, -mno-avx512f). */
#define ROWS8_VECTORS 4

/* The low fp16 half of each of eight int32 lanes, as fp32: the rows' d (shifted first: Q4_1's m, K's dmin). */
static inline __m256 halves8_ps(__m256i v) { return _mm256_cvtph_ps(low_halves(v)); }

/* The fp16 at p + r stride (r = 0..7) as fp32 lane r: the rows' d of Q4_0 and Q8_0, which have no second half
 * to gather along. Where gathers are slow (AMD), eight 16-bit loads into one vector, two chains of four: one
 * vector operation fewer per load than rows8_dwords and no narrowing after it (Zen 4, one GEMV from DRAM on
 * two threads, Q4_0 1.02-1.09x; Q8_0 unchanged there, 1.04x from L3). */
static inline __m256 rows8_d_ps(const uint8_t *p, int64_t stride, __m256i offsets) {
#if GALE_SLOW_GATHER
    (void)offsets;
    uint16_t h[8];
    for (int r = 0; r < 8; r++) memcpy(&h[r], p + r * stride, 2);
    __m128i lo = _mm_cvtsi32_si128(h[0]), hi = _mm_cvtsi32_si128(h[4]);
    for (int r = 1; r < 4; r++) lo = _mm_insert_epi16(lo, h[r], r), hi = _mm_insert_epi16(hi, h[4 + r], r);
    return _mm256_cvtph_ps(_mm_unpacklo_epi64(lo, hi));
#else
    return halves8_ps(rows8_dwords(p, stride, offsets));
#endif
}

/* R consecutive rows of Q4_0 or Q4_1 (row r at row0 + r stride) against N vectors (N <= ROWS8_VECTORS, a
 * compile-time constant at each call): out[v * out_stride + r] = row r . x[v]. One row at a time pays, per
 * block of 32 weights, a scale conversion, a broadcast, an fp32 conversion and an FMA besides the products;
 * here int32 lane r of every vector is row r, so those run once for R rows (the scales gathered), and each
 * activation dword is broadcast to the R rows' products. The transposition is shared by the N vectors.
 *
 * Per block b the rows' 16 quant bytes are transposed in 4-byte groups: T[k] lane r = row r's bytes 4k..4k+3,
 * whose low nibbles are columns 4k..4k+3 and high nibbles columns 16 + 4k..16 + 4k + 3. Example, row 5, k = 1:
 * T[1] lane 5 low nibbles = W[5, 32 b + 4..7], meeting the broadcast planes' columns 32 b + 4..7. vpdpbusd then
 * sums each lane's four products: after k = 0..3, lane r holds row r's q . h and q . l over the block, and
 * (q - 8) . a = 256 (q . h) + (q . l) - 8 sum(a), exact in int32 as in the other paths (Q4_1: q . a, its
 * offsets m gathered with d, the dword's high half, times s sum(a)).
 *
 * One body for two widths (a macro: C has no templates): rows8_q4, eight rows in 256-bit vectors (P = _mm256,
 * SI = si256, DP / WIDEN = DP16 / WIDEN16: without VNNI int16 sums widened once per block), and with
 * AVX512-VNNI rows16_q4, sixteen rows in 512-bit ones, which takes batches of three or more (half the
 * instructions per row: rows_dot). Each lane's integer sums and fp32 operations are the same in all of them, so
 * products are bit for bit alike (Zen 3, one Q4_0 GEMV of the 7B shapes: DP16 against DPBUSD's AVX2 pair 1.05x
 * at one vector on two threads from DRAM, 1.14x on one thread from L3, 1.11x at four vectors). */
#define ROWS_Q4(NAME, R, VI, VF, P, SI, DP, WIDEN, TRANSPOSE, DWORDS, HALVES_PS, D_PS) \
static inline __attribute__((always_inline)) void NAME(int64_t kind, const uint8_t *row0, int64_t stride, \
                                                       const gale_xq *xq, int64_t nb, const int N, float *out, \
                                                       int64_t out_stride) { \
    const int64_t bytes = BLOCK_BYTES[kind]; \
    const VI nibble = P##_set1_epi8(0x0f), z = P##_setzero_##SI(); \
    const __m256i offsets = row_offsets(stride); \
    VF acc[ROWS8_VECTORS]; \
    for (int v = 0; v < N; v++) acc[v] = P##_setzero_ps(); \
    for (int64_t b = 0; b < nb; b++) { \
        const uint8_t *blk = row0 + bytes * b, *q = block_qs(kind, blk); \
        prefetch_next_group(row0, stride, R, b, bytes); \
        VI T[4]; \
        TRANSPOSE(q, stride, T); \
        VI ph[ROWS8_VECTORS], pl[ROWS8_VECTORS]; \
        for (int v = 0; v < N; v++) ph[v] = pl[v] = z; \
        for (int k = 0; k < 4; k++) { \
            VI lo = P##_and_##SI(T[k], nibble), hi = P##_and_##SI(P##_srli_epi16(T[k], 4), nibble); \
            for (int v = 0; v < N; v++) { \
                const int8_t *h = xq[v].h + 32 * b + 4 * k, *l = xq[v].l + 32 * b + 4 * k; \
                int32_t h0, h1, l0, l1; \
                memcpy(&h0, h, 4), memcpy(&h1, h + 16, 4), memcpy(&l0, l, 4), memcpy(&l1, l + 16, 4); \
                ph[v] = DP(DP(ph[v], lo, P##_set1_epi32(h0)), hi, P##_set1_epi32(h1)); \
                pl[v] = DP(DP(pl[v], lo, P##_set1_epi32(l0)), hi, P##_set1_epi32(l1)); \
            } \
        } \
        VF d, m = P##_setzero_ps(); \
        if (kind == GALE_Q4_1) { \
            VI dm = DWORDS(blk, stride, offsets); /* d | m << 16 */ \
            d = HALVES_PS(dm), m = HALVES_PS(P##_srli_epi32(dm, 16)); \
        } else { \
            d = D_PS(blk, stride, offsets); \
        } \
        for (int v = 0; v < N; v++) { \
            VI p = P##_add_epi32(P##_slli_epi32(WIDEN(ph[v]), 8), WIDEN(pl[v])); \
            if (kind == GALE_Q4_0) p = P##_add_epi32(p, P##_set1_epi32(xq[v].minus8[8 * b])); \
            acc[v] = P##_fmadd_ps(P##_cvtepi32_ps(p), P##_mul_ps(d, P##_set1_ps(xq[v].scale[b])), acc[v]); \
            if (kind == GALE_Q4_1) acc[v] = P##_fmadd_ps(m, P##_set1_ps(xq[v].sum[b]), acc[v]); \
        } \
    } \
    for (int v = 0; v < N; v++) P##_storeu_ps(out + v * out_stride, acc[v]); \
}

ROWS_Q4(rows8_q4, 8, __m256i, __m256, _mm256, si256, DP16, WIDEN16, transpose_rows8_16, rows8_dwords, halves8_ps,
        rows8_d_ps)

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GALE_ROWS16 1
/* transpose_rows8_16 for sixteen rows: rows r, r + 4, r + 8, r + 12 as the 128-bit quarters of one vector, then
 * the same eight unpacks within each quarter, so T[k] lane r = row r's bytes 4k..4k+3 (r = 0..15). */
static inline void transpose_rows16_16(const uint8_t *p, int64_t stride, __m512i T[4]) {
    __m512i y[4];
    for (int i = 0; i < 4; i++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + i * stride)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (i + 4) * stride)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (i + 8) * stride)), 2);
        y[i] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (i + 12) * stride)), 3);
    }
    __m512i t0 = _mm512_unpacklo_epi32(y[0], y[1]), t1 = _mm512_unpackhi_epi32(y[0], y[1]);
    __m512i t2 = _mm512_unpacklo_epi32(y[2], y[3]), t3 = _mm512_unpackhi_epi32(y[2], y[3]);
    T[0] = _mm512_unpacklo_epi64(t0, t2), T[1] = _mm512_unpackhi_epi64(t0, t2);
    T[2] = _mm512_unpacklo_epi64(t1, t3), T[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* The dword at p + r stride in lane r (r = 0..15). */
static inline __m512i rows16_dwords(const uint8_t *p, int64_t stride, __m256i offsets) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(rows8_dwords(p, stride, offsets)),
                              rows8_dwords(p + 8 * stride, stride, offsets), 1);
}

static inline __m512 halves16_ps(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }

static inline __m512 rows16_d_ps(const uint8_t *p, int64_t stride, __m256i offsets) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(rows8_d_ps(p, stride, offsets)),
                              rows8_d_ps(p + 8 * stride, stride, offsets), 1);
}

#define WIDEN_NONE(acc) (acc)
ROWS_Q4(rows16_q4, 16, __m512i, __m512, _mm512, si512, _mm512_dpbusd_epi32, WIDEN_NONE, transpose_rows16_16,
        rows16_dwords, halves16_ps, rows16_d_ps)
#else
#define GALE_ROWS16 0
#endif
#undef ROWS_Q4

/* k_scales_mins_packed for eight rows at once: lane r of S[i] is dword i of row r's 12 scale bytes, lane r of
 * out[i] dword i of row r's unpacked scales (out[0], out[1]: sc 0-3, 4-7) and minimums (out[2], out[3]). */
static inline void k_scales_mins_rows8(const __m256i S[3], __m256i out[4]) {
    const __m256i low6 = _mm256_set1_epi32(0x3f3f3f3f), low4 = _mm256_set1_epi32(0x0f0f0f0f),
                  top2 = _mm256_set1_epi32(0x30303030); /* (x >> 6 & 3) << 4 = x >> 2 & 0x30 per byte */
    out[0] = _mm256_and_si256(S[0], low6);
    out[1] = _mm256_or_si256(_mm256_and_si256(S[2], low4), _mm256_and_si256(_mm256_srli_epi32(S[0], 2), top2));
    out[2] = _mm256_and_si256(S[1], low6);
    out[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(S[2], 4), low4),
                             _mm256_and_si256(_mm256_srli_epi32(S[1], 2), top2));
}

/* Byte i (0-3) of each int32 lane, as an int32. */
static inline __m256i lane_byte(__m256i v, const int i) {
    return i == 3 ? _mm256_srli_epi32(v, 24) : _mm256_and_si256(_mm256_srli_epi32(v, 8 * i), _mm256_set1_epi32(0xff));
}

/* Bit `bit` of each byte of v moved to bit 4 (16-bit shifts: the mask keeps what stayed in its own byte). */
static inline __m256i bit_to_4(__m256i v, const int bit) {
    __m256i moved = bit <= 4 ? _mm256_slli_epi16(v, 4 - bit) : _mm256_srli_epi16(v, bit - 4);
    return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

/* A 64-column step's sums into rows8_q45k's accumulators, sub-block 2j's (he, le: the planes' sums) times its
 * scales sc0, 2j + 1's (ho, lo) times sc1 (lane r: row r's). VNNI: 256 (q . h) + (q . l) per sub-block is exact
 * in int32 and below 2^24, so its fp32 conversion is too, and t accumulates sc (q . a) in fp32. Without it the
 * int16 pair sums widen by a vpmaddwd with the scale in both halves of each lane, into exact int32 sums per
 * plane (|H| <= 8 * 63 * 32 * 31 * 127 < 2^31), joined as 256 H + L at the super-block's end. */
static inline __attribute__((always_inline)) void scaled_sums(__m256i he, __m256i ho, __m256i le, __m256i lo,
                                                              __m256i sc0, __m256i sc1, __m256 *t, __m256i *H,
                                                              __m256i *L) {
#if GALE_VNNI
    (void)H, (void)L;
    __m256i p0 = _mm256_add_epi32(_mm256_slli_epi32(he, 8), le), p1 = _mm256_add_epi32(_mm256_slli_epi32(ho, 8), lo);
    *t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_cvtepi32_ps(sc0), *t);
    *t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_cvtepi32_ps(sc1), *t);
#else
    (void)t;
    __m256i s0 = _mm256_or_si256(sc0, _mm256_slli_epi32(sc0, 16)), s1 = _mm256_or_si256(sc1, _mm256_slli_epi32(sc1, 16));
    *H = _mm256_add_epi32(*H, _mm256_add_epi32(_mm256_madd_epi16(he, s0), _mm256_madd_epi16(ho, s1)));
    *L = _mm256_add_epi32(*L, _mm256_add_epi32(_mm256_madd_epi16(le, s0), _mm256_madd_epi16(lo, s1)));
#endif
}

/* Eight consecutive rows of Q4_K or Q5_K against N vectors, as rows8_q4 does Q4_0: out[v * out_stride + r] =
 * row r . x[v]. Per super-block, the rows' first 16 bytes (d | dmin, then the 12 scale bytes) come in one
 * transposition (head[i] lane r = row r's dword i) and are unpacked lane by lane (lane r: row r's sub-block
 * scales sc_i and minimums m_i); per 64 columns j the rows' 32 quant bytes are transposed 16 bytes at a time in
 * 4-byte groups (k = 4 half + i: T[i] lane r = row r's bytes 4k..4k+3 of qs[32 j ..]), whose low nibbles are
 * sub-block 2j's columns 4k..4k+3 and high nibbles sub-block 2j+1's (Q5_K: bits 2j, 2j + 1 of the transposed
 * qh bytes QH[k] are their fifth bits). Example: row 2, j = 1, k = 5 (half 1, i = 1): T[1] lane 2 low nibbles =
 * W[2, 256 b + 64 + 20..23], meeting the planes' columns 64 + 20..23 of the group. The sub-blocks' q . h and
 * q . l meet their scales in scaled_sums; m_i s sum(a)_i accumulates in fp32 (msum); the super-block adds
 * s d sum - dmin msum. */
static inline __attribute__((always_inline)) void rows8_q45k(int64_t kind, const uint8_t *row0, int64_t stride,
                                                             const gale_xq *xq, int64_t nb, const int N, float *out,
                                                             int64_t out_stride) {
    const int64_t bytes = BLOCK_BYTES[kind], qs_at = kind == GALE_Q5_K ? 48 : 16;
    const __m256i nibble = _mm256_set1_epi8(0x0f), z = _mm256_setzero_si256();
    __m256 acc[ROWS8_VECTORS];
    for (int v = 0; v < N; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row0 + bytes * b;
        prefetch_next_group(row0, stride, 8, b, bytes);
        __m256i head[4], sm[4], QH[8]; /* head[0] lane r: row r's d | dmin << 16; head[1..3]: its scale bytes */
        transpose_rows8_16(blk, stride, head);
        const __m256i dm = head[0];
        k_scales_mins_rows8(head + 1, sm);
        if (kind == GALE_Q5_K) transpose_rows8(blk + 16, stride, QH);
        __m256 t[ROWS8_VECTORS]; /* sum_i sc_i (q . a)_i */
        __m256i H[ROWS8_VECTORS], L[ROWS8_VECTORS]; /* without VNNI: sum_i sc_i (q . h)_i, sum_i sc_i (q . l)_i */
        for (int v = 0; v < N; v++) t[v] = _mm256_setzero_ps(), H[v] = L[v] = z;
        const int steps = GALE_VNNI || kind == GALE_Q4_K ? 8 : 4; /* k steps per widening: DP16's bound */
        for (int j = 0; j < 4; j++) {
            /* sub-blocks 2j, 2j + 1: bytes (2j) % 4, (2j + 1) % 4 of scale dword j / 2 */
            __m256i sc0 = lane_byte(sm[j / 2], (2 * j) % 4), sc1 = lane_byte(sm[j / 2], (2 * j + 1) % 4);
            __m256i he[ROWS8_VECTORS], le[ROWS8_VECTORS], ho[ROWS8_VECTORS], lo[ROWS8_VECTORS];
            for (int half = 0; half < 2; half++) { /* 16 bytes (T[0..3]) at a time: fewer registers live */
                __m256i T[4];
                transpose_rows8_16(blk + qs_at + 32 * j + 16 * half, stride, T);
                if (half == 0 || steps == 4)
                    for (int v = 0; v < N; v++) he[v] = le[v] = ho[v] = lo[v] = z;
                for (int i = 0; i < 4; i++) {
                    const int k = 4 * half + i;
                    __m256i even = _mm256_and_si256(T[i], nibble), odd = _mm256_and_si256(_mm256_srli_epi16(T[i], 4), nibble);
                    if (kind == GALE_Q5_K) {
                        even = _mm256_or_si256(even, bit_to_4(QH[k], 2 * j));
                        odd = _mm256_or_si256(odd, bit_to_4(QH[k], 2 * j + 1));
                    }
                    for (int v = 0; v < N; v++) {
                        const int8_t *h = xq[v].h + 256 * b + 64 * j + 4 * k, *l = xq[v].l + 256 * b + 64 * j + 4 * k;
                        int32_t h0, h1, l0, l1;
                        memcpy(&h0, h, 4), memcpy(&h1, h + 32, 4), memcpy(&l0, l, 4), memcpy(&l1, l + 32, 4);
                        he[v] = DP16(he[v], even, _mm256_set1_epi32(h0));
                        ho[v] = DP16(ho[v], odd, _mm256_set1_epi32(h1));
                        le[v] = DP16(le[v], even, _mm256_set1_epi32(l0));
                        lo[v] = DP16(lo[v], odd, _mm256_set1_epi32(l1));
                    }
                }
                if (half == 1 || steps == 4)
                    for (int v = 0; v < N; v++) scaled_sums(he[v], ho[v], le[v], lo[v], sc0, sc1, &t[v], &H[v], &L[v]);
            }
        }
        if (!GALE_VNNI)
            for (int v = 0; v < N; v++) t[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(H[v]), _mm256_set1_ps(256.f), _mm256_cvtepi32_ps(L[v]));
        __m256 d = halves8_ps(dm), dmin = halves8_ps(_mm256_srli_epi32(dm, 16));
        __m256 msum[ROWS8_VECTORS]; /* sum_i m_i s sum(a)_i in fp32: vpmulld's eight products cost ~10% (Zen 3) */
        for (int v = 0; v < N; v++) msum[v] = _mm256_setzero_ps();
        for (int i = 0; i < 8; i++) {
            __m256 m = _mm256_cvtepi32_ps(lane_byte(sm[2 + i / 4], i % 4));
            for (int v = 0; v < N; v++) msum[v] = _mm256_fmadd_ps(m, _mm256_set1_ps(xq[v].sum[8 * b + i]), msum[v]);
        }
        for (int v = 0; v < N; v++) {
            __m256 tv = _mm256_fmsub_ps(_mm256_mul_ps(t[v], d), _mm256_set1_ps(xq[v].scale[b]), _mm256_mul_ps(msum[v], dmin));
            acc[v] = _mm256_add_ps(acc[v], tv);
        }
    }
    for (int v = 0; v < N; v++) _mm256_storeu_ps(out + v * out_stride, acc[v]);
}

/* Eight consecutive rows of Q8_0 against N vectors (VNNI only: see rows8_kind), as rows8_q4 does Q4_0: the rows'
 * 32 quant bytes per block transposed in 4-byte groups (T[k] lane r = row r's bytes 4k..4k+3 = columns
 * 4k..4k+3), made unsigned by a bias, u = q + 128 (vpdpbusd's unsigned side), so each lane sums u . h and u . l
 * and the low plane's accumulator starts at -128 sum(a): q . a = 256 (u . h) + (u . l) - 128 sum(a), exact in
 * int32 (|256 u . h| <= 256 * 32 * 255 * 127). */
static inline __attribute__((always_inline)) void rows8_q8(const uint8_t *row0, int64_t stride, const gale_xq *xq,
                                                           int64_t nb, const int N, float *out, int64_t out_stride) {
    const int64_t bytes = BLOCK_BYTES[GALE_Q8_0];
    const __m256i bias = _mm256_set1_epi8((char)0x80), z = _mm256_setzero_si256();
    const __m256i offsets = row_offsets(stride);
    __m256 acc[ROWS8_VECTORS];
    for (int v = 0; v < N; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row0 + bytes * b;
        prefetch_next_group(row0, stride, 8, b, bytes);
        __m256i T[8];
        transpose_rows8(blk + 2, stride, T);
        __m256i ph[ROWS8_VECTORS], pl[ROWS8_VECTORS];
        for (int v = 0; v < N; v++) ph[v] = z, pl[v] = _mm256_set1_epi32(-128 * xq[v].sum32[b]);
        for (int k = 0; k < 8; k++) {
            __m256i u = _mm256_xor_si256(T[k], bias);
            for (int v = 0; v < N; v++) {
                int32_t h0, l0;
                memcpy(&h0, xq[v].h + 32 * b + 4 * k, 4), memcpy(&l0, xq[v].l + 32 * b + 4 * k, 4);
                ph[v] = DPBUSD(ph[v], u, _mm256_set1_epi32(h0));
                pl[v] = DPBUSD(pl[v], u, _mm256_set1_epi32(l0));
            }
        }
        __m256 d = rows8_d_ps(blk, stride, offsets);
        for (int v = 0; v < N; v++) {
            __m256i p = _mm256_add_epi32(_mm256_slli_epi32(ph[v], 8), pl[v]);
            acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(d, _mm256_set1_ps(xq[v].scale[b])), acc[v]);
        }
    }
    for (int v = 0; v < N; v++) _mm256_storeu_ps(out + v * out_stride, acc[v]);
}

/* Kinds multiplied eight rows at a time: all but Q6_K (rows8 was 0.67-0.73x: NOTES), and Q8_0 only with VNNI: its
 * biased bytes would overflow vpmaddubsw's int16 pair sums (2 * 255 * 127). */
static inline int rows8_kind(int64_t kind) { return kind != GALE_Q6_K && (GALE_VNNI || kind != GALE_Q8_0); }

/* Vectors per rows8_dot pass. Q4_K / Q5_K without VNNI take two: their eight accumulators of two vectors fill
 * AVX2's 16 registers, and more spill (Zen 3, one Q4_K GEMV of the 7B shapes on two threads from DRAM, against
 * the per-row kernel: one vector 1.15x, two 1.17x; three and four in one pass 0.85x / 0.92x, in passes of two
 * 0.90x / 0.94x). Passes keep each vector's products independent of its batch, which choosing the per-row
 * kernel for larger batches would not. */
static inline int64_t rows8_vectors(int64_t kind) { return !GALE_VNNI && is_k(kind) ? 2 : ROWS8_VECTORS; }

/* The eight-row kernels (rows8_kind) for n <= ROWS8_VECTORS vectors, each (kind, n) its own unrolled copy. */
static void rows8_dot(int64_t kind, const uint8_t *row0, int64_t stride, const gale_xq *xq, int64_t nb, int64_t n,
                      float *out, int64_t out_stride) {
#define ROWS8_CASE(N) \
    case N: \
        if (kind == GALE_Q4_0) rows8_q4(GALE_Q4_0, row0, stride, xq, nb, N, out, out_stride); \
        else if (kind == GALE_Q4_1) rows8_q4(GALE_Q4_1, row0, stride, xq, nb, N, out, out_stride); \
        else if (kind == GALE_Q8_0) rows8_q8(row0, stride, xq, nb, N, out, out_stride); \
        else if (kind == GALE_Q4_K) rows8_q45k(GALE_Q4_K, row0, stride, xq, nb, N, out, out_stride); \
        else rows8_q45k(GALE_Q5_K, row0, stride, xq, nb, N, out, out_stride); \
        return;
    switch (n) {
        ROWS8_CASE(1)
        ROWS8_CASE(2)
        ROWS8_CASE(3)
        ROWS8_CASE(4)
    }
#undef ROWS8_CASE
}

/* R = 8 or 16 consecutive rows (rows_step) for n <= ROWS8_VECTORS vectors: sixteen through rows16_q4 from three
 * vectors, else as two groups of eight (Zen 4, one GEMV from DRAM, rows16 against rows8: one vector 0.90-1.02x, two
 * 0.83-1.11x, three 0.98-1.22x, four 1.01-1.39x). */
static void rows_dot(int64_t kind, int64_t R, const uint8_t *row0, int64_t stride, const gale_xq *xq, int64_t nb,
                     int64_t n, float *out, int64_t out_stride) {
#if GALE_ROWS16
#define ROWS16_CASE(N) \
    case N: \
        if (kind == GALE_Q4_0) rows16_q4(GALE_Q4_0, row0, stride, xq, nb, N, out, out_stride); \
        else rows16_q4(GALE_Q4_1, row0, stride, xq, nb, N, out, out_stride); \
        return;
    if (R == 16 && n > 2) switch (n) {
        ROWS16_CASE(3)
        ROWS16_CASE(4)
    }
#undef ROWS16_CASE
#endif
    for (int64_t r = 0; r < R; r += 8) rows8_dot(kind, row0 + r * stride, stride, xq, nb, n, out + r, out_stride);
}

/* Rows per rows_dot call: sixteen for batches of Q4_0 / Q4_1 (three vectors or more) where 512-bit VNNI runs
 * them, else eight. */
static inline int64_t rows_step(int64_t kind, int64_t rows, int64_t n) {
    return GALE_ROWS16 && (kind == GALE_Q4_0 || kind == GALE_Q4_1) && n > 2 && rows % 16 == 0 ? 16 : 8;
}

/* One row of Q4_K / Q5_K for N vectors: per super-block s * (d * sum_i ((sc_i q) . a)_i - dmin * sum_i m_i
 * sum(a)_i), in integers until the super-block's end. The 6-bit scales multiply the widened weights in 16 bits
 * (sc q <= 63 * 31), once for all vectors: at 4 vectors 1.1-1.15x faster than a 32-bit multiply of each
 * vector's sums, the same at 1. Sums stay exact int32: each lane adds 4 products per sub-block, |sc q a| <=
 * 63 * 31 * 32639, 8 sub-blocks: < 2^31; |sum(a)| <= 32 * 32639 per sub-block, times m <= 63. */
static inline __attribute__((always_inline)) void row_dot_q45k(int64_t kind, const uint8_t *row, const gale_xq *xq,
                                                               int64_t nb, const int N, float *out) {
    const int64_t bytes = BLOCK_BYTES[kind];
    const __m256i nibble = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1), z = _mm256_setzero_si256();
    __m256 acc[XQ_VECTORS];
    for (int v = 0; v < N; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bytes, *qs = blk + (kind == GALE_Q5_K ? 48 : 16);
        prefetch_ahead(blk, 3); /* 144 or 176 bytes */
        uint32_t packed[4];
        k_scales_mins_packed(blk + 4, packed);
        const uint8_t *sc = (const uint8_t *)packed; /* bytes 0-7: the scales, 8-15: the minimums */
        /* the 16 bytes from registers: one vector load of the four words just stored cannot be forwarded
         * from the stores (Intel stalls ~15 cycles): Q4_K ran 13 -> 20 G weights/s per core without it */
        __m128i sm = _mm_set_epi32((int)packed[3], (int)packed[2], (int)packed[1], (int)packed[0]);
        __m256i mins = _mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8));
        __m256i t[XQ_VECTORS]; /* sum_i ((sc_i q) . a)_i, lanes to be summed */
        for (int v = 0; v < N; v++) t[v] = z;
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        for (int j = 0; j < 4; j++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i w0 = _mm256_and_si256(raw, nibble), w1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
            if (kind == GALE_Q5_K) {
                w0 = _mm256_or_si256(w0, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4));
                w1 = _mm256_or_si256(w1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4));
            }
            __m256i c0 = _mm256_set1_epi16(sc[2 * j]), c1 = _mm256_set1_epi16(sc[2 * j + 1]);
            __m256i l0 = _mm256_mullo_epi16(_mm256_unpacklo_epi8(w0, z), c0);
            __m256i h0 = _mm256_mullo_epi16(_mm256_unpackhi_epi8(w0, z), c0);
            __m256i l1 = _mm256_mullo_epi16(_mm256_unpacklo_epi8(w1, z), c1);
            __m256i h1 = _mm256_mullo_epi16(_mm256_unpackhi_epi8(w1, z), c1);
            for (int v = 0; v < N; v++) {
                const int16_t *a = xq[v].a + 256 * b + 64 * j;
                t[v] = _mm256_add_epi32(t[v], _mm256_add_epi32(dot32(l0, h0, a), dot32(l1, h1, a + 32)));
            }
        }
        __m256 d = _mm256_set1_ps(half_at(blk)), dmin = _mm256_set1_ps(half_at(blk + 2));
        for (int v = 0; v < N; v++) {
            __m256i msum = _mm256_mullo_epi32(mins, _mm256_loadu_si256((const __m256i *)(xq[v].sum32 + 8 * b)));
            __m256 tv = _mm256_fmsub_ps(_mm256_cvtepi32_ps(t[v]), d, _mm256_mul_ps(_mm256_cvtepi32_ps(msum), dmin));
            acc[v] = _mm256_fmadd_ps(tv, _mm256_set1_ps(xq[v].scale[b]), acc[v]);
        }
    }
    for (int v = 0; v < N; v++) out[v] = hsum(acc[v]);
}

/* Widths from which gemv_int takes Q6_K two rows at a time (rows_q6k): one vector's int16 activations (2
 * bytes a column) past half of a 32 KB L1. At 4096 columns pairs ran 0.74x one row at a time (Zen 4). */
#define Q6K_PAIR_COLS 8192

/* R consecutive rows of Q6_K (row r at row0 + r stride) for N vectors: out[r * N + v] = row r . x[v]; per
 * super-block d * s * (sum_i sc_i (q . a)_i - 32 sum_i sc_i sum(a)_i), 16 scales of 16 columns: a 32-column
 * product's lanes 0-3 take scale 2 p, lanes 4-7 scale 2 p + 1. R = 2 shares each activation load between two
 * rows: at 14336 columns a vector's 28 KB of int16 activations no longer stay in L1 beside the streamed
 * weights, and one row at a time ran at ~19 GB/s there against ~33 at 4096 columns (Zen 4). R <= 2 and
 * R * N <= XQ_VECTORS (the accumulators' arrays). */
static inline __attribute__((always_inline)) void rows_q6k(const uint8_t *row0, int64_t stride, const int R,
                                                           const gale_xq *xq, int64_t nb, const int N, float *out) {
    const __m256i nibble = _mm256_set1_epi8(0x0f), bits45 = _mm256_set1_epi8(0x30), z = _mm256_setzero_si256();
    const int RN = R * N;
    const int C = RN == 1 ? 4 : RN == 2 ? 2 : 1; /* FMA chains per (row, vector): few of them need several */
    __m256 acc[XQ_VECTORS];
    for (int i = 0; i < RN; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (R > 1) prefetch_next_group(row0, stride, R, b, BLOCK_BYTES[GALE_Q6_K]);
        __m256 fsc[2][2];
        __m256 t[4][XQ_VECTORS]; /* -32 d sum_i sc_i sum(a)_i, then + d sum_i sc_i (q . a)_i */
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = row0 + r * stride + b * BLOCK_BYTES[GALE_Q6_K];
            if (R == 1) prefetch_ahead(blk, 4); /* 210 bytes */
            __m128i sc = _mm_loadu_si128((const __m128i *)(blk + 192));
            __m256i sc_lo = _mm256_cvtepi8_epi32(sc), sc_hi = _mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8));
            float d = half_at(blk + 208);
            fsc[r][0] = _mm256_mul_ps(_mm256_cvtepi32_ps(sc_lo), _mm256_set1_ps(d));
            fsc[r][1] = _mm256_mul_ps(_mm256_cvtepi32_ps(sc_hi), _mm256_set1_ps(d));
            for (int v = 0; v < N; v++) {
                const int32_t *s16 = xq[v].sum16 + 16 * b;
                __m256 lo = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)s16));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(s16 + 8)));
                t[0][r * N + v] = _mm256_mul_ps(_mm256_set1_ps(-32.f),
                                                _mm256_fmadd_ps(fsc[r][1], hi, _mm256_mul_ps(fsc[r][0], lo)));
                for (int c = 1; c < C; c++) t[c][r * N + v] = _mm256_setzero_ps();
            }
        }
        for (int half = 0; half < 2; half++) {
            __m256i low[2][4], qh[2];
            for (int r = 0; r < R; r++) {
                const uint8_t *blk = row0 + r * stride + b * BLOCK_BYTES[GALE_Q6_K], *ql = blk + 64 * half;
                __m256i r0 = _mm256_loadu_si256((const __m256i *)ql), r1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
                qh[r] = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * half));
                low[r][0] = _mm256_and_si256(r0, nibble), low[r][1] = _mm256_and_si256(r1, nibble);
                low[r][2] = _mm256_and_si256(_mm256_srli_epi16(r0, 4), nibble);
                low[r][3] = _mm256_and_si256(_mm256_srli_epi16(r1, 4), nibble);
            }
            for (int part = 0; part < 4; part++) {
                __m256i pick = _mm256_setr_epi32(2 * part, 2 * part, 2 * part, 2 * part, 2 * part + 1, 2 * part + 1,
                                                 2 * part + 1, 2 * part + 1);
                for (int r = 0; r < R; r++) {
                    /* bits 2 part, 2 part + 1 of each qh byte to bits 4-5 (16-bit shifts: the mask drops what
                     * crosses from the neighbouring byte) */
                    __m256i moved = part < 2 ? _mm256_slli_epi16(qh[r], 4 - 2 * part)
                                             : part == 2 ? qh[r] : _mm256_srli_epi16(qh[r], 2);
                    __m256i w = _mm256_or_si256(low[r][part], _mm256_and_si256(moved, bits45));
                    __m256i l = _mm256_unpacklo_epi8(w, z), h = _mm256_unpackhi_epi8(w, z);
                    __m256 scale = _mm256_permutevar8x32_ps(fsc[r][half], pick);
                    for (int v = 0; v < N; v++) {
                        __m256i p = dot32(l, h, xq[v].a + 256 * b + 128 * half + 32 * part);
                        __m256 *tc = &t[part % C][r * N + v];
                        *tc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, *tc);
                    }
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int v = 0; v < N; v++) {
                int i = r * N + v;
                for (int c = 1; c < C; c++) t[0][i] = _mm256_add_ps(t[0][i], t[c][i]);
                acc[i] = _mm256_fmadd_ps(t[0][i], _mm256_set1_ps(xq[v].scale[b]), acc[i]);
            }
    }
    for (int i = 0; i < RN; i++) out[i] = hsum(acc[i]);
}

static inline __attribute__((always_inline)) void row_dot_xq_n(int64_t kind, const uint8_t *row, const gale_xq *xq,
                                                               int64_t nb, const int N, float *out) {
    if (kind == GALE_Q6_K) rows_q6k(row, 0, 1, xq, nb, N, out);
    else if (is_k(kind)) row_dot_q45k(kind, row, xq, nb, N, out);
    else row_dot_legacy(kind, row, xq, nb, N, out);
}

/* out[v] = row . x[v] for n <= XQ_VECTORS vectors. */
static void row_dot_xq(int64_t kind, const uint8_t *row, const gale_xq *xq, int64_t nb, int64_t n, float *out) {
    switch (n) {
    case 1: row_dot_xq_n(kind, row, xq, nb, 1, out); break;
    case 2: row_dot_xq_n(kind, row, xq, nb, 2, out); break;
    case 3: row_dot_xq_n(kind, row, xq, nb, 3, out); break;
    default: row_dot_xq_n(kind, row, xq, nb, 4, out); break;
    }
}
#endif

/* One output row (its blocks at `row`) for N vectors, activations in fp32: each block is dequantized once
 * (the loaders' values) and multiplied into every vector. N is a compile-time constant at each call
 * (row_dot's switch), so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_dot_n(int64_t kind, const uint8_t *row, const float *x,
                                                            int64_t nb, int64_t cols, const int N, float *out) {
    const int64_t bytes = BLOCK_BYTES[kind];
#ifdef GALE_AVX2
    __m256 w[4], acc[MAX_VECTORS];
    float wk[256] __attribute__((aligned(32)));
    for (int v = 0; v < N; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bytes;
        if (is_k(kind)) {
            block_weights(kind, blk, wk);
            for (int64_t k = 0; k < 256; k += 8) {
                __m256 wv = _mm256_load_ps(wk + k);
                for (int v = 0; v < N; v++) acc[v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + v * cols + b * 256 + k), acc[v]);
            }
            continue;
        }
        const uint8_t *qs = block_qs(kind, blk);
        if (kind == GALE_Q8_0) unpack_q8((const int8_t *)qs, w); else unpack_q4(qs, w);
        float d = half_at(blk);
        __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(block_m(kind, blk, d));
        for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(w[k], vd, vm);
        for (int k = 0; k < 4; k++)
            for (int v = 0; v < N; v++)
                acc[v] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + v * cols + b * 32 + 8 * k), acc[v]);
    }
    for (int v = 0; v < N; v++) out[v] = hsum(acc[v]);
#else
    float acc[MAX_VECTORS] = {0}, w[256];
    const int64_t elems = BLOCK_ELEMS[kind];
    for (int64_t b = 0; b < nb; b++) {
        block_weights(kind, row + b * bytes, w);
        for (int v = 0; v < N; v++) {
            const float *xb = x + v * cols + b * elems;
            float s = 0.f;
            for (int64_t j = 0; j < elems; j++) s += w[j] * xb[j];
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


/* One block matrix in GGUF records, rows = output features (kind: GALE_Q4_0 .. GALE_Q6_K). Mirrored by
 * quant.py's _QMat. */
typedef struct {
    int64_t kind;
    const uint8_t *blocks;
    int64_t rows, cols;
} gale_qmat;

static inline int64_t row_bytes(const gale_qmat *w) { return w->cols / BLOCK_ELEMS[w->kind] * BLOCK_BYTES[w->kind]; }

/* y[v] = W x[v] for up to MAX_VECTORS vectors: each block is read once for all of them. */
static void gemv_pass(const gale_qmat *w, const float *x, float *y, int64_t n, int threads) {
    int64_t rows = w->rows, cols = w->cols, nb = cols / BLOCK_ELEMS[w->kind], stride = row_bytes(w);
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        float out[MAX_VECTORS];
        row_dot(w->kind, w->blocks + r * stride, x, nb, cols, n, out);
        for (int64_t v = 0; v < n; v++) y[v * rows + r] = out[v];
    }
}

#ifdef GALE_AVX2
/* The integer path for n vectors: each quantized once (per 32 columns and/or per 256, as the kinds need),
 * then every row meets all of them while it sits in L1, its weights widened once per XQ_VECTORS of them. */
static void gemv_int(const gale_qmat *const *ws, float *const *ys, int count, const float *x, int64_t n,
                     int threads) {
    int64_t cols = ws[0]->cols, rows_total = 0;
    int need[2] = {0, 0}; /* 32-column groups, 256-column groups */
    for (int i = 0; i < count; i++) {
        rows_total += ws[i]->rows;
        need[is_k(ws[i]->kind)] = 1;
    }
    gale_xq *xq = calloc(2 * n, sizeof(gale_xq)); /* [group kind][vector] */
    for (int g = 0; g < 2; g++)
        for (int64_t v = 0; v < n && need[g]; v++) {
            xq_alloc(&xq[g * n + v], cols);
            xq_quantize(x + v * cols, cols, g ? 256 : 32, &xq[g * n + v]);
        }
#pragma omp parallel num_threads(threads) if (rows_total * cols >= 65536)
    for (int i = 0; i < count; i++) {
        const gale_qmat *w = ws[i];
        int64_t stride = row_bytes(w), nb = cols / BLOCK_ELEMS[w->kind];
        const gale_xq *q = xq + is_k(w->kind) * n;
        float *y = ys[i];
        if (rows8_kind(w->kind) && w->rows % 8 == 0) {
            const int64_t step = rows_step(w->kind, w->rows, n), pass = rows8_vectors(w->kind);
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < w->rows; r += step)
                for (int64_t v = 0; v < n; v += pass)
                    rows_dot(w->kind, step, w->blocks + r * stride, stride, q + v,
                             nb, n - v < pass ? n - v : pass, y + v * w->rows + r, w->rows);
            continue;
        }
        if (w->kind == GALE_Q6_K && n == 1 && w->rows % 2 == 0 && cols >= Q6K_PAIR_COLS) {
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < w->rows; r += 2) {
                float out[2];
                rows_q6k(w->blocks + r * stride, stride, 2, q, nb, 1, out);
                y[r] = out[0], y[r + 1] = out[1];
            }
            continue;
        }
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < w->rows; r++)
            for (int64_t v = 0; v < n; v += XQ_VECTORS) {
                float out[XQ_VECTORS];
                int64_t m = n - v < XQ_VECTORS ? n - v : XQ_VECTORS;
                row_dot_xq(w->kind, w->blocks + r * stride, q + v, nb, m, out);
                for (int64_t j = 0; j < m; j++) y[(v + j) * w->rows + r] = out[j];
            }
    }
    for (int64_t j = 0; j < 2 * n; j++)
        if (xq[j].a) xq_free(&xq[j]);
    free(xq);
}
#endif

/* y[i] = x W[i]^T for `count` matrices of the same input width (q/k/v, or gate/up: one input), x [n, cols]
 * -> y[i] [n, rows_i], the matrices' rows in one parallel region without barriers between them. One vector,
 * and any number of them for the K-quants, take the integer path (AVX2 builds); so do batches of the 32-wide
 * kinds unless `fp32_batches`, which multiplies them in fp32 passes of MAX_VECTORS that read each block once
 * for all of them. QuantLinear (prefill, scoring) asks for that: a batch of the default model (Q4_1) then
 * scores as the dequantized model does whatever its composition, where the integer path's 2^-16 rounding
 * moves batched log-likelihoods by ~1e-3 nats. The decode step does not: it is the gated path at any batch
 * size, and ~1.2x faster there. */
static void gemv_shared(const gale_qmat *const *ws, float *const *ys, int count, const float *x, int64_t n,
                        int fp32_batches, int threads) {
    int64_t cols = ws[0]->cols;
#ifdef GALE_AVX2
    int all_k = 1;
    for (int i = 0; i < count; i++) all_k &= is_k(ws[i]->kind);
    if (n == 1 || all_k || !fp32_batches) {
        gemv_int(ws, ys, count, x, n, threads);
        return;
    }
#endif
    for (int i = 0; i < count; i++)
        for (int64_t v = 0; v < n; v += MAX_VECTORS)
            gemv_pass(ws[i], x + v * cols, ys[i] + v * ws[i]->rows, n - v < MAX_VECTORS ? n - v : MAX_VECTORS,
                      threads);
}

/* y = x W^T for n vectors x [n, cols] -> y [n, rows]: QuantLinear's product (fp32_batches = 1), or the decode
 * step's (0: the integer path at any batch size, as gale_decode multiplies). */
void gale_gemv(const gale_qmat *w, const float *x, float *y, int64_t n, int fp32_batches, int threads) {
    gemv_shared(&w, &y, 1, x, n, fp32_batches, threads);
}

/* ---- fp32, fp16 and 16-bit integer rows: embedding lookups and prefill's GEMMs (quant.py's gemm_dtype) ----
 * Every kind's weights are w = a_g * q + b_g over groups g of 16 columns (q the block's integers; a, b its
 * scales: Q4_0 d and -8d, Q4_1 d and m, Q8_0 d and 0, Q4_K / Q5_K d sc_i and -dmin m_i, Q6_K d sc_i and -0
 * with q - 32, the -0 keeping the sign of a zero product). a_g * q is exact in fp32 for every kind but Q6_K
 * (<= 22 significant bits), and Q6_K adds nothing to it, so one fused multiply-add rounds exactly as
 * block_weights' multiply and add do; the rounding to fp16 (to nearest, ties to even, as torch's .half())
 * then gives dequantized().half() bit for bit (tests/test_quant.py). */
#if defined(__AVX512F__) && defined(__AVX512BW__) || defined(GALE_AVX2)
enum { PUT_F32 = 0, PUT_F16 = 1, PUT_INT = 2 };

/* Where PUT_INT writes a block's scales a and offsets b: those of columns c .. c + 15 at scale[(c >> shift)
 * stride] and off[(c >> shift) stride] (shift 4 or 5: 16 or 32 columns a scale; the GEMM's panels store rows
 * side by side). A shift, not a division: an integer division per 16 columns took a third of the unpacking. */
typedef struct {
    float *scale, *off;
    int shift;
    int64_t stride;
} put_scales;

/* 16 columns' int32 values: one 512-bit vector, or two 256-bit halves on AVX2 (block_put reads the same
 * either way). Without AVX-512 the dequantization was scalar: 2048 rows of a 7B Q4_0 layer took 17 ms against
 * the prefill GEMM's 53 (Zen 3), a quarter of prefill's time. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512i cols16;
static inline cols16 c16_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline cols16 c16_i8(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline cols16 c16_and(cols16 a, int32_t m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
static inline cols16 c16_or(cols16 a, cols16 b) { return _mm512_or_si512(a, b); }
static inline cols16 c16_sub(cols16 a, int32_t k) { return _mm512_sub_epi32(a, _mm512_set1_epi32(k)); }
static inline cols16 c16_srl(cols16 a, int n) { return _mm512_srli_epi32(a, n); }
static inline cols16 c16_sll(cols16 a, int n) { return _mm512_slli_epi32(a, n); }
#else
typedef struct { __m256i lo, hi; } cols16;
static inline cols16 c16_u8(const uint8_t *p) {
    return (cols16){_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))};
}
static inline cols16 c16_i8(const uint8_t *p) {
    return (cols16){_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)),
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))};
}
static inline cols16 c16_and(cols16 a, int32_t m) {
    return (cols16){_mm256_and_si256(a.lo, _mm256_set1_epi32(m)), _mm256_and_si256(a.hi, _mm256_set1_epi32(m))};
}
static inline cols16 c16_or(cols16 a, cols16 b) { return (cols16){_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
static inline cols16 c16_sub(cols16 a, int32_t k) {
    return (cols16){_mm256_sub_epi32(a.lo, _mm256_set1_epi32(k)), _mm256_sub_epi32(a.hi, _mm256_set1_epi32(k))};
}
static inline cols16 c16_srl(cols16 a, int n) { return (cols16){_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)}; }
static inline cols16 c16_sll(cols16 a, int n) { return (cols16){_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
#endif

/* 16 columns a * q + b from 16 int32 q, stored at dst + c as fp32, as fp16, or (PUT_INT) as q itself in int16
 * with a and b where `to` says: what the integer GEMM multiplies (gale_gemm_int). */
static inline __attribute__((always_inline)) void put16(cols16 q, float a, float b, void *dst, int64_t c,
                                                        const int mode, const put_scales *to) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (mode == PUT_INT) {
        _mm256_storeu_si256((__m256i *)((int16_t *)dst + c), _mm512_cvtepi32_epi16(q));
        to->scale[(c >> to->shift) * to->stride] = a, to->off[(c >> to->shift) * to->stride] = b;
        return;
    }
    __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_cvtepi32_ps(q), _mm512_set1_ps(b));
    if (mode == PUT_F16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + c), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else
        _mm512_storeu_ps((float *)dst + c, v);
#else /* PUT_INT: only gale_gemm_int asks for it, in AVX512-VNNI builds */
    __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    __m256 lo = _mm256_fmadd_ps(va, _mm256_cvtepi32_ps(q.lo), vb), hi = _mm256_fmadd_ps(va, _mm256_cvtepi32_ps(q.hi), vb);
    if (mode == PUT_F16) {
        const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + c), _mm256_cvtps_ph(lo, round));
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + c + 8), _mm256_cvtps_ph(hi, round));
    } else {
        _mm256_storeu_ps((float *)dst + c, lo);
        _mm256_storeu_ps((float *)dst + c + 8, hi);
    }
#endif
}

static inline cols16 nibbles16(const uint8_t *p, int shift) { return c16_and(c16_srl(c16_u8(p), shift), 0x0f); }

/* One block's columns as fp32, fp16 or integers and scales (put16's modes; the layouts at block_weights). Q4_0's
 * integers are q - 8 in PUT_INT (offset 0): the GEMM then skips the offsets' products for it. */
static inline __attribute__((always_inline)) void block_put(int64_t kind, const uint8_t *blk, void *w, const int mode,
                                                            const put_scales *to) {
    if (kind == GALE_Q4_K || kind == GALE_Q5_K) {
        float d = half_at(blk), dmin = half_at(blk + 2);
        uint8_t sc[8], m[8];
        k_scales_mins(blk + 4, sc, m);
        const uint8_t *qh = blk + 16, *qs = blk + (kind == GALE_Q5_K ? 48 : 16);
        for (int i = 0; i < 8; i++)
            for (int l = 0; l < 32; l += 16) {
                cols16 q = nibbles16(qs + 32 * (i / 2) + l, 4 * (i & 1));
                if (kind == GALE_Q5_K) q = c16_or(q, c16_sll(c16_and(c16_srl(c16_u8(qh + l), i), 1), 4));
                put16(q, d * (float)sc[i], -(dmin * (float)m[i]), w, 32 * i + l, mode, to);
            }
        return;
    }
    if (kind == GALE_Q6_K) {
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = half_at(blk + 208);
        for (int c = 0; c < 256; c += 16) { /* 16 columns share a scale, a half, a part and l0..l0+15 */
            int half = c / 128, part = (c % 128) / 32, l = c % 32;
            cols16 low = nibbles16(blk + 64 * half + l + 32 * (part & 1), 4 * (part >> 1));
            cols16 top = c16_and(c16_srl(c16_u8(blk + 128 + 32 * half + l), 2 * part), 3);
            cols16 q = c16_sub(c16_or(low, c16_sll(top, 4)), 32);
            put16(q, d * (float)sc[c / 16], -0.f, w, c, mode, to); /* -0: a negative scale times 0 stays -0 */
        }
        return;
    }
    const uint8_t *q = block_qs(kind, blk);
    float d = half_at(blk), m = block_m(kind, blk, d);
    if (kind == GALE_Q8_0) {
        for (int j = 0; j < 32; j += 16)
            put16(c16_i8(q + j), d, m, w, j, mode, to);
        return;
    }
    if (mode == PUT_INT && kind == GALE_Q4_0) {
        put16(c16_sub(nibbles16(q, 0), 8), d, 0.f, w, 0, mode, to);
        put16(c16_sub(nibbles16(q, 4), 8), d, 0.f, w, 16, mode, to);
        return;
    }
    put16(nibbles16(q, 0), d, m, w, 0, mode, to);
    put16(nibbles16(q, 4), d, m, w, 16, mode, to);
}

static void block_f16(int64_t kind, const uint8_t *blk, uint16_t *w) { block_put(kind, blk, w, PUT_F16, NULL); }

/* block_weights' values, 16 at a time (bit for bit: see above). */
static void block_fp32(int64_t kind, const uint8_t *blk, float *w) { block_put(kind, blk, w, PUT_F32, NULL); }
#else
static inline uint16_t f16_of(float f) { /* to nearest, ties to even */
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, sizeof u);
    return u;
}

static void block_f16(int64_t kind, const uint8_t *blk, uint16_t *w) {
    float f[256];
    block_weights(kind, blk, f);
    for (int64_t j = 0; j < BLOCK_ELEMS[kind]; j++) w[j] = f16_of(f[j]);
}

static void block_fp32(int64_t kind, const uint8_t *blk, float *w) { block_weights(kind, blk, w); }
#endif

/* fp32 rows of W: all of them (index NULL, n = rows) or rows index[0..n) (embedding lookups). */
void gale_dequant(const gale_qmat *w, const int64_t *index, int64_t n, float *out, int threads) {
    int64_t cols = w->cols, elems = BLOCK_ELEMS[w->kind], nb = cols / elems, bytes = BLOCK_BYTES[w->kind];
#pragma omp parallel for schedule(static) num_threads(threads) if (n * cols >= 65536)
    for (int64_t i = 0; i < n; i++) {
        int64_t r = index ? index[i] : i;
        for (int64_t b = 0; b < nb; b++)
            block_fp32(w->kind, w->blocks + (r * nb + b) * bytes, out + i * cols + b * elems);
    }
}

/* One row's planes (gale_dequant_planes) from its fp32 values; returns its scale. */
static float row_planes(const float *row, int64_t cols, int8_t *h, int8_t *l) {
    float top = 0.f;
    int finite = 1;
    int64_t c = 0;
#ifdef __AVX512F__
    __m512 mx = _mm512_setzero_ps(), big = _mm512_set1_ps(3.4028235e38f);
    __mmask16 ok = 0xffff;
    for (; c + 16 <= cols; c += 16) {
        __m512 v = _mm512_abs_ps(_mm512_loadu_ps(row + c));
        mx = _mm512_max_ps(mx, v), ok &= _mm512_cmp_ps_mask(v, big, _CMP_LE_OQ); /* NaN and inf fail */
    }
    top = _mm512_reduce_max_ps(mx), finite = ok == 0xffff;
#endif
    for (; c < cols; c++) {
        float v = fabsf(row[c]);
        top = v > top ? v : top, finite &= v <= 3.4028235e38f; /* NaN fails both */
    }
    if (!(top >= 1e-30f) || !finite) { /* zeros (the caller recomputes a non-finite row in fp32) */
        for (c = 0; c < cols; c++) h[c] = l[c] = 0;
        return finite ? 0.f : NAN;
    }
    float inv = 32639.f / top;
    c = 0;
#ifdef __AVX512F__
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i half = _mm512_set1_epi32(128);
    for (; c + 16 <= cols; c += 16) { /* cvtps rounds to nearest, ties to even, as rintf */
        __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + c), vinv));
        __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(a, half), 8);
        _mm_storeu_si128((__m128i *)(h + c), _mm512_cvtepi32_epi8(hi));
        _mm_storeu_si128((__m128i *)(l + c), _mm512_cvtepi32_epi8(_mm512_sub_epi32(a, _mm512_slli_epi32(hi, 8))));
    }
#endif
    for (; c < cols; c++) {
        int32_t a = (int32_t)rintf(row[c] * inv), hi = (a + 128) >> 8;
        h[c] = (int8_t)hi, l[c] = (int8_t)(a - 256 * hi);
    }
    return top / 32639.f;
}

/* Rows r0 .. r0 + n of W as 16-bit integers in two signed byte planes, for prefill's int8 GEMMs (quant.py's
 * int16 GEMM): W[r, c] = scale[r] a + e with a = round(W[r, c] / scale[r]) in [-32639, 32639] and scale[r] =
 * max_c |W[r, c]| / 32639 (|e| <= scale[r] / 2: 2^-16 of the row's largest), a = 256 h + l with h in
 * [-127, 127], l in [-128, 127]; out[i] = [h (cols bytes) | l (cols bytes)]. Rows below 1e-30 are zeros, as
 * xq_quantize's groups; a row holding inf or NaN gets zeros and scale NaN (its caller recomputes in fp32). */
void gale_dequant_planes(const gale_qmat *w, int64_t r0, int64_t n, int8_t *out, float *scale, int threads) {
    int64_t cols = w->cols, elems = BLOCK_ELEMS[w->kind], nb = cols / elems, bytes = BLOCK_BYTES[w->kind];
#pragma omp parallel num_threads(threads) if (n * cols >= 65536)
    {
        float *row = malloc(sizeof(float) * cols);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            for (int64_t b = 0; b < nb; b++) block_fp32(w->kind, w->blocks + ((r0 + i) * nb + b) * bytes, row + b * elems);
            scale[i] = row_planes(row, cols, out + 2 * i * cols, out + 2 * i * cols + cols);
        }
        free(row);
    }
}

/* The activations' side of the int16 GEMM: each row of x [n, cols] as row_planes does a weight row, out[i] =
 * [l | h] (the order that meets a weight's [h | l] in pairs of different planes), scale[i] its scale. */
void gale_planes(const float *x, int64_t n, int64_t cols, int8_t *out, float *scale, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n * cols >= 65536)
    for (int64_t i = 0; i < n; i++) scale[i] = row_planes(x + i * cols, cols, out + 2 * i * cols + cols, out + 2 * i * cols);
}

/* fp16 rows r0 .. r0 + n of W into out [n, cols]: a slice of the layer for one prefill GEMM. */
void gale_dequant_f16(const gale_qmat *w, int64_t r0, int64_t n, uint16_t *out, int threads) {
    int64_t cols = w->cols, elems = BLOCK_ELEMS[w->kind], nb = cols / elems, bytes = BLOCK_BYTES[w->kind];
#pragma omp parallel for schedule(static) num_threads(threads) if (n * cols >= 65536)
    for (int64_t i = 0; i < n; i++)
        for (int64_t b = 0; b < nb; b++)
            block_f16(w->kind, w->blocks + ((r0 + i) * nb + b) * bytes, out + i * cols + b * elems);
}

/* ---- prefill's GEMM in the integer path's arithmetic (AVX512-VNNI) ----
 * y = x W^T for many vectors at once, on the weights' own integers and the activations held to 16 bits per
 * group exactly as the one-vector kernels hold them (xq_quantize: the same a, s and integer sums), so a
 * prefill computes what decoding the same tokens one at a time computes, up to the order of fp32 sums. It is
 * the prefill GEMM of CPUs with AVX512-VNNI but no AMX, where torch's fp32 GEMM was the only choice: vpdpwssd
 * does 32 int16 multiply-adds per instruction against an fp32 FMA's 16 (measured on a 2-core Xeon without
 * AMX: both 1 per cycle at 512 bits), and the weights need no fp32 copy.
 *
 * A panel of GEMM_PANEL rows is unpacked once for up to GEMM_VECTORS vectors (block_put's integers and per-16-column
 * scales, then transposed so that one 64-byte vector holds columns 2p, 2p + 1 of 16 rows); each tile of
 * GEMM_TOKENS vectors then runs the whole width in registers: per pair of columns two weight vectors and one
 * broadcast pair of activations per vector, vpdpwssd into int32 lanes; per scale group (32 columns, Q6_K 16)
 * the lanes go to fp32 times d_r s_v, plus the offset's m_r (s sum(a))_v (Q4_1, Q4_K, Q5_K). int32 cannot
 * overflow: |q| <= 128 (Q6_K's q - 32: 32) and |a| <= 32639 over 32 columns stay below 2^28. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GEMM_PANEL 32 /* rows per panel: two vectors of 16 lanes */
#define GEMM_TOKENS 6 /* vectors per tile: 2 x 6 int32 and 2 x 6 fp32 accumulators of the 32 registers */
/* Vectors per pass over the panels: each pass unpacks the weights again, and its activations (512 x 14336 x
 * 2 bytes at most, 15 MB) are what every panel reads, from cache rather than DRAM for longer chunks. */
#define GEMM_VECTORS 512

typedef struct {
    int64_t cols, group; /* group: xq_quantize's (32 or 256) */
    int16_t *a;          /* [n][cols]: round(x / s), column order */
    float *s;            /* [n][cols / group] */
    float *sum;          /* [n][cols / 32]: s sum(a) of each 32 columns (the offsets' factor) */
} gemm_x;

/* x [n, cols] as xq_quantize writes each vector; returns 0, or 1 where x holds inf or NaN (the caller then
 * multiplies in fp32: the integers cannot represent them). */
static int gemm_quantize(const float *x, int64_t n, gemm_x *q, int threads) {
    int64_t cols = q->cols, group = q->group;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad) if (n * cols >= 65536)
    for (int64_t i = 0; i < n; i++) {
        const __m512 big = _mm512_set1_ps(3.4028235e38f);
        for (int64_t g = 0; g < cols / group; g++) {
            const float *xg = x + i * cols + g * group;
            float s;
            const __m512 inv = _mm512_set1_ps(group_scale(abs_max(xg, group), &s));
            q->s[i * (cols / group) + g] = s;
            for (int64_t c = 0; c < group; c += 32) {
                __m512 x0 = _mm512_loadu_ps(xg + c), x1 = _mm512_loadu_ps(xg + c + 16);
                bad |= (_mm512_cmp_ps_mask(_mm512_abs_ps(x0), big, _CMP_LE_OQ) &
                        _mm512_cmp_ps_mask(_mm512_abs_ps(x1), big, _CMP_LE_OQ)) != 0xffff;
                __m512i a0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), a1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
                int16_t *dst = q->a + i * cols + g * group + c;
                _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(a0));
                _mm256_storeu_si256((__m256i *)(dst + 16), _mm512_cvtepi32_epi16(a1));
                int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
                q->sum[i * (cols / 32) + (g * group + c) / 32] = s * (float)sum;
            }
        }
    }
    return bad;
}

typedef struct {
    int16_t *q;         /* [GEMM_PANEL][cols]: the rows' integers */
    int32_t *w;         /* [cols / 2][GEMM_PANEL]: columns 2p, 2p + 1 of each row as one int32 */
    float *scale, *off; /* [cols / sub][GEMM_PANEL]: their scales and offsets */
} gemm_panel;

/* r[i] lane j <- r[j] lane i: a 16 x 16 transpose of int32 lanes (64 shuffles). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++)
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]), r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88), r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
}

/* Rows r0 .. r0 + n (n <= GEMM_PANEL; the rest zeros) of W into P, scales per `sub` columns. */
static void pack_panel(const gale_qmat *W, int64_t r0, int64_t n, int64_t sub, gemm_panel *P) {
    int64_t cols = W->cols, elems = BLOCK_ELEMS[W->kind], nb = cols / elems, bytes = BLOCK_BYTES[W->kind];
    if (n < GEMM_PANEL) {
        memset(P->q, 0, sizeof(int16_t) * GEMM_PANEL * cols);
        memset(P->scale, 0, sizeof(float) * GEMM_PANEL * (cols / sub)), memset(P->off, 0, sizeof(float) * GEMM_PANEL * (cols / sub));
    }
    for (int64_t r = 0; r < n; r++)
        for (int64_t b = 0; b < nb; b++) {
            int64_t first = b * elems / sub * GEMM_PANEL + r;
            put_scales to = {P->scale + first, P->off + first, sub == 16 ? 4 : 5, GEMM_PANEL};
            block_put(W->kind, W->blocks + ((r0 + r) * nb + b) * bytes, P->q + r * cols + b * elems, PUT_INT, &to);
        }
    for (int v = 0; v < GEMM_PANEL / 16; v++)
        for (int64_t p = 0; p < cols / 2; p += 16) { /* 16 rows x 16 pairs at a time (cols: a multiple of 32) */
            __m512i t[16];
            for (int r = 0; r < 16; r++) t[r] = _mm512_loadu_si512((const int32_t *)(P->q + (16 * v + r) * cols) + p);
            transpose16(t);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(P->w + (p + i) * GEMM_PANEL + 16 * v, t[i]);
        }
}

/* y[t0 + t, r0 .. r0 + 32) for t < T (a compile-time constant at each call): the panel times T vectors over
 * the whole width, the rows' first `valid` written. */
static inline __attribute__((always_inline)) void gemm_tile(const gemm_panel *P, const gemm_x *x, int64_t t0,
                                                            const int T, const int sub, int offsets, float *y,
                                                            int64_t ldy, int64_t valid) {
    const int64_t cols = x->cols, ng = cols / x->group, n32 = cols / 32;
    __m512 acc[2][GEMM_TOKENS];
    for (int t = 0; t < T; t++) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols / sub; j++) {
        __m512i I[2][GEMM_TOKENS];
        for (int t = 0; t < T; t++) I[0][t] = I[1][t] = _mm512_setzero_si512();
        const int32_t *wj = P->w + j * sub / 2 * GEMM_PANEL;
        const int16_t *aj = x->a + t0 * cols + j * sub;
#pragma GCC unroll 16
        for (int p = 0; p < sub / 2; p++) {
            __m512i w0 = _mm512_loadu_si512(wj + p * GEMM_PANEL), w1 = _mm512_loadu_si512(wj + p * GEMM_PANEL + 16);
            for (int t = 0; t < T; t++) {
                int32_t pair;
                memcpy(&pair, aj + t * cols + 2 * p, 4);
                __m512i xb = _mm512_set1_epi32(pair);
                I[0][t] = _mm512_dpwssd_epi32(I[0][t], w0, xb);
                I[1][t] = _mm512_dpwssd_epi32(I[1][t], w1, xb);
            }
        }
        __m512 s0 = _mm512_loadu_ps(P->scale + j * GEMM_PANEL), s1 = _mm512_loadu_ps(P->scale + j * GEMM_PANEL + 16);
        int64_t g = j * sub / x->group;
        for (int t = 0; t < T; t++) {
            __m512 f = _mm512_set1_ps(x->s[(t0 + t) * ng + g]);
            acc[0][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[0][t]), _mm512_mul_ps(s0, f), acc[0][t]);
            acc[1][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[1][t]), _mm512_mul_ps(s1, f), acc[1][t]);
        }
        if (offsets) { /* sub == 32 */
            __m512 o0 = _mm512_loadu_ps(P->off + j * GEMM_PANEL), o1 = _mm512_loadu_ps(P->off + j * GEMM_PANEL + 16);
            for (int t = 0; t < T; t++) {
                __m512 u = _mm512_set1_ps(x->sum[(t0 + t) * n32 + j]);
                acc[0][t] = _mm512_fmadd_ps(o0, u, acc[0][t]);
                acc[1][t] = _mm512_fmadd_ps(o1, u, acc[1][t]);
            }
        }
    }
    __mmask16 m0 = valid >= 16 ? 0xffff : (__mmask16)((1u << valid) - 1);
    __mmask16 m1 = valid >= 32 ? 0xffff : valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1);
    for (int t = 0; t < T; t++) {
        _mm512_mask_storeu_ps(y + (t0 + t) * ldy, m0, acc[0][t]);
        _mm512_mask_storeu_ps(y + (t0 + t) * ldy + 16, m1, acc[1][t]);
    }
}

/* The panel times vectors v0 .. end, GEMM_TOKENS at a time (each tile's count a compile-time constant). */
static inline __attribute__((always_inline)) void gemm_tiles(const gemm_panel *P, const gemm_x *x, int64_t v0,
                                                             int64_t end, const int sub, int offsets, float *y,
                                                             int64_t ldy, int64_t valid) {
    int64_t t0 = v0;
    for (; t0 + GEMM_TOKENS <= end; t0 += GEMM_TOKENS) gemm_tile(P, x, t0, GEMM_TOKENS, sub, offsets, y, ldy, valid);
    switch (end - t0) {
    case 5: gemm_tile(P, x, t0, 5, sub, offsets, y, ldy, valid); break;
    case 4: gemm_tile(P, x, t0, 4, sub, offsets, y, ldy, valid); break;
    case 3: gemm_tile(P, x, t0, 3, sub, offsets, y, ldy, valid); break;
    case 2: gemm_tile(P, x, t0, 2, sub, offsets, y, ldy, valid); break;
    case 1: gemm_tile(P, x, t0, 1, sub, offsets, y, ldy, valid); break;
    default: break;
    }
}

/* y [n, rows] = x [n, cols] W^T in the integer path's arithmetic (above). Returns 0; 1 where x holds inf or
 * NaN (nothing written: the caller multiplies in fp32); -1 in builds without AVX512-VNNI (gale_gemm_int_ok). */
int gale_gemm_int(const gale_qmat *w, const float *x, float *y, int64_t n, int threads) {
    int64_t kind = w->kind, cols = w->cols, rows = w->rows;
    int64_t sub = kind == GALE_Q6_K ? 16 : 32;
    int offsets = kind == GALE_Q4_1 || kind == GALE_Q4_K || kind == GALE_Q5_K;
    gemm_x q = {cols, is_k(kind) ? 256 : 32, malloc(sizeof(int16_t) * n * cols), NULL, NULL};
    q.s = malloc(sizeof(float) * n * (cols / q.group));
    q.sum = malloc(sizeof(float) * n * (cols / 32));
    int bad = gemm_quantize(x, n, &q, threads);
    if (!bad) {
#pragma omp parallel num_threads(threads)
        {
            gemm_panel P = {malloc(sizeof(int16_t) * GEMM_PANEL * cols), malloc(sizeof(int32_t) * GEMM_PANEL * (cols / 2)),
                            malloc(sizeof(float) * GEMM_PANEL * (cols / sub)), malloc(sizeof(float) * GEMM_PANEL * (cols / sub))};
            for (int64_t v0 = 0; v0 < n; v0 += GEMM_VECTORS) {
                int64_t end = n - v0 < GEMM_VECTORS ? n : v0 + GEMM_VECTORS;
#pragma omp for schedule(static)
                for (int64_t r0 = 0; r0 < rows; r0 += GEMM_PANEL) {
                    int64_t valid = rows - r0 < GEMM_PANEL ? rows - r0 : GEMM_PANEL;
                    pack_panel(w, r0, valid, sub, &P);
                    float *yr = y + r0;
                    if (sub == 16)
                        gemm_tiles(&P, &q, v0, end, 16, offsets, yr, rows, valid);
                    else
                        gemm_tiles(&P, &q, v0, end, 32, offsets, yr, rows, valid);
                }
            }
            free(P.q), free(P.w), free(P.scale), free(P.off);
        }
    }
    free(q.a), free(q.s), free(q.sum);
    return bad;
}

int gale_gemm_int_ok(void) { return 1; }
#else
int gale_gemm_int(const gale_qmat *w, const float *x, float *y, int64_t n, int threads) {
    (void)w, (void)x, (void)y, (void)n, (void)threads;
    return -1;
}

int gale_gemm_int_ok(void) { return 0; }
#endif

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

/* K/V cache entries are fp32 or fp16 (`half`: the storage, half the memory; arithmetic stays fp32). fp16
 * needs F16C, so only AVX2 builds take it (gale_kv_half reports which). */
static inline float kv_at(const void *base, int64_t i, const int half) {
#ifdef GALE_AVX2
    if (half) return _cvtsh_ss(((const uint16_t *)base)[i]);
#endif
    (void)half;
    return ((const float *)base)[i];
}

#ifdef GALE_AVX2
static inline __m256 kv_load8(const void *base, int64_t i, const int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
    return _mm256_loadu_ps((const float *)base + i);
}
#endif

/* Store hd floats as one cache entry, rounded to nearest even in fp16 (what torch's .to(float16) gives). */
static inline void kv_store(void *base, int64_t i, const float *x, int64_t hd, const int half) {
#ifdef GALE_AVX2
    if (half) {
        uint16_t *dst = (uint16_t *)base + i;
        int64_t j = 0;
        for (; j + 8 <= hd; j += 8)
            _mm_storeu_si128((__m128i *)(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
        for (; j < hd; j++) dst[j] = _cvtss_sh(x[j], _MM_FROUND_TO_NEAREST_INT);
        return;
    }
#endif
    (void)half;
    memcpy((float *)base + i, x, sizeof(float) * hd);
}

/* out[j] = scale * q . k[j] for n keys (entries of hd values from `k`); eight keys per pass share one
 * reduction. */
static inline __attribute__((always_inline)) void scores(const float *q, const void *k, int64_t n, int64_t hd,
                                                         float scale, float *out, const int half) {
    int64_t j = 0;
#ifdef GALE_AVX2
    for (; hd % 8 == 0 && j + 8 <= n; j += 8) {
        __m256 a[8];
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
            __m256 qi = _mm256_loadu_ps(q + i);
            for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qi, kv_load8(k, (j + t) * hd + i, half), a[t]);
        }
        /* transpose-reduce: lane t of the result is the sum of a[t] */
        __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
#endif
    for (; j < n; j++) {
        if (!half) {
            out[j] = dot(q, (const float *)k + j * hd, hd) * scale;
            continue;
        }
        float s = 0.f;
        for (int64_t i = 0; i < hd; i++) s += q[i] * kv_at(k, j * hd + i, half);
        out[j] = s * scale;
    }
}

/* out[i] = sum_j p[j] v[j][i] for n entries of hd values, 32 columns at a time held in registers. */
static inline __attribute__((always_inline)) void weighted_sum(const float *p, const void *v, int64_t n, int64_t hd,
                                                               float *out, const int half) {
    int64_t i = 0;
#ifdef GALE_AVX2
    for (; i + 32 <= hd; i += 32) {
        __m256 a[8]; /* two keys in flight: a[0..3] even rows, a[4..7] odd rows */
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            __m256 p0 = _mm256_broadcast_ss(p + j), p1 = _mm256_broadcast_ss(p + j + 1);
            for (int t = 0; t < 4; t++) {
                a[t] = _mm256_fmadd_ps(p0, kv_load8(v, j * hd + i + 8 * t, half), a[t]);
                a[t + 4] = _mm256_fmadd_ps(p1, kv_load8(v, (j + 1) * hd + i + 8 * t, half), a[t + 4]);
            }
        }
        for (; j < n; j++)
            for (int t = 0; t < 4; t++)
                a[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), kv_load8(v, j * hd + i + 8 * t, half), a[t]);
        for (int t = 0; t < 4; t++) _mm256_storeu_ps(out + i + 8 * t, _mm256_add_ps(a[t], a[t + 4]));
    }
#endif
    for (; i < hd; i++) {
        float s = 0.f;
        for (int64_t j = 0; j < n; j++) s += p[j] * kv_at(v, j * hd + i, half);
        out[i] = s;
    }
}

/* Softmax-weighted values of one query over `len` cache entries: the range's max, sum and unnormalized
 * output (flash-decoding's partial result). */
static void attend_range(const float *q, const void *kb, const void *vb, int64_t len, int64_t hd, float scale,
                         float *sc, float *out, float *max_out, float *sum_out, int half) {
    if (half) scores(q, kb, len, hd, scale, sc, 1); else scores(q, kb, len, hd, scale, sc, 0);
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; j++) mx = sc[j] > mx ? sc[j] : mx;
    *sum_out = exp_shifted(sc, len, mx);
    *max_out = mx;
    if (half) weighted_sum(sc, vb, len, hd, out, 1); else weighted_sum(sc, vb, len, hd, out, 0); /* 0s if len 0 */
}

/* 1 when this build reads fp16 K/V caches. */
int gale_kv_half(void) {
#ifdef GALE_AVX2
    return 1;
#else
    return 0;
#endif
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
 * Cache layer l: kc[l], vc[l] = [slots, n_kv_heads, alloc, head_dim] in fp32, or fp16 when `half`; position
 * p is stored at index p % capacity of its sequence's slot (alloc >= min(p + 1, capacity)). Written first,
 * then attended: with
 * the engine's cache every stored entry of a sequence is inside its window (capacity <= window, or the
 * cache refuses to outgrow capacity), so the query attends entries 0 .. min(p + 1, capacity) - 1. */
void gale_decode(const gale_dims *c, const gale_layer *layers, void *const *kc, void *const *vc, int half,
                 int64_t alloc, int64_t capacity, int64_t n, const int64_t *slots, const int64_t *positions,
                 const float *rot, const float *norm, float *h, int threads) {
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
        const gale_qmat *wo = &L->wo, *w2 = &L->w2;
        float *qkv_y[3] = {q, k, v}, *ffn_y[2] = {g, u};
        gemv_shared(qkv_w, qkv_y, 3, xn, n, 0, threads);
        rope(q, rot, positions, n, H, hd);
        rope(k, rot, positions, n, KV, hd);
        for (int64_t s = 0; s < n; s++)
            for (int64_t kh = 0; kh < KV; kh++) {
                int64_t at = ((slots[s] * KV + kh) * alloc + positions[s] % capacity) * hd;
                kv_store(kc[l], at, k + (s * KV + kh) * hd, hd, half);
                kv_store(vc[l], at, v + (s * KV + kh) * hd, hd, half);
            }
        /* Flash-decoding: an item is (sequence, KV head, key range) and serves the whole query group, so
         * each K/V row is read once per group and the threads get equal shares; ranges merge below. */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t it = 0; it < n * KV * parts; it++) {
            int64_t s = it / (KV * parts), kh = it / parts % KV, p = it % parts;
            int64_t keys = positions[s] + 1 < capacity ? positions[s] + 1 : capacity;
            int64_t first = keys * p / parts, len = keys * (p + 1) / parts - first;
            int64_t at = ((slots[s] * KV + kh) * alloc + first) * hd, size = half ? 2 : 4;
            const char *kb = (const char *)kc[l] + at * size, *vb = (const char *)vc[l] + at * size;
            float *sc = scores_buf + omp_get_thread_num() * capacity;
            for (int64_t hq = kh * group; hq < (kh + 1) * group; hq++) {
                int64_t row = (s * H + hq) * parts + p;
                attend_range(q + (s * H + hq) * hd, kb, vb, len, hd, scale, sc, part_out + row * hd, part_max + row,
                             part_sum + row, half);
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
        gemv_shared(&wo, &tmp, 1, att, n, 0, threads);
        for (int64_t i = 0; i < n * dim; i++) h[i] += tmp[i];
        rms_norm(h, L->ffn_norm, xn, n, dim, c->eps);
        gemv_shared(ffn_w, ffn_y, 2, xn, n, 0, threads);
        swiglu(g, u, n * c->hidden);
        gemv_shared(&w2, &tmp, 1, g, n, 0, threads);
        for (int64_t i = 0; i < n * dim; i++) h[i] += tmp[i];
    }
    rms_norm(h, norm, h, n, dim, c->eps);
    free(xn); free(q); free(k); free(v); free(att); free(tmp); free(g); free(u);
    free(scores_buf); free(part_out); free(part_max); free(part_sum);
}
