// CUDA entry point of the attention_maps primitive (formulas in ../attention_pairs_args.h). Plain C++ so
// that the pybind11 binding compiles with the host compiler and no CUDA headers.
#pragma once

#include "attention_pairs_args.h"

namespace kobattr {

// Checks `args` (std::invalid_argument with a sentence saying what is wrong) and enqueues the kernels on
// `stream` (a cudaStream_t; 0 = the legacy default stream). Every pointer is device memory:
//   lse       (B, H, R) float32 workspace
//   row_sums  (B, M, R) float32 workspace, only when args.normalize_rows (else may be null)
// The host returns once the kernels are enqueued; launch errors are thrown as std::runtime_error.
void attention_maps_cuda(const AttentionPairsArgs& args, float* lse, float* row_sums, void* stream);

}  // namespace kobattr
