// Native float32 passes for the transformers backend's decode step on CPU (harness/backends/
// hf_kernels.py): RMSNorm, rotary position embedding of the query and key heads, and a gated MLP's
// SiLU(gate) * up. Compiled on first use with the system C++ compiler and loaded through ctypes.
//
// Why: at batch 16 each of these is a few thousand elements, so torch spends its time on
// dispatch and on one vocabulary-free but separate pass per operation (RMSNorm is five of them,
// rotary ten); one call here does the whole operation in one pass, single-threaded.
//
// Arithmetic: the rotary and the RMSNorm's scaling are the same float32 products and sums as the
// torch code they replace, in the same order, with -ffp-contract=off (no fused multiply-add), so
// rotary is bit-identical; RMSNorm's mean of squares is summed in another order (float32 rounding
// apart), SiLU uses a polynomial exp (relative error < 1.1e-7, under 2 ulp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float float_of(int32_t i) { float x; std::memcpy(&x, &i, 4); return x; }

// exp(x) for x <= 0 (below -87 gives 0): 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 split
// hi/lo), e^r by its Taylor polynomial to r^7. Branch-free, so the loops vectorise.
inline float exp_nonpositive(float x) {
    const float live = static_cast<float>(x > -87.0f);
    x = std::max(x, -87.0f);
    int32_t n = static_cast<int32_t>(x * 1.44269504f - 0.5f);  // round half up (x <= 0)
    float r = x - static_cast<float>(n) * 0.693145752f - static_cast<float>(n) * 1.42860677e-6f;
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return live * p * float_of((n + 127) << 23);
}

}  // namespace

extern "C" {

// out[r, :] = x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps)) * weight, rows `x_stride` / `out_stride` apart.
void rms_norm(const float* x, int64_t rows, int64_t x_stride, int64_t dim, const float* weight, float eps,
              float* out, int64_t out_stride) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * x_stride;
        float* o = out + r * out_stride;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < dim; ++j) sum += xr[j] * xr[j];
        const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) o[j] = weight[j] * (xr[j] * scale);
    }
}

// In place on the rows of `batch` x `seq` tokens (token (b, i) at x + (b * seq + i) * x_stride), the
// first `heads` heads of `head_dim` of each row: x = x * cos + rotate_half(x) * sin, rotate_half(x) =
// (-x2, x1) for the halves x1, x2 (transformers' Llama rotary), with token (b, i)'s cos / sin at
// b * cs_batch + i * cs_seq (cs_batch = 0: one row of positions for the whole batch).
void rotary(float* x, int64_t batch, int64_t seq, int64_t x_stride, int64_t heads, int64_t head_dim,
            const float* cos, const float* sin, int64_t cs_batch, int64_t cs_seq) {
    const int64_t half = head_dim / 2;
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t i = 0; i < seq; ++i) {
            const float* c = cos + b * cs_batch + i * cs_seq;
            const float* s = sin + b * cs_batch + i * cs_seq;
            for (int64_t h = 0; h < heads; ++h) {
                float* x1 = x + (b * seq + i) * x_stride + h * head_dim;
                float* x2 = x1 + half;
#pragma omp simd
                for (int64_t j = 0; j < half; ++j) {
                    const float p = x1[j], q = x2[j];
                    x1[j] = p * c[j] + (-q) * s[j];
                    x2[j] = q * c[half + j] + p * s[half + j];
                }
            }
        }
    }
}

// out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]: the gate and up halves of one row.
void silu_mul(const float* gate_up, int64_t rows, int64_t stride, int64_t inter, float* out, int64_t out_stride) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* g = gate_up + r * stride;
        const float* u = g + inter;
        float* o = out + r * out_stride;
#pragma omp simd
        for (int64_t j = 0; j < inter; ++j) {
            const float x = g[j];
            const float e = exp_nonpositive(-std::fabs(x));  // e^-|x|: never overflows
            const float sigmoid = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            o[j] = x * sigmoid * u[j];
        }
    }
}

}  // extern "C"
