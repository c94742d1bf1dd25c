// The attention_maps primitive of kobattr/backends/base.py, shared by the CPU and CUDA kernels.
//
//   alpha^h_ij = softmax_j(cap(scale * q^h_i . k^{h / (H / KV)}_j)) over the keys j visible from query i
//                (cap(s) = softcap tanh(s / softcap) when softcap > 0; visible: pair_rules.h)
//   kappa_ij   = (alpha^0_ij, ..., alpha^{H-1}_ij, [i == j])
//   map[b, m, i, j] = row_scale[b, i, m] * sqrt(max(kappa_ij^T grams[b, j, m] kappa_ij, 0)), 0 if invisible
//
// Output modes: the map for every query row or for the rows listed in `rows`; or, with `weights`,
// out[b, m, k, j] = sum_r weights[b, k, rows[r]] * map[b, m, rows[r], j] over the selected rows (all N
// without `rows`; a row listed twice counts twice), each map row first divided by its sum when
// normalize_rows; optionally alpha itself for the selected rows.
//
// The kernels take raw pointers; tensor_args.h builds this struct from checked at::Tensors.
//
// The row_lse entry points (the row_stats primitive: lse[b, h, i] = log sum_j exp(cap(scale q^h_i . k_j))
// over the keys visible from i) take the same struct with only the attention pattern set: q, k, valid,
// the sizes and options, rows null and n_rows = N, no pair tensor (n_grams = 0); their output is passed
// beside it.
#pragma once

#include <cstdint>

namespace kobattr {

struct AttentionPairsArgs {
    // Inputs, all C-contiguous.
    const float* q = nullptr;          // (B, H, N, Dh)
    const float* k = nullptr;          // (B, KV, N, Dh)
    const uint8_t* valid = nullptr;    // (B, N) 0 or 1 (torch.bool storage)
    const float* grams = nullptr;      // (B, N, M, H+1, H+1)
    const float* row_scale = nullptr;  // (B, N, M)
    const int64_t* rows = nullptr;     // (R,) query rows in [0, N), or null for all N rows
    const float* weights = nullptr;    // (B, K, N) indexed by the absolute row, or null for the map itself
    // Outputs.
    float* out = nullptr;    // (B, M, R, N) map, or (B, M, K, N) contraction when weights is set
    float* alpha = nullptr;  // (B, H, R, N), or null when not wanted
    // Optional input: the natural-log row log-sum-exp of every row (B, H, N), as row_lse computes it; the
    // CPU kernel then skips its own first pass.
    const float* row_lse = nullptr;
    // Optional output, only without `rows`: every row's log-sum-exp (B, H, N) as the first pass computed it.
    float* row_lse_out = nullptr;
    // Sizes and options.
    int64_t batch = 0, heads = 0, kv_heads = 0, seq_len = 0, head_dim = 0;
    int64_t n_grams = 0;        // M
    int64_t n_rows = 0;         // R: len(rows), or N when rows is null
    int64_t n_weight_rows = 0;  // K: weights.shape[1], 0 when weights is null
    bool causal = false;
    int64_t window = 0;  // 0 = no sliding window
    int64_t radius = 0;  // 0 = no symmetric window |i - j| <= radius
    float scale = 1.0f;
    float softcap = 0.0f;  // 0 = no logit soft-capping
    bool normalize_rows = false;  // only with weights
    // CPU kernel, map mode: bytes per thread it may keep pass 1's exponentials in (attention_pairs.cpp sets it)
    int64_t cache_bytes = 0;
};

}  // namespace kobattr
