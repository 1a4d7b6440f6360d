// Native float32 passes for the transformers backend's decode step on CPU (harness/backends/
// hf_kernels.py): RMSNorm, rotary position embedding of the query and key heads, a gated MLP's
// SiLU(gate) * up, a decode step's grouped-query attention, and the linears of a decode step (a few
// rows against a weight streamed from memory). Compiled on first use with the system C++ compiler
// and loaded through ctypes.
//
// Why: at batch 16 each of these is a few thousand elements, so torch spends its time on
// dispatch and on one vocabulary-free but separate pass per operation (RMSNorm is five of them,
// rotary ten); one call here does the whole operation in one pass, single-threaded (the
// attention and the linears, the ones with real work, on OpenMP threads).
//
// Arithmetic: the rotary and the RMSNorm's scaling are the same float32 products and sums as the
// torch code they replace, in the same order, with -ffp-contract=off (no fused multiply-add), so
// rotary is bit-identical; RMSNorm's mean of squares is summed in another order (float32 rounding
// apart), SiLU and the attention's softmax use a polynomial exp (relative error < 1.1e-7, under 2
// ulp); the attention and the linears sum in float32 in another order than torch's SDPA and oneDNN.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HF_NATIVE_AVX2 1
#endif

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

constexpr int64_t DECODE_MAX_GROUPS = 16;  // query heads per key-value head
constexpr int64_t DECODE_MAX_DIM = 256;    // head dimension
constexpr int64_t ROWS = 8;    // key rows per tile of the score pass: independent accumulators hide FMA latency
constexpr int64_t LANES = 8;   // float lanes per accumulator (one AVX register)

// One decode step's attention (a single query position per row, no mask): out[b, h, :] =
// softmax_l(scale * q[b, h] . k[b, h / groups, l]) . v[b, h / groups, l] over l < length.
// q: [batch, heads, dim] at strides (qb, qh, 1); k, v: [batch, kv_heads, length, dim] at strides
// (kb, kh, kl, 1) and (vb, vh, vl, 1) (a prefix view of a KV cache is read in place); out:
// [batch, heads, dim], contiguous. One work item is a (row, key-value head) pair: its keys are read
// once for all the query heads that share them and its values once; torch's CPU flash kernel
// treats a one-row query as a general block problem (set-up per row and head), 28 vs 21 ms for 30
// layers of SmolLM2 at batch 16 here. The items are split over `threads` OpenMP threads (torch's
// own runtime: no thread is started per call).
// Returns 0, or -1 when groups or dim exceed the limits above (nothing written).
int32_t decode_attention(const float* q, int64_t qb, int64_t qh, const float* k, int64_t kb, int64_t kh, int64_t kl,
                         const float* v, int64_t vb, int64_t vh, int64_t vl, float* out, int64_t batch,
                         int64_t heads, int64_t kv_heads, int64_t length, int64_t dim, float scale, int32_t threads) {
    const int64_t groups = heads / kv_heads;
    if (groups < 1 || groups * kv_heads != heads || groups > DECODE_MAX_GROUPS || dim > DECODE_MAX_DIM || length < 1)
        return -1;
    const int64_t items = batch * kv_heads;
    auto work = [&](int64_t first, int64_t last) {
        std::vector<float> scores(groups * length);
        float query[DECODE_MAX_GROUPS * DECODE_MAX_DIM], acc[DECODE_MAX_GROUPS * DECODE_MAX_DIM];
        float maxima[DECODE_MAX_GROUPS], sums[DECODE_MAX_GROUPS];
        for (int64_t item = first; item < last; ++item) {
            const int64_t b = item / kv_heads, g = item % kv_heads;
            const float* keys = k + b * kb + g * kh;
            const float* values = v + b * vb + g * vh;
            for (int64_t j = 0; j < groups; ++j) {
                const float* qj = q + b * qb + (g * groups + j) * qh;
                for (int64_t d = 0; d < dim; ++d) query[j * dim + d] = qj[d] * scale;
                maxima[j] = -INFINITY;
            }
            int64_t l = 0;
            if (dim % LANES == 0) {  // scores, ROWS key rows at a time: ROWS independent sums per query head
                for (; l + ROWS <= length; l += ROWS) {
                    for (int64_t j = 0; j < groups; ++j) {
                        const float* qj = query + j * dim;
                        float part[ROWS][LANES] = {};
                        for (int64_t c = 0; c < dim; c += LANES)
                            for (int64_t r = 0; r < ROWS; ++r) {
                                const float* key = keys + (l + r) * kl + c;
                                for (int64_t lane = 0; lane < LANES; ++lane) part[r][lane] += qj[c + lane] * key[lane];
                            }
                        for (int64_t r = 0; r < ROWS; ++r) {
                            float s = 0.0f;
                            for (int64_t lane = 0; lane < LANES; ++lane) s += part[r][lane];
                            scores[j * length + l + r] = s;
                            maxima[j] = std::max(maxima[j], s);
                        }
                    }
                }
            }
            for (; l < length; ++l) {  // the remaining rows (or any dim): one dot product at a time
                const float* key = keys + l * kl;
                for (int64_t j = 0; j < groups; ++j) {
                    const float* qj = query + j * dim;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < dim; ++d) s += qj[d] * key[d];
                    scores[j * length + l] = s;
                    maxima[j] = std::max(maxima[j], s);
                }
            }
            for (int64_t j = 0; j < groups; ++j) {  // softmax numerators and their sums
                float* sj = scores.data() + j * length;
                const float m = maxima[j];
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int64_t l = 0; l < length; ++l) {
                    const float e = exp_nonpositive(sj[l] - m);
                    sj[l] = e;
                    total += e;
                }
                sums[j] = total;
            }
            std::fill(acc, acc + groups * dim, 0.0f);
            for (int64_t l = 0; l < length; ++l) {  // weighted values: each value row once
                const float* value = values + l * vl;
                for (int64_t j = 0; j < groups; ++j) {
                    const float w = scores[j * length + l];
                    float* aj = acc + j * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) aj[d] += w * value[d];
                }
            }
            for (int64_t j = 0; j < groups; ++j) {
                float* o = out + (b * heads + g * groups + j) * dim;
                const float inverse = 1.0f / sums[j];
                for (int64_t d = 0; d < dim; ++d) o[d] = acc[j * dim + d] * inverse;
            }
        }
    };
#pragma omp parallel num_threads(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items))))
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        work(items * t / n, items * (t + 1) / n);
    }
    return 0;
}

}  // extern "C"

// ----------------------------------------------------------------------------- decode linears
// out[r, o] = x[r, :] . w[o, :] (+ bias[o]) for a few rows r of x ([rows, K], contiguous) and a
// row-major weight w ([n, K], nn.Linear's own layout): at decode a linear is a batch of 16 or so rows
// against a weight read from memory once per step, 16 multiply-adds per weight element. oneDNN's
// packed kernel reaches 40-50 GFLOP/s there on the 2-core AVX2 machine (hot weights: 60-75), i.e.
// it reads the weight at 5-6 GB/s of the 19 GB/s the cores can stream: its loads wait on memory.
// Here each OpenMP thread streams its own contiguous share of w's rows, NR rows at a time, and
// prefetches the weight PREFETCH_BYTES ahead of what it multiplies, so the reads are in flight while
// the multiply-adds run: 60-70 GFLOP/s over a SmolLM2 step's linears at 2 threads.
// A tile: NR weight rows against MR rows of x, NR * MR accumulators of 8 lanes each (12 of the 16
// AVX registers at NR 2, MR 6), k advancing 8 at a time; the first tile of each NR-row block issues
// the prefetches (the others re-read the block from L1).

#ifdef HF_NATIVE_AVX2
namespace {

constexpr int64_t LINEAR_NR = 2, LINEAR_MR = 6;
constexpr int64_t PREFETCH_BYTES = 6144;

inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int NR, int MR, bool PREFETCH>
inline void linear_tile(const float* x, int64_t K, const float* w, const float* bias, float* out, int64_t ldo,
                        bool accumulate, const char* ahead, const char* end) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        if (PREFETCH) {  // NR * 32 bytes of the weight per step: one 64-byte line per step at NR 2
            const char* line = ahead + k * NR * 4;
            if (line < end) _mm_prefetch(line, _MM_HINT_T0);
        }
        __m256 wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
            __m256 xv = _mm256_loadu_ps(x + i * K + k);
            asm("" : "+x"(xv));  // one load into a register for its NR uses (GCC would fold it into each FMA)
#pragma GCC unroll 8
            for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            const float dot = lanes_sum(acc[i][j]) + (bias ? bias[j] : 0.0f);
            out[i * ldo + j] = accumulate ? out[i * ldo + j] + dot : dot;
        }
}

template <int NR, bool PREFETCH>
inline void linear_tile_rows(int64_t mr, const float* x, int64_t K, const float* w, const float* bias, float* out,
                             int64_t ldo, bool acc, const char* ahead, const char* end) {
    switch (mr) {
        case 6: linear_tile<NR, 6, PREFETCH>(x, K, w, bias, out, ldo, acc, ahead, end); break;
        case 5: linear_tile<NR, 5, PREFETCH>(x, K, w, bias, out, ldo, acc, ahead, end); break;
        case 4: linear_tile<NR, 4, PREFETCH>(x, K, w, bias, out, ldo, acc, ahead, end); break;
        case 3: linear_tile<NR, 3, PREFETCH>(x, K, w, bias, out, ldo, acc, ahead, end); break;
        case 2: linear_tile<NR, 2, PREFETCH>(x, K, w, bias, out, ldo, acc, ahead, end); break;
        default: linear_tile<NR, 1, PREFETCH>(x, K, w, bias, out, ldo, acc, ahead, end); break;
    }
}

// Weight rows [first, last) (NR at a time; a last odd row alone) against all rows of x.
inline void linear_rows_range(const float* x, int64_t rows, int64_t K, const float* w, int64_t first, int64_t last,
                              const float* bias, float* out, int64_t ldo, bool accumulate) {
    const char* end = reinterpret_cast<const char*>(w + last * K);
    for (int64_t o = first; o < last; o += LINEAR_NR) {
        const float* block = w + o * K;
        const float* b = bias ? bias + o : nullptr;
        const char* ahead = reinterpret_cast<const char*>(block) + PREFETCH_BYTES;
        for (int64_t r = 0; r < rows; r += LINEAR_MR) {
            const int64_t mr = std::min(LINEAR_MR, rows - r);
            const float* xr = x + r * K;
            float* o_r = out + r * ldo + o;
            if (last - o < LINEAR_NR)
                linear_tile_rows<1, false>(mr, xr, K, block, b, o_r, ldo, accumulate, ahead, end);
            else if (r == 0)
                linear_tile_rows<LINEAR_NR, true>(mr, xr, K, block, b, o_r, ldo, accumulate, ahead, end);
            else
                linear_tile_rows<LINEAR_NR, false>(mr, xr, K, block, b, o_r, ldo, accumulate, ahead, end);
        }
    }
}

}  // namespace
#endif

extern "C" {

// out[r, o] (rows ldo apart) = x[r, :] . w[o, :] + bias[o] (bias may be null) for r < rows, o < n, or
// with `accumulate` out[r, o] += that (a residual connection's sum in the same pass); x [rows, K] and
// w [n, K] contiguous. The weight's rows are split over `threads` OpenMP threads in
// contiguous shares of whole NR-row blocks. Returns 0, or -1 (nothing written) where K is not a
// multiple of 8 or the library was built without AVX2 and FMA.
int32_t linear_rows(const float* x, int64_t rows, int64_t K, const float* w, int64_t n, const float* bias,
                    float* out, int64_t ldo, int32_t accumulate, int32_t threads) {
#ifdef HF_NATIVE_AVX2
    if (K % 8 != 0 || K < 8 || rows < 1 || n < 1) return -1;
    const int64_t blocks = (n + LINEAR_NR - 1) / LINEAR_NR;
#pragma omp parallel num_threads(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks))))
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t first = blocks * t / count * LINEAR_NR, last = std::min(n, blocks * (t + 1) / count * LINEAR_NR);
        if (first < last) linear_rows_range(x, rows, K, w, first, last, bias, out, ldo, accumulate != 0);
    }
    return 0;
#else
    (void)x, (void)rows, (void)K, (void)w, (void)n, (void)bias, (void)out, (void)ldo, (void)accumulate, (void)threads;
    return -1;
#endif
}

}  // extern "C"

namespace {

// A decode step's new keys and values into a KV cache: row b's key-value head h (`dim` numbers at
// src + b * src_row + src_k + h * dim for keys, src_v for values: the fused q / k / v output) to
// keys + b * kb + h * kh + position * kl (values likewise), the cache's buffers at their strides.
void append_kv(const float* src, int64_t batch, int64_t src_row, int64_t src_k, int64_t src_v, int64_t kv_heads,
               int64_t dim, float* keys, int64_t kb, int64_t kh, int64_t kl, float* values, int64_t vb, int64_t vh,
               int64_t vl, int64_t position) {
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < kv_heads; ++h) {
            std::memcpy(keys + b * kb + h * kh + position * kl, src + b * src_row + src_k + h * dim,
                        dim * sizeof(float));
            std::memcpy(values + b * vb + h * vh + position * vl, src + b * src_row + src_v + h * dim,
                        dim * sizeof(float));
        }
}

}  // namespace

// ----------------------------------------------------------------------------- a whole decode layer
// A Llama decoder layer's decode step (one new position per row, no mask) as the calls above, with no
// return to Python between them:
//   normed = rms_norm(x; norm1); qkv = normed [wq | wk | wv]^T + [bq | bk | bv]; rotary on q and k;
//   k, v appended to the cache buffers at `position`; attn = decode_attention(q; keys and values
//   0..position); out = x + attn wo^T + bo; normed = rms_norm(out; norm2);
//   out += (silu(normed wg^T) * (normed wu^T)) wd^T.
// x, out: [rows, width]; the cache buffers [rows, kv_heads, capacity > position, head_dim] at
// strides (kb, kh, kl, 1) / (vb, vh, vl, 1); cos / sin: this position's head_dim numbers per row
// (cs_batch apart, 0: one row for all); biases may be null; scratch: rows * (width + q_size +
// 2 * kv_size + q_size + 3 * inter) floats. Returns 0, or -1 (nothing written: not the cache,
// not out) where the attention or the linears do not take the shapes.
extern "C" {

int32_t decode_layer(const float* x, int64_t rows, int64_t width, const float* norm1, float eps1, const float* norm2,
                     float eps2, const float* wq, const float* bq, const float* wk, const float* bk, const float* wv,
                     const float* bv, int64_t heads, int64_t kv_heads, int64_t head_dim, const float* cos,
                     const float* sin, int64_t cs_batch, float* keys, int64_t kb, int64_t kh, int64_t kl,
                     float* values, int64_t vb, int64_t vh, int64_t vl, int64_t position, float scale,
                     const float* wo, const float* bo, const float* wg, const float* wu, const float* wd,
                     int64_t inter, float* scratch, float* out, int32_t threads) {
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, total = q_size + 2 * kv_size;
    const int64_t groups = kv_heads > 0 ? heads / kv_heads : 0;
    if (groups < 1 || groups * kv_heads != heads || groups > DECODE_MAX_GROUPS || head_dim > DECODE_MAX_DIM
        || head_dim % 2 || width % 8 || q_size % 8 || inter % 8)
        return -1;
#ifndef HF_NATIVE_AVX2
    return -1;
#endif
    float* normed = scratch;
    float* qkv = normed + rows * width;
    float* attn = qkv + rows * total;
    float* gate_up = attn + rows * q_size;
    float* hidden = gate_up + rows * 2 * inter;
    rms_norm(x, rows, width, width, norm1, eps1, normed, width);
    linear_rows(normed, rows, width, wq, q_size, bq, qkv, total, 0, threads);
    linear_rows(normed, rows, width, wk, kv_size, bk, qkv + q_size, total, 0, threads);
    linear_rows(normed, rows, width, wv, kv_size, bv, qkv + q_size + kv_size, total, 0, threads);
    rotary(qkv, rows, 1, total, heads + kv_heads, head_dim, cos, sin, cs_batch, head_dim);
    append_kv(qkv, rows, total, q_size, q_size + kv_size, kv_heads, head_dim, keys, kb, kh, kl, values, vb, vh, vl,
              position);
    decode_attention(qkv, total, head_dim, keys, kb, kh, kl, values, vb, vh, vl, attn, rows, heads, kv_heads,
                     position + 1, head_dim, scale, threads);
    std::memcpy(out, x, rows * width * sizeof(float));
    linear_rows(attn, rows, q_size, wo, width, bo, out, width, 1, threads);
    rms_norm(out, rows, width, width, norm2, eps2, normed, width);
    linear_rows(normed, rows, width, wg, inter, nullptr, gate_up, 2 * inter, 0, threads);
    linear_rows(normed, rows, width, wu, inter, nullptr, gate_up + inter, 2 * inter, 0, threads);
    silu_mul(gate_up, rows, 2 * inter, inter, hidden, inter);
    linear_rows(hidden, rows, inter, wd, width, nullptr, out, width, 1, threads);
    return 0;
}

}  // extern "C"
