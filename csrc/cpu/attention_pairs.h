// CPU entry points of the attention_maps primitive (formulas in ../attention_pairs_args.h) and of row_lse.
#pragma once

#include <string>
#include <vector>

#include "attention_pairs_args.h"

// The kernel is also built for AVX2 and AVX-512 (attention_pairs_x86_64_v3.cpp, _v4.cpp) where GCC targets
// x86-64; clang has no "#pragma GCC target", so it builds the baseline alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KOBATTR_X86_ISAS 1
#else
#define KOBATTR_X86_ISAS 0
#endif

namespace kobattr {

// Fills args.out and, when set, args.alpha, using `num_threads` OpenMP threads (0 = the OpenMP default).
// `args` comes from attention_maps_args (../tensor_args.h), which checked everything.
void attention_maps_cpu(const AttentionPairsArgs& args, int64_t num_threads);

// Fills lse (B, H, N) float32 with lse[b, h, i] = log sum_j exp(cap(scale q^h_i . k^{g(h)}_j)) over the keys j
// visible from i (natural log; +inf on rows that see no key, i.e. padding rows), the first pass of
// attention_maps_cpu alone. `args` comes from row_lse_args (../tensor_args.h): every row, no pair tensor.
void row_lse_cpu(const AttentionPairsArgs& args, float* lse, int64_t num_threads);

// The instruction sets this build has and this processor runs, widest first ("x86-64-v4", "x86-64-v3",
// "baseline"); the one the calls above use (the widest, unless use_isa chose another); use_isa(name) makes
// every later call use `name` and returns the previous choice (std::invalid_argument for one not in
// supported_isas()). For tests and benchmarks of each build.
std::vector<std::string> supported_isas();
std::string current_isa();
std::string use_isa(const std::string& name);

// For the map (no weights): pass 1 keeps the exponentials of one query tile and every head, H * N * 64 floats per
// thread, so that pass 2 needs neither q.k nor exp again, when they fit `bytes` per thread (default 512 MiB;
// 0 turns it off). Returns the previous limit; std::invalid_argument for a negative one.
int64_t set_cache_limit(int64_t bytes);

}  // namespace kobattr
