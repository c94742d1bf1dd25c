// kobattr._cuda: the CUDA kernels, called by kobattr/backends/cuda_backend.py with raw device pointers
// (tensor.data_ptr()) and the current stream (torch.cuda.current_stream().cuda_stream). A module of its
// own, separate from kobattr._cpu, because it is built only where nvcc is found and links the CUDA
// runtime; this file is compiled by the host compiler, the kernels by nvcc.
#include <pybind11/pybind11.h>

#include "pack_args.h"

#include "cuda/attention_pairs.h"

namespace py = pybind11;

namespace {

void attention_maps(uintptr_t q, uintptr_t k, uintptr_t valid, uintptr_t grams, uintptr_t row_scale, uintptr_t rows,
                    uintptr_t weights, uintptr_t out, uintptr_t alpha, uintptr_t lse, uintptr_t row_sums,
                    int64_t batch, int64_t heads, int64_t kv_heads, int64_t seq_len, int64_t head_dim,
                    int64_t n_grams, int64_t n_rows, int64_t n_weight_rows, bool causal, int64_t window,
                    double scale, bool normalize_rows, uintptr_t stream) {
    const kobattr::AttentionPairsArgs args = kobattr::pack_attention_args(
        q, k, valid, grams, row_scale, rows, weights, out, alpha, batch, heads, kv_heads, seq_len, head_dim, n_grams,
        n_rows, n_weight_rows, causal, window, scale, normalize_rows);
    kobattr::attention_maps_cuda(args, kobattr::as_pointer<float>(lse), kobattr::as_pointer<float>(row_sums),
                                 kobattr::as_pointer<void>(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "kobattr CUDA kernels (see kobattr/backends/cuda_backend.py).";
    m.def("attention_maps", &attention_maps,
          "Enqueues the attention_maps primitive on `stream`; pointers are addresses of C-contiguous buffers on "
          "the current CUDA device, 0 for the optional rows, weights, alpha and row_sums.",
          py::arg("q"), py::arg("k"), py::arg("valid"), py::arg("grams"), py::arg("row_scale"), py::arg("rows"),
          py::arg("weights"), py::arg("out"), py::arg("alpha"), py::arg("lse"), py::arg("row_sums"), py::arg("batch"),
          py::arg("heads"), py::arg("kv_heads"), py::arg("seq_len"), py::arg("head_dim"), py::arg("n_grams"),
          py::arg("n_rows"), py::arg("n_weight_rows"), py::arg("causal"), py::arg("window"), py::arg("scale"),
          py::arg("normalize_rows"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
