// fastface._C: the one pybind11 module for every C++ CPU kernel.
//
// Each kernel lives in its own csrc/<op>.cpp and exposes plain functions over numpy buffers (calling
// convention and validation helpers: common.h). This file only declares them and binds them, one
// section per kernel; the typed Python wrappers are in fastface/_cpp.py.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#if defined(__x86_64__) || defined(_M_X64)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common.h"

namespace py = pybind11;

namespace fastface {

// ---- runtime CPU features ----------------------------------------------------------------------

static CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();
  f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  f.avx512_bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
  f.avx512_vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
#if defined(__linux__)
  // AMX needs CPUID support *and* the kernel's permission for this process to use the tile state.
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const bool cpuid_amx = ((edx >> 22) & 1) && ((edx >> 24) & 1);  // AMX-BF16, AMX-TILE
  if (cpuid_amx && f.avx512_bf16) {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    f.amx_bf16 = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }
#endif
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect_cpu_features();
  return f;
}

// ---- kernels (one block per csrc/<op>.cpp) -------------------------------------------------------

// grouped_moe.cpp
py::tuple grouped_moe(const py::object& x, const py::object& group_ids, const py::object& router_weight,
                      const py::object& gate_up_proj, const py::object& down_proj, int64_t top_k,
                      const py::object& shared_gate_up_proj, const py::object& shared_down_proj,
                      bool normalize_topk, const std::string& activation, bool return_router_logits);
py::object moe_experts(const py::object& x, const py::object& top_k_index, const py::object& top_k_weights,
                       const py::object& gate_up_proj, const py::object& down_proj, const std::string& activation);

// attention.cpp
void attention(const py::object& q, const py::object& k, const py::object& v, const py::object& mask,
               const py::object& out, double scale);
void attention_set_simd(bool enabled);
void attention_set_bf16_dot(bool enabled);

// rotary.cpp
void rotary(const py::object& x, const py::object& cos, const py::object& sin, const py::object& out);
void rotary_set_simd(bool enabled);

// int8_linear.cpp
void int8_linear(const py::object& x, const py::object& weight, const py::object& scale, const py::object& sums,
                 const py::object& bias, const py::object& out);
void int8_linear_set_simd(bool enabled);
void int8_linear_set_products(const std::string& path);
std::string int8_linear_products();

// gemm.cpp (the matmul core of grouped_moe.cpp)
void set_matmul_path(const std::string& path);
std::string matmul_path(bool bf16);

// masked_decode.cpp
py::tuple masked_decode_step(const py::object& logits, const py::object& tokens, const py::object& masked,
                             const py::object& u, int64_t step, int64_t steps, double guidance,
                             double sample_temperature, double confidence_temperature, const std::string& schedule);
void set_reference_math(uintptr_t exp_addr, uintptr_t log_addr);
std::string reference_math();
void masked_decode_set_simd(bool enabled);

// d3diff.cpp
py::tuple d3diff_forward(const py::object& logits, const py::object& targets, const py::object& mask_ratio,
                         double alpha, std::optional<double> r_max);
py::object d3diff_backward(const py::object& logits, const py::object& targets, const py::object& mask_ratio,
                           const py::object& lse, const py::object& grad_rows, double alpha,
                           std::optional<double> r_max);
void d3diff_set_simd(bool enabled);

}  // namespace fastface

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastface C++ CPU kernels (see fastface/_cpp.py for the typed wrappers)";

  m.def("cpu_features", [] {
    const auto& f = fastface::cpu_features();
    py::dict d;
    d["avx2_fma"] = f.avx2_fma;
    d["avx512"] = f.avx512;
    d["avx512_bf16"] = f.avx512_bf16;
    d["avx512_vnni"] = f.avx512_vnni;
    d["amx_bf16"] = f.amx_bf16;
    return d;
  }, "The instruction sets this process may use (runtime dispatch).");

  // ---- grouped_moe.cpp ----
  m.def("grouped_moe", &fastface::grouped_moe, py::arg("x"), py::arg("group_ids"), py::arg("router_weight"),
        py::arg("gate_up_proj"), py::arg("down_proj"), py::arg("top_k"), py::arg("shared_gate_up_proj"),
        py::arg("shared_down_proj"), py::arg("normalize_topk"), py::arg("activation"),
        py::arg("return_router_logits"),
        "Grouped token-level MoE forward: returns (y, router_logits or None). Arrays: see fastface/_cpp.py.");
  m.def("moe_experts", &fastface::moe_experts, py::arg("x"), py::arg("top_k_index"), py::arg("top_k_weights"),
        py::arg("gate_up_proj"), py::arg("down_proj"), py::arg("activation"),
        "Experts only, routing given (transformers layout, one group, no shared expert): returns y.");

  // ---- attention.cpp ----
  m.def("attention", &fastface::attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("out"),
        py::arg("scale"),
        "Scaled dot-product attention forward into out [B, L, nh, hd]. Arrays: see fastface/_cpp.py.");
  m.def("attention_set_bf16_dot", &fastface::attention_set_bf16_dot, py::arg("enabled"),
        "False: bf16 attention widens to fp32 on the AVX-512 path instead of vdpbf16ps (tests).");

  // ---- rotary.cpp ----
  m.def("rotary", &fastface::rotary, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"),
        "Rotary embedding (rotate-half) of x [N, M, hd] by cos/sin [N, rd] into out [N, M, hd].");

  // ---- int8_linear.cpp ----
  m.def("int8_linear", &fastface::int8_linear, py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("sums"),
        py::arg("bias"), py::arg("out"),
        "x [M, K] quantised per row to int8, times the packed int8 weight [ceil(N/16), ceil(K/4), 64] with per-row "
        "scale [N] float32 and row sums [N] int32 (+ bias [N] float32), into out [M, N] (x's dtype).");
  m.def("int8_linear_set_products", &fastface::int8_linear_set_products, py::arg("path"),
        "Force int8_linear's products: 'auto' (the best this CPU has), 'vnni' (AVX512-VNNI), 'avx2' or 'portable' "
        "(tests and benchmarks); a path this CPU lacks is a ValueError.");
  m.def("int8_linear_products", &fastface::int8_linear_products, "The products int8_linear runs now.");

  // ---- gemm.cpp ----
  m.def("set_matmul_path", &fastface::set_matmul_path, py::arg("path"),
        "Force the matmul core: 'auto', 'amx', 'avx512', 'avx2' or 'scalar' (tests and benchmarks).");
  m.def("matmul_path", &fastface::matmul_path, py::arg("bf16"), "The matmul core a call would use now.");

  // ---- masked_decode.cpp ----
  m.def("masked_decode_step", &fastface::masked_decode_step, py::arg("logits"), py::arg("tokens"), py::arg("masked"),
        py::arg("u"), py::arg("step"), py::arg("steps"), py::arg("guidance"), py::arg("sample_temperature"),
        py::arg("confidence_temperature"), py::arg("schedule"),
        "One parallel masked-token decoding step: returns (tokens [B, N] int64, masked [B, N] bool).");
  m.def("set_reference_math", &fastface::set_reference_math, py::arg("exp_addr"), py::arg("log_addr"),
        "Addresses of MKL VML vmsExp / vmsLn (the ones torch.exp / torch.log call), or 0 for the built-in ones.");
  m.def("reference_math", &fastface::reference_math, "'vml' or 'builtin': the exp/log the decode step uses.");

  // ---- d3diff.cpp ----
  m.def("d3diff_forward", &fastface::d3diff_forward, py::arg("logits"), py::arg("targets"), py::arg("mask_ratio"),
        py::arg("alpha"), py::arg("r_max"),
        "D3Diff per-row losses CE_i + alpha * SE_i [M] float32 and logsumexp [M] float32 (for the backward).");
  m.def("d3diff_backward", &fastface::d3diff_backward, py::arg("logits"), py::arg("targets"), py::arg("mask_ratio"),
        py::arg("lse"), py::arg("grad_rows"), py::arg("alpha"), py::arg("r_max"),
        "dL/dlogits [M, V] in the logits' dtype, given dL/dloss_i (grad_rows [M] float32).");
  m.def("set_simd_kernels", [](bool enabled) {
    fastface::masked_decode_set_simd(enabled);
    fastface::d3diff_set_simd(enabled);
    fastface::attention_set_simd(enabled);
    fastface::rotary_set_simd(enabled);
    fastface::int8_linear_set_simd(enabled);
  }, py::arg("enabled"),
     "False: masked_decode_step, d3diff_*, attention, rotary and int8_linear's quantisation and epilogue run their "
     "portable paths (tests).");
}
