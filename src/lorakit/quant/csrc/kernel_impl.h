// The kernel body, included by kernels_avx2.cpp and kernels_avx512.cpp after a `#pragma GCC target` and the
// definition of the SIMD traits `S`. Everything here has internal linkage (anonymous namespace) and uses no
// standard-library inline function: an inline function compiled for AVX-512 must never be merged by the
// linker with its AVX2 twin and then run on an AVX2-only CPU.
namespace {

using lorakit_quant::Problem;

// n float16 bit patterns -> float32
inline void to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  float total = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Output rows [o, o + OT) x input rows [r, r + RT): OT * RT vector accumulators; each block's weights are
// dequantized once in registers (w = d q + m, one fused multiply-add) and used for the RT input rows.
template <bool Q4, int OT, int RT>
inline void tile(const Problem& p, int64_t o, int64_t r) {
  constexpr int kChunks = 32 / S::W;
  const int64_t nb = p.k / 32;
  const int64_t row_bytes = Q4 ? p.k / 2 : p.k;
  typename S::V acc[OT][RT];
  for (int i = 0; i < OT; ++i)
    for (int j = 0; j < RT; ++j) acc[i][j] = S::zero();
  const float* x = p.x + r * p.ldx;
  const uint8_t* q = p.q + o * row_bytes;
  const uint16_t* d = p.d + o * nb;
  const uint16_t* m = Q4 ? p.m + o * nb : nullptr;
  // Rows are short (K bytes or K / 2), so the hardware prefetchers barely ramp up on one tile's rows before
  // they end: fetch the same place kAhead rows further on (the tile after next) while computing this one.
  constexpr int64_t kAhead = 2 * OT;
  for (int64_t b = 0; b < nb; ++b) {
    for (int i = 0; i < OT; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(q + (i + kAhead) * row_bytes + b * (Q4 ? 16 : 32)), _MM_HINT_T0);
      if ((b & 31) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(d + (i + kAhead) * nb + b), _MM_HINT_T0);
        if (Q4) _mm_prefetch(reinterpret_cast<const char*>(m + (i + kAhead) * nb + b), _MM_HINT_T0);
      }
    }
    typename S::V dv[OT], mv[OT];
    for (int i = 0; i < OT; ++i) {
      dv[i] = S::set1(_cvtsh_ss(d[i * nb + b]));
      if (Q4) mv[i] = S::set1(_cvtsh_ss(m[i * nb + b]));
    }
    for (int c = 0; c < kChunks; ++c) {
      typename S::V xv[RT];
      for (int j = 0; j < RT; ++j) xv[j] = S::load(x + j * p.ldx + b * 32 + c * S::W);
      for (int i = 0; i < OT; ++i) {
        typename S::V w;
        if (Q4) {
          w = S::fma(S::q4(q + i * row_bytes + b * 16, c), dv[i], mv[i]);
        } else {
          w = S::mul(S::q8(reinterpret_cast<const int8_t*>(q + i * row_bytes + b * 32 + c * S::W)), dv[i]);
        }
        for (int j = 0; j < RT; ++j) acc[i][j] = S::fma(xv[j], w, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < OT; ++i)
    for (int j = 0; j < RT; ++j)
      p.y[(r + j) * p.ldy + o + i] = S::sum(acc[i][j]) + (p.bias ? p.bias[o + i] : 0.0f);
}

// One input row (decoding), output rows [o, o + OT). Per block, sum_j x_j q_j in a vector, times d (the
// factors converted to float32 a chunk of blocks at a time), and sum_b m_b * sum_j x_j apart: ~2/3 of the
// instructions of decoding each weight to d q + m, which matters because one row is barely enough work
// per weight byte to keep up with memory.
template <bool Q4, int OT>
inline void tile1(const Problem& p, int64_t o) {
  constexpr int64_t kChunk = 64, kAhead = 2 * OT;
  const int64_t nb = p.k / 32, row_bytes = Q4 ? p.k / 2 : p.k;
  const uint8_t* q = p.q + o * row_bytes;
  typename S::V acc[OT];
  float mterm[OT], dbuf[OT][kChunk], mbuf[OT][kChunk];
  for (int i = 0; i < OT; ++i) acc[i] = S::zero(), mterm[i] = 0.0f;
  for (int64_t b0 = 0; b0 < nb; b0 += kChunk) {
    const int64_t n = nb - b0 < kChunk ? nb - b0 : kChunk;
    for (int i = 0; i < OT; ++i) {
      to_float(p.d + (o + i) * nb + b0, dbuf[i], n);
      if (Q4) {
        to_float(p.m + (o + i) * nb + b0, mbuf[i], n);
        mterm[i] += dot(mbuf[i], p.xsum + b0, n);
      }
    }
    for (int64_t b = b0; b < b0 + n; ++b) {
      for (int i = 0; i < OT; ++i) {
        const uint8_t* block = q + i * row_bytes + b * (Q4 ? 16 : 32);
        _mm_prefetch(reinterpret_cast<const char*>(block + kAhead * row_bytes), _MM_HINT_T0);
        if ((b & 31) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(p.d + (o + i + kAhead) * nb + b), _MM_HINT_T0);
          if (Q4) _mm_prefetch(reinterpret_cast<const char*>(p.m + (o + i + kAhead) * nb + b), _MM_HINT_T0);
        }
        const typename S::V s = Q4 ? S::dot_q4(block, p.x + b * 32) : S::dot_q8(reinterpret_cast<const int8_t*>(block), p.x + b * 32);
        acc[i] = S::fma(s, S::set1(dbuf[i][b - b0]), acc[i]);
      }
    }
  }
  for (int i = 0; i < OT; ++i) p.y[o + i] = S::sum(acc[i]) + mterm[i] + (p.bias ? p.bias[o + i] : 0.0f);
}

// All input rows for output rows [o, o + OT): RT rows at a time, then the remainder.
template <bool Q4, int OT>
inline void column(const Problem& p, int64_t o) {
  int64_t r = 0;
  for (; r + S::RT <= p.rows; r += S::RT) tile<Q4, OT, S::RT>(p, o, r);
  for (; r + 2 <= p.rows; r += 2) tile<Q4, OT, 2>(p, o, r);
  for (; r < p.rows; ++r) tile<Q4, OT, 1>(p, o, r);
}

template <bool Q4>
inline void run(const Problem& p, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  if (p.rows == 1) {  // one row (decoding): more output rows at a time, for independent accumulators
    for (; o + S::OT1 <= o_end; o += S::OT1) tile1<Q4, S::OT1>(p, o);
    for (; o < o_end; ++o) tile1<Q4, 1>(p, o);
  } else {
    for (; o + S::OT <= o_end; o += S::OT) column<Q4, S::OT>(p, o);
  }
  for (; o < o_end; ++o) column<Q4, 1>(p, o);
}

}  // namespace
