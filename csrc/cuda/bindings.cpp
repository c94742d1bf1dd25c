// kobattr._cuda: the CUDA kernels, called by kobattr/backends/cuda_backend.py with raw device pointers
// (tensor.data_ptr()) and the current stream (torch.cuda.current_stream().cuda_stream). A module of its
// own, separate from kobattr._cpu, because it is built only where nvcc is found and links the CUDA
// runtime; this file is compiled by the host compiler, the kernels by nvcc.
#include <pybind11/pybind11.h>

#include "cuda/attention_pairs.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_pointer(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

void attention_maps(uintptr_t q, uintptr_t k, uintptr_t valid, uintptr_t grams, uintptr_t row_scale, uintptr_t rows,
                    uintptr_t weights, uintptr_t out, uintptr_t alpha, uintptr_t lse, uintptr_t row_sums,
                    int64_t batch, int64_t heads, int64_t kv_heads, int64_t seq_len, int64_t head_dim,
                    int64_t n_grams, int64_t n_rows, int64_t n_weight_rows, bool causal, int64_t window,
                    double scale, bool normalize_rows, uintptr_t stream) {
    kobattr::AttentionPairsArgs args;
    args.q = as_pointer<const float>(q);
    args.k = as_pointer<const float>(k);
    args.valid = as_pointer<const uint8_t>(valid);
    args.grams = as_pointer<const float>(grams);
    args.row_scale = as_pointer<const float>(row_scale);
    args.rows = as_pointer<const int64_t>(rows);
    args.weights = as_pointer<const float>(weights);
    args.out = as_pointer<float>(out);
    args.alpha = as_pointer<float>(alpha);
    args.batch = batch, args.heads = heads, args.kv_heads = kv_heads, args.seq_len = seq_len;
    args.head_dim = head_dim, args.n_grams = n_grams, args.n_rows = n_rows, args.n_weight_rows = n_weight_rows;
    args.causal = causal, args.window = window, args.scale = static_cast<float>(scale);
    args.normalize_rows = normalize_rows;
    kobattr::attention_maps_cuda(args, as_pointer<float>(lse), as_pointer<float>(row_sums), as_pointer<void>(stream));
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
