// CPU entry point of the attention_maps primitive (formulas in ../attention_pairs_args.h).
#pragma once

#include "attention_pairs_args.h"

namespace kobattr {

// Checks `args` (std::invalid_argument with a sentence saying what is wrong) and fills args.out and,
// when set, args.alpha, using `num_threads` OpenMP threads (0 = the OpenMP default).
void attention_maps_cpu(const AttentionPairsArgs& args, int64_t num_threads);

}  // namespace kobattr
