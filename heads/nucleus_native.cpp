// Native passes of the exact nucleus (heads/nucleus.py) and of AutoDeco's whole decoding step
// (heads/model.py, native_decode): the row statistics, the slow path's band search, the final
// masking, and autodeco_rows (both heads' MLPs, z = l / T, statistics, features, each row's nucleus
// and masking in one call). Compiled on first use with the system C++ compiler (with OpenMP: see
// on_row_blocks) and loaded through ctypes.
//
// The exactness contract: the reference's masses are torch's float32 exp(z - lse). nucleus.py's
// passes only narrow the search (the band, from an approximate exp) and sum/sort masses torch.exp
// computed, with the same float64 arithmetic as the numpy path. autodeco_rows decides with this
// file's exp, which is within 1.4e-7 of torch's (both measured against float64); a row where a
// decision lies within a margin that covers that (top_threshold, band_threshold) is decided with
// torch's masses: here, where the caller passes torch's exp function (TorchExp), else by the
// caller, to whom its candidates are handed back. A row whose checks fail is reported, not
// guessed. No fast-math: the float64 sums and comparisons must be IEEE (-fno-trapping-math, which
// lets compares and conversions vectorise, changes no result).

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Flush denormals to zero (and read them as zero) for the duration of a kernel, on this thread
// only; restored on exit. Terms below 1e-38 (e^2 of a token 44 nats down) otherwise cost ~100
// cycles each; they change no result beyond float32 rounding of the sums.
struct FlushDenormals {
#if defined(__SSE__)
    unsigned int saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
    ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// The opposite, inside a FlushDenormals scope: IEEE denormals back for a computation whose result is
// handed out (z = l / T must be torch's quotient, denormal or not).
struct KeepDenormals {
#if defined(__SSE__)
    unsigned int saved = _mm_getcsr();
    KeepDenormals() { _mm_setcsr(saved & ~0x8040u); }
    ~KeepDenormals() { _mm_setcsr(saved); }
#endif
};

constexpr int KEY_SHIFT = 18;      // as nucleus.py: rungs are 1/32 of (1 + depth) wide
constexpr float MAX_DEPTH = 64.0f;
constexpr float MIN_TEMPERATURE = 1e-6f;  // z = l / max(T, this), as heads.model's clamp_min(1e-6)
constexpr int CHUNK = 512;
constexpr int64_t BLOCK = 64;  // block maxima: CHUNK is a multiple of it

inline int32_t bits_of(float x) { int32_t i; std::memcpy(&i, &x, 4); return i; }
inline float float_of(int32_t i) { float x; std::memcpy(&x, &i, 4); return x; }

// exp(x) for x in [-64, 0], relative error < 4e-5: 2^t = 2^n * 2^f with n = trunc(t), f in (-1, 0].
// Branch-free, so the chunk loop vectorises. Only the band's guide uses it.
inline float approx_exp(float x) {
    float t = x * 1.44269504f;
    int32_t n = static_cast<int32_t>(t);
    float f = t - static_cast<float>(n);
    float p = 1.53533713e-4f;
    p = p * f + 1.33335581e-3f;
    p = p * f + 9.61812911e-3f;
    p = p * f + 5.55041087e-2f;
    p = p * f + 2.40226507e-1f;
    p = p * f + 6.93147181e-1f;
    p = p * f + 1.0f;
    return p * float_of((n + 127) << 23);
}

// exp(x) for x <= 0, relative error < 1.1e-7 (7.9e-8 measured at 2e8 points; x below -87 gives 0):
// 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 split hi/lo), e^r by its Taylor
// polynomial to r^7.
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

#if defined(__AVX2__) && defined(__FMA__)
// Eight exp(x) for x <= 0 (x <= -87 and NaN give 0; callers check NaN themselves), relative error
// < 1.5e-7 (1.41e-7 measured at 1e8 points): 2^(n/8) e^r with n = round(x 8 / ln 2), r = x - n ln 2 / 8
// (ln 2 / 8 split hi/lo, |r| <= ln 2 / 16), 2^(n/8) = 2^(n >> 3) * 2^((n & 7) / 8) from an 8-entry
// table in a register, e^r by its Taylor polynomial to r^5. A quarter fewer operations than
// exp_nonpositive: the sums pass takes it over every token of a row.
inline __m256 exp8_nonpositive(__m256 x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 t = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(11.5415602f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i n = _mm256_cvtps_epi32(t);
    __m256 r = _mm256_fmadd_ps(t, _mm256_set1_ps(-0.086639404296875f), x);
    r = _mm256_fmadd_ps(t, _mm256_set1_ps(-3.993272912339307e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 120);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256 eighths = _mm256_setr_ps(1.0f, 1.0905077457427979f, 1.1892070770263672f, 1.2968395948410034f,
                                          1.4142135381698608f, 1.5422108173370361f, 1.6817928552627563f,
                                          1.8340080976486206f);  // 2^(j / 8)
    const __m256 fraction = _mm256_permutevar8x32_ps(eighths, n);  // by n's low 3 bits
    const __m256 power = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_srai_epi32(n, 3), _mm256_set1_epi32(127)), 23));
    return _mm256_and_ps(live, _mm256_mul_ps(_mm256_mul_ps(fraction, p), power));
}
#endif

struct Rows {
    const float* z; int64_t stride; int64_t vocab;
    const int64_t* rows; const float* row_max; const double* top_p;
    int32_t key_first; int32_t n_keys; double margin_cap; double tail_share; double margin_floor;
};

// Rung keys of z[start, end) of one row into key[] (1 + depth clipped to [1, 1 + MAX_DEPTH]; the
// key clipped to the rungs too, so that a NaN cannot index outside the histogram).
inline void rung_keys(const float* z, int64_t n, float top, int32_t key_first, int32_t n_keys, int32_t* key,
                      float* shifted) {
    for (int64_t j = 0; j < n; ++j) {
        float s = top - z[j];
        s = s < 1.0f ? 1.0f : (s > 1.0f + MAX_DEPTH ? 1.0f + MAX_DEPTH : s);
        shifted[j] = s;
        const int32_t k = (bits_of(s) >> KEY_SHIFT) - key_first;
        key[j] = k < 0 ? 0 : (k > n_keys - 1 ? n_keys - 1 : k);
    }
}

// One row: the band [low, high] of rungs where the cumulative guide mass crosses P -/+ margin.
void band_of_row(const Rows& a, int64_t r, int32_t* low_out, int32_t* high_out) {
    const float* z = a.z + a.rows[r] * a.stride;
    const float top = a.row_max[r] + 1.0f;
    std::vector<double> hist(4 * a.n_keys, 0.0);  // four copies break store-to-load chains
    int32_t key[CHUNK];
    float shifted[CHUNK], guide[CHUNK];
    for (int64_t start = 0; start < a.vocab; start += CHUNK) {
        int64_t n = std::min<int64_t>(CHUNK, a.vocab - start);
        rung_keys(z + start, n, top, a.key_first, a.n_keys, key, shifted);
        for (int64_t j = 0; j < n; ++j) guide[j] = approx_exp(1.0f - shifted[j]);
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            hist[key[j]] += guide[j];
            hist[a.n_keys + key[j + 1]] += guide[j + 1];
            hist[2 * a.n_keys + key[j + 2]] += guide[j + 2];
            hist[3 * a.n_keys + key[j + 3]] += guide[j + 3];
        }
        for (; j < n; ++j) hist[key[j]] += guide[j];
    }
    double total = 0.0;
    for (int32_t k = 0; k < a.n_keys; ++k) {
        total += hist[k] + hist[a.n_keys + k] + hist[2 * a.n_keys + k] + hist[3 * a.n_keys + k];
        hist[k] = total;  // cumulative, in place
    }
    const double p = a.top_p[r];
    const double margin = std::min(a.margin_cap, std::max(a.margin_floor, a.tail_share * (1.0 - p)));
    int32_t low = 0, high = 0;
    for (int32_t k = 0; k < a.n_keys; ++k) {
        low += hist[k] < (p - margin) * total;
        high += hist[k] < (p + margin) * total;
    }
    *low_out = low;
    *high_out = std::min(high, a.n_keys - 1);
}

// ---------------------------------------------------------------------------- one row's statistics

struct RowScratch {
    explicit RowScratch(int64_t vocab) { fit(vocab); }
    void fit(int64_t vocab) {
        n_blocks = (vocab + BLOCK - 1) / BLOCK;
        order.resize(n_blocks);
    }
    int64_t n_blocks;
    std::vector<float> order;
    std::vector<std::pair<float, int64_t>> cand;
};

// The maximum of each block of 64 of the row (8 lanes of 8, then across the lanes); the last block
// may be shorter.
void block_maxima(const float* zr, int64_t vocab, float* block_max) {
    const int64_t full = vocab / BLOCK;
    for (int64_t b = 0; b < full; ++b) {
        float lane[8];
        for (int l = 0; l < 8; ++l) lane[l] = zr[b * BLOCK + l];
        for (int64_t j = 8; j < BLOCK; j += 8)
            for (int l = 0; l < 8; ++l) lane[l] = std::max(lane[l], zr[b * BLOCK + j + l]);
        float best = lane[0];
        for (int l = 1; l < 8; ++l) best = std::max(best, lane[l]);
        block_max[b] = best;
    }
    if (full * BLOCK < vocab) {
        float best = -INFINITY;
        for (int64_t j = full * BLOCK; j < vocab; ++j) best = std::max(best, zr[j]);
        block_max[full] = best;
    }
}

// zr = lr / t (float32 division, as torch divides) and the block maxima of zr, in one pass: eight
// lanes of eight per block (GCC/Clang vector types), the maximum of the lanes the block's.
typedef float Lanes __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores

void scale_with_block_maxima(const float* lr, int64_t vocab, float t, float* zr, float* block_max) {
    const int64_t full = vocab / BLOCK;
    const Lanes divisor = {t, t, t, t, t, t, t, t};
    for (int64_t b = 0; b < full; ++b) {
        const Lanes* in = reinterpret_cast<const Lanes*>(lr + b * BLOCK);
        Lanes* out = reinterpret_cast<Lanes*>(zr + b * BLOCK);
        Lanes best = in[0] / divisor;
        out[0] = best;
        for (int j = 1; j < BLOCK / 8; ++j) {
            const Lanes v = in[j] / divisor;
            out[j] = v;
            best = best < v ? v : best;  // as std::max(best, v): a NaN v leaves best
        }
        float m = best[0];
        for (int l = 1; l < 8; ++l) m = std::max(m, best[l]);
        block_max[b] = m;
    }
    if (full * BLOCK < vocab) {
        float m = -INFINITY;
        for (int64_t j = full * BLOCK; j < vocab; ++j) m = std::max(m, zr[j] = lr[j] / t);
        block_max[full] = m;
    }
}

// The k largest values of the row, sorted descending, and their token ids. They lie in the k blocks
// with the largest maxima, and are >= the k-th largest block maximum (those k blocks hold k values
// >= it): every value >= that floor lies in a block whose maximum is >= it. Those blocks are read 8
// values to a compare (a block holds one or two such values); the k largest of the ~100 found are
// selected, then sorted. Requires k <= vocab.
void top_of_row(const float* zr, int64_t vocab, int64_t k, const float* block_max, RowScratch& s, float* values,
                int64_t* indices) {
    const int64_t kb = std::min(k, s.n_blocks);
    std::copy(block_max, block_max + s.n_blocks, s.order.begin());
    std::nth_element(s.order.begin(), s.order.begin() + (kb - 1), s.order.end(), std::greater<float>());
    const float floor = kb == k ? s.order[kb - 1] : -INFINITY;
    s.cand.clear();
    for (int64_t b = 0; b < s.n_blocks; ++b) {
        if (!(block_max[b] >= floor)) continue;
        int64_t j = b * BLOCK;
#if defined(__AVX__)
        if ((b + 1) * BLOCK <= vocab) {
            const __m256 at_least = _mm256_set1_ps(floor);
            for (; j < (b + 1) * BLOCK; j += 8) {
                unsigned kept = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(zr + j), at_least, _CMP_GE_OQ));
                for (; kept != 0; kept &= kept - 1) {
                    const int64_t at = j + __builtin_ctz(kept);
                    s.cand.emplace_back(zr[at], at);
                }
            }
        }
#endif
        for (; j < std::min(vocab, (b + 1) * BLOCK); ++j)
            if (zr[j] >= floor) s.cand.emplace_back(zr[j], j);
    }
    auto by_value = [](const auto& x, const auto& y) { return x.first > y.first; };
    if (static_cast<int64_t>(s.cand.size()) < k) {  // only with NaN in the row: take it whole
        s.cand.clear();
        for (int64_t j = 0; j < vocab; ++j) s.cand.emplace_back(zr[j], j);
        std::partial_sort(s.cand.begin(), s.cand.begin() + k, s.cand.end(), by_value);  // safe with NaN
    } else {  // no NaN among values >= the floor: a strict weak order
        std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.end(), by_value);
        std::sort(s.cand.begin(), s.cand.begin() + k, by_value);
    }
    for (int64_t i = 0; i < k; ++i) {
        values[i] = s.cand[i].first;
        indices[i] = s.cand[i].second;
    }
}

// The slow path's guide, gathered by the sums pass from its own e: the mass of the tokens within
// each of these depths (nats) below the row max. The band where a row's nucleus ends lies between
// two of them; autodeco_rows' nucleus then reads only that shell's tokens closely.
constexpr int N_SHELLS = 12;
constexpr float SHELL_DEPTHS[N_SHELLS] = {1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20};

inline void shell_bounds(float m, float* bounds) {
    for (int i = 0; i < N_SHELLS; ++i) bounds[i] = m - SHELL_DEPTHS[i];
}

// shells[i] += the sum of e over the chunk's z > bounds[i], block by block: a block of BLOCK tokens
// whose maximum is <= bounds[i] adds nothing to shell i and is not read for it (bounds descend, so a
// block's shells start at the first bound below its maximum; most blocks of a row lie more than 10
// nats down and feed two or three of the twelve). Eight float32 lanes per shell, summed into float64
// at the end of the chunk.
typedef int32_t IntLanes __attribute__((vector_size(32), aligned(4)));

inline void shells_of_chunk(const float* z, const float* e, int64_t count, const float* block_max,
                            const float* bounds, double* shells) {
    Lanes acc[N_SHELLS] = {};
    const int64_t full = count / BLOCK;
    for (int64_t b = 0; b < full; ++b) {
        int first = 0;
        for (int i = 0; i < N_SHELLS; ++i) first += bounds[i] >= block_max[b];  // a NaN maximum: 0
        const Lanes* zb = reinterpret_cast<const Lanes*>(z + b * BLOCK);
        const Lanes* eb = reinterpret_cast<const Lanes*>(e + b * BLOCK);
        for (int i = first; i < N_SHELLS; ++i) {
            const Lanes bound = Lanes{} + bounds[i];
            Lanes kept[BLOCK / 8];
            for (int v = 0; v < BLOCK / 8; ++v)
                kept[v] = reinterpret_cast<Lanes>(reinterpret_cast<IntLanes>(eb[v]) & (zb[v] > bound));
            acc[i] += ((kept[0] + kept[1]) + (kept[2] + kept[3])) + ((kept[4] + kept[5]) + (kept[6] + kept[7]));
        }
    }
    for (int i = 0; i < N_SHELLS; ++i) {
        double sum = 0.0;
        for (int l = 0; l < 8; ++l) sum += acc[i][l];
        for (int64_t j = full * BLOCK; j < count; ++j) sum += z[j] > bounds[i] ? e[j] : 0.0f;
        shells[i] += sum;
    }
}

// Around the row max m, with e = exp(z - m): sums[0..2] = sum e, sum e * (m - z), sum e^2 (float64;
// float32 SIMD lanes summed into float64 every CHUNK tokens). With `shells`, also shells[i] = the sum
// of e over z > m - SHELL_DEPTHS[i] (a guide: float32 lanes within a chunk), from the row's block
// maxima: a block adds only to the shells its maximum lies above (most blocks lie more than 10 nats
// down, so they feed two or three of the twelve). Not inlined, and the sums loop the same with or
// without shells: row_stats and autodeco_rows must get the same sums, bit for bit.
__attribute__((noinline)) void sums_of_row(const float* zr, int64_t vocab, float m, double* sums,
                                           const float* block_max = nullptr, double* shells = nullptr) {
    double total = 0.0, total_ed = 0.0, total_e2 = 0.0;
    alignas(32) float ev[CHUNK];
    float bounds[N_SHELLS];
    shell_bounds(m, bounds);
    if (shells != nullptr) std::fill(shells, shells + N_SHELLS, 0.0);
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 top = _mm256_set1_ps(m), largest = _mm256_set1_ps(FLT_MAX), none = _mm256_set1_ps(-INFINITY);
    __m256 unordered = _mm256_setzero_ps();
#endif
    for (int64_t start = 0; start < vocab; start += CHUNK) {
        const int64_t count = std::min<int64_t>(CHUNK, vocab - start);
        float a = 0.0f, b = 0.0f, c = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 va = _mm256_setzero_ps(), vb = va, vc = va;
        for (int64_t j = 0; j < count; j += 8) {
            __m256 zz;
            if (j + 8 <= count) {
                zz = _mm256_loadu_ps(zr + start + j);
            } else {  // the row's last values; the lanes past its end read as -inf (e = 0)
                const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count - j)), lane);
                zz = _mm256_blendv_ps(none, _mm256_maskload_ps(zr + start + j, inside), _mm256_castsi256_ps(inside));
            }
            const __m256 d = _mm256_sub_ps(zz, top);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(d, d, _CMP_UNORD_Q));  // NaN, or inf - inf
            const __m256 e = exp8_nonpositive(d);
            _mm256_storeu_ps(ev + j, e);
            va = _mm256_add_ps(va, e);
            vb = _mm256_fmadd_ps(e, _mm256_min_ps(_mm256_sub_ps(top, zz), largest), vb);  // z = -inf adds 0
            vc = _mm256_fmadd_ps(e, e, vc);
        }
        alignas(32) float lanes[3][8];
        _mm256_store_ps(lanes[0], va);
        _mm256_store_ps(lanes[1], vb);
        _mm256_store_ps(lanes[2], vc);
        for (int l = 0; l < 8; ++l) {
            a += lanes[0][l];
            b += lanes[1][l];
            c += lanes[2][l];
        }
#else
#pragma omp simd reduction(+ : a, b, c)
        for (int64_t j = 0; j < count; ++j) {
            const float zz = zr[start + j];
            const float e = exp_nonpositive(zz - m);
            ev[j] = e;
            a += e;
            b += e * std::min(m - zz, FLT_MAX);  // z = -inf (e = 0) adds 0, not NaN
            c += e * e;
        }
#endif
        total += a;
        total_ed += b;
        total_e2 += c;
        if (shells != nullptr) shells_of_chunk(zr + start, ev, count, block_max + start / BLOCK, bounds, shells);
    }
#if defined(__AVX2__) && defined(__FMA__)
    if (_mm256_movemask_ps(unordered) != 0) total = total_ed = total_e2 = NAN;  // as exp_nonpositive's NaN would
#endif
    sums[0] = total;
    sums[1] = total_ed;
    sums[2] = total_e2;
}

// The lse of a row from its max m and sum e (float64, then rounded): row_stats and autodeco_rows
// both give nucleus.py this one.
inline float lse_of(float m, double total) { return static_cast<float>(static_cast<double>(m) + std::log(total)); }

// ---------------------------------------------------------------------------- one row's nucleus
// The exact nucleus decided with this file's own exp (exp_nonpositive, within 1.4e-7 of torch's,
// measured): every decision compares a float64 cumulative mass with P, and a cumulative within
// `close` (relative) of P could fall on the other side with torch's masses. Such a decision is made
// with torch's masses: by torch's exp function where autodeco_rows has it (TorchExp: the top
// candidates' decision, and a close band row's candidates through exact_threshold), else by the
// caller, to whom the row goes back with its candidates (EXACT: torch's exp, then nucleus_exact).
// A row whose band missed the crossing goes back whole (REDO: nucleus.py's exact path); all other
// rows get the threshold the reference would.

enum RowOutcome : uint8_t { SETTLED = 0, EXACT = 1, REDO = 2, BAND = 3 };  // BAND: not yet decided

// Where an EXACT row writes its candidates: value, value - lse (float32, as torch subtracts) and
// in-band flag of each, `count` of them.
struct Candidates {
    float* values;
    float* diffs;
    uint8_t* in_band;
    int64_t count;
};

// The values of x[0, n) above `floor`, in order, written from out[0] (which has room for n + 8, the
// last vector store's spill); returns how many. With AVX2 eight at a time (a compare's mask picks a
// left-packing permutation), else branch-free: every value written, the count advanced for those kept.
#if defined(__AVX2__)
struct LeftPack {
    alignas(32) int32_t lanes[256][8];
    LeftPack() {
        for (int mask = 0; mask < 256; ++mask) {
            int k = 0;
            for (int bit = 0; bit < 8; ++bit)
                if (mask >> bit & 1) lanes[mask][k++] = bit;
            for (; k < 8; ++k) lanes[mask][k] = 0;
        }
    }
};
const LeftPack LEFT_PACK;
#endif

inline int64_t gather_above(const float* x, int64_t n, float floor, float* out) {
    int64_t count = 0, j = 0;
#if defined(__AVX2__)
    const __m256 f = _mm256_set1_ps(floor);
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, f, _CMP_GT_OQ));
        const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(LEFT_PACK.lanes[mask]));
        _mm256_storeu_ps(out + count, _mm256_permutevar8x32_ps(v, lanes));
        count += __builtin_popcount(mask);
    }
#endif
    for (; j < n; ++j) {
        out[count] = x[j];
        count += x[j] > floor;
    }
    return count;
}

struct Crossing {
    int64_t first;  // masses before it sum below P
    bool close;     // a decision within `close` of P: the approximate masses cannot settle it
};

// Over masses e[0, n) after `base`: the first index whose cumulative reaches P (n if none).
inline Crossing crossing(const float* e, int64_t n, double base, double p, double close, int64_t stride = 1) {
    const double below = p * (1.0 - close), above = p * (1.0 + close);
    double cumulative = base;
    for (int64_t j = 0; j < n; ++j) {
        cumulative += e[j * stride];
        if (cumulative >= below) return {j, cumulative < above};
    }
    return {n, false};
}

struct NucleusScratch {
    std::vector<float> masses, values, band_values, shifted;
    std::vector<std::pair<float, float>> band;  // (value, mass)
    std::vector<int32_t> keys;
    std::vector<double> hist;
};

// torch's float32 exp, where the caller found a native function that gives it bit for bit (heads.nucleus
// .torch_exp: MKL's vmsExp with torch's mode, checked against torch.exp when loaded): fn(n, in, out,
// mode). With it a close decision is settled here instead of handed back.
struct TorchExp {
    void (*fn)(int32_t, const float*, float*, int64_t);
    int64_t mode;
    void operator()(const float* in, float* out, int64_t n) const {
        for (int64_t at = 0; at < n; at += INT32_MAX / 2)
            fn(static_cast<int32_t>(std::min<int64_t>(n - at, INT32_MAX / 2)), in + at, out + at, mode);
    }
};

// As heads.nucleus._cutoff (torch) on one row's k top candidates (v sorted descending) and their masses
// e (float32 exp(v - lse) as torch computes it): the index of the first cumulative mass (float64
// rounded to float32: torch's cumsum on the CPU) that is not below P, k if none.
inline int64_t first_reaching(const float* e, int64_t k, float p) {
    double cumulative = 0.0;
    int64_t first = 0;
    for (int64_t j = 0; j < k; ++j) {
        cumulative += e[j];
        first += static_cast<float>(cumulative) < p;
    }
    return first;
}

// The exact threshold of one row from candidates (values, torch's masses, in-band flags; `count` of
// them): the masses outside the band summed (float64), the band sorted descending and its cumulative
// continued from that sum to the first that is not below P (float32, as torch's cumsum). Returns
// whether that is the reference's: the crossing inside the band, the sum above it below P, and no
// mass below 2^-29 outside the band or at the crossing (float64 sums of float32 masses in
// [2^-29, 1] are exact in any order, so the sum above the band is the reference's).
inline bool exact_threshold(const float* values, const float* masses, const uint8_t* in_band, int64_t count,
                            float p, std::vector<std::pair<float, float>>& band, float* threshold) {
    const float tiny = std::ldexp(1.0f, -29);
    double base = 0.0;
    bool small_above = false;
    band.clear();
    for (int64_t j = 0; j < count; ++j) {
        if (in_band[j]) {
            band.emplace_back(values[j], masses[j]);
        } else {
            base += masses[j];
            small_above |= masses[j] < tiny;
        }
    }
    std::sort(band.begin(), band.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    int64_t first = 0;
    double cumulative = base;
    for (; first < static_cast<int64_t>(band.size()); ++first) {
        cumulative += band[first].second;
        if (!(static_cast<float>(cumulative) < p)) break;
    }
    const bool inside = first < static_cast<int64_t>(band.size());
    *threshold = inside ? band[first].first : -INFINITY;
    return inside && static_cast<float>(base) < p && band[first].second >= tiny && !small_above;
}

constexpr size_t REFINE = 256;  // a band larger than this is narrowed by a rung histogram of its tokens

// One row's threshold from its top candidates (values[k], sorted descending): SETTLED with
// *threshold where they settle it (p >= 1 keeps the row whole: -inf; p <= 0 keeps its top token and
// ties), REDO for a row with non-finite logits, BAND where they do not reach P or the crossing ties
// the last of them or (without torch's exp) lies within `close` of P: band_threshold decides then.
RowOutcome top_threshold(const float* values, int64_t k, float lse, float p32, double close,
                         const TorchExp* torch_exp, NucleusScratch& s, float* threshold) {
    const double p = std::max(p32, 0.0f);
    if (p >= 1.0) {
        *threshold = -INFINITY;
        return SETTLED;
    }
    if (!std::isfinite(lse)) return REDO;  // NaN or infinite logits: the caller's path copes
    s.masses.resize(k);
    int64_t first;
    if (torch_exp != nullptr) {  // torch's masses: the reference's decision itself
        s.values.resize(k);
        for (int64_t j = 0; j < k; ++j) s.values[j] = values[j] - lse;
        (*torch_exp)(s.values.data(), s.masses.data(), k);
        first = first_reaching(s.masses.data(), k, static_cast<float>(p));
    } else {
        for (int64_t j = 0; j < k; ++j) s.masses[j] = exp_nonpositive(values[j] - lse);
        const Crossing c = crossing(s.masses.data(), k, 0.0, p, close);
        first = c.close ? k : c.first;
    }
    if (first < k && values[first] > values[k - 1]) {
        *threshold = values[first];
        return SETTLED;
    }
    return BAND;
}

// The slow path of a row top_threshold left undecided (BAND), on the row zr itself:
//  * the band: between the shells (shells[i]: the guide mass above m - SHELL_DEPTHS[i], of total)
//    where the guide's cumulative crosses P -/+ margin (the margins of nucleus.py);
//  * one read of the row (blocks whose maximum is below the band skipped): the masses above the band
//    summed (float64), the band's tokens and masses kept;
//  * a band of more than REFINE tokens narrowed to the rungs (as rung_keys) where its cumulative
//    crosses P -/+ margin, the tokens above them added to the sum;
//  * the band sorted descending, the cumulative continued from the sum to the crossing.
// SETTLED with *threshold; a crossing within `close` of P hands the band and the tokens above it to
// the caller (EXACT, into `out`); a crossing outside the band (the guide erred) hands the row back
// whole (REDO).
RowOutcome band_threshold(const float* zr, int64_t vocab, const float* values, float lse, float p32,
                          const float* block_max, const double* shells, double total, int32_t key_first,
                          int32_t n_keys, double margin_cap, double tail_share, double margin_floor, double close,
                          NucleusScratch& s, float* threshold, Candidates& out) {
    const double p = std::max(p32, 0.0f);
    const double margin = std::min(margin_cap, std::max(margin_floor, tail_share * (1.0 - p)));
    const float m = values[0];
    float bounds[N_SHELLS];
    shell_bounds(m, bounds);
    float z_hi = INFINITY, z_lo = -INFINITY;  // the band: z_lo < z <= z_hi
    for (int i = 0; i < N_SHELLS; ++i) {
        if (shells[i] < (p - margin) * total) z_hi = bounds[i];
        if (shells[i] >= (p + margin) * total) {
            z_lo = bounds[i];
            break;
        }
    }
    // The tokens above the band's bottom (a few percent of the row), gathered branch-free: every token
    // written, the count advanced for those kept.
    s.values.resize(vocab + 8);
    int64_t count = 0;
    for (int64_t b = 0; b * BLOCK < vocab; ++b) {
        if (block_max[b] > z_lo)
            count += gather_above(zr + b * BLOCK, std::min<int64_t>(BLOCK, vocab - b * BLOCK), z_lo,
                                  s.values.data() + count);
    }
    s.masses.resize(count);
    double base = 0.0;
#pragma omp simd reduction(+ : base)
    for (int64_t j = 0; j < count; ++j) {
        s.masses[j] = exp_nonpositive(s.values[j] - lse);
        base += s.values[j] > z_hi ? static_cast<double>(s.masses[j]) : 0.0;
    }
    s.band.resize(count);
    size_t at = 0;
    for (int64_t j = 0; j < count; ++j) {
        s.band[at] = {s.values[j], s.masses[j]};
        at += s.values[j] <= z_hi;
    }
    s.band.resize(at);
    if (base >= p * (1.0 - close) || s.band.empty()) return REDO;  // the crossing lies above the band or near its top
    if (s.band.size() > REFINE) {  // narrow: the rungs of the band's tokens where base + their cumulative crosses P
        const int64_t n = static_cast<int64_t>(s.band.size());
        s.band_values.resize(n);
        s.keys.resize(n);
        s.shifted.resize(n);
        for (int64_t j = 0; j < n; ++j) s.band_values[j] = s.band[j].first;
        rung_keys(s.band_values.data(), n, m + 1.0f, key_first, n_keys, s.keys.data(), s.shifted.data());
        s.hist.assign(n_keys, 0.0);
        for (int64_t j = 0; j < n; ++j) s.hist[s.keys[j]] += s.band[j].second;
        int32_t low = 0, high = 0;
        double cumulative = base;
        for (int32_t q = 0; q < n_keys; ++q) {
            cumulative += s.hist[q];
            low += cumulative < p - margin;
            high += cumulative < p + margin;
        }
        high = std::min(high, n_keys - 1);
        int64_t kept = 0;
        for (int64_t j = 0; j < n; ++j) {
            if (s.keys[j] < low)
                base += s.band[j].second;
            else if (s.keys[j] <= high)
                s.band[kept++] = s.band[j];
        }
        s.band.resize(kept);
        if (base >= p * (1.0 - close) || s.band.empty()) return REDO;
    }
    std::sort(s.band.begin(), s.band.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    const Crossing c = crossing(&s.band[0].second, static_cast<int64_t>(s.band.size()), base, p, close, 2);
    if (c.first >= static_cast<int64_t>(s.band.size())) return REDO;
    if (!c.close) {
        *threshold = s.band[c.first].first;
        return SETTLED;
    }
    // EXACT: the gathered tokens down to the band's last value (a value range: its ties with it),
    // those above the band flagged out of it.
    const float band_top = s.band.front().first, band_bottom = s.band.back().first;
    int64_t n_out = 0;
    for (int64_t j = 0; j < count; ++j) {
        const float v = s.values[j];
        if (!(v >= band_bottom)) continue;
        out.values[n_out] = v;
        out.diffs[n_out] = v - lse;
        out.in_band[n_out] = v <= band_top;
        ++n_out;
    }
    out.count = n_out;
    return EXACT;
}

// out[r] = w2 . relu(w1 [x_r, extra_r] + b1) + b2 for rows r < n: a head's MLP (w1 [width, h +
// n_extra] row-major; the inputs are x's h values, then extra[r, n_extra]). Eight rows share each
// read of a weight row. Sums in another order than torch's matmul: equal to float32 rounding.
void mlp_rows(const float* x, int64_t x_stride, int64_t n, int64_t h, const float* extra, int64_t n_extra,
              const float* w1, const float* b1, int64_t width, const float* w2, const float* b2, float* out) {
    constexpr int R = 8;
    const int64_t n_in = h + n_extra;
    for (int64_t r0 = 0; r0 < n; r0 += R) {
        const float* xs[R];
        int64_t row[R];
        for (int i = 0; i < R; ++i) {
            row[i] = std::min<int64_t>(r0 + i, n - 1);  // a short group repeats its last row
            xs[i] = x + row[i] * x_stride;
        }
        float o[R] = {};
        for (int64_t j = 0; j < width; ++j) {
            const float* w = w1 + j * n_in;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, a4 = 0.0f, a5 = 0.0f, a6 = 0.0f, a7 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
            for (int64_t c = 0; c < h; ++c) {
                const float wc = w[c];
                a0 += wc * xs[0][c];
                a1 += wc * xs[1][c];
                a2 += wc * xs[2][c];
                a3 += wc * xs[3][c];
                a4 += wc * xs[4][c];
                a5 += wc * xs[5][c];
                a6 += wc * xs[6][c];
                a7 += wc * xs[7][c];
            }
            const float a[R] = {a0, a1, a2, a3, a4, a5, a6, a7};
            for (int i = 0; i < R; ++i) {
                float v = a[i] + b1[j];
                for (int64_t e = 0; e < n_extra; ++e) v += w[h + e] * extra[row[i] * n_extra + e];
                o[i] += w2[j] * std::max(v, 0.0f);
            }
        }
        for (int i = 0; i < R && r0 + i < n; ++i) out[r0 + i] = o[i] + b2[0];
    }
}

// work(r0, r1) on rows [0, n) split into `threads` contiguous blocks (at most one per row). Built
// with OpenMP (nucleus.py builds it so), the blocks run on the OpenMP runtime torch has loaded: its
// workers, still spinning after torch's last parallel operation, start at once, where a thread
// started for the call would queue behind a spinning worker on the other core. Without OpenMP the
// first block runs on the calling thread and the others on threads started for this call.
template <class Work>
void on_row_blocks(int64_t n, int32_t threads, const Work& work) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(threads, n));
#if defined(_OPENMP)
#pragma omp parallel num_threads(static_cast<int>(blocks))
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        work(n * t / count, n * (t + 1) / count);
    }
#else
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < blocks; ++t) pool.emplace_back(work, n * t / blocks, n * (t + 1) / blocks);
    work(0, n / blocks);
    for (auto& th : pool) th.join();
#endif
}

// How many CPUs a team of `threads` (as on_row_blocks starts it) may run on: the union of its
// threads' affinity masks (Linux; elsewhere `threads`). An engine that pins its main thread to one
// CPU and each of its OpenMP workers to another (vLLM's CPU worker) gives `threads`; a thread
// started for the call inherits the caller's mask, so without OpenMP (or with workers started
// unbound under a pinned caller) the team may stack on the caller's CPUs, and this counts those.
// Where no thread can read its mask (more CPUs than a cpu_set_t holds), `threads`.
int32_t team_cpus(int32_t threads) {
#if defined(__linux__)
    cpu_set_t all;
    CPU_ZERO(&all);
    bool unread = false;
    const auto add_own = [&all, &unread](int64_t, int64_t) {
        cpu_set_t mine;
        const bool read = sched_getaffinity(0, sizeof(mine), &mine) == 0;
#if defined(_OPENMP)
#pragma omp critical(autodeco_team_cpus)
#endif
        {
            if (read)
                CPU_OR(&all, &all, &mine);
            else
                unread = true;
        }
    };
#if defined(_OPENMP)
    on_row_blocks(threads, threads, add_own);
#else  // the threads on_row_blocks would start inherit the caller's mask
    add_own(0, 0);
#endif
    return unread ? threads : std::max(1, CPU_COUNT(&all));
#else
    return threads;
#endif
}

// Rows' slots (row r's candidates from entry r * vocab, counts[r] of them) packed in row order from
// entry 0; returns their total. Row r's slot starts at r * vocab >= the total before it.
int64_t pack_slots(float* values, float* diffs, uint8_t* in_band, const int64_t* counts, int64_t n, int64_t vocab) {
    int64_t total = 0;
    for (int64_t r = 0; r < n; ++r) {
        if (total != r * vocab) {
            std::memmove(values + total, values + r * vocab, counts[r] * sizeof(float));
            std::memmove(diffs + total, diffs + r * vocab, counts[r] * sizeof(float));
            std::memmove(in_band + total, in_band + r * vocab, counts[r]);
        }
        total += counts[r];
    }
    return total;
}

// zr = zr >= t ? zr : -inf over the row, in place.
inline void mask_row(float* zr, int64_t vocab, float t) {
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) zr[j] = zr[j] >= t ? zr[j] : -INFINITY;
}

// out = (z >= t ? z : -inf) over a row, or z itself with `masked` false, written past the caches
// (streaming stores: the output row is not read here again, and a plain store would first read its
// lines from memory). Ends with a store fence.
inline void store_row(float* out, const float* z, int64_t vocab, bool masked, float t) {
    auto value = [&](int64_t j) { return !masked || z[j] >= t ? z[j] : -INFINITY; };
    int64_t j = 0;
#if defined(__AVX__)
    for (; j < vocab && reinterpret_cast<uintptr_t>(out + j) % 32 != 0; ++j) out[j] = value(j);
    const __m256 floor = _mm256_set1_ps(masked ? t : -INFINITY), none = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= vocab; j += 8) {
        const __m256 v = _mm256_loadu_ps(z + j);
        _mm256_stream_ps(out + j, masked ? _mm256_blendv_ps(none, v, _mm256_cmp_ps(v, floor, _CMP_GE_OQ)) : v);
    }
#endif
    for (; j < vocab; ++j) out[j] = value(j);
#if defined(__SSE__)
    _mm_sfence();
#endif
}

// out = the row masked at t where every token >= t is among its top candidates (values[k] sorted
// descending, ids[k]; t > values[k - 1]): -inf everywhere (streaming stores), then those candidates.
inline void store_top(float* out, int64_t vocab, const float* values, const int64_t* ids, int64_t k, float t) {
    int64_t j = 0;
#if defined(__AVX__)
    for (; j < vocab && reinterpret_cast<uintptr_t>(out + j) % 32 != 0; ++j) out[j] = -INFINITY;
    const __m256 none = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= vocab; j += 8) _mm256_stream_ps(out + j, none);
#endif
    for (; j < vocab; ++j) out[j] = -INFINITY;
#if defined(__SSE__)
    _mm_sfence();
#endif
    for (int64_t i = 0; i < k && values[i] >= t; ++i) out[ids[i]] = values[i];
}

// autodeco_rows' scratch on each thread, kept from one call to the next: allocated per call, a decoding
// step's ~0.5 MB per thread came as fresh pages (page faults, zeroing) every step. Every entry is
// written before it is read.
struct StepScratch {
    RowScratch rows{0};
    NucleusScratch nucleus;
    std::vector<float> z, out, extra, block_max;
    std::vector<double> shells, totals;
};
thread_local StepScratch step_scratch;

}  // namespace

extern "C" {

// team_cpus, for nucleus.py's thread count; whether this build runs teams on OpenMP.
int32_t native_team_cpus(int32_t threads) { return team_cpus(threads); }
int32_t native_openmp() {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

// Band of each of the m rows (rows[r] indexes z), then its candidates: every token whose rung is
// <= the band's last, as its value, value - lse (float32, as torch subtracts) and in-band flag;
// row after row from entry 0, counts[r] of them for row r. Buffers hold m * vocab entries (each
// row first fills its own slot; the slots are then packed). Returns the number of candidates.
// threads > 1 splits the rows between that many threads.
int64_t nucleus_candidates(const float* z, int64_t stride, int64_t vocab, const int64_t* rows, int64_t m,
                           const float* row_max, const float* lse, const double* top_p,
                           int32_t key_first, int32_t n_keys, double margin_cap, double tail_share,
                           double margin_floor, float* values, float* diffs, uint8_t* in_band, int64_t* counts,
                           int32_t threads) {
    Rows a{z, stride, vocab, rows, row_max, top_p, key_first, n_keys, margin_cap, tail_share, margin_floor};
    auto work = [&](int64_t r0, int64_t r1) {
        FlushDenormals guard;
        int32_t key[CHUNK];
        float shifted[CHUNK];
        for (int64_t r = r0; r < r1; ++r) {
            int32_t low, high;
            band_of_row(a, r, &low, &high);
            const float* zr = z + rows[r] * stride;
            const float top = row_max[r] + 1.0f;
            int64_t at = r * vocab, count = 0;
            for (int64_t start = 0; start < vocab; start += CHUNK) {
                int64_t n = std::min<int64_t>(CHUNK, vocab - start);
                rung_keys(zr + start, n, top, key_first, n_keys, key, shifted);
                for (int64_t j = 0; j < n; ++j) {
                    if (key[j] <= high) {
                        values[at + count] = zr[start + j];
                        diffs[at + count] = zr[start + j] - lse[r];
                        in_band[at + count] = key[j] >= low;
                        ++count;
                    }
                }
            }
            counts[r] = count;
        }
    };
    on_row_blocks(m, threads, work);
    return pack_slots(values, diffs, in_band, counts, m, vocab);
}

// Exact thresholds from the packed candidates of nucleus_candidates (counts[r] for row r) and their float32 masses exp(value - lse) as torch computed them:
//   base = the float64 sum of the masses above the band (exact: every mass >= 2^-29 is a multiple
//   of 2^-52, every partial sum < 2 is then exact, so any order gives the reference's sum);
//   the band sorted by value, descending; the cumulative (float64 from base, rounded to float32
//   as torch's cumsum does) reaches P at `first`: threshold = that value.
// ok[r] = 0 where the exact argument does not hold or the band missed the crossing.
void nucleus_exact(const float* values, const float* masses, const uint8_t* in_band, const int64_t* counts,
                   int64_t m, const float* top_p, float* threshold, uint8_t* ok) {
    std::vector<std::pair<float, float>> band;
    int64_t at = 0;
    for (int64_t r = 0; r < m; at += counts[r], ++r)
        ok[r] = exact_threshold(values + at, masses + at, in_band + at, counts[r], top_p[r], band, threshold + r);
}

// Row statistics of z [n, vocab] (rows `stride` apart), in one call:
//  * the k largest values of each row, sorted descending, and their token ids (values[n, k],
//    indices[n, k]); found from the blocks of 64 with the k largest maxima, which hold them;
//  * around the row max m, with e = exp(z - m): sum e, sum e * (m - z), sum e^2 (float64; float32
//    SIMD lanes summed into float64 every CHUNK tokens). The entropy is log(sum e) + the second over
//    the first: every term is >= 0, so nothing cancels (lse - E_p[z] loses digits on peaked rows).
//    Tokens with e = 0 (z = -inf: a masked vocabulary) add nothing.
//  * lse = m + log(sum e) (float64, rounded to float32; as autodeco_rows).
// Two reads of each row (block maxima, then the sums) instead of torch's amax, two top-k's, a
// gather and five passes for the sums. Requires k <= vocab.
void row_stats(const float* z, int64_t n, int64_t stride, int64_t vocab, int64_t k, float* values,
               int64_t* indices, double* sum_e, double* sum_ed, double* sum_e2, float* lse, int32_t threads) {
    auto work = [&](int64_t r0, int64_t r1) {
        FlushDenormals guard;
        RowScratch scratch(vocab);
        std::vector<float> block_max(scratch.n_blocks);
        for (int64_t r = r0; r < r1; ++r) {
            const float* zr = z + r * stride;
            block_maxima(zr, vocab, block_max.data());
            top_of_row(zr, vocab, k, block_max.data(), scratch, values + r * k, indices + r * k);
            double sums[3];
            sums_of_row(zr, vocab, values[r * k], sums);
            sum_e[r] = sums[0];
            sum_ed[r] = sums[1];
            sum_e2[r] = sums[2];
            lse[r] = lse_of(values[r * k], sums[0]);
        }
    };
    on_row_blocks(n, threads, work);
}

// One AutoDeco decoding step on n rows (heads.model.decode with both heads on), in three phases on
// each thread's rows:
//  1. T = 2 sigmoid(temperature MLP(h)) (temperature[n]); z = logits / max(T, 1e-6) (float32
//     division, as torch divides) into a row of this thread's scratch, which stays in its cache, and
//     its block maxima; row_stats' top-k candidates and sums (the same functions, so the same values
//     and lse bit for bit: values[n, k], indices[n, k], lse[n]) and the top-p head's four features
//     (max prob, entropy, variance, top-5 mass);
//  2. P = sigmoid(top-p MLP(h, T[, features])) (top_p[n]);
//  3. each row's nucleus and the output row z [n, vocab], written once: where the top candidates
//     settle the row (top_threshold), -inf and the kept candidates; else z again into the scratch,
//     band_threshold on it, and the row masked (or whole) from there.
// status[r] = EXACT or REDO where row r's nucleus is left to the caller (z unmasked; see
// band_threshold): an EXACT row's candidates are in cand_values / cand_diffs / cand_in_band
// (buffers of n * vocab), cand_counts[r] of them, packed in row order from entry 0. With torch's
// exp (torch_exp_fn, called fn(n, in, out, torch_exp_mode); may be null) there are no EXACT rows:
// the top candidates' decision and each close row's are made here with torch's masses (as the
// caller's nucleus_exact would), and a row whose exact check fails is REDO. Returns the number of
// rows left to the caller. The heads' weights are row-major float32: w1 [width, inputs],
// b1 [width], w2 [width], b2 [1]. A row stays on one thread from its scaling to its masking.
int64_t autodeco_rows(const float* hidden, int64_t hidden_stride, int64_t h, const float* logits,
                      int64_t logits_stride, int64_t vocab, int64_t n, const float* t_w1, const float* t_b1,
                      const float* t_w2, const float* t_b2, int64_t t_width, const float* p_w1, const float* p_b1,
                      const float* p_w2, const float* p_b2, int64_t p_width, int32_t enhanced, int64_t k,
                      int32_t key_first, int32_t n_keys, double margin_cap, double tail_share, double margin_floor,
                      double close, float* z, float* values, int64_t* indices, float* lse, float* temperature,
                      float* top_p, uint8_t* status, float* cand_values, float* cand_diffs, uint8_t* cand_in_band,
                      int64_t* cand_counts, void* torch_exp_fn, int64_t torch_exp_mode, int32_t threads) {
    const TorchExp torch_exp_of{reinterpret_cast<void (*)(int32_t, const float*, float*, int64_t)>(torch_exp_fn),
                                torch_exp_mode};
    const TorchExp* torch_exp = torch_exp_fn != nullptr ? &torch_exp_of : nullptr;
    auto work = [&](int64_t r0, int64_t r1) {
        if (r1 <= r0) return;
        FlushDenormals guard;
        StepScratch& kept = step_scratch;
        RowScratch& scratch = kept.rows;
        NucleusScratch& nucleus = kept.nucleus;
        scratch.fit(vocab);
        const int64_t rows = r1 - r0, n_extra = enhanced ? 5 : 1;
        std::vector<float>&out = kept.out, &extra = kept.extra, &block_max = kept.block_max, &zrow = kept.z;
        zrow.resize(vocab);
        std::vector<double>&shells = kept.shells, &totals = kept.totals;
        out.resize(rows);
        extra.resize(rows * n_extra);
        block_max.resize(rows * scratch.n_blocks);
        shells.resize(rows * N_SHELLS);
        totals.resize(rows);
        mlp_rows(hidden + r0 * hidden_stride, hidden_stride, rows, h, nullptr, 0, t_w1, t_b1, t_width, t_w2, t_b2,
                 out.data());
        for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = r0 + i;
            const float t = 2.0f / (1.0f + std::exp(-out[i]));
            temperature[r] = t;
            float* zr = zrow.data();  // z stays in this thread's cache; the output row is written in phase 3
            float* bmax = block_max.data() + i * scratch.n_blocks;
            {
                KeepDenormals ieee;
                scale_with_block_maxima(logits + r * logits_stride, vocab, std::max(t, MIN_TEMPERATURE), zr, bmax);
            }
            float* top = values + r * k;
            top_of_row(zr, vocab, k, bmax, scratch, top, indices + r * k);
            double sums[3];
            sums_of_row(zr, vocab, top[0], sums, bmax, shells.data() + i * N_SHELLS);
            const double total = sums[0];
            totals[i] = total;
            const float l = lse_of(top[0], total);
            lse[r] = l;
            float* f = extra.data() + i * n_extra;
            f[0] = t;
            if (!enhanced) continue;
            float top5 = 0.0f;
            for (int64_t j = 0; j < std::min<int64_t>(5, k); ++j) top5 += std::exp(top[j] - l);
            const float sum_p2 = static_cast<float>(sums[2] / (total * total));
            f[1] = std::exp(top[0] - l);
            f[2] = static_cast<float>(std::log(total) + sums[1] / total);
            f[3] = (sum_p2 - 1.0f / static_cast<float>(vocab)) / static_cast<float>(std::max<int64_t>(vocab - 1, 1));
            f[4] = top5;
        }
        mlp_rows(hidden + r0 * hidden_stride, hidden_stride, rows, h, extra.data(), n_extra, p_w1, p_b1, p_width,
                 p_w2, p_b2, out.data());
        for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = r0 + i;
            top_p[r] = 1.0f / (1.0f + std::exp(-out[i]));
            float t = -INFINITY;
            float* zr = z + r * vocab;
            RowOutcome outcome = top_threshold(values + r * k, k, lse[r], top_p[r], close, torch_exp, nucleus, &t);
            cand_counts[r] = 0;
            if (outcome == SETTLED && t > -INFINITY) {  // the usual row: its kept tokens are candidates
                status[r] = SETTLED;
                store_top(zr, vocab, values + r * k, indices + r * k, k, t);
                continue;
            }
            {
                KeepDenormals ieee;  // the row's z again (phase 1's was overwritten by the next rows)
                const float divisor = std::max(temperature[r], MIN_TEMPERATURE);
                const float* lr = logits + r * logits_stride;
#pragma omp simd
                for (int64_t j = 0; j < vocab; ++j) zrow[j] = lr[j] / divisor;
            }
            if (outcome == BAND) {
                Candidates handed{cand_values + r * vocab, cand_diffs + r * vocab, cand_in_band + r * vocab, 0};
                outcome = band_threshold(zrow.data(), vocab, values + r * k, lse[r], top_p[r],
                                         block_max.data() + i * scratch.n_blocks, shells.data() + i * N_SHELLS,
                                         totals[i], key_first, n_keys, margin_cap, tail_share, margin_floor, close,
                                         nucleus, &t, handed);
                if (outcome == EXACT && torch_exp != nullptr) {  // the hand-back's finish, here
                    nucleus.masses.resize(handed.count);
                    (*torch_exp)(handed.diffs, nucleus.masses.data(), handed.count);
                    const bool ok = exact_threshold(handed.values, nucleus.masses.data(), handed.in_band,
                                                    handed.count, top_p[r], nucleus.band, &t);
                    outcome = ok ? SETTLED : REDO;
                }
                cand_counts[r] = outcome == EXACT ? handed.count : 0;
            }
            status[r] = outcome;
            store_row(zr, zrow.data(), vocab, outcome == SETTLED && t > -INFINITY, t);
        }
    };
    on_row_blocks(n, threads, work);
    pack_slots(cand_values, cand_diffs, cand_in_band, cand_counts, n, vocab);  // counts 0 but for EXACT rows
    int64_t unsettled = 0;
    for (int64_t r = 0; r < n; ++r) unsettled += status[r] != SETTLED;
    return unsettled;
}

// Each row's threshold from its k top candidates (values[n, k], sorted descending) and their masses
// (masses[n, k]: float32 exp(v - lse) as torch computed them), as heads.nucleus._cutoff does in
// torch: the cumulative (float64, rounded to float32: torch's cumsum on the CPU) is below P at
// `first` positions; threshold = values[min(first, k - 1)]. A row is settled where first < k and the
// threshold lies above the last candidate (tokens outside the candidates could tie it), or where
// P >= 1 (threshold -inf: keep the row whole). slow[r] = 1 for the others; returns their number.
int64_t nucleus_thresholds(const float* values, const float* masses, int64_t n, int64_t k, const float* top_p,
                           float* threshold, uint8_t* slow) {
    int64_t count = 0;
    for (int64_t r = 0; r < n; ++r) {
        const float* v = values + r * k;
        const float* e = masses + r * k;
        const float p = std::max(top_p[r], 0.0f);
        const int64_t first = first_reaching(e, k, p);
        const float t = v[std::min(first, k - 1)];
        const bool keep_all = p >= 1.0f;
        threshold[r] = keep_all ? -INFINITY : t;
        slow[r] = !keep_all && !(first < k && t > v[k - 1]);
        count += slow[r];
    }
    return count;
}

// z[rows, :] = z >= threshold ? z : -inf, in place (rows of length vocab, `stride` apart; threshold
// -inf leaves the row whole), rows split between `threads` threads.
void mask_below(float* z, int64_t n, int64_t stride, int64_t vocab, const float* threshold, int32_t threads) {
    on_row_blocks(n, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            if (threshold[r] > -INFINITY) mask_row(z + r * stride, vocab, threshold[r]);
    });
}

}  // extern "C"
