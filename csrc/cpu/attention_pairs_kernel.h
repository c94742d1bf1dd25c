// CPU kernel of the attention_maps primitive (see ../attention_pairs_args.h for the formulas), and of
// row_lse (the row_stats primitive), which is its first pass alone.
//
// Two passes over (query tile x key tile) blocks, never storing anything N x N beyond the requested
// output: pass 1 computes the softmax log-sum-exp of every (b, h, query row); pass 2 recomputes alpha
// tile by tile, forms the quadratic forms kappa^T G_j kappa and hands each finished tile to the output
// mode (map rows, row sums, weights contraction). Every inner loop runs over the kQueryTile query rows
// of a tile, stored contiguously, as explicit vectors (no -ffast-math needed, NaN semantics kept).
//
// Compiled once per instruction set: attention_pairs.cpp includes it for the baseline and dispatches,
// attention_pairs_x86_64_v3.cpp and _v4.cpp include it with KOBATTR_ISA_PRAGMA switching GCC to AVX2 or
// AVX-512 for everything below the pragma. A whole translation unit per instruction set, rather than
// target_clones on single functions: GCC lowers the 8-lane vector types for the file's own target before it
// clones, so the clones ran SSE-shaped code (broadcasts assembled from scalar inserts). Everything defined
// here lives in the namespace kobattr::KOBATTR_ISA and the shared helpers of pair_rules.h are static, so no
// inline function of one instruction set can stand in for another's at link time; for the same reason this
// file instantiates no standard-library template (Buffer instead of std::vector, copy_n and fill_n instead of
// std::copy and std::fill).
#ifndef KOBATTR_ISA
#error "define KOBATTR_ISA (the namespace of this instruction set) before including attention_pairs_kernel.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention_pairs_args.h"

#ifdef KOBATTR_ISA_PRAGMA
_Pragma(KOBATTR_ISA_PRAGMA)
#endif

#include "pair_rules.h"

#if defined(__GNUC__)
#define KOBATTR_INLINE inline __attribute__((always_inline))
#else
#define KOBATTR_INLINE inline
#endif

namespace kobattr {
namespace KOBATTR_ISA {
namespace {


constexpr int kQueryTile = 64;  // query rows per tile: the vector lanes of every inner loop
constexpr int kLanes = 8;       // query rows per vector
constexpr int kVectors = kQueryTile / kLanes;
constexpr int kKeyStep = 3;  // keys per register block of the score micro-kernel
constexpr float kInf = std::numeric_limits<float>::infinity();

// An owned array (std::vector without the shared template instantiations; see the top of the file).
template <typename T>
class Buffer {
  public:
    Buffer() = default;
    explicit Buffer(int64_t size, T value = T()) { assign(size, value); }
    Buffer(Buffer&& other) noexcept : data_(other.data_), size_(other.size_) { other.data_ = nullptr, other.size_ = 0; }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() { delete[] data_; }
    void assign(int64_t size, T value) {
        delete[] data_;
        data_ = size > 0 ? new T[size] : nullptr;
        size_ = size;
        fill(value);
    }
    void fill(T value) {
        for (int64_t i = 0; i < size_; ++i) data_[i] = value;
    }
    T* data() { return data_; }
    const T* data() const { return data_; }
    T& operator[](int64_t i) { return data_[i]; }
    const T& operator[](int64_t i) const { return data_[i]; }

  private:
    T* data_ = nullptr;
    int64_t size_ = 0;
};

template <typename T>
KOBATTR_INLINE T smaller(T a, T b) { return b < a ? b : a; }
template <typename T>
KOBATTR_INLINE T larger(T a, T b) { return a < b ? b : a; }
template <typename T>
KOBATTR_INLINE void copy_n(const T* src, int64_t n, T* dst) { std::memcpy(dst, src, n * sizeof(T)); }
template <typename T>
KOBATTR_INLINE void fill_n(T* dst, int64_t n, T value) {
    for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

// GCC/Clang vectors of kLanes query rows (one AVX2 register, two SSE ones), so that the hot loops are
// vector code on every clone without relying on the auto-vectoriser. Wider generic vectors than the
// target's registers compile to poor code, hence 8 lanes and not 16 for AVX-512.
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

KOBATTR_INLINE VecF load(const float* p) {
    VecF v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
KOBATTR_INLINE VecI load(const int32_t* p) {
    VecI v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
KOBATTR_INLINE void store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
KOBATTR_INLINE void store(int32_t* p, VecI v) { std::memcpy(p, &v, sizeof v); }
// x - (+0.0f) is x for every x, -0.0f included, so the compiler drops the subtraction and only broadcasts;
// VecF{} + x would have to keep an addition (0.0f + -0.0f is +0.0f), and a braced list compiles to inserts.
KOBATTR_INLINE VecF splat(float x) { return x - VecF{}; }
KOBATTR_INLINE VecI splat(int32_t x) { return VecI{} + x; }
KOBATTR_INLINE VecF select(VecI mask, VecF yes, VecF no) { return mask ? yes : no; }

// exp(x) = 2^n exp(x - n ln2), n = round(x / ln2), with the Cephes degree-6 polynomial (about 1 ulp).
// NaN stays NaN and x < -87 underflows to 0.
KOBATTR_INLINE VecF vector_exp(VecF x) {
    const VecF rounder = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const VecF clamped = select(x > 88.0f, splat(88.0f), x);
    const VecF n = (clamped * 1.44269504088896341f + rounder) - rounder;
    const VecF r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
    VecF p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const VecI exponent = (__builtin_convertvector(select(n < -126.0f, splat(-126.0f), n), VecI) + 127) << 23;
    return select(x < -87.0f, splat(0.0f), p * (VecF)exponent);
}

// The exponential soft_cap (../pair_rules.h) uses on the lanes.
struct VectorExp {
    KOBATTR_INLINE VecF operator()(VecF x) const { return vector_exp(x); }
};

// Four vectors of query lanes as one value of head_quadratic_form (../pair_rules.h): each coefficient is
// broadcast once for 32 pairs.
struct QueryBlock {
    static constexpr int kVectorsPerBlock = 4;
    VecF v[kVectorsPerBlock] = {};

    static KOBATTR_INLINE QueryBlock load(const float* p) {
        QueryBlock block;
        for (int u = 0; u < kVectorsPerBlock; ++u) block.v[u] = kobattr::KOBATTR_ISA::load(p + u * kLanes);
        return block;
    }
    KOBATTR_INLINE void store(float* p) const {
        for (int u = 0; u < kVectorsPerBlock; ++u) kobattr::KOBATTR_ISA::store(p + u * kLanes, v[u]);
    }
    KOBATTR_INLINE QueryBlock& operator+=(const QueryBlock& other) {
        for (int u = 0; u < kVectorsPerBlock; ++u) v[u] += other.v[u];
        return *this;
    }
    KOBATTR_INLINE QueryBlock operator*(const QueryBlock& other) const {
        QueryBlock product;
        for (int u = 0; u < kVectorsPerBlock; ++u) product.v[u] = v[u] * other.v[u];
        return product;
    }
};
static_assert(kVectors % QueryBlock::kVectorsPerBlock == 0, "a query tile is a whole number of blocks");

KOBATTR_INLINE QueryBlock operator*(float c, const QueryBlock& block) {
    QueryBlock product;
    for (int u = 0; u < QueryBlock::kVectorsPerBlock; ++u) product.v[u] = splat(c) * block.v[u];
    return product;
}

// Everything the tiles share: the checked arguments plus the prepared per-call buffers.
struct Plan {
    AttentionPairsArgs a;
    int64_t H, N, Dh, M, R, K, group;
    int64_t padded_rows;  // R rounded up to kQueryTile
    int64_t n_query_tiles, n_key_tiles;
    int key_tile;                // keys per tile, a multiple of kKeyStep
    // (B, H, n_query_tiles, Dh, kQueryTile): scale * q of the selected rows, each query tile transposed on its own so
    // that the micro-kernel reads one contiguous 16 KiB block (rows padded_rows apart would share an L1 set)
    Buffer<float> q_t;
    Buffer<int32_t> q_pos;  // (padded_rows) position of each selected row, -1 for padding
    Buffer<float> lse;      // (B, H, padded_rows) softmax log-sum-exp, +inf for rows seeing no key
    // Map mode: pass 1 keeps every tile's exponentials for pass 2 (Scratch::kept), which then needs neither
    // the scores nor exp again, when they fit a.score_cache_bytes per thread.
    bool keep_exponentials = false;
};

// The (Dh, kQueryTile) block of q_t holding query tile `query_tile` of head bh = b * H + h.
KOBATTR_INLINE float* query_tile_block(Plan& p, int64_t bh, int64_t query_tile) {
    return p.q_t.data() + (bh * p.n_query_tiles + query_tile) * p.Dh * kQueryTile;
}
KOBATTR_INLINE const float* query_tile_block(const Plan& p, int64_t bh, int64_t query_tile) {
    return p.q_t.data() + (bh * p.n_query_tiles + query_tile) * p.Dh * kQueryTile;
}

// q_t[bh][tile of r][d][lane of r] = scale * q[bh][rows[r]][d]
KOBATTR_INLINE void transpose_query_row(Plan& p, int64_t bh, int64_t r) {
    const float* src = p.a.q + (bh * p.N + p.q_pos[r]) * p.Dh;
    float* dst = query_tile_block(p, bh, r / kQueryTile) + r % kQueryTile;
    for (int64_t d = 0; d < p.Dh; ++d) dst[d * kQueryTile] = p.a.scale * src[d];
}

// Per-thread scratch for one tile; pass 1 alone (row_lse) needs only keys, scores and visible.
struct Scratch {
    Buffer<float> keys;     // (key_tile, Dh) keys of the tile, zero past N
    Buffer<float> scores;   // (key_tile, kQueryTile)
    Buffer<int32_t> visible;  // (key_tile, kQueryTile) -1 (all bits set) or 0
    Buffer<float> alpha;    // (key_tile, H, kQueryTile)
    Buffer<float> coef;     // (H, H) symmetric_coefficient of one Gram matrix, upper triangle
    Buffer<float> maps;     // (M, key_tile, kQueryTile) the finished map tile
    Buffer<float> row_scale;  // (M, kQueryTile)
    Buffer<float> row_weight;  // (M, K, kQueryTile) weights of the contraction, / row sum if normalising
    Buffer<double> row_sum;    // (M, kQueryTile)
    Buffer<double> contraction;  // (M, K, key_tile)
    // With p.keep_exponentials, for the query tile being mapped: (H, n_key_tiles, key_tile, kQueryTile)
    // e_ij = exp(s_ij - m_i,t), 0 where invisible, with m_i,t the running maximum of row i after key tile t
    // (pass 1's flash recurrence), and (H, n_key_tiles, kQueryTile) those maxima; alpha_ij = e_ij exp(m_i,t - lse_i).
    Buffer<float> kept, kept_max;

    explicit Scratch(const Plan& p)
        : keys(p.key_tile * p.Dh), scores(p.key_tile * kQueryTile), visible(p.key_tile * kQueryTile),
          alpha(p.M > 0 ? p.key_tile * p.H * kQueryTile : 0), coef(p.M > 0 ? p.H * p.H : 0),
          maps(p.M * p.key_tile * kQueryTile), row_scale(p.M * kQueryTile),
          row_weight(p.M * larger<int64_t>(p.K, 1) * kQueryTile), row_sum(p.M * kQueryTile),
          contraction(p.M * larger<int64_t>(p.K, 1) * p.key_tile),
          kept(p.keep_exponentials ? p.H * p.n_key_tiles * p.key_tile * kQueryTile : 0),
          kept_max(p.keep_exponentials ? p.H * p.n_key_tiles * kQueryTile : 0) {}
};

// The first and last position among a query tile's selected rows (last = -1 for a tile of padding alone).
struct QuerySpan {
    int32_t first = std::numeric_limits<int32_t>::max(), last = -1;
};
QuerySpan query_span(const Plan& p, int64_t query_tile) {
    QuerySpan span;
    for (int i = 0; i < kQueryTile; ++i) {
        const int32_t pos = p.q_pos[query_tile * kQueryTile + i];
        if (pos < 0) continue;
        span.first = smaller(span.first, pos);
        span.last = larger(span.last, pos);
    }
    return span;
}

// A tile is skipped when causality or a window hides all its keys from all its query rows.
bool tile_hidden(const Plan& p, int64_t query_tile, int64_t key_tile) {
    const QuerySpan span = query_span(p, query_tile);
    const int64_t j0 = key_tile * p.key_tile, j1 = smaller<int64_t>(j0 + p.key_tile, p.N) - 1;
    return keys_hidden(span.first, span.last, j0, j1, p.a.causal, p.a.window, p.a.radius);
}

// True when every query row of the tile is a real, valid token that sees every key of key tile `key_tile`
// (all inside N and valid): the first pass then needs no visibility masks for it.
bool tile_fully_visible(const Plan& p, int64_t b, int64_t query_tile, int64_t key_tile) {
    const int64_t j0 = key_tile * p.key_tile, j1 = j0 + p.key_tile - 1;
    if (j1 >= p.N) return false;
    const uint8_t* valid = p.a.valid + b * p.N;
    for (int i = 0; i < kQueryTile; ++i) {
        const int32_t pos = p.q_pos[query_tile * kQueryTile + i];
        if (pos < 0 || !valid[pos]) return false;
    }
    for (int64_t j = j0; j <= j1; ++j)
        if (!valid[j]) return false;
    const QuerySpan span = query_span(p, query_tile);
    return keys_all_visible(span.first, span.last, j0, j1, p.a.causal, p.a.window, p.a.radius);
}

// Copies keys [j0, j0 + key_tile) of key head g, zero past N, so the micro-kernel needs no bounds.
KOBATTR_INLINE void load_keys(const Plan& p, int64_t b, int64_t g, int64_t j0, float* keys) {
    const float* src = p.a.k + ((b * (p.H / p.group) + g) * p.N + j0) * p.Dh;
    const int64_t n_keys = smaller<int64_t>(p.key_tile, p.N - j0);
    copy_n(src, n_keys * p.Dh, keys);
    fill_n(keys + n_keys * p.Dh, (p.key_tile - n_keys) * p.Dh, 0.0f);
}

// visible[j][i] = [query i sees key j0 + j] (the rule of ../pair_rules.h) as an all-ones/zero mask.
KOBATTR_INLINE void visibility(const Plan& p, int64_t b, int64_t query_tile, int64_t j0, int32_t* visible) {
    const int32_t* pos = p.q_pos.data() + query_tile * kQueryTile;
    const uint8_t* valid = p.a.valid + b * p.N;
    int32_t query_ok[kQueryTile];
    for (int i = 0; i < kQueryTile; ++i) query_ok[i] = (pos[i] >= 0 && valid[pos[i]]) ? -1 : 0;
    // clamped so that they fit the int32 lanes without changing the rule (|i - j| <= N - 1)
    const int32_t window = static_cast<int32_t>(smaller<int64_t>(p.a.window, p.N + 1));
    const int32_t radius = static_cast<int32_t>(smaller<int64_t>(p.a.radius, p.N + 1));
    for (int j = 0; j < p.key_tile; ++j) {
        const int32_t key = static_cast<int32_t>(j0 + j);
        const int32_t key_ok = (key < p.N && valid[key]) ? -1 : 0;
        for (int v = 0; v < kVectors; ++v) {
            const VecI valid_pair = load(query_ok + v * kLanes) & key_ok;
            store(visible + j * kQueryTile + v * kLanes,
                  kobattr::visible(valid_pair, load(pos + v * kLanes), splat(key), p.a.causal, window, radius));
        }
    }
}

// scores[j][i] = sum_d keys[j][d] * q_t[d][i] for key_tile keys x kQueryTile queries, in register blocks
// of kKeyStep keys x kQueryVectors vectors of queries (q_t is one query tile, (Dh, kQueryTile)). 3 x 4 blocks
// (12 accumulators, 4 query loads and 3 broadcasts per step) ran at 113-115 GFLOP/s on both the AVX2 and the
// AVX-512 clone of a Zen 4 core, 4 x 2 at 70-104, larger blocks spilled on AVX2. Not inlined: inside its
// callers GCC's SLP vectoriser assembled the key broadcasts from scalar inserts.
__attribute__((noinline)) void score_tile(const float* __restrict keys, const float* __restrict q_t, int64_t Dh, int key_tile,
                               float* __restrict scores) {
    constexpr int kQueryVectors = 4;
    for (int j = 0; j < key_tile; j += kKeyStep) {
        const float* key_rows = keys + j * Dh;
        for (int v = 0; v < kVectors; v += kQueryVectors) {
            VecF acc[kKeyStep][kQueryVectors] = {};
            for (int64_t d = 0; d < Dh; ++d) {
                VecF query[kQueryVectors];
#pragma GCC unroll 4
                for (int u = 0; u < kQueryVectors; ++u) query[u] = load(q_t + d * kQueryTile + (v + u) * kLanes);
#pragma GCC unroll 4
                for (int jj = 0; jj < kKeyStep; ++jj) {
                    const VecF key = splat(key_rows[jj * Dh + d]);
#pragma GCC unroll 4
                    for (int u = 0; u < kQueryVectors; ++u) acc[jj][u] += key * query[u];
                }
            }
#pragma GCC unroll 4
            for (int jj = 0; jj < kKeyStep; ++jj)
#pragma GCC unroll 4
                for (int u = 0; u < kQueryVectors; ++u) store(scores + (j + jj) * kQueryTile + (v + u) * kLanes, acc[jj][u]);
        }
    }
}

// scores = cap(scores) (soft_cap of ../pair_rules.h) over a key_tile x kQueryTile tile when soft-capping;
// both passes call it right after score_tile, so alpha is normalised by the lse of the same logits.
KOBATTR_INLINE void cap_scores(const Plan& p, float* scores) {
    if (p.a.softcap <= 0.0f) return;
    for (int64_t e = 0; e < int64_t(p.key_tile) * kQueryTile; e += kLanes)
        store(scores + e, soft_cap(load(scores + e), p.a.softcap, VectorExp{}));
}

// One key tile of pass 1: running_max / running_sum updated from the tile's scores (flash recurrence), the
// exponentials kept when `kept` is set. kMasked: only where visible[j][i]; otherwise every pair of the tile counts.
template <bool kMasked>
KOBATTR_INLINE void tile_statistics(const Plan& p, int64_t kt, const float* scores, const int32_t* visible,
                                    float* running_max, double* running_sum, float* kept, float* kept_max) {
    for (int v = 0; v < kVectors; ++v) {
        VecF tile_max = splat(-kInf);
        for (int j = 0; j < p.key_tile; ++j) {
            const VecF s = load(scores + j * kQueryTile + v * kLanes);
            VecI larger_here = s > tile_max;
            if constexpr (kMasked) larger_here &= load(visible + j * kQueryTile + v * kLanes);
            tile_max = select(larger_here, s, tile_max);
        }
        const VecF old_max = load(running_max + v * kLanes);
        const VecF new_max = select(old_max > tile_max, old_max, tile_max);
        VecF tile_sum = {};
        for (int j = 0; j < p.key_tile; ++j) {
            VecF e = vector_exp(load(scores + j * kQueryTile + v * kLanes) - new_max);
            if constexpr (kMasked) e = select(load(visible + j * kQueryTile + v * kLanes), e, splat(0.0f));
            tile_sum += e;
            if (kept) store(kept + (kt * p.key_tile + j) * kQueryTile + v * kLanes, e);
        }
        if (kept) store(kept_max + kt * kQueryTile + v * kLanes, new_max);
        for (int l = 0; l < kLanes; ++l) {
            // A row that has seen no visible key yet keeps max -inf and sum 0 (no inf - inf).
            const int i = v * kLanes + l;
            if (new_max[l] == -kInf) continue;
            const double rescale = running_max[i] == -kInf ? 0.0 : std::exp(double(running_max[i]) - new_max[l]);
            running_sum[i] = running_sum[i] * rescale + tile_sum[l];
            running_max[i] = new_max[l];
        }
    }
}

// Pass 1 for one (b, h, query tile): lse_i = m_i + log(sum_j exp(s_ij - m_i)) over the visible keys (s capped),
// with the running maximum m_i updated tile by tile (the flash-attention recurrence); lse has kQueryTile slots.
// kept / kept_max: this head's part of Scratch::kept / kept_max to fill, or null.
void row_stats_task(const Plan& p, int64_t b, int64_t h, int64_t query_tile, Scratch& w, float* lse,
                    float* kept = nullptr, float* kept_max = nullptr) {
    const float* q_t = query_tile_block(p, b * p.H + h, query_tile);
    const float* scores = w.scores.data();
    const int32_t* visible = w.visible.data();
    float running_max[kQueryTile];
    double running_sum[kQueryTile];
    for (int i = 0; i < kQueryTile; ++i) running_max[i] = -kInf, running_sum[i] = 0.0;
    for (int64_t kt = 0; kt < p.n_key_tiles; ++kt) {
        if (tile_hidden(p, query_tile, kt)) continue;
        const int64_t j0 = kt * p.key_tile;
        load_keys(p, b, h / p.group, j0, w.keys.data());
        score_tile(w.keys.data(), q_t, p.Dh, p.key_tile, w.scores.data());
        cap_scores(p, w.scores.data());
        if (tile_fully_visible(p, b, query_tile, kt)) {
            tile_statistics<false>(p, kt, scores, visible, running_max, running_sum, kept, kept_max);
        } else {
            visibility(p, b, query_tile, j0, w.visible.data());
            tile_statistics<true>(p, kt, scores, visible, running_max, running_sum, kept, kept_max);
        }
    }
    for (int i = 0; i < kQueryTile; ++i)
        lse[i] = running_sum[i] > 0.0 ? float(running_max[i] + std::log(running_sum[i])) : kInf;
}

// Pass 2 for one (b, query tile, key tile): alpha^h_ij = exp(s_ij - lse_i) into w.alpha, then
// maps[m][j][i] = row_scale_i,m * sqrt(max(kappa_ij^T G_j,m kappa_ij, 0)), 0 where j is invisible from i.
void pair_tile(const Plan& p, int64_t b, int64_t query_tile, int64_t key_tile, Scratch& w) {
    const int64_t H = p.H, Dh = p.Dh, BK = p.key_tile, j0 = key_tile * BK;
    const int32_t* pos = p.q_pos.data() + query_tile * kQueryTile;
    const int32_t* visible = w.visible.data();
    float* alpha_tile = w.alpha.data();
    visibility(p, b, query_tile, j0, w.visible.data());
    for (int64_t h = 0; h < H; ++h) {
        const float* lse = p.lse.data() + (b * H + h) * p.padded_rows + query_tile * kQueryTile;
        if (p.keep_exponentials) {  // alpha_ij = e_ij exp(m_i,t - lse_i), both factors <= 1
            const float* kept = w.kept.data() + (h * p.n_key_tiles + key_tile) * BK * kQueryTile;
            const float* kept_max = w.kept_max.data() + (h * p.n_key_tiles + key_tile) * kQueryTile;
            VecF factor[kVectors];
            for (int v = 0; v < kVectors; ++v)
                factor[v] = vector_exp(load(kept_max + v * kLanes) - load(lse + v * kLanes));
            for (int64_t j = 0; j < BK; ++j)
                for (int v = 0; v < kVectors; ++v)
                    store(alpha_tile + (j * H + h) * kQueryTile + v * kLanes,
                          load(kept + j * kQueryTile + v * kLanes) * factor[v]);
            continue;
        }
        if (h % p.group == 0) load_keys(p, b, h / p.group, j0, w.keys.data());
        const float* q_t = query_tile_block(p, b * H + h, query_tile);
        score_tile(w.keys.data(), q_t, Dh, BK, w.scores.data());
        cap_scores(p, w.scores.data());
        for (int64_t j = 0; j < BK; ++j)
            for (int v = 0; v < kVectors; ++v) {
                const VecF e = vector_exp(load(w.scores.data() + j * kQueryTile + v * kLanes) - load(lse + v * kLanes));
                const VecI mask = load(visible + j * kQueryTile + v * kLanes);
                store(alpha_tile + (j * H + h) * kQueryTile + v * kLanes, select(mask, e, splat(0.0f)));
            }
    }
    for (int64_t m = 0; m < p.M; ++m)
        for (int i = 0; i < kQueryTile; ++i)
            w.row_scale[m * kQueryTile + i] = pos[i] >= 0 ? p.a.row_scale[(b * p.N + pos[i]) * p.M + m] : 0.0f;

    const int64_t n_keys = smaller<int64_t>(BK, p.N - j0);
    float* coef = w.coef.data();
    for (int64_t m = 0; m < p.M; ++m) {
        for (int64_t j = 0; j < BK; ++j) {
            float* maps = w.maps.data() + (m * BK + j) * kQueryTile;
            if (j >= n_keys) {
                fill_n(maps, kQueryTile, 0.0f);
                continue;
            }
            const float* G = p.a.grams + ((b * p.N + j0 + j) * p.M + m) * (H + 1) * (H + 1);
            for (int64_t r = 0; r < H; ++r)
                for (int64_t s = r; s < H; ++s) coef[r * H + s] = symmetric_coefficient(G, H, r, s);
            const float* alpha = alpha_tile + j * H * kQueryTile;
            float quad[kQueryTile];
            for (int v = 0; v < kVectors; v += QueryBlock::kVectorsPerBlock)
                head_quadratic_form<QueryBlock>(
                    H, [&](int64_t r, int64_t s) { return coef[r * H + s]; },
                    [&](int64_t h) { return QueryBlock::load(alpha + h * kQueryTile + v * kLanes); })
                    .store(quad + v * kLanes);
            const int32_t key = static_cast<int32_t>(j0 + j);
            for (int i = 0; i < kQueryTile; ++i)
                if (pos[i] == key && visible[j * kQueryTile + i] != 0) quad[i] += residual_term(G, H, alpha + i, kQueryTile);
            const float* row_scale = w.row_scale.data() + m * kQueryTile;
            for (int i = 0; i < kQueryTile; ++i) maps[i] = map_value(quad[i], row_scale[i], visible[j * kQueryTile + i] != 0);
        }
    }
}

// dst[b, c, r, j0 + j] = src[c * c_stride + j * j_stride + i] for the tile's rows r and keys j and every
// channel c < C of a (B, C, R, N) output (zeros when `hidden`): C = H for alpha, M for the maps.
void write_tile(const Plan& p, float* dst_base, int64_t C, const float* src, int64_t c_stride, int64_t j_stride,
                int64_t b, int64_t query_tile, int64_t key_tile, bool hidden) {
    const int64_t j0 = key_tile * p.key_tile, n_keys = smaller<int64_t>(p.key_tile, p.N - j0);
    for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < kQueryTile; ++i) {
            const int64_t r = query_tile * kQueryTile + i;
            if (r >= p.R) break;
            float* dst = dst_base + ((b * C + c) * p.R + r) * p.N + j0;
            for (int64_t j = 0; j < n_keys; ++j)
                dst[j] = hidden ? 0.0f : src[c * c_stride + j * j_stride + i];
        }
}

// alpha[b, h, r, j0 + j]; the scratch holds alpha as (key, head, row).
void write_alpha(const Plan& p, int64_t b, int64_t query_tile, int64_t key_tile, bool hidden, const Scratch& w) {
    write_tile(p, p.a.alpha, p.H, w.alpha.data(), kQueryTile, p.H * kQueryTile, b, query_tile, key_tile, hidden);
}

// out[b, m, r, j0 + j]; the scratch holds the maps as (method, key, row).
void write_map(const Plan& p, int64_t b, int64_t query_tile, int64_t key_tile, bool hidden, const Scratch& w) {
    write_tile(p, p.a.out, p.M, w.maps.data(), p.key_tile * kQueryTile, kQueryTile, b, query_tile, key_tile, hidden);
}

// contraction[m][k][j] += sum_i row_weight[m][k][i] * maps[m][j][i]
void contract_tile(const Plan& p, Scratch& w) {
    for (int64_t m = 0; m < p.M; ++m)
        for (int64_t k = 0; k < p.K; ++k) {
            const float* weight = w.row_weight.data() + (m * p.K + k) * kQueryTile;
            for (int64_t j = 0; j < p.key_tile; ++j) {
                const float* maps = w.maps.data() + (m * p.key_tile + j) * kQueryTile;
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int i = 0; i < kQueryTile; ++i) sum += weight[i] * maps[i];
                w.contraction[(m * p.K + k) * p.key_tile + j] += sum;
            }
        }
}

int thread_count(int64_t requested) {
#ifdef _OPENMP
    return requested > 0 ? static_cast<int>(requested) : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

Plan make_plan(const AttentionPairsArgs& a) {
    Plan p;
    p.a = a;
    p.H = a.heads, p.N = a.seq_len, p.Dh = a.head_dim, p.M = a.n_grams, p.R = a.n_rows;
    p.K = a.weights ? a.n_weight_rows : 0;
    p.group = a.heads / a.kv_heads;
    p.n_query_tiles = (p.R + kQueryTile - 1) / kQueryTile;
    p.padded_rows = p.n_query_tiles * kQueryTile;
    // Keep the (key_tile, H, kQueryTile) alpha tile near 128 KiB so that it stays in L2.
    const int64_t keys_for_cache = (32 * 1024) / (kQueryTile * p.H);
    p.key_tile = static_cast<int>(larger<int64_t>(kKeyStep, smaller<int64_t>(keys_for_cache / kKeyStep * kKeyStep, 64 / kKeyStep * kKeyStep)));
    p.n_key_tiles = (p.N + p.key_tile - 1) / p.key_tile;
    p.q_pos.assign(p.padded_rows, -1);
    for (int64_t r = 0; r < p.R; ++r) p.q_pos[r] = static_cast<int32_t>(query_position(a.rows, r));
    p.q_t.assign(a.batch * p.H * p.Dh * p.padded_rows, 0.0f);
    p.lse.assign(a.batch * p.H * p.padded_rows, kInf);
    return p;
}

// The first part of every call, run by every thread of the caller's parallel region (orphaned `omp for`s,
// each ending in a barrier): q_t = scale * q of the selected rows (transpose_query_row), the query rows becoming the
// vector lanes, then pass 1 (row_stats_task) for every (b, h, query tile) into p.lse, or, when the caller
// gives every row's log-sum-exp (a.row_lse), the selected rows of it.
void row_stats_pass(Plan& p, Scratch& w) {
    const int64_t BH = p.a.batch * p.H;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
        for (int64_t r = 0; r < p.R; ++r) transpose_query_row(p, bh, r);
        if (p.a.row_lse)  // given: the selected rows of it, and no first pass
            for (int64_t r = 0; r < p.R; ++r) p.lse[bh * p.padded_rows + r] = p.a.row_lse[bh * p.N + p.q_pos[r]];
    }
    if (p.a.row_lse) return;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < BH * p.n_query_tiles; ++task)
        row_stats_task(p, task / (p.H * p.n_query_tiles), (task / p.n_query_tiles) % p.H, task % p.n_query_tiles, w,
                       p.lse.data() + task * kQueryTile);
    if (p.a.row_lse_out) {  // every row (no rows selection): hand the statistics back, padding rows dropped
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < BH; ++bh)
            copy_n(p.lse.data() + bh * p.padded_rows, p.N, p.a.row_lse_out + bh * p.N);
    }
}

// The same preparation for one (b, query tile) inside its own task, for every head: the map's tasks need
// nothing from each other, so the map runs as one dynamic loop without barriers (a thread that the machine
// delays holds no other thread up). Fills the row_lse_out rows of the tile too.
void prepare_tile(Plan& p, Scratch& w, int64_t b, int64_t qt) {
    const int64_t first = qt * kQueryTile, last = smaller<int64_t>(first + kQueryTile, p.R);
    for (int64_t h = 0; h < p.H; ++h) {
        const int64_t bh = b * p.H + h;
        for (int64_t r = first; r < last; ++r) {
            transpose_query_row(p, bh, r);
            if (p.a.row_lse) p.lse[bh * p.padded_rows + r] = p.a.row_lse[bh * p.N + p.q_pos[r]];
        }
        if (p.a.row_lse) continue;
        float* lse = p.lse.data() + bh * p.padded_rows + first;
        if (p.keep_exponentials)
            row_stats_task(p, b, h, qt, w, lse, w.kept.data() + h * p.n_key_tiles * p.key_tile * kQueryTile,
                           w.kept_max.data() + h * p.n_key_tiles * kQueryTile);
        else
            row_stats_task(p, b, h, qt, w, lse);
        if (p.a.row_lse_out) copy_n(lse, last - first, p.a.row_lse_out + bh * p.N + first);
    }
}

}  // namespace

void row_lse(const AttentionPairsArgs& a, float* lse, int64_t num_threads) {
    Plan p = make_plan(a);  // every row (a.rows is null), no pair tensor (M = 0: a small scratch)
    const int64_t BH = a.batch * p.H, N = p.N;
    const int threads = thread_count(num_threads);
    (void)threads;  // unused without OpenMP

#pragma omp parallel num_threads(threads)
    {
        Scratch w(p);
        row_stats_pass(p, w);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < BH; ++bh)  // drop the padding rows of the last query tile
            copy_n(p.lse.data() + bh * p.padded_rows, N, lse + bh * N);
    }
}

void attention_maps(const AttentionPairsArgs& a, int64_t num_threads) {
    if (a.n_rows == 0) {
        // a contraction over no rows is 0; an empty map has nothing to fill
        if (a.weights) fill_n(a.out, a.batch * a.n_grams * a.n_weight_rows * a.seq_len, 0.0f);
        return;
    }
    Plan p = make_plan(a);
    const int64_t B = a.batch;
    const int threads = thread_count(num_threads);
    (void)threads;  // unused without OpenMP

    if (!a.weights) {
        // Keeping one query tile's exponentials of every head spares pass 2 the scores and their exp.
        p.keep_exponentials = !a.row_lse && p.H * p.n_key_tiles * (p.key_tile + 1) * kQueryTile * int64_t(sizeof(float)) <= a.cache_bytes;
#pragma omp parallel num_threads(threads)
        {
            // The map: each task owns one (b, query tile) row band of the output, its preparation included.
            Scratch w(p);
#pragma omp for schedule(dynamic)
            for (int64_t task = 0; task < B * p.n_query_tiles; ++task) {
                const int64_t b = task / p.n_query_tiles, qt = task % p.n_query_tiles;
                prepare_tile(p, w, b, qt);
                for (int64_t kt = 0; kt < p.n_key_tiles; ++kt) {
                    const bool hidden = tile_hidden(p, qt, kt);
                    if (!hidden) pair_tile(p, b, qt, kt, w);
                    write_map(p, b, qt, kt, hidden, w);
                    if (a.alpha) write_alpha(p, b, qt, kt, hidden, w);
                }
            }
        }
        return;
    }

    // The contraction's tasks are key-major and read every query tile: prepare them all first.
#pragma omp parallel num_threads(threads)
    {
        Scratch w(p);
        row_stats_pass(p, w);
    }

    // The contraction needs the row sums of the map first when normalising, hence a first sweep.
    const int64_t M = p.M, K = p.K;
    Buffer<float> inv_row_sum(B * M * p.padded_rows, 1.0f);
    if (a.normalize_rows) {
#pragma omp parallel num_threads(threads)
        {
            Scratch w(p);
#pragma omp for schedule(dynamic)
            for (int64_t task = 0; task < B * p.n_query_tiles; ++task) {
                const int64_t b = task / p.n_query_tiles, qt = task % p.n_query_tiles;
                w.row_sum.fill(0.0);
                for (int64_t kt = 0; kt < p.n_key_tiles; ++kt) {
                    const bool hidden = tile_hidden(p, qt, kt);
                    if (!hidden) {
                        pair_tile(p, b, qt, kt, w);
                        for (int64_t m = 0; m < M; ++m)
                            for (int64_t j = 0; j < p.key_tile; ++j)
                                for (int i = 0; i < kQueryTile; ++i)
                                    w.row_sum[m * kQueryTile + i] += w.maps[(m * p.key_tile + j) * kQueryTile + i];
                    }
                    if (a.alpha) write_alpha(p, b, qt, kt, hidden, w);
                }
                // Rows summing to 0 stay 0: any finite factor works, keep 1.
                for (int64_t m = 0; m < M; ++m)
                    for (int i = 0; i < kQueryTile; ++i) {
                        const double sum = w.row_sum[m * kQueryTile + i];
                        inv_row_sum[(b * M + m) * p.padded_rows + qt * kQueryTile + i] =
                            sum > 0.0 ? float(1.0 / sum) : 1.0f;
                    }
            }
        }
    }

#pragma omp parallel num_threads(threads)
    {
        // Each task owns one (b, key tile) column band of out[b, m, k, :] and sweeps all query tiles.
        Scratch w(p);
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < B * p.n_key_tiles; ++task) {
            const int64_t b = task / p.n_key_tiles, kt = task % p.n_key_tiles;
            w.contraction.fill(0.0);
            for (int64_t qt = 0; qt < p.n_query_tiles; ++qt) {
                const bool hidden = tile_hidden(p, qt, kt);
                if (!hidden) pair_tile(p, b, qt, kt, w);
                // alpha was written by the normalising sweep already, if there was one.
                if (a.alpha && !a.normalize_rows) write_alpha(p, b, qt, kt, hidden, w);
                if (hidden) continue;
                for (int64_t m = 0; m < M; ++m)
                    for (int64_t k = 0; k < K; ++k)
                        for (int i = 0; i < kQueryTile; ++i) {
                            const int64_t r = qt * kQueryTile + i;
                            // weights are indexed by the row's position, whichever rows are selected
                            w.row_weight[(m * K + k) * kQueryTile + i] =
                                r < p.R ? a.weights[(b * K + k) * p.N + p.q_pos[r]] *
                                              inv_row_sum[(b * M + m) * p.padded_rows + r]
                                        : 0.0f;
                        }
                contract_tile(p, w);
            }
            const int64_t j0 = kt * p.key_tile, n_keys = smaller<int64_t>(p.key_tile, p.N - j0);
            for (int64_t m = 0; m < M; ++m)
                for (int64_t k = 0; k < K; ++k)
                    for (int64_t j = 0; j < n_keys; ++j)
                        a.out[((b * M + m) * K + k) * p.N + j0 + j] = float(w.contraction[(m * K + k) * p.key_tile + j]);
        }
    }
}

}  // namespace KOBATTR_ISA
}  // namespace kobattr
