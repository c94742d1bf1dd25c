// The attention_maps primitive of kobattr/backends/base.py, shared by the CPU and CUDA kernels.
//
//   alpha^h_ij = softmax_j(scale * q^h_i . k^{h / (H / KV)}_j) over the keys j visible from query i
//   kappa_ij   = (alpha^0_ij, ..., alpha^{H-1}_ij, [i == j])
//   map[b, m, i, j] = row_scale[b, i, m] * sqrt(max(kappa_ij^T grams[b, j, m] kappa_ij, 0)), 0 if invisible
//
// Output modes: the map for every query row or for the rows listed in `rows`; or, with `weights`,
// out[b, m, k, j] = sum_i weights[b, k, i] * map[b, m, i, j] (each map row first divided by its sum
// when normalize_rows); optionally alpha itself for the selected rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kobattr {

struct AttentionPairsArgs {
    // Inputs, all C-contiguous.
    const float* q = nullptr;          // (B, H, N, Dh)
    const float* k = nullptr;          // (B, KV, N, Dh)
    const uint8_t* valid = nullptr;    // (B, N) 0 or 1 (torch.bool storage)
    const float* grams = nullptr;      // (B, N, M, H+1, H+1)
    const float* row_scale = nullptr;  // (B, N, M)
    const int64_t* rows = nullptr;     // (R,) query rows, or null for all N rows
    const float* weights = nullptr;    // (B, K, N), or null for the map itself
    // Outputs.
    float* out = nullptr;    // (B, M, R, N) map, or (B, M, K, N) contraction when weights is set
    float* alpha = nullptr;  // (B, H, R, N), or null when not wanted
    // Sizes and options.
    int64_t batch = 0, heads = 0, kv_heads = 0, seq_len = 0, head_dim = 0;
    int64_t n_grams = 0;        // M
    int64_t n_rows = 0;         // R: len(rows), or N when rows is null
    int64_t n_weight_rows = 0;  // K: weights.shape[1], 0 when weights is null
    bool causal = false;
    int64_t window = 0;  // 0 = no sliding window
    float scale = 1.0f;
    bool normalize_rows = false;
};

inline void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument("attention_maps: " + message);
}

// Everything that can be checked without reading device memory; both kernels call it first.
inline void check_attention_pairs_args(const AttentionPairsArgs& a) {
    const std::string sizes = " (B=" + std::to_string(a.batch) + ", H=" + std::to_string(a.heads) +
                              ", KV=" + std::to_string(a.kv_heads) + ", N=" + std::to_string(a.seq_len) +
                              ", Dh=" + std::to_string(a.head_dim) + ", M=" + std::to_string(a.n_grams) + ")";
    require(a.batch >= 1 && a.heads >= 1 && a.kv_heads >= 1 && a.seq_len >= 1 && a.head_dim >= 1 && a.n_grams >= 1,
            "every size must be at least 1" + sizes + ".");
    require(a.heads % a.kv_heads == 0,
            "the number of query heads H=" + std::to_string(a.heads) +
                " must be a multiple of the number of key heads KV=" + std::to_string(a.kv_heads) +
                " (grouped-query attention shares each key head among H / KV query heads).");
    require(a.seq_len < (int64_t(1) << 31), "the sequence length N must be below 2^31" + sizes + ".");
    require(a.q != nullptr, "q must point to a (B, H, N, Dh) float32 buffer, got a null pointer.");
    require(a.k != nullptr, "k must point to a (B, KV, N, Dh) float32 buffer, got a null pointer.");
    require(a.valid != nullptr, "valid must point to a (B, N) bool buffer, got a null pointer.");
    require(a.grams != nullptr, "grams must point to a (B, N, M, H+1, H+1) float32 buffer, got a null pointer.");
    require(a.row_scale != nullptr, "row_scale must point to a (B, N, M) float32 buffer, got a null pointer.");
    require(a.out != nullptr, "out must point to the float32 output buffer, got a null pointer.");
    require(a.window >= 0, "the sliding window must be 0 (none) or positive, got " + std::to_string(a.window) + ".");
    require(std::isfinite(a.scale), "the softmax scale must be a finite number.");
    require(!(a.rows != nullptr && a.weights != nullptr),
            "pass either rows (to select map rows) or weights (to contract over all rows), not both.");
    if (a.rows == nullptr)
        require(a.n_rows == a.seq_len, "without rows the number of output rows R=" + std::to_string(a.n_rows) +
                                           " must equal the sequence length N=" + std::to_string(a.seq_len) + ".");
    else
        require(a.n_rows >= 0, "the number of selected rows must not be negative.");
    if (a.weights != nullptr)
        require(a.n_weight_rows >= 1, "weights must have at least one row (K >= 1), got K=" +
                                          std::to_string(a.n_weight_rows) + ".");
    else
        require(!a.normalize_rows, "normalize_rows only applies to the weights contraction; pass weights too.");
}

}  // namespace kobattr
