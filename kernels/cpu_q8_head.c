// The logits head over a GGUF Q8_0 table for a few rows, the way llama.cpp runs it: each input row
// is quantized to int8 per block of 32 (scale = max|x| / 127, codes round-half-even of x / scale),
// and each block's products are one exact integer dot product (VNNI: 32 byte products summed into
// 8 int32 lanes by one instruction), scaled by weight scale * input scale and accumulated in fp32.
// Reading 1-byte codes (28 MB for the embedded model's 49,152 x 576 table, plus 3.5 MB of fp32
// scales) is half the bf16 table's 57 MB, and a single-stream decode step's head is bound by them.
//
//   x [M, K] float32 contiguous, codes [N, K] int8 in [-127, 127], scales [N, K / 32] float32,
//   out [M, N] float32; table rows are split between OpenMP threads.
// The reference is `q8_0_matmul_reference` (kernels/cpu_q8_head.py), the same arithmetic in torch.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QBLOCK 32
#define MAX_ROWS 4
#define MAX_K 16384

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CS_DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define CS_HAVE_VNNI 1
#elif defined(__AVXVNNI__)
#define CS_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#define CS_HAVE_VNNI 1
#else
#define CS_HAVE_VNNI 0
#endif

extern "C" int cs_q8_head_supported(void) { return CS_HAVE_VNNI; }

// x[m] as int8 codes per block of 32 and their scales: the activation side of llama.cpp's q8_0 dot.
extern "C" void cs_quantize_rows_q8(const float* x, int64_t M, int64_t K, int8_t* q, float* d) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < K / QBLOCK; b++) {
            const float* xb = x + m * K + b * QBLOCK;
            float amax = 0.0f;
            for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float scale = amax / 127.0f;
            const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
            d[m * (K / QBLOCK) + b] = scale;
            for (int i = 0; i < QBLOCK; i++) {
                const float v = nearbyintf(xb[i] * inv);  // half to even, as torch.round
                q[m * K + b * QBLOCK + i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
            }
        }
    }
}

#if CS_HAVE_VNNI
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int M>
static void q8_rows(const int8_t* qx, const float* dx, int64_t K, const int8_t* codes, const float* scales,
                    int64_t N, float* out, int num_threads) {
    const int64_t nb = K / QBLOCK;
    // |x| as unsigned bytes, once: vpdpbusd multiplies unsigned by signed, so each weight byte takes
    // the sign of its input (vpsignb) and the input its magnitude.
    uint8_t ax[MAX_ROWS * MAX_K];
    for (int64_t i = 0; i < M * K; i++) ax[i] = (uint8_t)(qx[i] < 0 ? -qx[i] : qx[i]);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* c = codes + n * K;
        const float* s = scales + n * nb;
        __m256 acc[M];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m256i w = _mm256_loadu_si256((const __m256i*)(c + b * QBLOCK));
            for (int m = 0; m < M; m++) {
                const __m256i xs = _mm256_loadu_si256((const __m256i*)(qx + m * K + b * QBLOCK));
                const __m256i xa = _mm256_loadu_si256((const __m256i*)(ax + m * K + b * QBLOCK));
                const __m256i dot = CS_DPBUSD(_mm256_setzero_si256(), xa, _mm256_sign_epi8(w, xs));
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s[b] * dx[m * nb + b]), acc[m]);
            }
        }
        for (int m = 0; m < M; m++) out[m * N + n] = hsum8(acc[m]);
    }
}
#endif

// Returns 0, or -1 for what it does not take (no VNNI, K not a multiple of 32 or past MAX_K, M past
// MAX_ROWS); `qx` [M, K] and `dx` [M, K / 32] come from cs_quantize_rows_q8.
extern "C" int cs_q8_0_matmul(const int8_t* qx, const float* dx, int64_t M, int64_t K, const int8_t* codes,
                              const float* scales, int64_t N, float* out, int num_threads) {
#if CS_HAVE_VNNI
    if (K % QBLOCK != 0 || K > MAX_K) return -1;
    switch (M) {
        case 1: q8_rows<1>(qx, dx, K, codes, scales, N, out, num_threads); return 0;
        case 2: q8_rows<2>(qx, dx, K, codes, scales, N, out, num_threads); return 0;
        case 3: q8_rows<3>(qx, dx, K, codes, scales, N, out, num_threads); return 0;
        case 4: q8_rows<4>(qx, dx, K, codes, scales, N, out, num_threads); return 0;
        default: return -1;
    }
#else
    (void)qx; (void)dx; (void)M; (void)K; (void)codes; (void)scales; (void)N; (void)out; (void)num_threads;
    return -1;
#endif
}
