// Weight-only block-quantized linear layers: the entry points of the ISA-specific kernels.
//
//   y[r, o] = sum_k x[r, k] * w[o, k] + bias[o],   w[o, 32 b + j] = d[o, b] * q[o, 32 b + j] + m[o, b]
//
// x: (M, K) float32 rows ldx apart; y: (M, N) float32 rows ldy apart; K a multiple of 32.
// Q8 (GGUF Q8_0): q int8 (N, K), m absent (0).  Q4 (GGUF Q4_1; Q4_0 is m = -8 d): q uint8 (N, K / 2),
// block b of row o in 16 bytes, byte j holding element j in its low nibble and element j + 16 in its high one.
// d, m: float16 bit patterns (N, K / 32). Each call computes output columns [o_begin, o_end) of every row.
//
// With xq set, x comes as int8 blocks instead (GGUF's Q8_1 activations, as llama.cpp multiplies them):
//   x[r, 32 b + j] ~ xs[r, b] * xq[r, 32 b + j],  xm[r, b] = xs[r, b] * sum_j xq[r, 32 b + j]   (quantize_rows)
// (xs and xm rows are ldxs apart, zero past K / 32)
// and each block's product is an integer dot product (u8 x s8 pairs: maddubs, or VNNI's dpbusd), scaled once.
#pragma once
#include <cstdint>

namespace lorakit_quant {

enum Format : int64_t { kQ8 = 0, kQ4 = 1 };

struct Problem {
  const float* x;
  int64_t ldx, rows, k;
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;  // nullptr for Q8
  const float* bias;  // nullptr without bias
  float* y;
  int64_t ldy;
  int64_t format;
  const float* xsum;  // Q4 with one row: the sum of each block of x (K / 32), for the m term
  const int8_t* xq = nullptr;  // int8 activations (rows, K), or nullptr: float32 x
  const float* xs = nullptr;   // their block scales (rows, K / 32), rows ldxs apart (zero past K / 32)
  const float* xm = nullptr;   // xs * the block sums of xq, as xs, for Q4's m term
  int64_t ldxs = 0;            // K / 32 rounded up to a multiple of 8
};

// Rows [r_begin, r_end) of p.x as int8 blocks into xq, xs, xm (shaped as Problem's; AVX2).
void quantize_rows(const Problem& p, int8_t* xq, float* xs, float* xm, int64_t r_begin, int64_t r_end);

void linear_avx2(const Problem& p, int64_t o_begin, int64_t o_end);
void linear_avx512(const Problem& p, int64_t o_begin, int64_t o_end);
void linear_avx512vnni(const Problem& p, int64_t o_begin, int64_t o_end);  // AVX-512 + VL + BW + VNNI

}  // namespace lorakit_quant
