/* Block-quantized matrix-vector kernels for decode steps of a few rows on AVX2 CPUs.

   A one-stream decode step reads every weight once and does little else, so
   on a 2-core AVX2 machine it is bound by memory and by the number of calls
   it makes.  These kernels read 4-bit weights (blocks of 32 with an fp16
   scale and minimum, the layout of GGUF's Q4_1) or 8-bit ones (fp16 scale,
   GGUF's Q8_0), quantize the activation rows to int8 per block of 32 as they
   start, and can fold in what surrounds a projection in a Llama layer: the
   RMS norm before it, the SiLU-gated product after gate/up, the residual add.
   Built and loaded by native_kernels.py; the layout is documented there.

   Products of u8/s8 pairs go through vpmaddubsw into int16: 15 * 127 * 2 and
   127 * 127 * 2 both fit, so nothing saturates (the trap the int8 fbgemm path
   on AVX2 has to avoid with 7-bit weights).  Threads: OpenMP, which resolves
   to the libgomp torch already loaded, so these share torch's thread pool. */

#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define Q4_BLOCK_BYTES 20 /* fp16 d, fp16 m, 16 bytes of nibbles */
#define Q8_BLOCK_BYTES 34 /* fp16 d, 32 int8 */
#define MAX_ROWS 8

static inline float hsum_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* One row of activations, quantized: int8 per block of 32, and per block the pair
   (scale, scale * sum of the block), the second for the 4-bit weights' minimum term. */
typedef struct {
    int8_t *q;
    float *scales;
} QuantRow;

/* x (K floats) -> q; with `norm` the row is RMS-normalized and scaled by it first
   (the factor 1/rms folds into the block scales). */
static void quantize_row(const float *x, int K, const float *norm, float eps, QuantRow r)
{
    float inv_rms = 1.0f;
    if (norm) {
        __m256 ss = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) {
            __m256 v = _mm256_loadu_ps(x + k);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        inv_rms = 1.0f / sqrtf(hsum_ps(ss) / (float)K + eps);
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v[4];
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            if (norm)
                v[i] = _mm256_mul_ps(v[i], _mm256_loadu_ps(norm + b * QK + 8 * i));
        }
        __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float max_abs = _mm_cvtss_f32(m4);
        const float d = max_abs / 127.0f;
        const __m256 id = _mm256_set1_ps(max_abs != 0.0f ? 127.0f / max_abs : 0.0f);
        __m256i i[4];
        for (int j = 0; j < 4; j++)
            i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const int sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_storeu_si256((__m256i *)(r.q + b * QK), _mm256_permutevar8x32_epi32(p, perm));
        r.scales[2 * b] = d * inv_rms;
        r.scales[2 * b + 1] = d * inv_rms * (float)sum;
    }
}

/* 32 nibbles: byte j holds element j (low) and element j + 16 (high). */
static inline __m256i unpack_nibbles(const uint8_t *qs)
{
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    const __m256i shifted = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
    return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

static inline __m256 dot_u8_s8(__m256i u, __m256i s)
{
    const __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* A block's fp16 scale (and minimum) as lanes 0 (and 1). */
static inline __m128 block_scales(const uint8_t *blk)
{
    int32_t both;
    memcpy(&both, blk, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(both));
}

/* The activation block's (scale, scale * sum) as lanes 0 and 1. */
static inline __m128 row_scales(const QuantRow *x, int b)
{
    return _mm_castpd_ps(_mm_load_sd((const double *)(x->scales + 2 * b)));
}

/* Dot products of one 4-bit weight row with `rows` quantized activation rows:
   per block d dx sum(q qx) + m dx sum(qx), the second term's lane kept apart. */
static inline __attribute__((always_inline)) void dot_q4_row(const uint8_t *w, int nb, int rows, const QuantRow *x, float *out)
{
    __m256 acc[MAX_ROWS];
    __m128 mins[MAX_ROWS];
    for (int r = 0; r < rows; r++) {
        acc[r] = _mm256_setzero_ps();
        mins[r] = _mm_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * Q4_BLOCK_BYTES;
        const __m128 dm = block_scales(blk);
        const __m256i q = unpack_nibbles(blk + 4);
        for (int r = 0; r < rows; r++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(x[r].q + b * QK));
            const __m128 scale = _mm_mul_ps(dm, row_scales(&x[r], b)); /* d dx, m dx sum */
            mins[r] = _mm_add_ps(mins[r], scale);
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scale), dot_u8_s8(q, a), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum_ps(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(mins[r]));
}

/* The same for an 8-bit weight row (s8 x s8: signs moved onto the activations). */
static inline __attribute__((always_inline)) void dot_q8_row(const uint8_t *w, int nb, int rows, const QuantRow *x, float *out)
{
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < rows; r++)
        acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * Q8_BLOCK_BYTES;
        const __m128 d = block_scales(blk); /* lane 1 is the next bytes: unused */
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m256i q_abs = _mm256_sign_epi8(q, q);
        for (int r = 0; r < rows; r++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(x[r].q + b * QK));
            const __m128 scale = _mm_mul_ss(d, row_scales(&x[r], b));
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scale), dot_u8_s8(q_abs, _mm256_sign_epi8(a, q)), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum_ps(acc[r]);
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* Output rows [n0, n1) of one call, for M rows of activations. */
static inline __attribute__((always_inline)) void gemv_range(
    const int M, const QuantRow *rows, int nb, size_t row_bytes, const uint8_t *w, int bits, int N,
    int gated, const float *residual, float *out, int n0, int n1)
{
    for (int n = n0; n < n1; n++) {
        float dots[MAX_ROWS], up[MAX_ROWS];
        const uint8_t *wn = w + (size_t)n * row_bytes;
        if (bits == 4)
            dot_q4_row(wn, nb, M, rows, dots);
        else
            dot_q8_row(wn, nb, M, rows, dots);
        if (gated) {
            const uint8_t *wu = w + (size_t)(n + N) * row_bytes;
            if (bits == 4)
                dot_q4_row(wu, nb, M, rows, up);
            else
                dot_q8_row(wu, nb, M, rows, up);
            for (int r = 0; r < M; r++)
                dots[r] = silu(dots[r]) * up[r];
        }
        for (int r = 0; r < M; r++) {
            const size_t i = (size_t)r * N + n;
            out[i] = residual ? residual[i] + dots[r] : dots[r];
        }
    }
}

/* One copy per row count, with M a constant the compiler sees (inside an OpenMP
   region it would be a variable again): the accumulators then stay in registers. */
#define GEMV_RANGE_FOR(MR)                                                                        \
    static void gemv_range_##MR(const QuantRow *rows, int nb, size_t row_bytes, const uint8_t *w, \
                                int bits, int N, int gated, const float *residual, float *out,    \
                                int n0, int n1)                                                   \
    {                                                                                             \
        gemv_range(MR, rows, nb, row_bytes, w, bits, N, gated, residual, out, n0, n1);            \
    }
GEMV_RANGE_FOR(1)
GEMV_RANGE_FOR(2)
GEMV_RANGE_FOR(3)
GEMV_RANGE_FOR(4)

static void gemv_range_any(int M, const QuantRow *rows, int nb, size_t row_bytes, const uint8_t *w,
                           int bits, int N, int gated, const float *residual, float *out, int n0,
                           int n1)
{
    switch (M) {
    case 1: gemv_range_1(rows, nb, row_bytes, w, bits, N, gated, residual, out, n0, n1); break;
    case 2: gemv_range_2(rows, nb, row_bytes, w, bits, N, gated, residual, out, n0, n1); break;
    case 3: gemv_range_3(rows, nb, row_bytes, w, bits, N, gated, residual, out, n0, n1); break;
    case 4: gemv_range_4(rows, nb, row_bytes, w, bits, N, gated, residual, out, n0, n1); break;
    default: gemv_range(M, rows, nb, row_bytes, w, bits, N, gated, residual, out, n0, n1); break;
    }
}

/* out[M, N] = x[M, K] W^T (+ residual[M, N]); W is N rows of K/32 blocks.
   `bits` 4 or 8.  `norm`: RMS-normalize each x row with these weights first.
   `gated`: W holds gate rows then up rows (2N in all) and out = silu(gate) * up.
   Returns 0, or -1 for shapes it does not take (the caller checks first). */
int block_gemv(const float *x, int M, int K, const float *norm, float eps, const uint8_t *w,
               int bits, int N, int gated, const float *residual, float *out)
{
    if (M < 1 || M > MAX_ROWS || K % QK || (bits != 4 && bits != 8))
        return -1;
    const int nb = K / QK;
    const size_t row_bytes = (size_t)nb * (bits == 4 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES);
    int8_t *q = malloc((size_t)M * K + 2 * sizeof(float) * (size_t)M * nb);
    if (!q)
        return -1;
    float *scales = (float *)(q + (size_t)M * K);
    QuantRow rows[MAX_ROWS];
    for (int r = 0; r < M; r++) {
        rows[r] = (QuantRow){q + (size_t)r * K, scales + (size_t)2 * r * nb};
        quantize_row(x + (size_t)r * K, K, norm, eps, rows[r]);
    }
#pragma omp parallel
    {
        /* Contiguous shares in multiples of 8 rows, one per thread. */
        const int threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int chunks = (N + 7) / 8;
        const int n0 = 8 * (int)((long)chunks * t / threads);
        int n1 = 8 * (int)((long)chunks * (t + 1) / threads);
        n1 = n1 < N ? n1 : N;
        gemv_range_any(M, rows, nb, row_bytes, w, bits, N, gated, residual, out, n0, n1);
    }
    free(q);
    return 0;
}

/* Pack W [N, K] (float32) into the layout above: per block of 32, for 4 bits
   d = (max - min) / 15 and m = min in fp16, q = round((w - m) / d) in 0..15;
   for 8 bits d = max|w| / 127, q = round(w / d) in -127..127.  The same
   arithmetic, in the same order, as native_kernels.pack_q4 / pack_q8 (the
   tests compare the bytes); C because torch's elementwise calls took 1.4 s a
   start for the default model's 121 weights. */
void pack_blocks(const float *w, int N, int K, int bits, uint8_t *out)
{
    const int nb = K / QK;
    const size_t row_bytes = (size_t)nb * (bits == 4 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int b = 0; b < nb; b++) {
            const float *x = w + (size_t)n * K + (size_t)b * QK;
            uint8_t *blk = out + (size_t)n * row_bytes + (size_t)b * (bits == 4 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES);
            if (bits == 4) {
                float lo = x[0], hi = x[0];
                for (int i = 1; i < QK; i++) {
                    lo = x[i] < lo ? x[i] : lo;
                    hi = x[i] > hi ? x[i] : hi;
                }
                const uint16_t d16 = _cvtss_sh((hi - lo) / 15.0f, 0), m16 = _cvtss_sh(lo, 0);
                const float d = _cvtsh_ss(d16), m = _cvtsh_ss(m16);
                uint8_t q[QK];
                for (int i = 0; i < QK; i++) {
                    const float v = d > 0.0f ? nearbyintf((x[i] - m) / d) : 0.0f;
                    q[i] = (uint8_t)(v < 0.0f ? 0.0f : (v > 15.0f ? 15.0f : v));
                }
                memcpy(blk, &d16, 2);
                memcpy(blk + 2, &m16, 2);
                for (int j = 0; j < QK / 2; j++)
                    blk[4 + j] = (uint8_t)(q[j] | (q[j + QK / 2] << 4));
            } else {
                float amax = 0.0f;
                for (int i = 0; i < QK; i++)
                    amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
                const uint16_t d16 = _cvtss_sh(amax / 127.0f, 0);
                const float d = _cvtsh_ss(d16);
                memcpy(blk, &d16, 2);
                for (int i = 0; i < QK; i++) {
                    const float v = d > 0.0f ? nearbyintf(x[i] / d) : 0.0f;
                    blk[2 + i] = (uint8_t)(int8_t)(v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v));
                }
            }
        }
    }
}
