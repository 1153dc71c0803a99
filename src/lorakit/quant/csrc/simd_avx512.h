// The AVX-512F SIMD traits of the kernel (kernel_impl.h): 16 floats per vector. Included, after their
// `#pragma GCC target`, by kernels_avx512.cpp and kernels_avx512vnni.cpp.
#pragma once
#include <immintrin.h>

namespace {
struct S {
  using V = __m512;
  static constexpr int W = 16;
  // One row: 4 output rows a time (tile1). Several: 8 input rows x 2 output rows (16 of the 32 zmm registers
  // accumulate); tiles of <= 4 rows take 4 output rows instead.
  static constexpr int OT1 = 4, OT = 2, RT = 8;
  static constexpr int IOT = 2, IRT = 4;  // int8 activations (irows): output x input rows per tile (4 x 4 and 2 x 8
  // measured no faster with VNNI's 32 registers)
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static V q8(const int8_t* p) {  // 16 int8 -> float
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V q4(const uint8_t* block, int c) {  // elements 16c .. 16c + 15: low nibbles (c = 0), high (c = 1)
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    v = c == 0 ? _mm512_and_si512(v, _mm512_set1_epi32(15)) : _mm512_srli_epi32(v, 4);
    return _mm512_cvtepi32_ps(v);
  }
  static V dot_q8(const int8_t* q, const float* x) {  // lane sums of x q over one block of 32
    return _mm512_fmadd_ps(load(x + 16), q8(q + 16), _mm512_mul_ps(load(x), q8(q)));
  }
  static V dot_q4(const uint8_t* block, const float* x) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    const V lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    return _mm512_fmadd_ps(load(x + 16), _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_mul_ps(load(x), lo));
  }
};
}  // namespace
