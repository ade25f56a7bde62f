// CPU GEMM for the kernels (implementation, measurements and the choice against a BLAS: gemm.cpp).
//
// Legend: M rows of A (activations), N rows of W (weights, one per output column), K the reduction dim.
//
// Two primitives, each on a path (ISA) chosen at runtime:
//   gemm:    C[M, N] = A[M, K] . W[N, K]^T, W in its stored (transformers) layout, no repacking, fp32
//            accumulation; A is M row pointers, so rows can be gathered in place;
//   act_mul: out = act(gate) * up, the FFN epilogue between the two GEMMs of an expert;
// and, for bf16 on CPUs with AMX, the tile primitives (amx_*) that a caller arranges itself.
// Batch invariance: each output C[m, n] sees the same sequence of operations whatever M, N and the
// blocking are, so a row's result is bitwise the same alone or in any batch (on one machine and path).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTFACE_X86 1
#endif

namespace fastface {

using bf16 = uint16_t;  // bfloat16 bits (conversions: common.h)

enum class Act { Silu, Gelu };  // silu(g) = g sigmoid(g); gelu(g) with the tanh approximation

// Ordered: each path may use the instruction sets of the ones before it.
enum class Path { Scalar, Avx2, Avx512, Amx };

// The path a call would use now: the best the CPU has (Amx for bf16 only), or the one forced by
// set_matmul_path, capped at the best.
Path choose_path(bool is_bf16);
const char* path_name(Path p);

// The primitives on one path. Amx runs gemm and act_mul as Avx512 (callers use the amx_* tiles for the
// bulk of their bf16 work).
struct Kernels {
  Path path;
  bool avx512_bf16;  // the Avx512 path may use vdpbf16ps for bf16 inputs

  // C[m * ldc + n] = sum_k A[m][k] * W[n * ldw + k] for m < M, n < N, k < K.
  void gemm(int64_t M, int64_t N, int64_t K, const float* const* A, const float* W, int64_t ldw, float* C,
            int64_t ldc) const;
  void gemm(int64_t M, int64_t N, int64_t K, const bf16* const* A, const bf16* W, int64_t ldw, float* C,
            int64_t ldc) const;
  // out[i] = act(gate[i]) * up[i] for i < n (rounded to bf16 for a bf16 out).
  void act_mul(const float* gate, const float* up, int64_t n, Act a, float* out) const;
  void act_mul(const float* gate, const float* up, int64_t n, Act a, bf16* out) const;
};

Kernels kernels_for(bool is_bf16);  // the primitives on choose_path(is_bf16)

#ifdef FASTFACE_X86
// ----------------------------------------------------------------------------------------------
// AMX (bf16), for Path::Amx only. Weights are the tiles' "A" operand, read in place: 16 weight rows x 32 k,
// row stride ldw_bytes, k-block kb at byte offset 64 * kb. Activation rows are packed into the VNNI "B"
// operand, per group of 16 rows: nkb k-blocks of 256 uint32, element (k, m) in the half k % 2 of uint32
// ((k / 32) * 16 + (k % 32) / 2) * 16 + m (k-pairs x rows). Products come out transposed:
// c[t * 256 + n * 16 + m] = C^T[n, m] of accumulator t.
// ----------------------------------------------------------------------------------------------

void amx_configure();  // per thread, before its first amx_block: 8 tiles of 16 rows x 64 bytes
void amx_release();    // per thread, after its last amx_block

// C^T tiles over nkb k-blocks of 32: c[0] = W0.B0, c[1] = W1.B0, c[2] = W0.B1, c[3] = W1.B1 (B1 optional).
// W0/W1: 16 rows each, row stride ldw_bytes, k-block kb at byte offset 64 * kb; B: 256 u32 per k-block.
void amx_block(const void* W0, const void* W1, int64_t ldw_bytes, const uint32_t* B0, const uint32_t* B1,
               int64_t nkb, float* c /* [4][16][16] */);

// Two 16-row weight blocks as tile sources, with one row stride: rows [ra, ra + 16) of Wa and [rb, rb + 16)
// of Wb, both [rows, K]. In place when both blocks are whole and K is a multiple of 32; else copied
// zero-padded into pa / pb [16, Kp] (odd shapes only): never reads past a weight, padded k meets zero
// activations, padded rows give outputs nobody reads. Returns the row stride in elements.
int64_t amx_rows2(const bf16* Wa, int64_t ra, const bf16* Wb, int64_t rb, int64_t rows, int64_t K, int64_t Kp,
                  bf16* pa, bf16* pb, const bf16** wa, const bf16** wb);

// Row m of a 16-row group into its packed B operand b: b(k, m) = src[k] for k < K.
void amx_pack_row(const bf16* src, int64_t K, int64_t m, uint32_t* b);

// The epilogue of a gate/up amx_block, straight into the packed B operand of the next GEMM (k = f):
// b(f0 + f, m) = bf16(act(gate_t[f * 16 + m]) * up_t[f * 16 + m]) for f < nf, m < mvalid, where gate_t and
// up_t are C^T tiles [16 f, 16 m].
void amx_pack_act_mul(const float* gate_t, const float* up_t, int64_t f0, int64_t nf, int64_t mvalid, Act a,
                      uint32_t* b);
#endif  // FASTFACE_X86

}  // namespace fastface
