// Packs the raw addresses and sizes that kobattr/backends/kernel_args.py passes to both binding
// files (kobattr._cpu and kobattr._cuda) into an AttentionPairsArgs.
#pragma once

#include <cstdint>

#include "attention_pairs_args.h"

namespace kobattr {

template <typename T>
T* as_pointer(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

inline AttentionPairsArgs pack_attention_args(uintptr_t q, uintptr_t k, uintptr_t valid, uintptr_t grams,
                                              uintptr_t row_scale, uintptr_t rows, uintptr_t weights, uintptr_t out,
                                              uintptr_t alpha, int64_t batch, int64_t heads, int64_t kv_heads,
                                              int64_t seq_len, int64_t head_dim, int64_t n_grams, int64_t n_rows,
                                              int64_t n_weight_rows, bool causal, int64_t window, double scale,
                                              bool normalize_rows) {
    AttentionPairsArgs args;
    args.q = as_pointer<const float>(q);
    args.k = as_pointer<const float>(k);
    args.valid = as_pointer<const uint8_t>(valid);
    args.grams = as_pointer<const float>(grams);
    args.row_scale = as_pointer<const float>(row_scale);
    args.rows = as_pointer<const int64_t>(rows);
    args.weights = as_pointer<const float>(weights);
    args.out = as_pointer<float>(out);
    args.alpha = as_pointer<float>(alpha);
    args.batch = batch, args.heads = heads, args.kv_heads = kv_heads, args.seq_len = seq_len;
    args.head_dim = head_dim, args.n_grams = n_grams, args.n_rows = n_rows, args.n_weight_rows = n_weight_rows;
    args.causal = causal, args.window = window, args.scale = static_cast<float>(scale);
    args.normalize_rows = normalize_rows;
    return args;
}

}  // namespace kobattr
