// The tensor boundary of kobattr._cpu and kobattr._cuda: attention_maps_args checks every tensor of an
// attention_maps call (dtype, device, contiguity, shape, and the values the kernels index with) and
// packs pointers and sizes into the AttentionPairsArgs the kernels take; row_lse_args does the same for
// a row_lse call, whose AttentionPairsArgs carry only the attention pattern (attention_args, shared). A
// failed check raises ValueError in Python with a sentence naming the function and the argument, what it
// must be and what it is.
//
// Only device-independent torch headers: both extensions link the libraries every torch build has.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "attention_pairs_args.h"

namespace kobattr {

// One axis of an expected shape: its letter in the formulas and its size (kAnySize: taken from the tensor).
struct Axis {
    const char* name;
    int64_t size;
};
constexpr int64_t kAnySize = -1;

// The name torch uses in Python (torch.float32), not the C++ one (Float).
inline const char* dtype_name(at::ScalarType dtype) {
    switch (dtype) {
        case at::kFloat: return "float32";
        case at::kDouble: return "float64";
        case at::kHalf: return "float16";
        case at::kBFloat16: return "bfloat16";
        case at::kLong: return "int64";
        case at::kInt: return "int32";
        case at::kShort: return "int16";
        case at::kChar: return "int8";
        case at::kByte: return "uint8";
        case at::kBool: return "bool";
        default: return c10::toString(dtype);
    }
}

// "(B=2, KV, N=7, Dh=16)": the expected shape, with the sizes that are already known.
inline std::string shape_text(std::initializer_list<Axis> axes) {
    std::string text = "(";
    for (const Axis& axis : axes) {
        if (text.size() > 1) text += ", ";
        text += axis.name;
        if (axis.size != kAnySize) text += "=" + std::to_string(axis.size);
    }
    return text + ")";
}

inline std::string describe(const at::Tensor& t) {
    if (!t.defined()) return "an undefined tensor";
    return c10::str(t.is_contiguous() ? "a contiguous " : "a non-contiguous ", dtype_name(t.scalar_type()),
                    " tensor of shape ", t.sizes(), " on ", t.device());
}

// `fn` names the Python function in the message ("attention_maps", "row_lse").
inline void check_tensor(const char* fn, const at::Tensor& t, const char* name, at::ScalarType dtype,
                         const at::Device& device, std::initializer_list<Axis> axes) {
    bool ok = t.defined() && t.scalar_type() == dtype && t.device() == device && t.is_contiguous() &&
              t.dim() == static_cast<int64_t>(axes.size());
    int64_t d = 0;
    for (const Axis& axis : axes) {
        ok = ok && (axis.size == kAnySize || t.size(d) == axis.size);
        ++d;
    }
    TORCH_CHECK_VALUE(ok, fn, ": ", name, " must be a contiguous ", dtype_name(dtype), " tensor of shape ",
                      shape_text(axes), " on ", device, "; got ", describe(t), ".");
}

// The size of axis `d`, or kAnySize when `t` does not have that axis (its own check then fails).
inline int64_t size_or_any(const at::Tensor& t, int64_t d) { return t.defined() && t.dim() > d ? t.size(d) : kAnySize; }

// Checks the attention pattern of a call of `fn` (q, k, valid and the options every primitive shares) and
// returns the kernels' view of it: all N rows (rows null, n_rows = N), no pair tensor (n_grams = 0).
// `device_type` is the one device type this extension runs on.
inline AttentionPairsArgs attention_args(const char* fn, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& valid, bool causal, int64_t window, int64_t radius,
                                         double scale, double softcap, at::DeviceType device_type) {
    TORCH_CHECK_VALUE(q.defined() && q.device().type() == device_type, fn, ": this extension runs on ",
                      c10::DeviceTypeName(device_type, true), " tensors, but q is ", describe(q), ".");
    const at::Device device = q.device();
    check_tensor(fn, q, "q", at::kFloat, device, {{"B", kAnySize}, {"H", kAnySize}, {"N", kAnySize}, {"Dh", kAnySize}});
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dh = q.size(3);
    TORCH_CHECK_VALUE(B >= 1 && H >= 1 && N >= 1 && Dh >= 1, fn, ": q must have at least one batch "
                      "element, head, token and head dimension; got shape ", q.sizes(), ".");
    TORCH_CHECK_VALUE(N < (int64_t(1) << 31), fn, ": the sequence length N must be below 2^31; got N=", N, ".");
    check_tensor(fn, k, "k", at::kFloat, device, {{"B", B}, {"KV", kAnySize}, {"N", N}, {"Dh", Dh}});
    const int64_t KV = k.size(1);
    TORCH_CHECK_VALUE(KV >= 1 && H % KV == 0, fn, ": the number of query heads H=", H,
                      " must be a multiple of the number of key heads KV=", KV,
                      " (grouped-query attention shares each key head among H / KV query heads).");
    check_tensor(fn, valid, "valid", at::kBool, device, {{"B", B}, {"N", N}});
    TORCH_CHECK_VALUE(window >= 0, fn, ": the sliding window must be 0 (none) or positive; got ", window, ".");
    TORCH_CHECK_VALUE(radius >= 0, fn, ": the symmetric window radius must be 0 (none) or positive; got ", radius,
                      ".");
    TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": the softmax scale must be a finite number; got ", scale, ".");
    const float softcap32 = static_cast<float>(softcap);  // the kernels cap in float32
    TORCH_CHECK_VALUE(softcap == 0 || (softcap > 0 && softcap32 > 0 && std::isfinite(softcap32)), fn,
                      ": the logit soft-cap must be 0 (none) or a positive number within the float32 range; got ",
                      softcap, ".");

    AttentionPairsArgs a;
    a.q = q.data_ptr<float>();
    a.k = k.data_ptr<float>();
    a.valid = reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>());
    a.batch = B, a.heads = H, a.kv_heads = KV, a.seq_len = N, a.head_dim = Dh, a.n_rows = N;
    a.causal = causal, a.window = window, a.radius = radius, a.scale = static_cast<float>(scale);
    a.softcap = softcap32;
    return a;
}

// Checks every argument of attention_maps (the outputs out and alpha too, which the caller allocates)
// and returns the kernels' view of them.
inline AttentionPairsArgs attention_maps_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid,
                                              const at::Tensor& grams, const at::Tensor& row_scale,
                                              const std::optional<at::Tensor>& rows,
                                              const std::optional<at::Tensor>& weights, const at::Tensor& out,
                                              const std::optional<at::Tensor>& alpha, bool causal, int64_t window,
                                              int64_t radius, double scale, double softcap, bool normalize_rows,
                                              at::DeviceType device_type) {
    constexpr const char* fn = "attention_maps";
    AttentionPairsArgs a = attention_args(fn, q, k, valid, causal, window, radius, scale, softcap, device_type);
    const at::Device device = q.device();
    const int64_t B = a.batch, H = a.heads, N = a.seq_len;
    const int64_t M = size_or_any(grams, 2);
    check_tensor(fn, grams, "grams", at::kFloat, device,
                 {{"B", B}, {"N", N}, {"M", kAnySize}, {"H+1", H + 1}, {"H+1", H + 1}});
    TORCH_CHECK_VALUE(M >= 1, "attention_maps: grams must hold at least one Gram matrix per key (M >= 1); got shape ",
                      grams.sizes(), ".");
    check_tensor(fn, row_scale, "row_scale", at::kFloat, device, {{"B", B}, {"N", N}, {"M", M}});

    int64_t R = N;
    if (rows) {
        check_tensor(fn, *rows, "rows", at::kLong, device, {{"R", kAnySize}});
        R = rows->size(0);
        if (R > 0) {
            const int64_t low = rows->min().item<int64_t>(), high = rows->max().item<int64_t>();
            TORCH_CHECK_VALUE(low >= 0 && high < N, "attention_maps: rows must lie in [0, N=", N,
                              "), got values from ", low, " to ", high, ".");
        }
    }
    int64_t K = 0;
    if (weights) {
        K = size_or_any(*weights, 1);
        check_tensor(fn, *weights, "weights", at::kFloat, device, {{"B", B}, {"K", kAnySize}, {"N", N}});
        TORCH_CHECK_VALUE(K >= 1, "attention_maps: weights must have at least one row (K >= 1); got shape ",
                          weights->sizes(), ".");
    }
    TORCH_CHECK_VALUE(!normalize_rows || weights, "attention_maps: normalize_rows only applies to the weights "
                      "contraction; pass weights too.");
    if (weights)
        check_tensor(fn, out, "out", at::kFloat, device, {{"B", B}, {"M", M}, {"K", K}, {"N", N}});
    else
        check_tensor(fn, out, "out", at::kFloat, device, {{"B", B}, {"M", M}, {"R", R}, {"N", N}});
    if (alpha) check_tensor(fn, *alpha, "alpha", at::kFloat, device, {{"B", B}, {"H", H}, {"R", R}, {"N", N}});

    a.grams = grams.data_ptr<float>();
    a.row_scale = row_scale.data_ptr<float>();
    a.rows = rows ? rows->data_ptr<int64_t>() : nullptr;
    a.weights = weights ? weights->data_ptr<float>() : nullptr;
    a.out = out.data_ptr<float>();
    a.alpha = alpha ? alpha->data_ptr<float>() : nullptr;
    a.n_grams = M, a.n_rows = R, a.n_weight_rows = K;
    a.normalize_rows = normalize_rows;
    return a;
}

// Checks an optional precomputed row log-sum-exp (B, H, N) float32 for attention_maps and hands it to the kernel.
inline void given_row_lse(AttentionPairsArgs& a, const std::optional<at::Tensor>& row_lse, const at::Tensor& q) {
    if (!row_lse) return;
    check_tensor("attention_maps", *row_lse, "row_lse", at::kFloat, q.device(),
                 {{"B", a.batch}, {"H", a.heads}, {"N", a.seq_len}});
    a.row_lse = row_lse->data_ptr<float>();
}

// Checks an optional output for the row log-sum-exp of every row (B, H, N) float32 (only without rows).
inline void row_lse_output(AttentionPairsArgs& a, const std::optional<at::Tensor>& row_lse_out, const at::Tensor& q) {
    if (!row_lse_out) return;
    TORCH_CHECK_VALUE(a.rows == nullptr, "attention_maps: row_lse_out holds every row's statistics, so it needs "
                      "all rows (rows=None).");
    check_tensor("attention_maps", *row_lse_out, "row_lse_out", at::kFloat, q.device(),
                 {{"B", a.batch}, {"H", a.heads}, {"N", a.seq_len}});
    a.row_lse_out = row_lse_out->data_ptr<float>();
}

// Checks every argument of row_lse, the output lse (B, H, N) float32 too, and returns the kernels' view of
// the attention pattern (every row, no pair tensor); the caller hands lse.data_ptr<float>() to the kernel.
inline AttentionPairsArgs row_lse_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid,
                                       const at::Tensor& lse, bool causal, int64_t window, int64_t radius,
                                       double scale, double softcap, at::DeviceType device_type) {
    constexpr const char* fn = "row_lse";
    const AttentionPairsArgs a = attention_args(fn, q, k, valid, causal, window, radius, scale, softcap, device_type);
    check_tensor(fn, lse, "lse", at::kFloat, q.device(), {{"B", a.batch}, {"H", a.heads}, {"N", a.seq_len}});
    return a;
}

}  // namespace kobattr
