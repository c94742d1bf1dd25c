// The per-pair and per-tile rules and the pair arithmetic that the CPU (cpu/attention_pairs_kernel.h) and CUDA
// (cuda/attention_pairs.cu) attention_maps kernels share, written once for the host compiler and nvcc, so that
// the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define KOBATTR_HOST_DEVICE __host__ __device__ __forceinline__
#else
// static: the CPU kernel is compiled once per instruction set, and each copy must keep its own helpers
#define KOBATTR_HOST_DEVICE static inline
#endif

namespace kobattr {

// Position of output row r: rows[r] when rows are selected, r itself otherwise.
KOBATTR_HOST_DEVICE int64_t query_position(const int64_t* rows, int64_t r) { return rows ? rows[r] : r; }

// visible_ij = valid_i & valid_j & (j <= i if causal) & (i - j < window if window > 0)
// & (|i - j| <= radius if radius > 0), the rule of Layer.visible; `valid_pair` is valid_i & valid_j. Also
// evaluated on GCC vectors of positions (the CPU kernel's lanes), where comparisons give all-ones/zero
// masks and `&` combines them, hence |i - j| <= radius as two comparisons (no abs on vectors).
template <typename Mask, typename Position, typename Offset>
KOBATTR_HOST_DEVICE Mask visible(Mask valid_pair, Position i, Position j, bool causal, Offset window, Offset radius) {
    if (causal) valid_pair = valid_pair & (j <= i);
    if (window > 0) valid_pair = valid_pair & (i - j < window);
    if (radius > 0) valid_pair = valid_pair & (i - j <= radius) & (j - i <= radius);
    return valid_pair;
}

// The same rule over ranges: true when causality, the window or the radius hides every key in
// [first_key, last_key] from every query in [first_query, last_query] (last_query < 0: the tile has no
// query), so that a kernel can skip the tile. The radius hides keys on both sides: a tile entirely more
// than radius after the last query or before the first one.
KOBATTR_HOST_DEVICE bool keys_hidden(int64_t first_query, int64_t last_query, int64_t first_key, int64_t last_key,
                                     bool causal, int64_t window, int64_t radius) {
    return last_query < 0 || (causal && first_key > last_query) || (window > 0 && first_query - last_key >= window) ||
           (radius > 0 && (first_key - last_query > radius || first_query - last_key > radius));
}

// The opposite case: true when every key in [first_key, last_key] is visible (by the rule; validity aside) from
// every query in [first_query, last_query], so that a kernel can drop the per-pair masks of the tile.
KOBATTR_HOST_DEVICE bool keys_all_visible(int64_t first_query, int64_t last_query, int64_t first_key, int64_t last_key,
                                          bool causal, int64_t window, int64_t radius) {
    return last_query >= 0 && (!causal || last_key <= first_query) && (window <= 0 || last_query - first_key < window) &&
           (radius <= 0 || (last_query - first_key <= radius && last_key - first_query <= radius));
}

// cap(s) = c tanh(s / c), the logit soft-capping of Gemma 2, for softcap c > 0 (s itself otherwise), on
// the scaled logit s = scale q.k, before masking. Written as c - 2c / (exp(2 s / c) + 1) so that one
// formula serves both kernels with their own exponential `exp` (expf on the GPU, the CPU kernel's vector
// exp on its lanes); exp overflowing to inf or underflowing to 0 saturates it to +-c.
template <typename Value, typename Exp>
KOBATTR_HOST_DEVICE Value soft_cap(Value s, float softcap, Exp exp) {
    if (!(softcap > 0.0f)) return s;
    return softcap - (2.0f * softcap) / (exp((s + s) / softcap) + 1.0f);
}

// kappa_ij's last slot is [i == j], so on the diagonal the quadratic form kappa^T G kappa gains
// sum_h (G[h, H] + G[H, h]) alpha_h + G[H, H]; G is one (H+1, H+1) Gram matrix, alpha_h = alpha[h * stride].
KOBATTR_HOST_DEVICE float residual_term(const float* G, int64_t H, const float* alpha, int64_t stride) {
    float term = G[H * (H + 1) + H];
    for (int64_t h = 0; h < H; ++h) term += (G[h * (H + 1) + H] + G[H * (H + 1) + h]) * alpha[h * stride];
    return term;
}

// C_rs of the symmetric form: G_rr on the diagonal, G_rs + G_sr above it (s > r), so that
// kappa^T G kappa over the heads is sum_r alpha_r sum_{s >= r} C_rs alpha_s, half of the H^2 products.
KOBATTR_HOST_DEVICE float symmetric_coefficient(const float* G, int64_t H, int64_t r, int64_t s) {
    return r == s ? G[r * (H + 1) + r] : G[r * (H + 1) + s] + G[s * (H + 1) + r];
}

// sum_h sum_g alpha_h G_hg alpha_g over the heads of one pair (the residual slot is residual_term's), as
// sum_r alpha(r) sum_{s >= r} coefficient(r, s) alpha(s) with coefficient = symmetric_coefficient. Value is
// float on the GPU (a thread per pair) and a block of query-lane vectors on the CPU (a pair per lane), so
// both kernels sum in the same order.
template <typename Value, typename Coefficient, typename Alpha>
KOBATTR_HOST_DEVICE Value head_quadratic_form(int64_t H, Coefficient coefficient, Alpha alpha) {
    Value quad = Value();
    for (int64_t r = 0; r < H; ++r) {
        Value inner = Value();
        for (int64_t s = r; s < H; ++s) inner += coefficient(r, s) * alpha(s);
        quad += alpha(r) * inner;
    }
    return quad;
}

// map_ij = row_scale_i sqrt(max(quad_ij, 0)) where i sees j, 0 elsewhere. quad < 0 only by rounding, and NaN
// must stay NaN, hence no max().
KOBATTR_HOST_DEVICE float map_value(float quad, float row_scale, bool visible) {
    return visible ? row_scale * sqrtf(quad < 0.0f ? 0.0f : quad) : 0.0f;
}

}  // namespace kobattr
