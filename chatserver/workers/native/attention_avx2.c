/* Rotary embedding, KV cache write and attention for steps of a few rows, in one call.

   In torch a layer's attention for one decoding row is some fifteen calls
   (rotary as a complex product, two cache writes, scaled_dot_product_attention
   and the views around them), each a few microseconds of dispatch for little
   arithmetic.  Here it is one call per layer: for each row (its slot and its
   position) the q and k heads are rotated, k and v are written into the slot
   cache, then each head attends over positions 0..position of its slot.
   Rows are written before any attends, so rows of one sequence in one step
   (a short prompt chunk) see each other causally.  Built and loaded by
   native_kernels.py together with gemv_avx2.c.

   Layouts (float32): qkv [T, (H + 2 KV) D], q heads then k heads then v heads,
   each rotated pair (i, i + D/2 of the model's layout) adjacent at 2i, 2i + 1
   (the runner's row order for its complex rotary); cos and sin [positions, D/2];
   caches [slots, KV, capacity, D]; out [T, H D].  D a multiple of 8. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for x <= 0 (scores minus their maximum): Cephes' range reduction and
   polynomial, about 1e-7 relative; below -87 it gives 0. */
static inline __m256 exp_nonpositive(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

static void rotate(float *x, int D, const float *cos, const float *sin)
{
    for (int i = 0; i < D / 2; i++) {
        const float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cos[i] - b * sin[i];
        x[2 * i + 1] = a * sin[i] + b * cos[i];
    }
}

/* One head of one row: softmax(q K^T scale) V over the first n positions. */
static void attend(const float *q, const float *keys, const float *values, int n, int D,
                   float scale, float *scores, float *out)
{
    float best = -INFINITY;
    for (int j = 0; j < n; j++) {
        const float *k = keys + (size_t)j * D;
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
        scores[j] = hsum8(acc) * scale;
        best = scores[j] > best ? scores[j] : best;
    }
    const __m256 top = _mm256_set1_ps(best);
    __m256 total8 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top));
        _mm256_storeu_ps(scores + j, e);
        total8 = _mm256_add_ps(total8, e);
    }
    float total = hsum8(total8);
    if (j < n) {
        float tail[8] = {0};
        for (int i = 0; j + i < n; i++)
            tail[i] = scores[j + i] - best;
        __m256 e = exp_nonpositive(_mm256_loadu_ps(tail));
        _mm256_storeu_ps(tail, e);
        for (int i = 0; j + i < n; i++) {
            scores[j + i] = tail[i];
            total += tail[i];
        }
    }
    for (int d = 0; d < D; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int t = 0; t < n; t++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[t]), _mm256_loadu_ps(values + (size_t)t * D + d), acc);
        _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / total)));
    }
}

/* Returns 0, or -1 for what it does not take (the caller checks first). */
int rope_cache_attend(float *qkv, int T, const int64_t *slots, const int64_t *positions,
                      const float *cos, const float *sin, float *k_cache, float *v_cache, int H,
                      int KV, int D, int capacity, float scale, float *out)
{
    if (T < 1 || D % 8 || H % KV)
        return -1;
    const int width = (H + 2 * KV) * D, groups = H / KV, half = D / 2;
    for (int t = 0; t < T; t++) {
        float *row = qkv + (size_t)t * width;
        const int64_t pos = positions[t], slot = slots[t];
        if (pos < 0 || pos >= capacity)
            return -1;
        for (int h = 0; h < H + KV; h++)
            rotate(row + h * D, D, cos + pos * half, sin + pos * half);
        for (int h = 0; h < KV; h++) {
            const size_t at = (((size_t)slot * KV + h) * capacity + pos) * D;
            for (int d = 0; d < D; d++) {
                k_cache[at + d] = row[(H + h) * D + d];
                v_cache[at + d] = row[(H + KV + h) * D + d];
            }
        }
    }
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * ((size_t)capacity + 8));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int i = 0; i < T * H; i++) {
            if (!scores)
                continue;
            const int t = i / H, h = i % H;
            const size_t base = ((size_t)slots[t] * KV + h / groups) * capacity * D;
            attend(qkv + (size_t)t * width + h * D, k_cache + base, v_cache + base,
                   (int)positions[t] + 1, D, scale, scores, out + (size_t)t * H * D + h * D);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
