// CPU entry point of the attention_maps primitive (formulas in ../attention_pairs_args.h).
#pragma once

#include "attention_pairs_args.h"

namespace kobattr {

// Fills args.out and, when set, args.alpha, using `num_threads` OpenMP threads (0 = the OpenMP default).
// `args` comes from attention_maps_args (../tensor_args.h), which checked everything.
void attention_maps_cpu(const AttentionPairsArgs& args, int64_t num_threads);

}  // namespace kobattr
