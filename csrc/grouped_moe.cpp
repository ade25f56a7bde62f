// Grouped token-level mixture of experts, forward, on the CPU.
//
// Legend: T tokens, H hidden, G expert groups, E routed experts per group, S shared experts per group,
// F routed expert ffn width, Fs shared expert ffn width, K top-k, P = T*(K+S) (token, slot) pairs,
// M rows of one expert's matmul (its pairs), MB rows per chunk.
//
// Algorithm (reference: fastface/moe.py, grouped_moe_reference):
//   1. route: per token, logits = x_t . router[g_t]^T (fp32), softmax, top-k (ties -> lower expert
//      index), optional renormalisation;
//   2. counting sort of the (token, slot) pairs by key (g, e) -- routed experts -- and (g, s) -- shared
//      experts, weight 1 -- with a histogram and a prefix sum, stable in token order (no full sort);
//   3. per expert, per chunk of MB rows: gather the rows, GEMM with gate_up, act(gate) * up fused into
//      the GEMM's epilogue, GEMM with down, scale by the routing weight, write the pair's row;
//   4. combine: y_t = sum over the token's slots in a fixed order (routed by rank, then shared).
// Deterministic: every output element is computed by one thread with a reduction order that depends
// on K only, never on which or how many other rows share the expert (no atomics), so a token's output
// is bitwise the same alone or in any batch (on one machine and matmul path).
//
// Matmul core: C[M, N] = A[M, K] . W[N, K]^T with W in its stored (transformers) layout, no repacking.
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
// AMX) this was written on, Mixtral shape H=1024 F=2816 E=8 K=2, one thread:
//   bf16 T=512: AMX 186 GFLOP/s vs vdpbf16ps 33 GFLOP/s (5.6x); T=64: 66 vs 24 GFLOP/s;
//   fp32 T=64: 55 GFLOP/s (weights streamed once per expert: memory-bound at 16 rows per expert);
//   for scale, torch.matmul [1024 x 1024] x [1024 x 5632], 2 threads: fp32 171, bf16 697 GFLOP/s.
// Full tables (both dtypes, against transformers' experts, with roofline fractions):
// bench/results/bench_grouped_moe_cpu.json, from bench/bench_grouped_moe_cpu.py.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTFACE_X86 1
#endif

#include "common.h"

namespace fastface {
namespace {

using bf16 = uint16_t;

enum class Act { Silu, Gelu };

// ----------------------------------------------------------------------------------------------
// matmul paths
// ----------------------------------------------------------------------------------------------

enum class Path { Scalar, Avx2, Avx512, Amx };
std::atomic<int> g_forced_path{-1};  // -1 = auto; set by set_matmul_path (tests, benchmarks)

Path best_path(bool is_bf16) {
  const CpuFeatures& f = cpu_features();
  Path p = Path::Scalar;
  if (f.avx2_fma) p = Path::Avx2;
  if (f.avx512) p = Path::Avx512;
  if (is_bf16 && f.amx_bf16) p = Path::Amx;
  return p;
}

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
//   Tr::zero(), Tr::load(p), Tr::load_tail(p, n), Tr::madd(acc, a, b), Tr::hsum(acc).
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
      for (int i = 0; i < MR; ++i) a[i] = load_tail(A[i] + k, rem);                                     \
      for (int j = 0; j < NR; ++j) {                                                                   \
        const L b = load_tail(W + j * ldw + k, rem);                                                   \
        for (int i = 0; i < MR; ++i) acc[i][j] = madd(acc[i][j], a[i], b);                             \
      }                                                                                                \
    }                                                                                                  \
    for (int i = 0; i < MR; ++i)                                                                       \
      for (int j = 0; j < NR; ++j) C[i * ldc + j] = hsum(acc[i][j]);                                   \
  }

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

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
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
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
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
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
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  FASTFACE_MICRO_KERNEL
};

#pragma GCC pop_options

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

// ----------------------------------------------------------------------------------------------
// dispatch of the two primitives: C = A . W^T, and out = act(gate) * up
// ----------------------------------------------------------------------------------------------

struct Kernels {
  Path path;
  bool avx512_bf16;
  void gemm(int64_t M, int64_t N, int64_t K, const float* const* A, const float* W, int64_t ldw, float* C,
            int64_t ldc) const {
#ifdef FASTFACE_X86
    if (path >= Path::Avx512) return gemm_nt_vec<Avx512F32>(M, N, K, A, W, ldw, C, ldc);
    if (path == Path::Avx2) return gemm_nt_vec<Avx2F32>(M, N, K, A, W, ldw, C, ldc);
#endif
    gemm_nt_scalar(M, N, K, A, W, ldw, C, ldc);
  }
  void gemm(int64_t M, int64_t N, int64_t K, const bf16* const* A, const bf16* W, int64_t ldw, float* C,
            int64_t ldc) const {
#ifdef FASTFACE_X86
    if (path >= Path::Avx512 && avx512_bf16) return gemm_nt_vec<Avx512Bf16Dot>(M, N, K, A, W, ldw, C, ldc);
    if (path >= Path::Avx512) return gemm_nt_vec<Avx512Bf16Widen>(M, N, K, A, W, ldw, C, ldc);
    if (path == Path::Avx2) return gemm_nt_vec<Avx2Bf16>(M, N, K, A, W, ldw, C, ldc);
#endif
    gemm_nt_scalar(M, N, K, A, W, ldw, C, ldc);
  }
  template <class Out>
  void act_mul(const float* gate, const float* up, int64_t n, Act a, Out* out) const {
#ifdef FASTFACE_X86
    if (path >= Path::Avx512) return act_mul_avx512(gate, up, n, a, out);
    if (path == Path::Avx2) return act_mul_avx2(gate, up, n, a, out);
#endif
    act_mul_scalar(gate, up, n, a, out);
  }
};

// ----------------------------------------------------------------------------------------------
// the expert pipeline, shared by grouped_moe (routes itself) and moe_experts (routing given)
// ----------------------------------------------------------------------------------------------

// One expert's work: its weights and its range in the sorted pair arrays.
struct Job {
  const void* gate_up;  // [2F, H]
  const void* down;     // [H, F]
  int64_t F;
  int64_t begin, end;   // pairs [begin, end) of the sorted order
};

// Sorted (token, slot) pairs: token id, destination row in the [P, H] pair buffer, routing weight.
struct Pairs {
  std::vector<int32_t> token;
  std::vector<int64_t> row;
  std::vector<float> weight;
};

constexpr int64_t kChunkRows = 128;  // MB: rows per chunk (A chunk 512 KB fp32 at H = 1024: stays in L2)
constexpr int64_t kWaveRows = 512;   // rows whose act(gate) * up is kept at once (all experts of one wave)
constexpr int64_t kFBlock = 16;      // f columns per task of the first GEMM (32 weight rows)
constexpr int64_t kHBlock = 32;      // output columns per task of the second GEMM

struct Chunk {
  int64_t job, c0, mb, hrow0;  // pairs [c0, c0 + mb) of job; their rows start at hrow0 of the wave's buffer
};
struct Task {
  int64_t chunk, n0, nb;  // output columns [n0, n0 + nb) of one chunk
};

// All experts' chunks are cut into tasks; every thread takes tasks from one shared list per phase, so a
// wave costs two barriers whatever the number of experts (T = 1: 2 experts, 2 barriers in all).
// Barriers matter here: on a loaded 2-core machine a barrier that waits for a descheduled thread costs
// a scheduler slice (ms), so 3 barriers per (expert, chunk) measured 2-10x slower at T = 1 there.
template <class In>
void run_jobs(const Kernels& kern, const In* x, int64_t H, const std::vector<Job>& jobs, const Pairs& pairs,
              Act act, float* ypair /* [P, H] */) {
  int64_t Fmax = 0;
  for (const Job& j : jobs) Fmax = std::max(Fmax, j.F);
  // waves of chunks, each holding at most kWaveRows rows (or one chunk)
  std::vector<std::vector<Chunk>> waves(1);
  int64_t rows = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j)
    for (int64_t c0 = jobs[j].begin; c0 < jobs[j].end; c0 += kChunkRows) {
      const int64_t mb = std::min(kChunkRows, jobs[j].end - c0);
      if (rows + mb > kWaveRows && !waves.back().empty()) {
        waves.emplace_back();
        rows = 0;
      }
      waves.back().push_back({j, c0, mb, rows});
      rows += mb;
    }
  std::vector<std::vector<Task>> tasks1(waves.size()), tasks2(waves.size());
  for (size_t w = 0; w < waves.size(); ++w)
    for (int64_t c = 0; c < static_cast<int64_t>(waves[w].size()); ++c) {
      const int64_t F = jobs[waves[w][c].job].F;
      for (int64_t f0 = 0; f0 < F; f0 += kFBlock) tasks1[w].push_back({c, f0, std::min(kFBlock, F - f0)});
      for (int64_t h0 = 0; h0 < H; h0 += kHBlock) tasks2[w].push_back({c, h0, std::min(kHBlock, H - h0)});
    }
  const int64_t P = static_cast<int64_t>(pairs.token.size());
  std::vector<const In*> xrows(P);  // A operand of the first GEMM: the pair's token row, read in place
  for (int64_t p = 0; p < P; ++p) xrows[p] = x + static_cast<int64_t>(pairs.token[p]) * H;
  std::vector<In> hbuf(static_cast<size_t>(kWaveRows * Fmax));  // act(gate) * up of one wave [rows, F]
  std::vector<const In*> hrows(kWaveRows);
  for (int64_t i = 0; i < kWaveRows; ++i) hrows[i] = hbuf.data() + i * Fmax;

#pragma omp parallel
  {
    std::vector<float> c1(static_cast<size_t>(kChunkRows * 2 * kFBlock));  // [MB, 2 * FB] gate | up
    std::vector<float> c2(static_cast<size_t>(kChunkRows * kHBlock));      // [MB, HB]
    for (size_t w = 0; w < waves.size(); ++w) {
      const std::vector<Chunk>& wave = waves[w];
      // hbuf[rows, f0:f1] = act(x W_gate[f0:f1]^T) * (x W_up[f0:f1]^T)
      const int64_t n1 = static_cast<int64_t>(tasks1[w].size());
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n1; ++i) {
        const Task& t = tasks1[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const In* gu = static_cast<const In*>(job.gate_up);
        kern.gemm(ch.mb, t.nb, H, &xrows[ch.c0], gu + t.n0 * H, H, c1.data(), 2 * kFBlock);
        kern.gemm(ch.mb, t.nb, H, &xrows[ch.c0], gu + (job.F + t.n0) * H, H, c1.data() + kFBlock, 2 * kFBlock);
        for (int64_t r = 0; r < ch.mb; ++r)
          kern.act_mul(&c1[r * 2 * kFBlock], &c1[r * 2 * kFBlock + kFBlock], t.nb, act,
                       &hbuf[(ch.hrow0 + r) * Fmax + t.n0]);
      }
      // ypair[row] = w * (h W_down[h0:h1]^T)
      const int64_t n2 = static_cast<int64_t>(tasks2[w].size());
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n2; ++i) {
        const Task& t = tasks2[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const In* dn = static_cast<const In*>(job.down);
        kern.gemm(ch.mb, t.nb, job.F, &hrows[ch.hrow0], dn + t.n0 * job.F, job.F, c2.data(), kHBlock);
        for (int64_t r = 0; r < ch.mb; ++r) {
          const float wt = pairs.weight[ch.c0 + r];
          float* dst = ypair + pairs.row[ch.c0 + r] * H + t.n0;
          const float* src = &c2[r * kHBlock];
          for (int64_t h = 0; h < t.nb; ++h) dst[h] = wt * src[h];
        }
      }
    }
  }
}

#ifdef FASTFACE_X86
// ----------------------------------------------------------------------------------------------
// AMX (bf16): the expert weights are the tiles' "A" operand, read in place (16 weight rows x 32 k, row
// stride = the weight's row), and the few activation rows are packed into the VNNI "B" operand
// (16 k-pairs x 16 rows), once per chunk. The products come out transposed (C^T[n, m]), which is what the
// epilogues want: act(gate) * up goes straight into the VNNI layout of the second GEMM's B operand, and the
// down projection's C^T is scattered to the pairs' rows with the routing weight.
// Blocking: 2 weight tiles x 2 row groups (4 accumulators) per k-step: 4 tile loads per 4 TDPBF16PS.
// Measured (Mixtral shape, bf16, T=512, one thread): 186 GFLOP/s vs 33 for the vdpbf16ps kernel.
// ----------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {  // 0-3 accumulators C^T[16 n, 16 m] fp32, 4-5 B (x), 6-7 A (weights)
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// C^T tiles over nkb k-blocks of 32: c[0] = W0.B0, c[1] = W1.B0, c[2] = W0.B1, c[3] = W1.B1 (B1 optional).
// W0/W1: 16 rows each, row stride ldw_bytes, k-block kb at byte offset 64 * kb; B: 256 u32 per k-block.
static void amx_block(const void* W0, const void* W1, int64_t ldw_bytes, const uint32_t* B0, const uint32_t* B1,
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

// Two 16-row weight blocks as tile sources, with one row stride: rows [ra, ra + 16) of Wa and [rb, rb + 16)
// of Wb, both [rows, K]. In place when both blocks are whole and K is a multiple of 32; else copied
// zero-padded into pa / pb [16, Kp] (odd shapes only): never reads past a weight, padded k meets zero
// activations, padded rows give outputs nobody reads.
static int64_t amx_rows2(const bf16* Wa, int64_t ra, const bf16* Wb, int64_t rb, int64_t rows, int64_t K,
                         int64_t Kp, bf16* pa, bf16* pb, const bf16** wa, const bf16** wb) {
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

void run_jobs_amx(const bf16* x, int64_t H, const std::vector<Job>& jobs, const Pairs& pairs, Act act,
                  float* ypair) {
  constexpr int64_t kF = 16;  // f per first-GEMM task (a gate tile and an up tile)
  constexpr int64_t kH = 32;  // outputs per second-GEMM task (two tiles)
  int64_t Fmax = 0;
  for (const Job& j : jobs) Fmax = std::max(Fmax, j.F);
  const int64_t nkb = (H + 31) / 32, Hp = nkb * 32;
  const int64_t nfkb_max = (Fmax + 31) / 32;
  std::vector<std::vector<Chunk>> waves(1);
  int64_t rows = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j)
    for (int64_t c0 = jobs[j].begin; c0 < jobs[j].end; c0 += kChunkRows) {
      const int64_t mb = std::min(kChunkRows, jobs[j].end - c0);
      const int64_t padded = (mb + 15) / 16 * 16;  // chunks start on 16-row groups of the packed operands
      if (rows + padded > kWaveRows && !waves.back().empty()) {
        waves.emplace_back();
        rows = 0;
      }
      waves.back().push_back({j, c0, mb, rows});
      rows += padded;
    }
  std::vector<std::vector<Task>> tasks1(waves.size()), tasks2(waves.size());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> wave_groups(waves.size());
  for (size_t w = 0; w < waves.size(); ++w)
    for (int64_t c = 0; c < static_cast<int64_t>(waves[w].size()); ++c) {
      for (int64_t m0 = 0; m0 < waves[w][c].mb; m0 += 16) wave_groups[w].push_back({c, m0});
      const int64_t F = jobs[waves[w][c].job].F;
      for (int64_t f0 = 0; f0 < F; f0 += kF) tasks1[w].push_back({c, f0, std::min(kF, F - f0)});
      for (int64_t h0 = 0; h0 < H; h0 += kH) tasks2[w].push_back({c, h0, std::min(kH, H - h0)});
    }
  // packed B operands of one wave, per 16-row group: x [nkb][16][16] u32 and h [nfkb][16][16] u32
  const int64_t groups = kWaveRows / 16;
  std::vector<uint32_t> xpack(static_cast<size_t>(groups * nkb * 256));
  std::vector<uint32_t> hpack(static_cast<size_t>(groups * nfkb_max * 256));

#pragma omp parallel
  {
    amx_configure();
    alignas(64) float c[4 * 256];
    std::vector<bf16> pad0(16 * std::max(Hp, nfkb_max * 32)), pad1(pad0.size());
    for (size_t w = 0; w < waves.size(); ++w) {
      const std::vector<Chunk>& wave = waves[w];
      const std::vector<std::pair<int64_t, int64_t>>& grp = wave_groups[w];  // (chunk, first row) per group
      // phase 0: pack x rows; clear h
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < static_cast<int64_t>(grp.size()); ++i) {
        const Chunk& ch = wave[grp[i].first];
        const int64_t m0 = grp[i].second, g = ch.hrow0 / 16 + m0 / 16;
        uint32_t* dst = &xpack[g * nkb * 256];
        std::memset(dst, 0, nkb * 256 * sizeof(uint32_t));
        std::memset(&hpack[g * nfkb_max * 256], 0, nfkb_max * 256 * sizeof(uint32_t));
        for (int64_t m = 0; m < 16 && m0 + m < ch.mb; ++m) {
          const bf16* src = x + static_cast<int64_t>(pairs.token[ch.c0 + m0 + m]) * H;
          for (int64_t k = 0; k < H; ++k) {
            bf16* d = reinterpret_cast<bf16*>(&dst[((k / 32) * 16 + (k % 32) / 2) * 16 + m]);
            d[k % 2] = src[k];
          }
        }
      }
      // phase 1: h = act(gate) * up, written into its packed B layout
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < static_cast<int64_t>(tasks1[w].size()); ++i) {
        const Task& t = tasks1[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const bf16* gu = static_cast<const bf16*>(job.gate_up);
        const int64_t F = job.F;
        // gate rows [f0, f0 + 16) of the gate half [0, F), up rows [f0, f0 + 16) of the up half [F, 2F)
        const bf16 *wg, *wu;
        const int64_t ld0 = amx_rows2(gu, t.n0, gu + F * H, t.n0, F, H, Hp, pad0.data(), pad1.data(), &wg, &wu);
        const int64_t ng = (ch.mb + 15) / 16;
        for (int64_t gi = 0; gi < ng; gi += 2) {
          const int64_t g0 = ch.hrow0 / 16 + gi;
          const bool two = gi + 1 < ng;
          amx_block(wg, wu, ld0 * 2, &xpack[g0 * nkb * 256], two ? &xpack[(g0 + 1) * nkb * 256] : nullptr, nkb, c);
          for (int64_t s = 0; s < (two ? 2 : 1); ++s) {
            const float* cg = c + s * 512;  // gate^T [16 f, 16 m]
            const float* cu = cg + 256;     // up^T
            uint16_t* hp = reinterpret_cast<uint16_t*>(&hpack[(g0 + s) * nfkb_max * 256]);
            for (int64_t f = 0; f < t.nb; ++f) {
              const int64_t ff = t.n0 + f;
              const __m512 hv = _mm512_mul_ps(act512(_mm512_loadu_ps(cg + f * 16), act), _mm512_loadu_ps(cu + f * 16));
              alignas(32) uint16_t hb[16];
              _mm256_store_si256(reinterpret_cast<__m256i*>(hb), to_bf16_512(hv));
              uint16_t* d = hp + (((ff / 32) * 16 + (ff % 32) / 2) * 16) * 2 + ff % 2;
              const int64_t mvalid = std::min<int64_t>(16, ch.mb - (gi + s) * 16);
              for (int64_t m = 0; m < mvalid; ++m) d[m * 2] = hb[m];
            }
          }
        }
      }
      // phase 2: ypair[row] = w * (h W_down^T)
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < static_cast<int64_t>(tasks2[w].size()); ++i) {
        const Task& t = tasks2[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const bf16* dn = static_cast<const bf16*>(job.down);
        const int64_t F = job.F, nfkb = (F + 31) / 32, Fp = nfkb * 32;
        const bf16 *w0, *w1;
        const int64_t ld0 = amx_rows2(dn, t.n0, dn, t.n0 + 16, H, F, Fp, pad0.data(), pad1.data(), &w0, &w1);
        const int64_t ng = (ch.mb + 15) / 16;
        for (int64_t gi = 0; gi < ng; gi += 2) {
          const int64_t g0 = ch.hrow0 / 16 + gi;
          const bool two = gi + 1 < ng;
          // the down projection's k runs over F: the packed h of this row group, stride nfkb_max blocks
          amx_block(w0, w1, ld0 * 2, &hpack[g0 * nfkb_max * 256], two ? &hpack[(g0 + 1) * nfkb_max * 256] : nullptr,
                    nfkb, c);
          for (int64_t s = 0; s < (two ? 2 : 1); ++s) {
            const int64_t mvalid = std::min<int64_t>(16, ch.mb - (gi + s) * 16);
            for (int64_t m = 0; m < mvalid; ++m) {
              const int64_t p = ch.c0 + (gi + s) * 16 + m;
              const float wt = pairs.weight[p];
              float* dst = ypair + pairs.row[p] * H + t.n0;
              for (int64_t h = 0; h < t.nb; ++h) dst[h] = wt * c[s * 512 + (h / 16) * 256 + (h % 16) * 16 + m];
            }
          }
        }
      }
    }
    _tile_release();
  }
}

#pragma GCC pop_options
#endif  // FASTFACE_X86

// y[t] = sum_{s < nslots} ypair[t * nslots + s], in slot order; written in the output dtype.
template <class Out>
void combine(const float* ypair, int64_t T, int64_t nslots, int64_t H, Out* y) {
  // small batches (decode) stay on the calling thread: a fork/join costs more than the sums, and on a
  // loaded machine a join can wait a whole scheduler slice for a descheduled worker
#pragma omp parallel for schedule(static) if (T * nslots * H >= (1 << 16))
  for (int64_t t = 0; t < T; ++t) {
    const float* src = ypair + t * nslots * H;
    Out* dst = y + t * H;
    for (int64_t h = 0; h < H; ++h) {
      float acc = src[h];
      for (int64_t s = 1; s < nslots; ++s) acc += src[s * H + h];
      if constexpr (std::is_same_v<Out, float>) dst[h] = acc; else dst[h] = f32_to_bf16(acc);
    }
  }
}

// Counting sort of the pairs by key. Routed pair (t, k) has key g*E + experts[t, k]; shared pair (t, s)
// has key G*E + g*S + s. Stable in token order.
struct Routing {
  int64_t T, K, G, E, S;
  const int64_t* group;    // [T] or nullptr (all zero)
  const int32_t* experts;  // [T, K] expert within the group
  const float* weights;    // [T, K]
};

Pairs sort_pairs(const Routing& r, std::vector<int64_t>& offsets) {
  const int64_t nkeys = r.G * r.E + r.G * r.S, nslots = r.K + r.S;
  std::vector<int64_t> count(nkeys + 1, 0);
  auto gid = [&](int64_t t) { return r.group ? r.group[t] : 0; };
  for (int64_t t = 0; t < r.T; ++t) {
    const int64_t g = gid(t);
    for (int64_t k = 0; k < r.K; ++k) ++count[g * r.E + r.experts[t * r.K + k] + 1];
    for (int64_t s = 0; s < r.S; ++s) ++count[r.G * r.E + g * r.S + s + 1];
  }
  for (int64_t i = 0; i < nkeys; ++i) count[i + 1] += count[i];  // prefix sum -> start of each key
  offsets = count;
  Pairs p;
  const int64_t P = r.T * nslots;
  p.token.resize(P);
  p.row.resize(P);
  p.weight.resize(P);
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  for (int64_t t = 0; t < r.T; ++t) {
    const int64_t g = gid(t);
    for (int64_t k = 0; k < r.K; ++k) {
      const int64_t d = next[g * r.E + r.experts[t * r.K + k]]++;
      p.token[d] = static_cast<int32_t>(t);
      p.row[d] = t * nslots + k;
      p.weight[d] = r.weights[t * r.K + k];
    }
    for (int64_t s = 0; s < r.S; ++s) {
      const int64_t d = next[r.G * r.E + g * r.S + s]++;
      p.token[d] = static_cast<int32_t>(t);
      p.row[d] = t * nslots + r.K + s;
      p.weight[d] = 1.0f;
    }
  }
  return p;
}

// Run everything after routing. Weights: routed [G, E, 2F, H] / [G, E, H, F], shared [G, S, 2Fs, H] /
// [G, S, H, Fs] (or null).
template <class In>
void experts_forward(const Kernels& kern, const In* x, int64_t H, const Routing& r, const In* gate_up,
                     const In* down, int64_t F, const In* sgate_up, const In* sdown, int64_t Fs, Act act, In* y) {
  std::vector<int64_t> offsets;
  const Pairs pairs = sort_pairs(r, offsets);
  std::vector<Job> jobs;
  for (int64_t g = 0; g < r.G; ++g)
    for (int64_t e = 0; e < r.E; ++e) {
      const int64_t key = g * r.E + e;
      if (offsets[key + 1] > offsets[key])
        jobs.push_back({gate_up + key * 2 * F * H, down + key * H * F, F, offsets[key], offsets[key + 1]});
    }
  for (int64_t g = 0; g < r.G; ++g)
    for (int64_t s = 0; s < r.S; ++s) {
      const int64_t key = r.G * r.E + g * r.S + s, w = g * r.S + s;
      if (offsets[key + 1] > offsets[key])
        jobs.push_back({sgate_up + w * 2 * Fs * H, sdown + w * H * Fs, Fs, offsets[key], offsets[key + 1]});
    }
  const int64_t nslots = r.K + r.S;
  std::vector<float> ypair(static_cast<size_t>(r.T * nslots * H));
#ifdef FASTFACE_X86
  if constexpr (std::is_same_v<In, bf16>) {
    if (kern.path == Path::Amx) {
      run_jobs_amx(x, H, jobs, pairs, act, ypair.data());
      return combine(ypair.data(), r.T, nslots, H, y);
    }
  }
#endif
  run_jobs(kern, x, H, jobs, pairs, act, ypair.data());
  combine(ypair.data(), r.T, nslots, H, y);
}

// Router: logits[t] = x_t . router[g_t]^T, softmax, top-k with ties to the lower index, renormalise.
template <class In>
void route(const Kernels& kern, const In* x, const int64_t* group, const In* router, int64_t T, int64_t H,
           int64_t E, int64_t K, bool normalize, float* logits, int32_t* experts, float* weights) {
#pragma omp parallel if (T * E * H >= (1 << 20))  // decode: on the calling thread (see combine)
  {
    std::vector<float> p(E);
    std::vector<char> taken(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* l = logits + t * E;
      const In* xt = x + t * H;
      kern.gemm(1, E, H, &xt, router + group[t] * E * H, H, l, E);
      float mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
      std::fill(taken.begin(), taken.end(), 0);
      float wsum = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;  // strict '>': ties keep the lower index
        taken[best] = 1;
        experts[t * K + k] = static_cast<int32_t>(best);
        weights[t * K + k] = p[best];
        wsum += p[best];
      }
      if (normalize)
        for (int64_t k = 0; k < K; ++k) weights[t * K + k] /= wsum;
    }
  }
}

Act parse_act(const std::string& a) {
  if (a == "silu") return Act::Silu;
  if (a == "gelu") return Act::Gelu;
  value_error("activation must be 'silu' or 'gelu', got '" + a + "'");
}

Kernels kernels_for(bool is_bf16) { return Kernels{choose_path(is_bf16), cpu_features().avx512_bf16}; }

py::array new_array(DType dt, std::vector<py::ssize_t> shape) {
  if (dt == DType::BF16) return py::array_t<int16_t>(shape);
  return py::array_t<float>(shape);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// bindings
// ----------------------------------------------------------------------------------------------

py::tuple grouped_moe(const py::object& x_, const py::object& group_ids_, const py::object& router_weight_,
                      const py::object& gate_up_proj_, const py::object& down_proj_, int64_t top_k,
                      const py::object& shared_gate_up_proj_, const py::object& shared_down_proj_,
                      bool normalize_topk, const std::string& activation, bool return_router_logits) {
  const auto floats = {DType::F32, DType::BF16};
  Arg x = require(x_, "x", 2, floats);
  Arg gid = require(group_ids_, "group_ids", 1, {DType::I64});
  Arg rw = require(router_weight_, "router_weight", 3, floats);
  Arg gu = require(gate_up_proj_, "gate_up_proj", 4, floats);
  Arg dn = require(down_proj_, "down_proj", 4, floats);
  require_same_dtype(rw, x);
  require_same_dtype(gu, x);
  require_same_dtype(dn, x);
  const int64_t T = x.dim(0), H = x.dim(1), G = rw.dim(0), E = rw.dim(1);
  if (H < 1) value_error("x must have at least one hidden column");
  if (G < 1 || E < 1) value_error("router_weight must have at least one group and one expert, got shape " +
                                  shape_str(rw.info.shape));
  require_shape(gid, {T});
  require_shape(rw, {G, E, H});
  if (gu.dim(0) != G || gu.dim(1) != E || gu.dim(3) != H || gu.dim(2) % 2 || gu.dim(2) == 0)
    value_error("gate_up_proj must have shape (" + std::to_string(G) + ", " + std::to_string(E) + ", 2F, " +
                std::to_string(H) + ") with F >= 1, got " + shape_str(gu.info.shape));
  const int64_t F = gu.dim(2) / 2;
  require_shape(dn, {G, E, H, F});
  require_int("top_k", top_k, 1, E);
  const bool has_shared = !shared_gate_up_proj_.is_none();
  if (has_shared != !shared_down_proj_.is_none())
    value_error("shared_gate_up_proj and shared_down_proj must be given together");
  int64_t S = 0, Fs = 0;
  const void* sgu_ptr = nullptr;
  const void* sdn_ptr = nullptr;
  std::vector<Arg> keep;
  if (has_shared) {
    Arg sgu = require(shared_gate_up_proj_, "shared_gate_up_proj", 4, floats);
    Arg sdn = require(shared_down_proj_, "shared_down_proj", 4, floats);
    require_same_dtype(sgu, x);
    require_same_dtype(sdn, x);
    S = sgu.dim(1);
    if (sgu.dim(0) != G || sgu.dim(3) != H || sgu.dim(2) % 2 || (S > 0 && sgu.dim(2) == 0))
      value_error("shared_gate_up_proj must have shape (" + std::to_string(G) + ", S, 2Fs, " + std::to_string(H) +
                  ") with Fs >= 1, got " + shape_str(sgu.info.shape));
    Fs = sgu.dim(2) / 2;
    require_shape(sdn, {G, S, H, Fs});
    sgu_ptr = sgu.info.ptr;
    sdn_ptr = sdn.info.ptr;
    keep.push_back(std::move(sgu));
    keep.push_back(std::move(sdn));
  }
  const Act act = parse_act(activation);
  require_range_i64(gid, 0, G);

  const bool is_bf16 = x.dtype == DType::BF16;
  py::array y = new_array(x.dtype, {T, H});
  py::array_t<float> logits({T, E});
  void* y_ptr = y.mutable_data();
  float* logits_ptr = logits.mutable_data();
  {
    py::gil_scoped_release nogil;
    const Kernels kern = kernels_for(is_bf16);
    std::vector<int32_t> experts(static_cast<size_t>(T * top_k));
    std::vector<float> weights(static_cast<size_t>(T * top_k));
    const Routing r{T, top_k, G, E, S, gid.data<int64_t>(), experts.data(), weights.data()};
    if (is_bf16) {
      route(kern, x.data<bf16>(), gid.data<int64_t>(), rw.data<bf16>(), T, H, E, top_k, normalize_topk, logits_ptr,
            experts.data(), weights.data());
      experts_forward(kern, x.data<bf16>(), H, r, gu.data<bf16>(), dn.data<bf16>(), F,
                      static_cast<const bf16*>(sgu_ptr), static_cast<const bf16*>(sdn_ptr), Fs, act,
                      static_cast<bf16*>(y_ptr));
    } else {
      route(kern, x.data<float>(), gid.data<int64_t>(), rw.data<float>(), T, H, E, top_k, normalize_topk,
            logits_ptr, experts.data(), weights.data());
      experts_forward(kern, x.data<float>(), H, r, gu.data<float>(), dn.data<float>(), F,
                      static_cast<const float*>(sgu_ptr), static_cast<const float*>(sdn_ptr), Fs, act,
                      static_cast<float*>(y_ptr));
    }
  }
  return py::make_tuple(y, return_router_logits ? py::object(logits) : py::object(py::none()));
}

py::object moe_experts(const py::object& x_, const py::object& top_k_index_, const py::object& top_k_weights_,
                       const py::object& gate_up_proj_, const py::object& down_proj_, const std::string& activation) {
  const auto floats = {DType::F32, DType::BF16};
  Arg x = require(x_, "x", 2, floats);
  Arg idx = require(top_k_index_, "top_k_index", 2, {DType::I64});
  Arg tw = require(top_k_weights_, "top_k_weights", 2, {DType::F32});
  Arg gu = require(gate_up_proj_, "gate_up_proj", 3, floats);
  Arg dn = require(down_proj_, "down_proj", 3, floats);
  require_same_dtype(gu, x);
  require_same_dtype(dn, x);
  const int64_t T = x.dim(0), H = x.dim(1), K = idx.dim(1), E = gu.dim(0);
  if (H < 1) value_error("x must have at least one hidden column");
  if (E < 1) value_error("gate_up_proj must hold at least one expert");
  require_shape(idx, {T, K});
  require_shape(tw, {T, K});
  if (gu.dim(2) != H || gu.dim(1) % 2 || gu.dim(1) == 0)
    value_error("gate_up_proj must have shape (E, 2F, " + std::to_string(H) + ") with F >= 1, got " +
                shape_str(gu.info.shape));
  const int64_t F = gu.dim(1) / 2;
  require_shape(dn, {E, H, F});
  const Act act = parse_act(activation);
  require_range_i64(idx, 0, E);

  const bool is_bf16 = x.dtype == DType::BF16;
  py::array y = new_array(x.dtype, {T, H});
  void* y_ptr = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    const Kernels kern = kernels_for(is_bf16);
    std::vector<int32_t> experts(static_cast<size_t>(T * K));
    const int64_t* ip = idx.data<int64_t>();
    for (int64_t i = 0; i < T * K; ++i) experts[i] = static_cast<int32_t>(ip[i]);
    const Routing r{T, K, 1, E, 0, nullptr, experts.data(), tw.data<float>()};
    if (is_bf16)
      experts_forward<bf16>(kern, x.data<bf16>(), H, r, gu.data<bf16>(), dn.data<bf16>(), F, nullptr, nullptr, 0, act,
                            static_cast<bf16*>(y_ptr));
    else
      experts_forward<float>(kern, x.data<float>(), H, r, gu.data<float>(), dn.data<float>(), F, nullptr, nullptr, 0,
                             act, static_cast<float*>(y_ptr));
  }
  return std::move(y);
}

void set_matmul_path(const std::string& path) {
  if (path == "auto") g_forced_path = -1;
  else if (path == "scalar") g_forced_path = static_cast<int>(Path::Scalar);
  else if (path == "avx2") g_forced_path = static_cast<int>(Path::Avx2);
  else if (path == "avx512") g_forced_path = static_cast<int>(Path::Avx512);
  else if (path == "amx") g_forced_path = static_cast<int>(Path::Amx);
  else value_error("path must be one of 'auto', 'amx', 'avx512', 'avx2', 'scalar', got '" + path + "'");
}

std::string matmul_path(bool bf16) { return path_name(choose_path(bf16)); }

}  // namespace fastface
