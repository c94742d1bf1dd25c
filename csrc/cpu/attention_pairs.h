// CPU entry points of the attention_maps primitive (formulas in ../attention_pairs_args.h) and of row_lse.
#pragma once

#include "attention_pairs_args.h"

namespace kobattr {

// Fills args.out and, when set, args.alpha, using `num_threads` OpenMP threads (0 = the OpenMP default).
// `args` comes from attention_maps_args (../tensor_args.h), which checked everything.
void attention_maps_cpu(const AttentionPairsArgs& args, int64_t num_threads);

// Fills lse (B, H, N) float32 with lse[b, h, i] = log sum_j exp(cap(scale q^h_i . k^{g(h)}_j)) over the keys j
// visible from i (natural log; +inf on rows that see no key, i.e. padding rows), the first pass of
// attention_maps_cpu alone. `args` comes from row_lse_args (../tensor_args.h): every row, no pair tensor.
void row_lse_cpu(const AttentionPairsArgs& args, float* lse, int64_t num_threads);

}  // namespace kobattr
