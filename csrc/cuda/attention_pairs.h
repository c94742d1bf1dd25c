// CUDA entry points of the attention_maps primitive (formulas in ../attention_pairs_args.h) and of
// row_lse. Plain C++ so that the binding compiles with the host compiler and no CUDA headers, and the
// kernels with nvcc and no torch headers.
#pragma once

#include "attention_pairs_args.h"

namespace kobattr {

// Enqueues the kernels on `stream` (a cudaStream_t; 0 = the legacy default stream) of GPU `device`.
// `args` comes from attention_maps_args (../tensor_args.h), which checked everything; its pointers and
// the workspaces are memory of that GPU:
//   lse       (B, H, R) float32
//   row_sums  (B, M, R) float32, only when args.normalize_rows (else may be null)
// Returns once the kernels are enqueued; limits of the launch (batch, grid, shared memory) are thrown
// as std::invalid_argument, CUDA errors as std::runtime_error.
void attention_maps_cuda(const AttentionPairsArgs& args, float* lse, float* row_sums, int device, void* stream);

// Enqueues the row statistics alone: lse (B, H, N) float32, memory of GPU `device`, gets
// lse[b, h, i] = log sum_j exp(cap(scale q^h_i . k^{g(h)}_j)) over the keys j visible from i (natural log;
// +inf on rows that see no key, i.e. padding rows). `args` comes from row_lse_args (../tensor_args.h):
// every row, no pair tensor. Errors as for attention_maps_cuda.
void row_lse_cuda(const AttentionPairsArgs& args, float* lse, int device, void* stream);

}  // namespace kobattr
