// Native passes of the exact nucleus (heads/nucleus.py): the row statistics, the slow path's band
// search and the final masking, compiled on first use with the system C++ compiler and loaded
// through ctypes.
//
// The exactness contract stays in Python's hands: these functions only narrow the search (the
// band, from an approximate exp) and sum/sort float32 masses that torch.exp computed, with the
// same float64 arithmetic as the numpy path; a row whose checks fail is reported, not guessed.
// No fast-math: the float64 sums and comparisons must be IEEE (-fno-trapping-math, which lets
// compares and conversions vectorise, changes no result).

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

constexpr int KEY_SHIFT = 18;      // as nucleus.py: rungs are 1/32 of (1 + depth) wide
constexpr float MAX_DEPTH = 64.0f;
constexpr int CHUNK = 512;

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

// exp(x) for x <= 0, relative error < 1.1e-7 (under 2 ulp; x below -87 gives 0): 2^n * e^r with
// n = round(x / ln 2), r = x - n ln 2 (ln 2 split hi/lo), e^r by its Taylor polynomial to r^7.
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

// work(r0, r1) on rows [0, n) split into `threads` contiguous blocks (at most one per row): the
// first block on the calling thread, the others on threads started for this call.
template <class Work>
void on_row_blocks(int64_t n, int32_t threads, const Work& work) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(threads, n));
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < blocks; ++t) pool.emplace_back(work, n * t / blocks, n * (t + 1) / blocks);
    work(0, n / blocks);
    for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// Band of each of the m rows (rows[r] indexes z), then its candidates: every token whose rung is
// <= the band's last, as its value, value - lse (float32, as torch subtracts) and in-band flag;
// row after row from entry 0, counts[r] of them for row r. Buffers hold m * vocab entries (each
// row first fills its own slot; the slots are then packed). Returns the number of candidates.
// threads > 1 splits the rows between that many threads.
int64_t nucleus_candidates(const float* z, int64_t stride, int64_t vocab, const int64_t* rows, int64_t m,
                           const float* row_max, const float* lse, const double* top_p,
                           int32_t key_first, int32_t n_keys, double margin_cap, double tail_share,
                           double margin_floor, float* values, float* diffs, uint8_t* in_band,
                           int64_t* counts, int32_t threads) {
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
    int64_t total = 0;
    for (int64_t r = 0; r < m; ++r) {  // pack: row r's slot starts at r * vocab >= total
        if (total != r * vocab) {
            std::memmove(values + total, values + r * vocab, counts[r] * sizeof(float));
            std::memmove(diffs + total, diffs + r * vocab, counts[r] * sizeof(float));
            std::memmove(in_band + total, in_band + r * vocab, counts[r]);
        }
        total += counts[r];
    }
    return total;
}

// Exact thresholds from the packed candidates of nucleus_candidates (counts[r] for row r) and their float32 masses exp(value - lse) as torch computed them:
//   base = the float64 sum of the masses above the band (exact: every mass >= 2^-29 is a multiple
//   of 2^-52, every partial sum < 2 is then exact, so any order gives the reference's sum);
//   the band sorted by value, descending; the cumulative (float64 from base, rounded to float32
//   as torch's cumsum does) reaches P at `first`: threshold = that value.
// ok[r] = 0 where the exact argument does not hold or the band missed the crossing.
void nucleus_exact(const float* values, const float* masses, const uint8_t* in_band, const int64_t* counts,
                   int64_t m, const float* top_p, float* threshold, uint8_t* ok) {
    const float tiny = std::ldexp(1.0f, -29);
    std::vector<std::pair<float, float>> band;
    int64_t at = 0;
    for (int64_t r = 0; r < m; at += counts[r], ++r) {
        double base = 0.0;
        bool small_above = false;
        band.clear();
        for (int64_t j = 0; j < counts[r]; ++j) {
            if (in_band[at + j]) {
                band.emplace_back(values[at + j], masses[at + j]);
            } else {
                base += masses[at + j];
                small_above |= masses[at + j] < tiny;
            }
        }
        std::sort(band.begin(), band.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
        const float p = top_p[r];
        int64_t first = 0;
        double cumulative = base;
        for (; first < static_cast<int64_t>(band.size()); ++first) {
            cumulative += band[first].second;
            if (!(static_cast<float>(cumulative) < p)) break;
        }
        const bool inside = first < static_cast<int64_t>(band.size());
        threshold[r] = inside ? band[first].first : -INFINITY;
        ok[r] = inside && static_cast<float>(base) < p && band[first].second >= tiny && !small_above;
    }
}

// Row statistics of z [n, vocab] (rows `stride` apart), in one call:
//  * the k largest values of each row, sorted descending, and their token ids (values[n, k],
//    indices[n, k]); found from the blocks of 64 with the k largest maxima, which hold them;
//  * around the row max m, with e = exp(z - m): sum e, sum e * (m - z), sum e^2 (float64; float32
//    SIMD lanes summed into float64 every CHUNK tokens). The entropy is log(sum e) + the second over
//    the first: every term is >= 0, so nothing cancels (lse - E_p[z] loses digits on peaked rows).
//    Tokens with e = 0 (z = -inf: a masked vocabulary) add nothing.
// Two reads of each row (block maxima, then the sums) instead of torch's amax, two top-k's, a
// gather and five passes for the sums. Requires k <= vocab.
void row_stats(const float* z, int64_t n, int64_t stride, int64_t vocab, int64_t k, float* values,
               int64_t* indices, double* sum_e, double* sum_ed, double* sum_e2, int32_t threads) {
    constexpr int64_t BLOCK = 64;
    auto work = [&](int64_t r0, int64_t r1) {
        FlushDenormals guard;
        const int64_t n_blocks = (vocab + BLOCK - 1) / BLOCK, full = vocab / BLOCK;
        std::vector<float> block_max(n_blocks), order(n_blocks);
        std::vector<std::pair<float, int64_t>> cand;
        for (int64_t r = r0; r < r1; ++r) {
            const float* zr = z + r * stride;
            for (int64_t b = 0; b < full; ++b) {  // 8 lanes of 8, then across the lanes
                float lane[8];
                for (int l = 0; l < 8; ++l) lane[l] = zr[b * BLOCK + l];
                for (int64_t j = 8; j < BLOCK; j += 8)
                    for (int l = 0; l < 8; ++l) lane[l] = std::max(lane[l], zr[b * BLOCK + j + l]);
                float best = lane[0];
                for (int l = 1; l < 8; ++l) best = std::max(best, lane[l]);
                block_max[b] = best;
            }
            if (full < n_blocks) {
                float best = -INFINITY;
                for (int64_t j = full * BLOCK; j < vocab; ++j) best = std::max(best, zr[j]);
                block_max[full] = best;
            }
            // The k largest values lie in the k blocks with the largest maxima, and are >= the k-th
            // largest block maximum (those k blocks hold k values >= it): every value >= that floor
            // lies in a block whose maximum is >= it.
            const int64_t kb = std::min(k, n_blocks);
            std::copy(block_max.begin(), block_max.end(), order.begin());
            std::nth_element(order.begin(), order.begin() + (kb - 1), order.end(), std::greater<float>());
            const float floor = kb == k ? order[kb - 1] : -INFINITY;
            cand.clear();
            for (int64_t b = 0; b < n_blocks; ++b) {
                if (!(block_max[b] >= floor)) continue;
                for (int64_t j = b * BLOCK; j < std::min(vocab, (b + 1) * BLOCK); ++j)
                    if (zr[j] >= floor) cand.emplace_back(zr[j], j);
            }
            if (static_cast<int64_t>(cand.size()) < k) {  // only with NaN in the row: take it whole
                cand.clear();
                for (int64_t j = 0; j < vocab; ++j) cand.emplace_back(zr[j], j);
            }
            auto by_value = [](const auto& x, const auto& y) { return x.first > y.first; };
            std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), by_value);
            for (int64_t i = 0; i < k; ++i) {
                values[r * k + i] = cand[i].first;
                indices[r * k + i] = cand[i].second;
            }
            const float m = cand[0].first;
            double total = 0.0, total_ed = 0.0, total_e2 = 0.0;
            for (int64_t start = 0; start < vocab; start += CHUNK) {
                const int64_t count = std::min<int64_t>(CHUNK, vocab - start);
                float a = 0.0f, b = 0.0f, c = 0.0f;
#pragma omp simd reduction(+ : a, b, c)
                for (int64_t j = 0; j < count; ++j) {
                    const float zz = zr[start + j];
                    const float e = exp_nonpositive(zz - m);
                    a += e;
                    b += e * std::min(m - zz, FLT_MAX);  // z = -inf (e = 0) adds 0, not NaN
                    c += e * e;
                }
                total += a;
                total_ed += b;
                total_e2 += c;
            }
            sum_e[r] = total;
            sum_ed[r] = total_ed;
            sum_e2[r] = total_e2;
        }
    };
    on_row_blocks(n, threads, work);
}

// z[rows, :] = z >= threshold ? z : -inf, in place (rows of length vocab, `stride` apart).
void mask_below(float* z, int64_t n, int64_t stride, int64_t vocab, const float* threshold) {
    for (int64_t r = 0; r < n; ++r) {
        float* zr = z + r * stride;
        const float t = threshold[r];
        if (!(t > -INFINITY)) continue;
        for (int64_t j = 0; j < vocab; ++j) zr[j] = zr[j] >= t ? zr[j] : -INFINITY;
    }
}

}  // extern "C"
