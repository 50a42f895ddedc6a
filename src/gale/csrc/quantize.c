// fp32 rows -> GGUF block records, ported from llama.cpp's reference quantizers (ggml-quants.c,
// quantize_row_*_ref, which llama-quantize runs when no importance matrix is given), so Gale's files hold
// the blocks llama.cpp would write. One entry point, gale_quantize, parallel over rows with OpenMP.
// No fused multiply-adds: llama.cpp's blocks, bit for bit, whatever -march the library is built with.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <float.h>

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

// GGML type ids (the GGUF tensor types), the `kind` argument of gale_quantize.
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// ggml's portable fp32 -> fp16 (round to nearest even), bit for bit.
static uint16_t fp16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static float fp32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i; memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

// ---- 32-weight blocks ------------------------------------------------------------------------------

// Q8_0: {fp16 d, int8 q[32]}, x = d * q.
static void q8_0(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = MAX(amax, fabsf(x[j]));
        const float d = amax / 127, id = d ? 1.0f / d : 0.0f;
        put16(y, fp16(d));
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

// The signed value of largest magnitude (Q4_0 and Q5_0 scale by it, so it maps exactly to -8 / -16).
static float signed_absmax(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    return max;
}

static void range(const float *x, float *min, float *max) {
    *min = FLT_MAX; *max = -FLT_MAX;
    for (int j = 0; j < 32; j++) { *min = MIN(*min, x[j]); *max = MAX(*max, x[j]); }
}

// Q4_0: {fp16 d, 16 bytes of nibbles}, x = d * (q - 8); element j in the low nibble of byte j, j+16 high.
static void q4_0(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 18) {
        const float d = signed_absmax(x) / -8, id = d ? 1.0f / d : 0.0f;
        put16(y, fp16(d));
        for (int j = 0; j < 16; j++) {
            const uint8_t a = MIN(15, (int8_t)(x[j] * id + 8.5f)), b = MIN(15, (int8_t)(x[j + 16] * id + 8.5f));
            y[2 + j] = a | (b << 4);
        }
    }
}

// Q4_1: {fp16 d, fp16 m, nibbles}, x = d * q + m.
static void q4_1(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, y += 20) {
        float min, max;
        range(x, &min, &max);
        const float d = (max - min) / 15, id = d ? 1.0f / d : 0.0f;
        put16(y, fp16(d));
        put16(y + 2, fp16(min));
        for (int j = 0; j < 16; j++) {
            const uint8_t a = MIN(15, (int8_t)((x[j] - min) * id + 0.5f));
            const uint8_t b = MIN(15, (int8_t)((x[j + 16] - min) * id + 0.5f));
            y[4 + j] = a | (b << 4);
        }
    }
}

// Q5_0 / Q5_1: Q4_0 / Q4_1 with a fifth bit per weight in a 32-bit word before the nibbles.
static void pack5(const uint8_t *q, uint8_t *qh_out, uint8_t *qs) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
        qh |= ((q[j] & 0x10u) >> 4) << j;
        qh |= ((q[j + 16] & 0x10u) >> 4) << (j + 16);
    }
    memcpy(qh_out, &qh, 4);
}

static void q5_0(const float *x, uint8_t *y, int64_t nb) {
    uint8_t q[32];
    for (int64_t i = 0; i < nb; i++, x += 32, y += 22) {
        const float d = signed_absmax(x) / -16, id = d ? 1.0f / d : 0.0f;
        put16(y, fp16(d));
        for (int j = 0; j < 32; j++) q[j] = MIN(31, (int8_t)(x[j] * id + 16.5f));
        pack5(q, y + 2, y + 6);
    }
}

static void q5_1(const float *x, uint8_t *y, int64_t nb) {
    uint8_t q[32];
    for (int64_t i = 0; i < nb; i++, x += 32, y += 24) {
        float min, max;
        range(x, &min, &max);
        const float d = (max - min) / 31, id = d ? 1.0f / d : 0.0f;
        put16(y, fp16(d));
        put16(y + 2, fp16(min));
        for (int j = 0; j < 32; j++) q[j] = (uint8_t)((x[j] - min) * id + 0.5f);
        pack5(q, y + 4, y + 8);
    }
}

// ---- 256-weight super-blocks (K-quants) --------------------------------------------------------------

// Scale and offset of each of the 8 sub-blocks of 32 weights on levels 0..nmax that minimise the weighted
// squared error: a search over nstep+1 candidate scales around (max - min) / nmax, each refined by weighted
// least squares (llama.cpp's make_qkx2_quants). The 8 sub-blocks run side by side, one per vector lane:
// each lane does exactly llama.cpp's arithmetic in llama.cpp's order, so the results are its bit for bit.
// x and w are [32][8] (weight i of sub-block j at [i][j]); returns scales, mins (minus the offsets, >= 0)
// and the levels L[j][i].
#define LANES 8
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

static inline v8i nearest_int8(v8f f) {  // nearest_int in each lane
    const v8f val = f + 12582912.f;
    v8i i;
    memcpy(&i, &val, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static inline v8i clamp8(v8i l, int lo, int hi) {
    const v8i under = l < lo;  // comparisons give all-ones lanes where true
    l = (l & ~under) | (lo & under);
    const v8i over = l > hi;
    return (l & ~over) | (hi & over);
}

static void make_qkx2_quants8(int nmax, const v8f x[32], const v8f w[32], uint8_t L[LANES][32], float *scale_out,
                              float *the_min, float rmin, float rdelta, int nstep) {
    v8f min = x[0], max = x[0], sum_w = w[0], sum_x = w[0] * x[0], best = {0}, iscale, scale;
    v8i Laux[32], Lbest[32];
    for (int i = 1; i < 32; ++i) {
        for (int j = 0; j < LANES; ++j) {
            min[j] = x[i][j] < min[j] ? x[i][j] : min[j];
            max[j] = x[i][j] > max[j] ? x[i][j] : max[j];
        }
        sum_w += w[i]; sum_x += w[i] * x[i];
    }
    int flat[LANES];  // all weights equal (llama.cpp returns levels 0 at once)
    for (int j = 0; j < LANES; ++j) {
        if (min[j] > 0) min[j] = 0;
        flat[j] = max[j] == min[j];
        iscale[j] = flat[j] ? 0.f : nmax / (max[j] - min[j]);
        scale[j] = flat[j] ? 0.f : 1 / iscale[j];
    }
    for (int i = 0; i < 32; ++i) {
        Lbest[i] = clamp8(nearest_int8(iscale * (x[i] - min)), 0, nmax);
        const v8f diff = scale * __builtin_convertvector(Lbest[i], v8f) + min - x[i];
        best += w[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        v8f sum_l = {0}, sum_l2 = {0}, sum_xl = {0}, err = {0};
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        for (int i = 0; i < 32; ++i) {
            Laux[i] = clamp8(nearest_int8(iscale * (x[i] - min)), 0, nmax);
            const v8f l = __builtin_convertvector(Laux[i], v8f);
            sum_l += w[i] * l; sum_l2 += w[i] * l * l; sum_xl += w[i] * l * x[i];
        }
        const v8f D = sum_w * sum_l2 - sum_l * sum_l;
        v8f this_scale = (sum_w * sum_xl - sum_x * sum_l) / D, this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        for (int j = 0; j < LANES; ++j)
            if (this_min[j] > 0) { this_min[j] = 0; this_scale[j] = sum_xl[j] / sum_l2[j]; }
        for (int i = 0; i < 32; ++i) {
            const v8f diff = this_scale * __builtin_convertvector(Laux[i], v8f) + this_min - x[i];
            err += w[i] * (diff * diff);
        }
        for (int j = 0; j < LANES; ++j) {
            if (flat[j] || !(D[j] > 0) || !(err[j] < best[j])) continue;
            for (int i = 0; i < 32; ++i) Lbest[i][j] = Laux[i][j];
            best[j] = err[j]; scale[j] = this_scale[j]; min[j] = this_min[j];
        }
    }
    for (int j = 0; j < LANES; ++j) {
        for (int i = 0; i < 32; ++i) L[j][i] = flat[j] ? 0 : (uint8_t)Lbest[i][j];
        the_min[j] = -min[j];
        scale_out[j] = scale[j];
    }
}

// Symmetric levels -nmax..nmax-1 (stored + nmax) of 8 groups of 16 weights side by side (x[i][j]: weight i of
// group j), weights x^2 (llama.cpp's make_qx_quants, rmse_type 1, no imatrix, each lane in its arithmetic):
// 19 candidate scales around the one that maps the largest magnitude to -nmax. Fills scale[j] and L[j][i].
static void make_qx_quants8(int nmax, const v8f x[16], int8_t L[LANES][16], float *scale_out) {
    v8f max = {0}, amax = {0}, sumlx = {0}, suml2 = {0}, iscale, scale, best;
    v8i Laux[16], Lbest[16];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < LANES; ++j)
            if (fabsf(x[i][j]) > amax[j]) { amax[j] = fabsf(x[i][j]); max[j] = x[i][j]; }
    iscale = (float)-nmax / max;
    for (int i = 0; i < 16; ++i) {
        Lbest[i] = clamp8(nearest_int8(iscale * x[i]), -nmax, nmax - 1);
        const v8f l = __builtin_convertvector(Lbest[i], v8f), w = x[i] * x[i];
        sumlx += w * x[i] * l; suml2 += w * l * l;
    }
    for (int j = 0; j < LANES; ++j) scale[j] = suml2[j] ? sumlx[j] / suml2[j] : 0.0f;
    best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = (v8f){0};
        for (int i = 0; i < 16; ++i) {
            Laux[i] = clamp8(nearest_int8(iscale * x[i]), -nmax, nmax - 1);
            const v8f l = __builtin_convertvector(Laux[i], v8f), w = x[i] * x[i];
            sumlx += w * x[i] * l; suml2 += w * l * l;
        }
        for (int j = 0; j < LANES; ++j) {
            if (!(suml2[j] > 0 && sumlx[j] * sumlx[j] > best[j] * suml2[j])) continue;
            for (int i = 0; i < 16; ++i) Lbest[i][j] = Laux[i][j];
            scale[j] = sumlx[j] / suml2[j]; best[j] = scale[j] * sumlx[j];
        }
    }
    for (int j = 0; j < LANES; ++j) {
        const int zero = amax[j] < GROUP_MAX_EPS;  // all (nearly) zero: levels 0, scale 0
        for (int i = 0; i < 16; ++i) L[j][i] = zero ? 0 : (int8_t)(Lbest[i][j] + nmax);
        scale_out[j] = zero ? 0.f : scale[j];
    }
}

static inline void get_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63; *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

// Q4_K and Q5_K share their layout up to the quants: {fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins
// of 8 sub-blocks of 32}. Fills those 16 bytes and L (levels 0..nmax) for one super-block.
static void kquant_scales(const float *x, int nmax, float rmin, int nstep, uint8_t *head, uint8_t *L) {
    v8f xt[32], wt[32];
    float mins[QK_K / 32], scales[QK_K / 32], max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) {
            xt[l][j] = x[32 * j + l];
            wt[l][j] = av_x + fabsf(x[32 * j + l]);
        }
    }
    make_qkx2_quants8(nmax, xt, wt, (uint8_t (*)[32])L, scales, mins, rmin, 0.1f, nstep);
    for (int j = 0; j < QK_K / 32; ++j) {
        max_scale = MAX(max_scale, scales[j]);
        max_min = MAX(max_min, mins[j]);
    }
    uint8_t *sc = head + 4;
    memset(sc, 0, 12);
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f, inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; ++j) {
        const uint8_t ls = MIN(63, (uint8_t)nearest_int(inv_scale * scales[j]));
        const uint8_t lm = MIN(63, (uint8_t)nearest_int(inv_min * mins[j]));
        if (j < 4) {
            sc[j] = ls; sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= ((ls >> 4) << 6);
            sc[j - 0] |= ((lm >> 4) << 6);
        }
    }
    const uint16_t d16 = fp16(max_scale / 63.f), dmin16 = fp16(max_min / 63.f);
    put16(head, d16);
    put16(head + 2, dmin16);
    for (int j = 0; j < QK_K / 32; ++j) {  // requantize against the 6-bit scales actually stored
        uint8_t s, m;
        get_scale_min_k4(j, sc, &s, &m);
        const float d = fp32(d16) * s;
        if (!d) continue;
        const float dm = fp32(dmin16) * m;
        for (int ii = 0; ii < 32; ++ii) L[32 * j + ii] = MAX(0, MIN(nmax, nearest_int((x[32 * j + ii] + dm) / d)));
    }
}

// Q4_K (144 bytes): head, then 128 bytes: per 64 weights, 32 bytes (low nibble j, high nibble j + 32).
static void q4_k(const float *x, uint8_t *y, int64_t nb) {
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 144) {
        kquant_scales(x, 15, -1.f, 20, y, L);
        uint8_t *q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
    }
}

// Q5_K (176 bytes): head, 32 bytes of fifth bits (bit 2k / 2k+1 for the k-th 64-weight group), 128 of nibbles.
static void q5_k(const float *x, uint8_t *y, int64_t nb) {
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 176) {
        kquant_scales(x, 31, -0.5f, 15, y, L);
        uint8_t *qh = y + 16, *ql = y + 48, m1 = 1, m2 = 2;
        memset(qh, 0, QK_K / 8);
        for (int n = 0; n < QK_K; n += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n + j], l2 = L[n + j + 32];
                if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                ql[j] = l1 | (l2 << 4);
            }
        }
    }
}

// Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales of 16-weight groups, fp16 d.
static void q6_k(const float *x, uint8_t *y, int64_t nb) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t i = 0; i < nb; i++, x += QK_K, y += 210) {
        float max_scale = 0, max_abs_scale = 0;
        for (int half = 0; half < 2; ++half) {  // groups 0-7, then 8-15, in vector lanes
            v8f xt[16];
            for (int j = 0; j < LANES; ++j)
                for (int ii = 0; ii < 16; ++ii) xt[ii][j] = x[16 * (LANES * half + j) + ii];
            make_qx_quants8(32, xt, (int8_t (*)[16])(L + 16 * LANES * half), scales + LANES * half);
        }
        for (int ib = 0; ib < QK_K / 16; ++ib)
            if (fabsf(scales[ib]) > max_abs_scale) { max_abs_scale = fabsf(scales[ib]); max_scale = scales[ib]; }
        memset(y, 0, 210);
        if (max_abs_scale < GROUP_MAX_EPS) continue;
        int8_t *sc = (int8_t *)(y + 192);
        const float iscale = -128.f / max_scale;
        const uint16_t d16 = fp16(1 / iscale);
        put16(y + 208, d16);
        for (int ib = 0; ib < QK_K / 16; ++ib) sc[ib] = (int8_t)MIN(127, nearest_int(iscale * scales[ib]));
        for (int j = 0; j < QK_K / 16; ++j) {
            const float d = fp32(d16) * sc[j];
            if (!d) continue;
            for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = MAX(-32, MIN(31, nearest_int(x[16 * j + ii] / d))) + 32;
        }
        uint8_t *ql = y, *qh = y + 128;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                ql[l] = (L[j + l] & 0xF) | ((L[j + l + 64] & 0xF) << 4);
                ql[l + 32] = (L[j + l + 32] & 0xF) | ((L[j + l + 96] & 0xF) << 4);
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                                  | ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}

typedef void (*row_quantizer)(const float *, uint8_t *, int64_t);

static int format_of(int kind, row_quantizer *f, int *block, int *bytes) {
    switch (kind) {
        case Q4_0: *f = q4_0; *block = 32; *bytes = 18; return 0;
        case Q4_1: *f = q4_1; *block = 32; *bytes = 20; return 0;
        case Q5_0: *f = q5_0; *block = 32; *bytes = 22; return 0;
        case Q5_1: *f = q5_1; *block = 32; *bytes = 24; return 0;
        case Q8_0: *f = q8_0; *block = 32; *bytes = 34; return 0;
        case Q4_K: *f = q4_k; *block = QK_K; *bytes = 144; return 0;
        case Q5_K: *f = q5_k; *block = QK_K; *bytes = 176; return 0;
        case Q6_K: *f = q6_k; *block = QK_K; *bytes = 210; return 0;
        default: return -1;
    }
}

// Quantize `rows` rows of `cols` fp32 weights into GGUF type `kind`'s records (rows * cols / block * bytes
// bytes at `out`). Returns 0, -1 for a type without a quantizer, -2 when cols is not a multiple of the block.
int gale_quantize(int kind, const float *x, uint8_t *out, int64_t rows, int64_t cols, int threads) {
    row_quantizer f;
    int block, bytes;
    if (format_of(kind, &f, &block, &bytes)) return -1;
    if (cols % block) return -2;
    const int64_t nb = cols / block;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) f(x + r * cols, out + r * nb * bytes, nb);
    return 0;
}
