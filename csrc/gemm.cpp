// CPU GEMM (interface and legend: gemm.h): C[M, N] = A[M, K] . W[N, K]^T with W in its stored
// (transformers) layout, no repacking, and the FFN epilogue act(gate) * up.
//   - fp32: AVX-512 (or AVX2) register-blocked dot-product micro-kernel, 4 rows x 6 weight rows
//     (24 accumulators; 3 x 4 on AVX2, which has 16 vector registers), K along the vector lanes, one
//     horizontal sum per output at the end;
//   - bf16: AMX where the CPU and kernel allow it (weights are the AMX "A" operand in place, the few
//     activation rows are packed into the VNNI "B" operand, so nothing large is repacked), else
//     AVX512-BF16 vdpbf16ps with the same dot-product blocking, else bf16 -> fp32 conversion + FMA;
//   - a scalar fallback for CPUs without AVX2.
// Choice vs a BLAS from a wheel (numpy/scipy's OpenBLAS): a BLAS picks different kernels for different
// M (gemv at M=1, small-matrix paths), which breaks bitwise batch invariance, and offers no bf16 GEMM
// with fp32 accumulation that every wheel ships. Measured on the 2-core Xeon (Sapphire Rapids class,
// AMX) this was written on, inside the grouped MoE (grouped_moe.cpp), Mixtral shape H=1024 F=2816 E=8 K=2,
// one thread:
//   bf16 T=512: AMX 186 GFLOP/s vs vdpbf16ps 33 GFLOP/s (5.6x); T=64: 66 vs 24 GFLOP/s;
//   fp32 T=64: 55 GFLOP/s (weights streamed once per expert: memory-bound at 16 rows per expert);
//   for scale, torch.matmul [1024 x 1024] x [1024 x 5632], 2 threads: fp32 171, bf16 697 GFLOP/s.
// Full tables (both dtypes, against transformers' experts, with roofline fractions):
// bench/results/bench_grouped_moe_cpu.json, from bench/bench_grouped_moe_cpu.py.

#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#ifdef FASTFACE_X86
#include <immintrin.h>
#endif

#include "common.h"

namespace fastface {
namespace {

// ----------------------------------------------------------------------------------------------
// matmul paths
// ----------------------------------------------------------------------------------------------

std::atomic<int> g_forced_path{-1};  // -1 = auto; set by set_matmul_path (tests, benchmarks)

Path best_path(bool is_bf16) {
  const CpuFeatures& f = cpu_features();
  Path p = Path::Scalar;
  if (f.avx2_fma) p = Path::Avx2;
  if (f.avx512) p = Path::Avx512;
  if (is_bf16 && f.amx_bf16) p = Path::Amx;
  return p;
}

}  // namespace

Path choose_path(bool is_bf16) {
  int forced = g_forced_path.load();
  Path best = best_path(is_bf16);
  if (forced < 0) return best;
  Path p = static_cast<Path>(forced);
  if (p == Path::Amx && !is_bf16) p = Path::Avx512;  // AMX is bf16 only
  return std::min(p, best);                         // never use an ISA the CPU lacks
}

const char* path_name(Path p) {
  switch (p) {
    case Path::Scalar: return "scalar";
    case Path::Avx2: return "avx2";
    case Path::Avx512: return "avx512";
    case Path::Amx: return "amx";
  }
  return "?";
}

void set_matmul_path(const std::string& path) {
  if (path == "auto") g_forced_path = -1;
  else if (path == "scalar") g_forced_path = static_cast<int>(Path::Scalar);
  else if (path == "avx2") g_forced_path = static_cast<int>(Path::Avx2);
  else if (path == "avx512") g_forced_path = static_cast<int>(Path::Avx512);
  else if (path == "amx") g_forced_path = static_cast<int>(Path::Amx);
  else value_error("path must be one of 'auto', 'amx', 'avx512', 'avx2', 'scalar', got '" + path + "'");
}

std::string matmul_path(bool is_bf16) { return path_name(choose_path(is_bf16)); }

namespace {

// ----------------------------------------------------------------------------------------------
// scalar pieces (also the fallback path)
// ----------------------------------------------------------------------------------------------

inline float load_f(const float* p) { return *p; }
inline float load_f(const bf16* p) { return bf16_to_f32(*p); }

inline float act_scalar(float g, Act a) {
  if (a == Act::Silu) return g / (1.0f + std::exp(-g));
  // gelu(tanh) = 0.5 g (1 + tanh(z)) = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)
  const float z = 0.7978845608028654f * (g + 0.044715f * g * g * g);
  return g / (1.0f + std::exp(-2.0f * z));
}

template <class In>
void gemm_nt_scalar(int64_t M, int64_t N, int64_t K, const In* const* A, const In* W, int64_t ldw, float* C,
                    int64_t ldc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      // 8 partial sums, fixed order: independent of M and N
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const In* a = A[m];
      const In* w = W + n * ldw;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += load_f(a + k + j) * load_f(w + k + j);
      for (int j = 0; k < K; ++k, ++j) acc[j] += load_f(a + k) * load_f(w + k);
      C[m * ldc + n] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
}

void act_mul_scalar(const float* gate, const float* up, int64_t n, Act a, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = act_scalar(gate[i], a) * up[i];
}
void act_mul_scalar(const float* gate, const float* up, int64_t n, Act a, bf16* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(act_scalar(gate[i], a) * up[i]);
}

// ----------------------------------------------------------------------------------------------
// vector dot-product micro-kernels: C[m, n] = sum_k A[m, k] W[n, k], MR x NR outputs per call
// ----------------------------------------------------------------------------------------------
#ifdef FASTFACE_X86

// Generic register-blocked micro-kernel over an ISA traits class Tr:
//   Tr::in_t, Tr::V (accumulator), Tr::L (loaded operand), Tr::kStep (K elements per step),
//   Tr::zero(), Tr::load(p), Tr::load_tail(p, n), Tr::madd(acc, a, b), Tr::store_sums(acc, C, ldc).
// Every accumulator sees the same sequence of operations whatever MR and NR are, so the result of one
// (m, n) does not depend on the blocking -- the basis of batch invariance.
#define FASTFACE_MICRO_KERNEL                                                                          \
  template <int MR, int NR>                                                                            \
  static void micro(const in_t* const* A, const in_t* W, int64_t ldw, int64_t K, float* C,            \
                    int64_t ldc) {                                                                     \
    V acc[MR][NR];                                                                                     \
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)                                               \
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = zero();                         \
    int64_t k = 0;                                                                                     \
    for (; k + kStep <= K; k += kStep) {                                                               \
      L a[MR];                                                                                         \
      _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) a[i] = load(A[i] + k);                       \
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) {                                           \
        const L b = load(W + j * ldw + k);                                                             \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) acc[i][j] = madd(acc[i][j], a[i], b);     \
      }                                                                                                \
    }                                                                                                  \
    if (k < K) {                                                                                       \
      const int rem = static_cast<int>(K - k);                                                         \
      L a[MR];                                                                                         \
      _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) a[i] = load_tail(A[i] + k, rem);             \
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) {                                           \
        const L b = load_tail(W + j * ldw + k, rem);                                                   \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) acc[i][j] = madd(acc[i][j], a[i], b);     \
      }                                                                                                \
    }                                                                                                  \
    store_sums<MR, NR>(acc, C, ldc);                                                                   \
  }

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// C[i * ldc + j] = hsum(acc[i][j]), one output at a time (the AVX2 micro-kernels).
template <class V, int MR, int NR, class Sum>
static inline void store_each_sum(V (&acc)[MR][NR], float* C, int64_t ldc, Sum hsum) {
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = hsum(acc[i][j]);
}

struct Avx2F32 {
  using in_t = float;
  using V = __m256;
  using L = __m256;
  static constexpr int kStep = 8;
  static constexpr int kMR = 3, kNR = 4;  // 12 accumulators + 3 rows + 1 weight vector = 16 ymm registers
  static V zero() { return _mm256_setzero_ps(); }
  static L load(const float* p) { return _mm256_loadu_ps(p); }
  static L load_tail(const float* p, int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
  }
  static V madd(V acc, L a, L b) { return _mm256_fmadd_ps(a, b, acc); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <int MR, int NR>
  static void store_sums(V (&acc)[MR][NR], float* C, int64_t ldc) { store_each_sum(acc, C, ldc, hsum); }
  FASTFACE_MICRO_KERNEL
};

struct Avx2Bf16 {  // bf16 inputs widened to fp32, FMA
  using in_t = bf16;
  using V = __m256;
  using L = __m256;
  static constexpr int kStep = 8;
  static constexpr int kMR = 3, kNR = 4;
  static V zero() { return _mm256_setzero_ps(); }
  static L widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static L load(const bf16* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static L load_tail(const bf16* p, int n) {
    alignas(16) bf16 tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, n * sizeof(bf16));
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  static V madd(V acc, L a, L b) { return _mm256_fmadd_ps(a, b, acc); }
  static float hsum(V v) { return Avx2F32::hsum(v); }
  template <int MR, int NR>
  static void store_sums(V (&acc)[MR][NR], float* C, int64_t ldc) { store_each_sum(acc, C, ldc, hsum); }
  FASTFACE_MICRO_KERNEL
};

// exp for the activations: Cody-Waite range reduction + degree-6 polynomial, |rel err| < 2e-7
static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.3981999507e-3f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 act256(__m256 g, Act a) {
  __m256 z = g;  // silu: g * sigmoid(g); gelu(tanh): g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3))
  if (a == Act::Gelu) {
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    z = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
  }
  const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), z)));
  return _mm256_div_ps(g, den);
}

template <class Out>
static void act_mul_avx2(const float* gate, const float* up, int64_t n, Act a, Out* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 h = _mm256_mul_ps(act256(_mm256_loadu_ps(gate + i), a), _mm256_loadu_ps(up + i));
    if constexpr (std::is_same_v<Out, float>) {
      _mm256_storeu_ps(out + i, h);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, h);
      for (int j = 0; j < 8; ++j) out[i + j] = f32_to_bf16(tmp[j]);
    }
  }
  for (; i < n; ++i) {
    const float h = act_scalar(gate[i], a) * up[i];
    if constexpr (std::is_same_v<Out, float>) out[i] = h; else out[i] = f32_to_bf16(h);
  }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

// Horizontal sums of the AVX-512 accumulators, four at a time. Every output is reduced by one tree: lanes j and
// j + 8, then j and j + 4, then j and j + 2, then the last pair (the tree of GCC's _mm512_reduce_add_ps, which
// this replaced: outputs are bitwise unchanged), so an output does not depend on which accumulators share its
// shuffles. One reduce_add per output spends ~9 shuffles and adds on it; four at once share them (13 vector ops
// for four outputs). At small K that matters: face-s has K = 256 and 192, 8-16 k-steps per output.
static inline __m128 reduce_add4_512(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  // 256-bit halves of each v_i: [v0: lanes j + (j + 8), v1: ...] as 2 x 8 lanes
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
  // 128-bit chunk i holds v_i's 4 partial sums (lanes j + (j + 4))
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));  // lanes 0, 1 of each chunk: j + (j + 2)
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));  // lane 0 of each chunk: the sum
  const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(first, s));
}

// C[i * ldc + j] = the sum of acc[i][j], four consecutive j per reduce_add4_512 (a short group padded with zeros).
template <int MR, int NR>
static inline void store_sums_512(__m512 (&acc)[MR][NR], float* C, int64_t ldc) {
  const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int j = 0; j < NR; j += 4) {
      const int n = NR - j < 4 ? NR - j : 4;
      const __m128 r = reduce_add4_512(acc[i][j], n > 1 ? acc[i][j + 1] : z, n > 2 ? acc[i][j + 2] : z,
                                       n > 3 ? acc[i][j + 3] : z);
      _mm_mask_storeu_ps(C + i * ldc + j, static_cast<__mmask8>((1u << n) - 1), r);
    }
  }
}

struct Avx512F32 {
  using in_t = float;
  using V = __m512;
  using L = __m512;
  static constexpr int kStep = 16;
  static constexpr int kMR = 4, kNR = 6;  // 24 accumulators + 4 rows + 1 weight vector of 32 zmm
  static V zero() { return _mm512_setzero_ps(); }
  static L load(const float* p) { return _mm512_loadu_ps(p); }
  static L load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static V madd(V acc, L a, L b) { return _mm512_fmadd_ps(a, b, acc); }
  template <int MR, int NR>
  static void store_sums(V (&acc)[MR][NR], float* C, int64_t ldc) { store_sums_512<MR, NR>(acc, C, ldc); }
  FASTFACE_MICRO_KERNEL
};

struct Avx512Bf16Widen {  // bf16 inputs widened to fp32, FMA (AVX-512 CPUs without AVX512-BF16)
  using in_t = bf16;
  using V = __m512;
  using L = __m512;
  static constexpr int kStep = 16;
  static constexpr int kMR = 4, kNR = 6;  // 24 accumulators + 4 rows + 1 weight vector of 32 zmm
  static V zero() { return _mm512_setzero_ps(); }
  static L widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static L load(const bf16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static L load_tail(const bf16* p, int n) { return widen(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p)); }
  static V madd(V acc, L a, L b) { return _mm512_fmadd_ps(a, b, acc); }
  template <int MR, int NR>
  static void store_sums(V (&acc)[MR][NR], float* C, int64_t ldc) { store_sums_512<MR, NR>(acc, C, ldc); }
  FASTFACE_MICRO_KERNEL
};

static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 act512(__m512 g, Act a) {
  __m512 z = g;
  if (a == Act::Gelu) {
    const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    z = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
  }
  const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), z)));
  return _mm512_div_ps(g, den);
}

// fp32 -> bf16, round to nearest even (NaN inputs do not occur here: finite GEMM outputs)
static inline __m256i to_bf16_512(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

template <class Out>
static void act_mul_avx512(const float* gate, const float* up, int64_t n, Act a, Out* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const int rem = static_cast<int>(std::min<int64_t>(16, n - i));
    const __mmask16 m = (__mmask16)((1u << rem) - 1);
    const __m512 h = _mm512_mul_ps(act512(_mm512_maskz_loadu_ps(m, gate + i), a), _mm512_maskz_loadu_ps(m, up + i));
    if constexpr (std::is_same_v<Out, float>) _mm512_mask_storeu_ps(out + i, m, h);
    else _mm256_mask_storeu_epi16(out + i, m, to_bf16_512(h));
  }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

struct Avx512Bf16Dot {  // vdpbf16ps: 32 bf16 products per instruction into 16 fp32 lanes
  using in_t = bf16;
  using V = __m512;
  using L = __m512bh;
  static constexpr int kStep = 32;
  static constexpr int kMR = 4, kNR = 6;  // 24 accumulators + 4 rows + 1 weight vector of 32 zmm
  static V zero() { return _mm512_setzero_ps(); }
  static L load(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static L load_tail(const bf16* p, int n) { return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p); }
  static V madd(V acc, L a, L b) { return _mm512_dpbf16_ps(acc, a, b); }
  template <int MR, int NR>
  static void store_sums(V (&acc)[MR][NR], float* C, int64_t ldc) { store_sums_512<MR, NR>(acc, C, ldc); }
  FASTFACE_MICRO_KERNEL
};

#pragma GCC pop_options

// Register residency. Every loop over the accumulators, the tail's included, is unrolled at compile time: one
// loop with a run-time trip count (the K tail's, before) made GCC keep acc[][] in memory as well, zeroing 24
// zmm of stack at every call and reloading them for the sums. Measured, one thread, a 2-core EPYC (AVX-512,
// AVX512-BF16), both changes of this file's commit together (outputs bitwise unchanged on every path):
// face-s MoE layer (T = 2064, H = 256, E = 4, F = 192, 1 shared of 256) fp32 31.3 -> 25.9 ms, bf16 24.2 ->
// 16.3 ms; Mixtral shape (bench/bench_grouped_moe_cpu.py --quick) fp32 T = 512 209 -> 186 ms, bf16 113 -> 101 ms.
// Blocked driver over a micro-kernel: Tr::kMR rows x Tr::kNR weight rows per call, sized so the accumulators,
// the loaded rows and one weight vector fit the register file without spills (AVX-512: 4 x 6 -> 29 of 32
// zmm; AVX2: 3 x 4 -> 16 of 16 ymm, measured 1.5x over 4 x 6 there), tails by smaller instantiations.
template <class Tr, int MR>
inline void micro_nr(int nr, const typename Tr::in_t* const* A, const typename Tr::in_t* W, int64_t ldw, int64_t K,
                     float* C, int64_t ldc) {
  switch (nr) {
    case 6: Tr::template micro<MR, 6>(A, W, ldw, K, C, ldc); break;
    case 5: Tr::template micro<MR, 5>(A, W, ldw, K, C, ldc); break;
    case 4: Tr::template micro<MR, 4>(A, W, ldw, K, C, ldc); break;
    case 3: Tr::template micro<MR, 3>(A, W, ldw, K, C, ldc); break;
    case 2: Tr::template micro<MR, 2>(A, W, ldw, K, C, ldc); break;
    default: Tr::template micro<MR, 1>(A, W, ldw, K, C, ldc); break;
  }
}

template <class Tr>
void gemm_nt_vec(int64_t M, int64_t N, int64_t K, const typename Tr::in_t* const* A, const typename Tr::in_t* W,
                 int64_t ldw, float* C, int64_t ldc) {
  constexpr int MR = Tr::kMR, NR = Tr::kNR;
  for (int64_t m = 0; m < M; m += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m));
    for (int64_t n = 0; n < N; n += NR) {
      const int nr = static_cast<int>(std::min<int64_t>(NR, N - n));
      const auto* const* a = A + m;
      const auto* w = W + n * ldw;
      float* c = C + m * ldc + n;
      switch (mr) {
        case 4: micro_nr<Tr, 4>(nr, a, w, ldw, K, c, ldc); break;
        case 3: micro_nr<Tr, 3>(nr, a, w, ldw, K, c, ldc); break;
        case 2: micro_nr<Tr, 2>(nr, a, w, ldw, K, c, ldc); break;
        default: micro_nr<Tr, 1>(nr, a, w, ldw, K, c, ldc); break;
      }
    }
  }
}

#endif  // FASTFACE_X86

template <class Out>
void act_mul_on([[maybe_unused]] Path path, const float* gate, const float* up, int64_t n, Act a, Out* out) {
#ifdef FASTFACE_X86
  if (path >= Path::Avx512) return act_mul_avx512(gate, up, n, a, out);
  if (path == Path::Avx2) return act_mul_avx2(gate, up, n, a, out);
#endif
  act_mul_scalar(gate, up, n, a, out);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// dispatch of the two primitives: C = A . W^T, and out = act(gate) * up
// ----------------------------------------------------------------------------------------------

void Kernels::gemm(int64_t M, int64_t N, int64_t K, const float* const* A, const float* W, int64_t ldw, float* C,
                   int64_t ldc) const {
#ifdef FASTFACE_X86
  if (path >= Path::Avx512) return gemm_nt_vec<Avx512F32>(M, N, K, A, W, ldw, C, ldc);
  if (path == Path::Avx2) return gemm_nt_vec<Avx2F32>(M, N, K, A, W, ldw, C, ldc);
#endif
  gemm_nt_scalar(M, N, K, A, W, ldw, C, ldc);
}

void Kernels::gemm(int64_t M, int64_t N, int64_t K, const bf16* const* A, const bf16* W, int64_t ldw, float* C,
                   int64_t ldc) const {
#ifdef FASTFACE_X86
  if (path >= Path::Avx512 && avx512_bf16) return gemm_nt_vec<Avx512Bf16Dot>(M, N, K, A, W, ldw, C, ldc);
  if (path >= Path::Avx512) return gemm_nt_vec<Avx512Bf16Widen>(M, N, K, A, W, ldw, C, ldc);
  if (path == Path::Avx2) return gemm_nt_vec<Avx2Bf16>(M, N, K, A, W, ldw, C, ldc);
#endif
  gemm_nt_scalar(M, N, K, A, W, ldw, C, ldc);
}

void Kernels::act_mul(const float* gate, const float* up, int64_t n, Act a, float* out) const {
  act_mul_on(path, gate, up, n, a, out);
}
void Kernels::act_mul(const float* gate, const float* up, int64_t n, Act a, bf16* out) const {
  act_mul_on(path, gate, up, n, a, out);
}

Kernels kernels_for(bool is_bf16) { return Kernels{choose_path(is_bf16), cpu_features().avx512_bf16}; }

#ifdef FASTFACE_X86
// ----------------------------------------------------------------------------------------------
// AMX (bf16) tile primitives. The products come out transposed (C^T[n, m]), which is what the MoE's
// epilogues want: act(gate) * up goes straight into the VNNI layout of the second GEMM's B operand
// (amx_pack_act_mul), and the down projection's C^T is scattered to the pairs' rows by the caller.
// Blocking: 2 weight tiles x 2 row groups (4 accumulators) per k-step: 4 tile loads per 4 TDPBF16PS.
// Measured (Mixtral shape, bf16, T=512, one thread): 186 GFLOP/s vs 33 for the vdpbf16ps kernel.
// ----------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace

void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {  // 0-3 accumulators C^T[16 n, 16 m] fp32, 4-5 B (activations), 6-7 A (weights)
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

void amx_release() { _tile_release(); }

void amx_block(const void* W0, const void* W1, int64_t ldw_bytes, const uint32_t* B0, const uint32_t* B1,
               int64_t nkb, float* c /* [4][16][16] */) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const char* w0 = static_cast<const char*>(W0);
  const char* w1 = static_cast<const char*>(W1);
  if (B1) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      _tile_loadd(4, B0 + kb * 256, 64);
      _tile_loadd(5, B1 + kb * 256, 64);
      _tile_loadd(6, w0 + kb * 64, ldw_bytes);
      _tile_loadd(7, w1 + kb * 64, ldw_bytes);
      _tile_dpbf16ps(0, 6, 4);
      _tile_dpbf16ps(1, 7, 4);
      _tile_dpbf16ps(2, 6, 5);
      _tile_dpbf16ps(3, 7, 5);
    }
  } else {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      _tile_loadd(4, B0 + kb * 256, 64);
      _tile_loadd(6, w0 + kb * 64, ldw_bytes);
      _tile_loadd(7, w1 + kb * 64, ldw_bytes);
      _tile_dpbf16ps(0, 6, 4);
      _tile_dpbf16ps(1, 7, 4);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  if (B1) {
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

int64_t amx_rows2(const bf16* Wa, int64_t ra, const bf16* Wb, int64_t rb, int64_t rows, int64_t K, int64_t Kp,
                  bf16* pa, bf16* pb, const bf16** wa, const bf16** wb) {
  if (ra + 16 <= rows && rb + 16 <= rows && K == Kp) {
    *wa = Wa + ra * K;
    *wb = Wb + rb * K;
    return K;
  }
  std::memset(pa, 0, 16 * Kp * sizeof(bf16));
  std::memset(pb, 0, 16 * Kp * sizeof(bf16));
  for (int64_t r = 0; r < 16; ++r) {
    if (ra + r < rows) std::memcpy(pa + r * Kp, Wa + (ra + r) * K, K * sizeof(bf16));
    if (rb + r < rows) std::memcpy(pb + r * Kp, Wb + (rb + r) * K, K * sizeof(bf16));
  }
  *wa = pa;
  *wb = pb;
  return Kp;
}

void amx_pack_row(const bf16* src, int64_t K, int64_t m, uint32_t* b) {
  for (int64_t k = 0; k < K; ++k) {
    bf16* d = reinterpret_cast<bf16*>(&b[((k / 32) * 16 + (k % 32) / 2) * 16 + m]);
    d[k % 2] = src[k];
  }
}

void amx_pack_act_mul(const float* gate_t, const float* up_t, int64_t f0, int64_t nf, int64_t mvalid, Act a,
                      uint32_t* b) {
  uint16_t* hp = reinterpret_cast<uint16_t*>(b);
  for (int64_t f = 0; f < nf; ++f) {
    const int64_t ff = f0 + f;
    const __m512 hv = _mm512_mul_ps(act512(_mm512_loadu_ps(gate_t + f * 16), a), _mm512_loadu_ps(up_t + f * 16));
    alignas(32) uint16_t hb[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(hb), to_bf16_512(hv));
    uint16_t* d = hp + (((ff / 32) * 16 + (ff % 32) / 2) * 16) * 2 + ff % 2;
    for (int64_t m = 0; m < mvalid; ++m) d[m * 2] = hb[m];
  }
}

#pragma GCC pop_options
#endif  // FASTFACE_X86

}  // namespace fastface
