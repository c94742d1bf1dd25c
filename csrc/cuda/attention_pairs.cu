// CUDA kernels of the attention_maps primitive (formulas in ../attention_pairs_args.h), and of row_lse
// (the row_stats primitive), which is row_stats_kernel alone over every row.
//
// A block owns a 16 x 16 tile of (query row, key) pairs, one thread per pair: thread t has query lane
// t % 16 and key lane t / 16, so a warp covers 16 queries of 2 keys and its reads of a key's Gram
// matrix are broadcasts. q and k are staged through shared memory in chunks of head dimensions.
//   row_stats_kernel  lse_i = log sum_j exp(s_ij) per (b, h, query row), looping over all key tiles
//                     (s_ij the scaled logit, soft-capped when softcap > 0)
//   pair_kernel       alpha for the tile from lse, then kappa^T G_j kappa per pair, reduced to the
//                     output mode: map rows, row sums (for normalize_rows), or the weights contraction
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/attention_pairs.h"
#include "pair_rules.h"

namespace kobattr {
namespace {

constexpr int kTile = 16;                  // query rows and keys per tile
constexpr int kThreads = kTile * kTile;    // one thread per pair
constexpr int kChunk = 32;                 // head dimensions staged in shared memory at a time
constexpr int kPlane = kTile * (kTile + 1);  // one head's alpha tile, padded against bank conflicts

enum class Mode { kMap, kRowSums, kContract };

struct TileStage {
    float q[kTile][kChunk + 1];
    float k[kTile][kChunk + 1];
    int64_t position[kTile];  // the position of each query lane, -1 past the selected rows
};

__device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// [query at position i sees key j] (the rule of ../pair_rules.h); i < 0 marks a lane past the selected rows.
__device__ __forceinline__ bool is_visible(const AttentionPairsArgs& a, int64_t b, int64_t i, int64_t j) {
    if (i < 0 || j >= a.seq_len) return false;
    const bool valid_pair = a.valid[b * a.seq_len + i] && a.valid[b * a.seq_len + j];
    return visible(valid_pair, i, j, a.causal, a.window, a.radius);
}

// The block's query positions into stage.position (call before anything reads them).
__device__ void load_positions(const AttentionPairsArgs& a, int64_t r0, TileStage& stage) {
    if (threadIdx.x < kTile) {
        const int64_t r = r0 + threadIdx.x;
        stage.position[threadIdx.x] = r < a.n_rows ? query_position(a.rows, r) : -1;
    }
    __syncthreads();
}

// True when causality or a window hides keys [j0, j0 + kTile) from every query of the block.
__device__ bool tile_hidden(const AttentionPairsArgs& a, const TileStage& stage, int64_t j0) {
    int64_t first = INT64_MAX, last = -1;
    for (int t = 0; t < kTile; ++t) {
        const int64_t pos = stage.position[t];
        if (pos < 0) continue;
        first = min(first, pos);
        last = max(last, pos);
    }
    return keys_hidden(first, last, j0, min(j0 + kTile, a.seq_len) - 1, a.causal, a.window, a.radius);
}

// The exponential soft_cap (../pair_rules.h) uses on the GPU.
struct DeviceExp {
    __device__ __forceinline__ float operator()(float x) const { return expf(x); }
};

// s = cap(scale * q^h_{position[t % 16]} . k^{g(h)}_{j0 + t / 16}) (soft_cap of ../pair_rules.h), every
// thread of the block taking part; both kernels take their logits from here, so lse and alpha agree.
__device__ float tile_score(const AttentionPairsArgs& a, int64_t b, int64_t h, int64_t j0, TileStage& stage) {
    const int query_lane = threadIdx.x % kTile, key_lane = threadIdx.x / kTile;
    const int64_t N = a.seq_len, Dh = a.head_dim, g = h / (a.heads / a.kv_heads);
    float dot = 0.0f;
    for (int64_t d0 = 0; d0 < Dh; d0 += kChunk) {
        for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
            const int lane = e / kChunk, col = e % kChunk;
            const int64_t d = d0 + col, pos = stage.position[lane], key = j0 + lane;
            stage.q[lane][col] = (pos >= 0 && d < Dh) ? a.q[((b * a.heads + h) * N + pos) * Dh + d] : 0.0f;
            stage.k[lane][col] = (key < N && d < Dh) ? a.k[((b * a.kv_heads + g) * N + key) * Dh + d] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int c = 0; c < kChunk; ++c) dot += stage.q[query_lane][c] * stage.k[key_lane][c];
        __syncthreads();
    }
    return soft_cap(dot * a.scale, a.softcap, DeviceExp{});
}

// lse[b, h, r] = m + log(sum_j exp(s_rj - m)) over the visible keys j (+inf when none is visible).
// Grid: (query tiles * H, B). Each thread keeps a running (max, sum) over its key lane, then the 16
// lanes of each query are merged.
__global__ void __launch_bounds__(kThreads) row_stats_kernel(AttentionPairsArgs a, float* lse) {
    __shared__ TileStage stage;
    __shared__ float lane_max[kTile][kTile], lane_sum[kTile][kTile];  // [key lane][query lane]
    const int64_t n_query_tiles = ceil_div(a.n_rows, kTile);
    const int64_t query_tile = blockIdx.x % n_query_tiles, h = blockIdx.x / n_query_tiles, b = blockIdx.y;
    const int query_lane = threadIdx.x % kTile, key_lane = threadIdx.x / kTile;
    load_positions(a, query_tile * kTile, stage);
    const int64_t pos = stage.position[query_lane];
    float running_max = -INFINITY, running_sum = 0.0f;
    for (int64_t j0 = 0; j0 < a.seq_len; j0 += kTile) {
        if (tile_hidden(a, stage, j0)) continue;  // the same for the whole block
        const float s = tile_score(a, b, h, j0, stage);
        if (!is_visible(a, b, pos, j0 + key_lane)) continue;
        if (s > running_max) {
            running_sum = running_sum * expf(running_max - s) + 1.0f;
            running_max = s;
        } else {
            running_sum += expf(s - running_max);
        }
    }
    lane_max[key_lane][query_lane] = running_max;
    lane_sum[key_lane][query_lane] = running_sum;
    __syncthreads();
    const int64_t r = query_tile * kTile + query_lane;
    if (key_lane != 0 || r >= a.n_rows) return;
    float row_max = -INFINITY;
    for (int t = 0; t < kTile; ++t) row_max = fmaxf(row_max, lane_max[t][query_lane]);
    float row_sum = 0.0f;
    for (int t = 0; t < kTile; ++t)
        if (lane_sum[t][query_lane] > 0.0f) row_sum += lane_sum[t][query_lane] * expf(lane_max[t][query_lane] - row_max);
    lse[(b * a.heads + h) * a.n_rows + r] = row_sum > 0.0f ? row_max + logf(row_sum) : INFINITY;
}

// Grid: (query tiles * key tiles, B); dynamic shared memory: H * kPlane floats of alpha.
// map[m, i, j] = row_scale[i, m] * sqrt(max(kappa_ij^T G_j,m kappa_ij, 0)), then per mode:
//   kMap       out[b, m, r, j] = map
//   kRowSums   row_sums[b, m, r] += sum_j map            (atomics: one per row and block)
//   kContract  out[b, m, k, j] += sum_i w[b, k, i] map   (w divided by the row sum when normalising)
// and alpha[b, h, r, j] when write_alpha.
__global__ void __launch_bounds__(kThreads)
pair_kernel(AttentionPairsArgs a, const float* lse, float* row_sums, Mode mode, bool write_alpha) {
    extern __shared__ float alpha_tile[];  // [h][key lane][query lane (padded)]
    __shared__ TileStage stage;
    __shared__ float staged[kTile][kTile + 1];  // [key lane][query lane] for coalesced writes
    const int64_t H = a.heads, N = a.seq_len, M = a.n_grams, R = a.n_rows;
    const int64_t n_key_tiles = ceil_div(N, kTile);
    const int64_t r0 = (blockIdx.x / n_key_tiles) * kTile, j0 = (blockIdx.x % n_key_tiles) * kTile, b = blockIdx.y;
    const int query_lane = threadIdx.x % kTile, key_lane = threadIdx.x / kTile;
    // For coalesced writes thread t instead stores row t / 16, key t % 16 of a tile.
    const int write_row = threadIdx.x / kTile, write_key = threadIdx.x % kTile;
    const bool in_output = r0 + write_row < R && j0 + write_key < N;
    load_positions(a, r0, stage);

    if (tile_hidden(a, stage, j0)) {
        if (write_alpha && in_output)
            for (int64_t h = 0; h < H; ++h) a.alpha[((b * H + h) * R + r0 + write_row) * N + j0 + write_key] = 0.0f;
        if (mode == Mode::kMap && in_output)
            for (int64_t m = 0; m < M; ++m) a.out[((b * M + m) * R + r0 + write_row) * N + j0 + write_key] = 0.0f;
        return;
    }

    const int64_t r = r0 + query_lane, pos = stage.position[query_lane], j = j0 + key_lane;
    const bool visible = is_visible(a, b, pos, j);
    const int slot = key_lane * (kTile + 1) + query_lane;
    for (int64_t h = 0; h < H; ++h) {
        const float s = tile_score(a, b, h, j0, stage);
        alpha_tile[h * kPlane + slot] = visible ? expf(s - lse[(b * H + h) * R + r]) : 0.0f;
    }
    __syncthreads();
    if (write_alpha && in_output)
        for (int64_t h = 0; h < H; ++h)
            a.alpha[((b * H + h) * R + r0 + write_row) * N + j0 + write_key] =
                alpha_tile[h * kPlane + write_key * (kTile + 1) + write_row];

    for (int64_t m = 0; m < M; ++m) {
        float quad = 0.0f;
        if (visible) {
            const float* G = a.grams + ((b * N + j) * M + m) * (H + 1) * (H + 1);
            quad = head_quadratic_form<float>(
                H, [&](int64_t r, int64_t s) { return symmetric_coefficient(G, H, r, s); },
                [&](int64_t h) { return alpha_tile[h * kPlane + slot]; });
            if (pos == j) quad += residual_term(G, H, alpha_tile + slot, kPlane);
        }
        const float value = map_value(quad, visible ? a.row_scale[(b * N + pos) * M + m] : 0.0f, visible);

        if (mode == Mode::kContract) {
            float inverse_sum = 1.0f;  // rows summing to 0 hold only zeros: any finite factor keeps them 0
            if (a.normalize_rows && r < R) {
                const float sum = row_sums[(b * M + m) * R + r];
                inverse_sum = sum > 0.0f ? 1.0f / sum : 1.0f;
            }
            for (int64_t k = 0; k < a.n_weight_rows; ++k) {
                float contribution = r < R ? a.weights[(b * a.n_weight_rows + k) * N + pos] * inverse_sum * value : 0.0f;
                // The 16 query lanes of a key are 16 consecutive lanes of one warp.
                for (int offset = kTile / 2; offset > 0; offset /= 2)
                    contribution += __shfl_xor_sync(0xffffffffu, contribution, offset);
                if (query_lane == 0 && j < N) atomicAdd(a.out + ((b * M + m) * a.n_weight_rows + k) * N + j, contribution);
            }
            continue;
        }
        staged[key_lane][query_lane] = value;
        __syncthreads();
        if (mode == Mode::kMap && in_output) {
            a.out[((b * M + m) * R + r0 + write_row) * N + j0 + write_key] = staged[write_key][write_row];
        } else if (mode == Mode::kRowSums && key_lane == 0 && r < R) {
            float sum = 0.0f;
            for (int t = 0; t < kTile; ++t) sum += staged[t][query_lane];
            atomicAdd(row_sums + (b * M + m) * R + r, sum);
        }
        __syncthreads();
    }
}

// `fn` names the Python function in the messages ("attention_maps", "row_lse").
void check_cuda(const char* fn, cudaError_t status, const std::string& what) {
    if (status != cudaSuccess)
        throw std::runtime_error(std::string(fn) + ": " + what + " failed: " + cudaGetErrorString(status) + ".");
}

// Limits of this launch configuration, beyond what the tensor checks of ../tensor_args.h cover.
void require(const char* fn, bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(std::string(fn) + ": " + message);
}

// The limits of the grids both entry points launch: (query tiles * H, B) for row_stats_kernel and
// (query tiles * key tiles, B) for pair_kernel (with_pairs).
void require_grid(const char* fn, const AttentionPairsArgs& a, bool with_pairs) {
    require(fn, a.batch <= 65535, "the CUDA kernel handles at most 65535 batch elements per call, got B=" +
                                      std::to_string(a.batch) + "; split the batch.");
    const int64_t query_tiles = (a.n_rows + kTile - 1) / kTile, key_tiles = (a.seq_len + kTile - 1) / kTile;
    require(fn, query_tiles * a.heads <= INT32_MAX && (!with_pairs || query_tiles * key_tiles <= INT32_MAX),
            "the problem has too many tiles for one CUDA grid (R=" + std::to_string(a.n_rows) +
                ", N=" + std::to_string(a.seq_len) + "); select fewer rows per call.");
}

// Makes `device` current for the launches and restores the caller's device afterwards.
class DeviceGuard {
  public:
    DeviceGuard(const char* fn, int device) {
        check_cuda(fn, cudaGetDevice(&previous_), "cudaGetDevice");
        if (device != previous_) check_cuda(fn, cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceGuard() { cudaSetDevice(previous_); }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

  private:
    int previous_ = 0;
};

}  // namespace

void attention_maps_cuda(const AttentionPairsArgs& a, float* lse, float* row_sums, int device, void* stream_handle) {
    constexpr const char* fn = "attention_maps";
    require_grid(fn, a, true);
    const int64_t query_tiles = (a.n_rows + kTile - 1) / kTile, key_tiles = (a.seq_len + kTile - 1) / kTile;
    const DeviceGuard guard(fn, device);
    cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    if (a.weights)  // the contraction accumulates into out; over no rows it stays 0
        check_cuda(fn,
                   cudaMemsetAsync(a.out, 0, sizeof(float) * a.batch * a.n_grams * a.n_weight_rows * a.seq_len, stream),
                   "clearing out");
    if (a.n_rows == 0) return;

    const size_t alpha_bytes = size_t(a.heads) * kPlane * sizeof(float);
    int max_bytes = 0;
    check_cuda(fn, cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "reading the shared memory limit");
    const size_t static_bytes = sizeof(TileStage) + sizeof(float) * kTile * (kTile + 1);
    require(fn, alpha_bytes + static_bytes <= size_t(max_bytes),
            "H=" + std::to_string(a.heads) + " heads need " + std::to_string(alpha_bytes + static_bytes) +
                " bytes of shared memory per block but this GPU allows " + std::to_string(max_bytes) + ".");
    check_cuda(fn, cudaFuncSetAttribute(pair_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(alpha_bytes)),
               "raising the shared memory limit of pair_kernel");

    if (a.normalize_rows)
        check_cuda(fn, cudaMemsetAsync(row_sums, 0, sizeof(float) * a.batch * a.n_grams * a.n_rows, stream),
                   "clearing row_sums");

    const dim3 stats_grid(unsigned(query_tiles * a.heads), unsigned(a.batch));
    row_stats_kernel<<<stats_grid, kThreads, 0, stream>>>(a, lse);
    check_cuda(fn, cudaGetLastError(), "launching row_stats_kernel");

    const dim3 pair_grid(unsigned(query_tiles * key_tiles), unsigned(a.batch));
    const bool want_alpha = a.alpha != nullptr;
    if (!a.weights) {
        pair_kernel<<<pair_grid, kThreads, alpha_bytes, stream>>>(a, lse, row_sums, Mode::kMap, want_alpha);
    } else if (!a.normalize_rows) {
        pair_kernel<<<pair_grid, kThreads, alpha_bytes, stream>>>(a, lse, row_sums, Mode::kContract, want_alpha);
    } else {
        // The contraction divides by the row sums, so they need a sweep of their own first.
        pair_kernel<<<pair_grid, kThreads, alpha_bytes, stream>>>(a, lse, row_sums, Mode::kRowSums, want_alpha);
        check_cuda(fn, cudaGetLastError(), "launching pair_kernel (row sums)");
        pair_kernel<<<pair_grid, kThreads, alpha_bytes, stream>>>(a, lse, row_sums, Mode::kContract, false);
    }
    check_cuda(fn, cudaGetLastError(), "launching pair_kernel");
}

void row_lse_cuda(const AttentionPairsArgs& a, float* lse, int device, void* stream_handle) {
    constexpr const char* fn = "row_lse";
    require_grid(fn, a, false);
    const DeviceGuard guard(fn, device);
    const int64_t query_tiles = (a.n_rows + kTile - 1) / kTile;
    const dim3 grid(unsigned(query_tiles * a.heads), unsigned(a.batch));
    // with every row selected (n_rows = N), row_stats_kernel writes lse[(b * H + h) * N + i]: the (B, H, N) output
    row_stats_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(a, lse);
    check_cuda(fn, cudaGetLastError(), "launching row_stats_kernel");
}

}  // namespace kobattr
