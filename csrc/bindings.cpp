// kobattr._cpu: the CPU kernels, called by kobattr/backends/cpu_backend.py with raw pointers
// (tensor.data_ptr()) so that no torch headers are needed and the extension builds in seconds.
#include <pybind11/pybind11.h>

#include "pack_args.h"

#include "cpu/attention_pairs.h"

namespace py = pybind11;

namespace {

void attention_maps(uintptr_t q, uintptr_t k, uintptr_t valid, uintptr_t grams, uintptr_t row_scale, uintptr_t rows,
                    uintptr_t weights, uintptr_t out, uintptr_t alpha, int64_t batch, int64_t heads, int64_t kv_heads,
                    int64_t seq_len, int64_t head_dim, int64_t n_grams, int64_t n_rows, int64_t n_weight_rows,
                    bool causal, int64_t window, double scale, bool normalize_rows, int64_t num_threads) {
    const kobattr::AttentionPairsArgs args = kobattr::pack_attention_args(
        q, k, valid, grams, row_scale, rows, weights, out, alpha, batch, heads, kv_heads, seq_len, head_dim, n_grams,
        n_rows, n_weight_rows, causal, window, scale, normalize_rows);
    kobattr::attention_maps_cpu(args, num_threads);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "kobattr CPU kernels (see kobattr/backends/cpu_backend.py).";
    m.def("attention_maps", &attention_maps,
          "Fills out (and alpha when its pointer is not 0) with the attention_maps primitive; pointers are "
          "addresses of C-contiguous CPU buffers, 0 for the optional rows, weights and alpha.",
          py::arg("q"), py::arg("k"), py::arg("valid"), py::arg("grams"), py::arg("row_scale"), py::arg("rows"),
          py::arg("weights"), py::arg("out"), py::arg("alpha"), py::arg("batch"), py::arg("heads"),
          py::arg("kv_heads"), py::arg("seq_len"), py::arg("head_dim"), py::arg("n_grams"), py::arg("n_rows"),
          py::arg("n_weight_rows"), py::arg("causal"), py::arg("window"), py::arg("scale"),
          py::arg("normalize_rows"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
