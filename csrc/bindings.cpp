// kobattr._cpu: the CPU kernels, called by kobattr/backends/kernel_args.py (compiled_attention_maps,
// compiled_row_lse) with tensors, checked by tensor_args.h before the kernel sees their data pointers.
#include <torch/csrc/utils/pybind.h>

#include "cpu/attention_pairs.h"
#include "tensor_args.h"

namespace py = pybind11;

namespace {

void attention_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid, const at::Tensor& grams,
                    const at::Tensor& row_scale, const std::optional<at::Tensor>& rows,
                    const std::optional<at::Tensor>& weights, const at::Tensor& out,
                    const std::optional<at::Tensor>& alpha, bool causal, int64_t window, int64_t radius,
                    double scale, double softcap, bool normalize_rows, int64_t num_threads,
                    const std::optional<at::Tensor>& row_lse, const std::optional<at::Tensor>& row_lse_out) {
    kobattr::AttentionPairsArgs args = kobattr::attention_maps_args(
        q, k, valid, grams, row_scale, rows, weights, out, alpha, causal, window, radius, scale, softcap,
        normalize_rows, at::kCPU);
    kobattr::given_row_lse(args, row_lse, q);
    kobattr::row_lse_output(args, row_lse_out, q);
    kobattr::attention_maps_cpu(args, num_threads);
}

void row_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid, const at::Tensor& lse, bool causal,
             int64_t window, int64_t radius, double scale, double softcap, int64_t num_threads) {
    const kobattr::AttentionPairsArgs args =
        kobattr::row_lse_args(q, k, valid, lse, causal, window, radius, scale, softcap, at::kCPU);
    kobattr::row_lse_cpu(args, lse.data_ptr<float>(), num_threads);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "kobattr CPU kernels (see kobattr/backends/kernel_args.py).";
    m.attr("device_type") = "cpu";
    m.def("attention_maps", &attention_maps,
          "Fills out (and alpha unless None) with the attention_maps primitive of kobattr/backends/base.py on "
          "contiguous CPU tensors: q, k, grams, row_scale, weights, out, alpha float32, valid bool, rows int64; "
          "num_threads OpenMP threads (0 = the OpenMP default); row_lse (B, H, N) float32 or None: every row's "
          "log-sum-exp as row_lse gives it, which spares the kernel its first pass; row_lse_out (B, H, N) float32 "
          "or None (only with rows=None): receives every row's log-sum-exp (+inf where a row sees no key).",
          py::arg("q"), py::arg("k"), py::arg("valid"), py::arg("grams"), py::arg("row_scale"), py::arg("rows"),
          py::arg("weights"), py::arg("out"), py::arg("alpha"), py::arg("causal"), py::arg("window"),
          py::arg("radius"), py::arg("scale"), py::arg("softcap"), py::arg("normalize_rows"), py::arg("num_threads"),
          py::arg("row_lse") = py::none(), py::arg("row_lse_out") = py::none(),
          py::call_guard<py::gil_scoped_release>());
    m.def("row_lse", &row_lse,
          "Fills lse (B, H, N) with the row_stats primitive of kobattr/backends/base.py: lse[b, h, i] = log sum_j "
          "exp(cap(scale q^h_i . k_j)) over the keys j visible from i (natural log; +inf on rows that see no key, "
          "i.e. padding rows). Contiguous CPU tensors: q (B, H, N, Dh), k (B, KV, N, Dh) and lse float32, valid "
          "(B, N) bool; num_threads OpenMP threads (0 = the OpenMP default).",
          py::arg("q"), py::arg("k"), py::arg("valid"), py::arg("lse"), py::arg("causal"), py::arg("window"),
          py::arg("radius"), py::arg("scale"), py::arg("softcap"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>());
    m.def("set_cache_limit", &kobattr::set_cache_limit,
          "Bytes per thread the map may keep the first pass's exponentials in (H * N * 64 floats; default 512 MiB, "
          "0 = recompute them in the second pass); returns the previous limit.",
          py::arg("bytes"));
    m.def("isas", &kobattr::supported_isas,
          "The instruction sets this build of the kernel has and this processor runs, widest first.");
    m.def("isa", &kobattr::current_isa, "The instruction set the kernel runs with now.");
    m.def("use_isa", &kobattr::use_isa,
          "Makes every later call run the kernel built for `name` (one of isas()); returns the previous one. For "
          "tests and benchmarks of each build.",
          py::arg("name"));
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
