// AVX2 + FMA + F16C build of the kernel (kernel_impl.h): 8 floats per vector.
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

namespace {
struct S {
  using V = __m256;
  static constexpr int W = 8;
  // One row: 4 output rows a time (tile1). Several: 8 input rows x 1 output row (8 of the 16 ymm registers
  // accumulate, x is read from L1 by the multiply-adds); tiles of <= 4 rows take 2 output rows instead.
  static constexpr int OT1 = 4, OT = 1, RT = 8;
  static constexpr int IOT = 2, IRT = 4;  // int8 activations (irows): output x input rows per tile
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static V q8(const int8_t* p) {  // 8 int8 -> float
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V q4(const uint8_t* block, int c) {  // elements 8c .. 8c + 7 of a 16-byte 4-bit block
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * (c & 1))));
    v = c < 2 ? _mm256_and_si256(v, _mm256_set1_epi32(15)) : _mm256_srli_epi32(v, 4);
    return _mm256_cvtepi32_ps(v);
  }
  static V dot_q8(const int8_t* q, const float* x) {  // lane sums of x q over one block of 32
    V a = _mm256_mul_ps(load(x), q8(q)), b = _mm256_mul_ps(load(x + 8), q8(q + 8));
    a = _mm256_fmadd_ps(load(x + 16), q8(q + 16), a);
    b = _mm256_fmadd_ps(load(x + 24), q8(q + 24), b);
    return _mm256_add_ps(a, b);
  }
  static V dot_q4(const uint8_t* block, const float* x) {
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block)));
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8)));
    const __m256i mask = _mm256_set1_epi32(15);
    V a = _mm256_mul_ps(load(x), _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask)));
    V b = _mm256_mul_ps(load(x + 8), _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask)));
    a = _mm256_fmadd_ps(load(x + 16), _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)), a);
    b = _mm256_fmadd_ps(load(x + 24), _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)), b);
    return _mm256_add_ps(a, b);
  }
};
}  // namespace

#include "kernel_impl.h"

void lorakit_quant::linear_avx2(const Problem& p, int64_t o_begin, int64_t o_end) {
  if (p.format == kQ4) run<true>(p, o_begin, o_end);
  else run<false>(p, o_begin, o_end);
}

// Each block of 32: xs = max|x| / 127, xq = x / xs rounded to the nearest (even) integer, xm = xs * sum(xq); a block
// holding a NaN gets xs = NaN (max would drop it), so that NaN reaches y as it does in float.
void lorakit_quant::quantize_rows(const Problem& p, int8_t* xq, float* xs, float* xm, int64_t r_begin, int64_t r_end) {
  const int64_t nb = p.k / 32;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' interleaving of lanes
  for (int64_t r = r_begin; r < r_end; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = p.x + r * p.ldx + 32 * b;
      __m256 v[4], amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm256_loadu_ps(x + 8 * c);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[c]));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[c], v[c], _CMP_UNORD_Q));
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
      const float scale = _mm256_movemask_ps(nan) ? __builtin_nanf("") : top / 127.0f;
      const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
      __m256i n[4];
      for (int c = 0; c < 4; ++c) n[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], inv));
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + r * p.k + 32 * b), _mm256_permutevar8x32_epi32(packed, order));
      xs[r * p.ldxs + b] = scale;
      if (xm) {
        const __m256i t = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
        __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4e));
        u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xb1));
        xm[r * p.ldxs + b] = scale * static_cast<float>(_mm_cvtsi128_si32(u));
      }
    }
}
#else
void lorakit_quant::linear_avx2(const Problem&, int64_t, int64_t) {}  // never called: cpu_isa() is 0 here
void lorakit_quant::quantize_rows(const Problem&, int8_t*, float*, float*, int64_t, int64_t) {}
#endif
