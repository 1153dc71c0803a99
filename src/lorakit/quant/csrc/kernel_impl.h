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
// dequantized once in registers (w = d q + m, one fused multiply-add) and used for the RT input rows, whose
// values come from memory (L1) as the multiply-adds' operands, so the registers hold accumulators and weights.
//
// Blocks [b0, b1) of K only: the first range (b0 == 0) writes y (with the bias), the later ones add to it.
template <bool Q4, int OT, int RT>
inline void tile(const Problem& p, int64_t o, int64_t r, int64_t b0, int64_t b1) {
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
  // Only the first row tile fetches (r == 0): later ones find the weights in cache.
  constexpr int64_t kAhead = 2 * OT;
  const bool fetch = r == 0;
  for (int64_t b = b0; b < b1; ++b) {
    if (fetch) {
      for (int i = 0; i < OT; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(q + (i + kAhead) * row_bytes + b * (Q4 ? 16 : 32)), _MM_HINT_T0);
        if ((b & 31) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(d + (i + kAhead) * nb + b), _MM_HINT_T0);
          if (Q4) _mm_prefetch(reinterpret_cast<const char*>(m + (i + kAhead) * nb + b), _MM_HINT_T0);
        }
      }
    }
    typename S::V dv[OT], mv[OT];
    for (int i = 0; i < OT; ++i) {
      dv[i] = S::set1(_cvtsh_ss(d[i * nb + b]));
      if (Q4) mv[i] = S::set1(_cvtsh_ss(m[i * nb + b]));
    }
    for (int c = 0; c < kChunks; ++c) {
      typename S::V w[OT];
      for (int i = 0; i < OT; ++i) {
        if (Q4) {
          w[i] = S::fma(S::q4(q + i * row_bytes + b * 16, c), dv[i], mv[i]);
        } else {
          w[i] = S::mul(S::q8(reinterpret_cast<const int8_t*>(q + i * row_bytes + b * 32 + c * S::W)), dv[i]);
        }
      }
      for (int j = 0; j < RT; ++j) {
        const typename S::V xv = S::load(x + j * p.ldx + b * 32 + c * S::W);
        for (int i = 0; i < OT; ++i) acc[i][j] = S::fma(xv, w[i], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < OT; ++i)
    for (int j = 0; j < RT; ++j) {
      float& y = p.y[(r + j) * p.ldy + o + i];
      y = S::sum(acc[i][j]) + (b0 > 0 ? y : p.bias ? p.bias[o + i] : 0.0f);
    }
}

// A tile of n <= RT input rows: the tile<..., n> instance (each count its own, fully unrolled).
template <bool Q4, int OT, int RT>
inline void tile_n(const Problem& p, int64_t o, int64_t r, int64_t n, int64_t b0, int64_t b1) {
  if constexpr (RT > 0) {
    if (n == RT) tile<Q4, OT, RT>(p, o, r, b0, b1);
    else tile_n<Q4, OT, RT - 1>(p, o, r, n, b0, b1);
  }
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

// Output rows [o0, o1) for input rows [r, r + n), blocks [b0, b1): OT output rows at a time, then single ones.
template <bool Q4, int OT, int RT>
inline void sweep(const Problem& p, int64_t o0, int64_t o1, int64_t r, int64_t n, int64_t b0, int64_t b1) {
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) tile_n<Q4, OT, RT>(p, o, r, n, b0, b1);
  for (; o < o1; ++o) tile_n<Q4, 1, RT>(p, o, r, n, b0, b1);
}

// Several input rows, output rows [o_begin, o_end). The rows go in ceil(rows / RT) tiles of nearly equal size (9
// rows with RT 8: 5 + 4, not 8 + 1, whose one-row tile would decode each weight for a single row); a tile of at
// most RT / 2 rows takes twice the output rows at a time instead, so each decoded weight still feeds several
// multiply-adds. Each row tile sweeps a panel of output rows (~kPanelBytes of weights, which stay in L2 for the
// next tile) over a slice of K whose rows of x fit in L1 (kXBytes): the multiply-adds read x from L1 at up to two
// loads a cycle, where from L2 (64 rows x 1536 floats is 384 KB) they ran at ~2/3 of the rate (AVX2 on Zen 4: 27
// against 40 GMAC/s). K is cut in equal slices only where the tile's x exceeds that (K = 1536 with 8 rows), each
// slice adding its sums to y.
template <bool Q4>
inline void rows(const Problem& p, int64_t o_begin, int64_t o_end) {
  constexpr int64_t kPanelBytes = 64 << 10, kXBytes = 24 << 10;
  const int64_t nb = p.k / 32, tiles = (p.rows + S::RT - 1) / S::RT;
  const int64_t row_bytes = Q4 ? p.k / 2 + p.k / 8 : p.k + p.k / 16;
  const int64_t panel = tiles == 1 ? o_end - o_begin : (kPanelBytes / row_bytes + S::OT) / S::OT * S::OT;
  const int64_t tile_rows = (p.rows + tiles - 1) / tiles;
  const int64_t fit = kXBytes / (tile_rows * 32 * 4), max_kb = fit > 0 ? fit : 1;
  const int64_t slices = (nb + max_kb - 1) / max_kb, kb = (nb + slices - 1) / slices;
  for (int64_t o0 = o_begin; o0 < o_end; o0 += panel) {
    const int64_t o1 = o0 + panel < o_end ? o0 + panel : o_end;
    for (int64_t b0 = 0; b0 < nb; b0 += kb) {
      const int64_t b1 = b0 + kb < nb ? b0 + kb : nb;
      for (int64_t t = 0, r = 0; t < tiles; ++t) {
        const int64_t n = (p.rows - r + (tiles - t) - 1) / (tiles - t);
        if (2 * n <= S::RT) sweep<Q4, 2 * S::OT, S::RT / 2>(p, o0, o1, r, n, b0, b1);
        else sweep<Q4, S::OT, S::RT>(p, o0, o1, r, n, b0, b1);
        r += n;
      }
    }
  }
}

// ---- int8 activations (p.xq): per block, an integer dot product of 32 weight codes and 32 activation codes,
// converted once and scaled by d * xs; Q4's m term is sum_b m_b * xm_b. 256-bit integer code in every build.

// 8 int32 lane sums of u * s over 32 (unsigned, signed) byte pairs, 4 pairs a lane.
inline __m256i idot(__m256i u, __m256i s) {
#ifdef LORAKIT_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// A 4-bit block's 32 codes as bytes, in element order (low nibbles are elements 0-15, high ones 16-31).
inline __m256i unpack_q4(const uint8_t* block) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block)), low4 = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Output rows [o, o + OT) x input rows [r, r + RT), all of K: each block's codes unpacked once in registers for the
// RT rows. Q8's signed codes go in as |w| with x's signs flipped where w < 0 (maddubs / dpbusd take u8 x s8). The
// scales d * xs of a chunk of blocks are multiplied beforehand, a vector at a time, so that each block's product
// costs its integer dot product, a conversion and one multiply-add by a scale broadcast from memory.
template <bool Q4, int OT, int RT>
inline void itile(const Problem& p, int64_t o, int64_t r) {
  constexpr int64_t kChunk = 64, kAhead = 2 * OT;
  const int64_t nb = p.k / 32, row_bytes = Q4 ? p.k / 2 : p.k;
  __m256 acc[OT][RT];
  for (int i = 0; i < OT; ++i)
    for (int j = 0; j < RT; ++j) acc[i][j] = _mm256_setzero_ps();
  alignas(32) float scale[OT][RT][kChunk], dbuf[kChunk], mbuf[kChunk];
  const uint8_t* q = p.q + o * row_bytes;
  const uint16_t* d = p.d + o * nb;
  const int8_t* xq = p.xq + r * p.k;
  const bool fetch = r == 0;  // (later row tiles find the weights in cache)
  for (int64_t b0 = 0; b0 < nb; b0 += kChunk) {
    const int64_t n = nb - b0 < kChunk ? nb - b0 : kChunk, n8 = (n + 7) / 8 * 8;
    for (int i = 0; i < OT; ++i) {
      // d and m of the chunk's blocks, zero past n: xs and xm rows are zero there too (their rows are ldxs apart,
      // a multiple of 8), so that whole vectors of 8 blocks go through
      to_float(d + i * nb + b0, dbuf, n);
      for (int64_t b = n; b < n8; ++b) dbuf[b] = mbuf[b] = 0.0f;
      if (Q4) to_float(p.m + (o + i) * nb + b0, mbuf, n);
      for (int j = 0; j < RT; ++j) {
        const float* xs = p.xs + (r + j) * p.ldxs + b0;
        const float* xm = Q4 ? p.xm + (r + j) * p.ldxs + b0 : nullptr;
        for (int64_t b = 0; b < n8; b += 8) {
          _mm256_store_ps(scale[i][j] + b, _mm256_mul_ps(_mm256_load_ps(dbuf + b), _mm256_loadu_ps(xs + b)));
          if (Q4) acc[i][j] = _mm256_fmadd_ps(_mm256_load_ps(mbuf + b), _mm256_loadu_ps(xm + b), acc[i][j]);  // m term
        }
      }
    }
    for (int64_t b = b0; b < b0 + n; ++b) {
      __m256i w[OT];
      for (int i = 0; i < OT; ++i) {
        const uint8_t* block = q + i * row_bytes + b * (Q4 ? 16 : 32);
        if (fetch) {
          _mm_prefetch(reinterpret_cast<const char*>(block + kAhead * row_bytes), _MM_HINT_T0);
          if ((b & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(d + (i + kAhead) * nb + b), _MM_HINT_T0);
        }
        w[i] = Q4 ? unpack_q4(block) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
      }
      for (int j = 0; j < RT; ++j) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j * p.k + b * 32));
        for (int i = 0; i < OT; ++i) {
          const __m256i s = Q4 ? idot(w[i], xv) : idot(_mm256_sign_epi8(w[i], w[i]), _mm256_sign_epi8(xv, w[i]));
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(&scale[i][j][b - b0]), acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < OT; ++i)
    for (int j = 0; j < RT; ++j) p.y[(r + j) * p.ldy + o + i] = hsum8(acc[i][j]) + (p.bias ? p.bias[o + i] : 0.0f);
}

template <bool Q4, int OT, int RT>
inline void itile_n(const Problem& p, int64_t o, int64_t r, int64_t n) {
  if constexpr (RT > 0) {
    if (n == RT) itile<Q4, OT, RT>(p, o, r);
    else itile_n<Q4, OT, RT - 1>(p, o, r, n);
  }
}

template <bool Q4, int OT, int RT>
inline void isweep(const Problem& p, int64_t o0, int64_t o1, int64_t r, int64_t n) {
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) itile_n<Q4, OT, RT>(p, o, r, n);
  for (; o < o1; ++o) itile_n<Q4, 1, RT>(p, o, r, n);
}

// Input rows in tiles of at most kRT (balanced, as rows() does), each sweeping a panel of output rows whose
// weights stay in L2 for the next tile; a tile of at most kRT / 2 rows takes twice the output rows at a time.
template <bool Q4>
inline void irows(const Problem& p, int64_t o_begin, int64_t o_end) {
  constexpr int kOT = S::IOT, kRT = S::IRT;
  constexpr int64_t kPanelBytes = 64 << 10;
  const int64_t tiles = (p.rows + kRT - 1) / kRT;
  const int64_t row_bytes = Q4 ? p.k / 2 + p.k / 8 : p.k + p.k / 16;
  const int64_t panel = tiles == 1 ? o_end - o_begin : (kPanelBytes / row_bytes + kOT) / kOT * kOT;
  for (int64_t o0 = o_begin; o0 < o_end; o0 += panel) {
    const int64_t o1 = o0 + panel < o_end ? o0 + panel : o_end;
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      const int64_t n = (p.rows - r + (tiles - t) - 1) / (tiles - t);
      if (2 * n <= kRT) isweep<Q4, 2 * kOT, kRT / 2>(p, o0, o1, r, n);
      else isweep<Q4, kOT, kRT>(p, o0, o1, r, n);
      r += n;
    }
  }
}

template <bool Q4>
inline void run(const Problem& p, int64_t o_begin, int64_t o_end) {
  if (p.xq) return irows<Q4>(p, o_begin, o_end);
  if (p.rows > 1) return rows<Q4>(p, o_begin, o_end);
  int64_t o = o_begin;  // one row (decoding): more output rows at a time, for independent accumulators
  for (; o + S::OT1 <= o_end; o += S::OT1) tile1<Q4, S::OT1>(p, o);
  for (; o < o_end; ++o) tile1<Q4, 1>(p, o);
}

}  // namespace
