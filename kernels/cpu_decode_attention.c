// Decode-step paged attention on the CPU: one call a layer writes the step's K/V into the block
// cache and attends each sequence's one new token over its whole cached context, reading K/V
// through the block table in place (no gathered copy). float32 throughout.
//
// Layouts (row strides in elements; the innermost dimension is contiguous, heads are D apart):
//   q   [S, H, D]      k, v [S, KVH, D]      out [S, H, D] contiguous
//   cache [2, num_slots, KVH, D] contiguous (slot = block * block_size + offset; K then V)
//   slots [S] int64 (>= 0: the caller checked), tables [S, table_stride] int32, seq_lens [S] int32
// Query heads g*group .. g*group+group-1 share KV head g (GQA). Each position's K row (then V row),
// all KV heads, is read once for all query heads; softmax in two passes (max, then exp and sum).
// Sequences run in parallel (OpenMP, the libgomp Inductor's CPU kernels use) once a step has work.
// The reference is paged_attention_reference (kernels/paged_attention.py); tests compare them.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_HEADS 128
#define MAX_HEAD_DIM 256

// exp for the softmax, in a form the compiler vectorizes (libm's expf stays scalar without
// -ffast-math, which this file must not use: its crtfastmath would set flush-to-zero for the whole
// process). Cody-Waite range reduction to r in [-ln2/2, ln2/2], a degree-6 Taylor polynomial
// (relative error < 2e-7 there), 2^n through the exponent bits. x <= 0 here (scores minus their
// maximum); below -87 the result is 0, as expf's underflow.
static inline float softmax_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_roundf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } bits;
    bits.i = ((int32_t)n + 127) << 23;
    return p * bits.f;
}

// One sequence, all heads: positions walk the block table in order and each position's K (then V)
// row, all KV heads, is read once, contiguously (block_size rows back to back within a block).
static void attend_sequence(const float* q, const float* kc, const float* vc, const int32_t* table, int64_t ctx,
                            int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale, float* out,
                            float* scores /* [H, ctx] */, float* acc /* [H, D] */) {
    const int64_t group = H / KVH, row = KVH * D;
    for (int64_t j = 0; j < ctx; j++) {
        const float* krow = kc + ((int64_t)table[j / BS] * BS + j % BS) * row;
        for (int64_t h = 0; h < H; h++) {
            const float* kp = krow + (h / group) * D;
            const float* qh = q + h * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; d++) dot += qh[d] * kp[d];
            scores[h * ctx + j] = dot * scale;
        }
    }
    float inv[MAX_HEADS];
    for (int64_t h = 0; h < H; h++) {
        float* sc = scores + h * ctx;
        float m = -INFINITY;
        for (int64_t j = 0; j < ctx; j++) m = sc[j] > m ? sc[j] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < ctx; j++) {
            const float e = softmax_exp(sc[j] - m);
            sc[j] = e;
            sum += e;
        }
        inv[h] = 1.0f / sum;
    }
    memset(acc, 0, sizeof(float) * H * D);
    for (int64_t j = 0; j < ctx; j++) {
        const float* vrow = vc + ((int64_t)table[j / BS] * BS + j % BS) * row;
        for (int64_t h = 0; h < H; h++) {
            const float* vp = vrow + (h / group) * D;
            const float p = scores[h * ctx + j];
            float* a = acc + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) a[d] += p * vp[d];
        }
    }
    for (int64_t h = 0; h < H; h++) {
#pragma omp simd
        for (int64_t d = 0; d < D; d++) out[h * D + d] = acc[h * D + d] * inv[h];
    }
}

#ifdef __cplusplus
extern "C"
#endif
// Returns 0, or -1 when a shape is past the fixed limits (the caller then takes the torch path).
int cs_decode_attention_f32(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                            int64_t v_stride, float* cache, int64_t num_slots, const int64_t* slots,
                            const int32_t* tables, int64_t table_stride, const int32_t* seq_lens, float* out,
                            int64_t S, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale,
                            int64_t max_ctx, int num_threads) {
    if (H > MAX_HEADS || D > MAX_HEAD_DIM || H % KVH != 0) return -1;
    float* kc = cache;
    float* vc = cache + num_slots * KVH * D;
    const int64_t row = KVH * D;
    for (int64_t s = 0; s < S; s++) {
        memcpy(kc + slots[s] * row, k + s * k_stride, sizeof(float) * row);
        memcpy(vc + slots[s] * row, v + s * v_stride, sizeof(float) * row);
    }
    // A parallel region costs a few microseconds: worth it only once the step has real work.
    const int parallel = num_threads > 1 && S > 1 && S * max_ctx >= 512;
    const int workers = parallel ? num_threads : 1;
    const int64_t per_worker = H * max_ctx + H * D;
    float* work = (float*)malloc(sizeof(float) * per_worker * workers);
    if (work == NULL) return -1;
#pragma omp parallel for num_threads(workers) schedule(dynamic, 1) if (parallel)
    for (int64_t s = 0; s < S; s++) {
#ifdef _OPENMP
        float* mine = work + (parallel ? omp_get_thread_num() : 0) * per_worker;
#else
        float* mine = work;
#endif
        attend_sequence(q + s * q_stride, kc, vc, tables + s * table_stride, seq_lens[s], H, KVH, D, BS, scale,
                        out + s * H * D, mine, mine + H * max_ctx);
    }
    free(work);
    return 0;
}
