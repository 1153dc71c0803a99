// torch operators over the block-quantized kernels (lorakit.quant.kernels builds this file and the two
// kernels_*.cpp at first use): lorakit_quant::linear and lorakit_quant::cpu_isa.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"

namespace {

using lorakit_quant::Problem;

// 3: AVX-512F + VL + BW + VNNI, 2: AVX-512F, each with AVX2 / FMA / F16C; 1: AVX2 + FMA + F16C; 0: none of them
// (no kernel runs here).
int64_t cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool vnni = __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vnni");
  if (avx2 && __builtin_cpu_supports("avx512f")) return vnni ? 3 : 2;
  return avx2 ? 1 : 0;
#else
  return 0;
#endif
}

bool is_half_bits(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kShort; }

// y = x dequant(q, d, m)^T + bias for x (..., K) of a float dtype, computed in float32 and returned in x's dtype;
// isa 1 (AVX2), 2 (AVX-512) or 3 (AVX-512 VNNI), at most cpu_isa(). d and m hold float16 values (float16 or int16
// bit patterns). act 8: x rounded to int8 blocks first (kernels.h), integer products; act 32: float32 products.
at::Tensor linear(const at::Tensor& input, const at::Tensor& q, const at::Tensor& d, const std::optional<at::Tensor>& m,
                  const std::optional<at::Tensor>& bias, int64_t format, int64_t isa, int64_t act) {
  TORCH_CHECK(isa >= 1 && isa <= cpu_isa(), "lorakit_quant.linear: isa ", isa, " is not available on this CPU (",
              cpu_isa(), ")");
  const bool q4 = format == lorakit_quant::kQ4;
  TORCH_CHECK(format == lorakit_quant::kQ8 || q4, "format must be 0 (Q8) or 1 (Q4)");
  TORCH_CHECK(act == 8 || act == 32, "act must be 8 (int8 activations) or 32 (float32), got ", act);
  TORCH_CHECK(d.dim() == 2 && d.is_contiguous() && is_half_bits(d), "d must be (N, K / 32) float16 (or its int16 bits)");
  const int64_t n = d.size(0), k = 32 * d.size(1);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == k && at::isFloatingType(input.scalar_type()),
              "x must be (..., ", k, ") floating point, got ", input.sizes(), " ", input.scalar_type());
  TORCH_CHECK(q.is_contiguous() && q.dim() == 2 && q.size(0) == n && q.size(1) == (q4 ? k / 2 : k) &&
                  q.scalar_type() == (q4 ? at::kByte : at::kChar),
              "q must be contiguous (N, K) int8 for Q8 or (N, K / 2) uint8 for Q4");
  TORCH_CHECK(!q4 || (m && m->is_contiguous() && is_half_bits(*m) && m->sizes() == d.sizes()), "Q4 needs m shaped as d");
  TORCH_CHECK(!bias || (bias->numel() == n && at::isFloatingType(bias->scalar_type())), "bias must be (N,)");
  at::Tensor x = input.reshape({-1, k});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (x.stride(1) != 1) x = x.contiguous();
  at::Tensor bias32;
  if (bias) bias32 = bias->to(at::kFloat).contiguous();  // no copy when it is float32 already
  auto y = at::empty({x.size(0), n}, x.options());
  Problem p{x.data_ptr<float>(), x.stride(0), x.size(0), k,
            reinterpret_cast<const uint8_t*>(q.data_ptr()),
            reinterpret_cast<const uint16_t*>(d.data_ptr()),
            q4 ? reinterpret_cast<const uint16_t*>(m->data_ptr()) : nullptr,
            bias ? bias32.data_ptr<float>() : nullptr, y.data_ptr<float>(), y.stride(0), format, nullptr};
  std::vector<int8_t> xq;
  std::vector<float> xs, xm, xsum;
  if (act == 8) {
    const int64_t rows = x.size(0);
    p.ldxs = (k / 32 + 7) / 8 * 8;
    xq.resize(rows * k), xs.assign(rows * p.ldxs, 0.0f), xm.assign(q4 ? rows * p.ldxs : 0, 0.0f);
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
      lorakit_quant::quantize_rows(p, xq.data(), xs.data(), q4 ? xm.data() : nullptr, begin, end);
    });
    p.xq = xq.data(), p.xs = xs.data(), p.xm = q4 ? xm.data() : nullptr;
  } else if (q4 && x.size(0) == 1) {
    xsum.assign(k / 32, 0.0f);
    for (int64_t b = 0; b < k / 32; ++b)
      for (int64_t j = 0; j < 32; ++j) xsum[b] += p.x[32 * b + j];
    p.xsum = xsum.data();
  }
  // Threads split the output rows in multiples of 4, each at least ~32 KB of weights.
  const int64_t row_bytes = q4 ? k / 2 + k / 8 : k + k / 16;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (4 * row_bytes));
  at::parallel_for(0, (n + 3) / 4, grain, [&](int64_t begin, int64_t end) {
    const int64_t o_end = std::min(4 * end, n);
    if (isa == 3) lorakit_quant::linear_avx512vnni(p, 4 * begin, o_end);
    else if (isa == 2) lorakit_quant::linear_avx512(p, 4 * begin, o_end);
    else lorakit_quant::linear_avx2(p, 4 * begin, o_end);
  });
  auto sizes = input.sizes().vec();
  sizes.back() = n;
  y = y.view(sizes);
  return input.scalar_type() == at::kFloat ? y : y.to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY(lorakit_quant, lib) {
  lib.def("linear(Tensor x, Tensor q, Tensor d, Tensor? m, Tensor? bias, int format, int isa, int act) -> Tensor");
  lib.def("cpu_isa() -> int", &cpu_isa);
}

TORCH_LIBRARY_IMPL(lorakit_quant, CPU, lib) { lib.impl("linear", &linear); }
