// kobattr._cuda: the CUDA kernels, called by kobattr/backends/kernel_args.py (compiled_attention_maps,
// compiled_row_lse) with tensors and the current stream (torch.cuda.current_stream().cuda_stream). A module of its own,
// separate from kobattr._cpu, because it is built only where nvcc is found and links the CUDA runtime;
// this file is compiled by the host compiler against torch, the kernels by nvcc without it. The stream
// comes from Python because the binding links only the torch libraries that CPU builds of torch have too.
#include <torch/csrc/utils/pybind.h>

#include <cstdint>

#include "cuda/attention_pairs.h"
#include "tensor_args.h"

namespace py = pybind11;

namespace {

void attention_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid, const at::Tensor& grams,
                    const at::Tensor& row_scale, const std::optional<at::Tensor>& rows,
                    const std::optional<at::Tensor>& weights, const at::Tensor& out,
                    const std::optional<at::Tensor>& alpha, bool causal, int64_t window, int64_t radius,
                    double scale, double softcap, bool normalize_rows, uintptr_t stream) {
    const kobattr::AttentionPairsArgs args = kobattr::attention_maps_args(
        q, k, valid, grams, row_scale, rows, weights, out, alpha, causal, window, radius, scale, softcap,
        normalize_rows, at::kCUDA);
    // Workspaces: the row log-sum-exp, and the row sums that normalize_rows divides by.
    const at::Tensor lse = q.new_empty({args.batch, args.heads, args.n_rows});
    const at::Tensor row_sums = normalize_rows ? q.new_empty({args.batch, args.n_grams, args.n_rows}) : at::Tensor();
    kobattr::attention_maps_cuda(args, lse.data_ptr<float>(), normalize_rows ? row_sums.data_ptr<float>() : nullptr,
                                 q.device().index(), reinterpret_cast<void*>(stream));
}

void row_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid, const at::Tensor& lse, bool causal,
             int64_t window, int64_t radius, double scale, double softcap, uintptr_t stream) {
    const kobattr::AttentionPairsArgs args =
        kobattr::row_lse_args(q, k, valid, lse, causal, window, radius, scale, softcap, at::kCUDA);
    kobattr::row_lse_cuda(args, lse.data_ptr<float>(), q.device().index(), reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "kobattr CUDA kernels (see kobattr/backends/kernel_args.py).";
    m.attr("device_type") = "cuda";
    m.def("attention_maps", &attention_maps,
          "Enqueues the attention_maps primitive of kobattr/backends/base.py on `stream` (a cudaStream_t of q's "
          "GPU): contiguous tensors on one GPU, q, k, grams, row_scale, weights, out, alpha float32, valid bool, "
          "rows int64.",
          py::arg("q"), py::arg("k"), py::arg("valid"), py::arg("grams"), py::arg("row_scale"), py::arg("rows"),
          py::arg("weights"), py::arg("out"), py::arg("alpha"), py::arg("causal"), py::arg("window"),
          py::arg("radius"), py::arg("scale"), py::arg("softcap"), py::arg("normalize_rows"), py::arg("stream"),
          py::call_guard<py::gil_scoped_release>());
    m.def("row_lse", &row_lse,
          "Enqueues the row_stats primitive of kobattr/backends/base.py on `stream` (a cudaStream_t of q's GPU): "
          "lse[b, h, i] = log sum_j exp(cap(scale q^h_i . k_j)) over the keys j visible from i into lse (B, H, N) "
          "(natural log; +inf on rows that see no key, i.e. padding rows). Contiguous tensors on one GPU: q "
          "(B, H, N, Dh), k (B, KV, N, Dh) and lse float32, valid (B, N) bool.",
          py::arg("q"), py::arg("k"), py::arg("valid"), py::arg("lse"), py::arg("causal"), py::arg("window"),
          py::arg("radius"), py::arg("scale"), py::arg("softcap"), py::arg("stream"),
          py::call_guard<py::gil_scoped_release>());
}
