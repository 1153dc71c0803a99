// torch operators over the block-quantized kernels (lorakit.quant.kernels builds this file and the two
// kernels_*.cpp at first use): lorakit_quant::linear and lorakit_quant::cpu_isa.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"

namespace {

using lorakit_quant::Problem;

// 2: AVX-512F with AVX2 / FMA / F16C; 1: AVX2 + FMA + F16C; 0: neither (no kernel runs here).
int64_t cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return 2;
  return avx2 ? 1 : 0;
#else
  return 0;
#endif
}

// y = x dequant(q, d, m)^T + bias for x (M, K) float32; isa 1 (AVX2) or 2 (AVX-512), at most cpu_isa().
at::Tensor linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const std::optional<at::Tensor>& m,
                  const std::optional<at::Tensor>& bias, int64_t format, int64_t isa) {
  TORCH_CHECK(isa >= 1 && isa <= cpu_isa(), "lorakit_quant.linear: isa ", isa, " is not available on this CPU (",
              cpu_isa(), ")");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x must be (M, K) float32, rows contiguous");
  const int64_t k = x.size(1), n = q.size(0);
  const bool q4 = format == lorakit_quant::kQ4;
  TORCH_CHECK(format == lorakit_quant::kQ8 || q4, "format must be 0 (Q8) or 1 (Q4)");
  TORCH_CHECK(k % 32 == 0, "in_features must be a multiple of 32, got ", k);
  TORCH_CHECK(q.is_contiguous() && q.dim() == 2 && q.size(1) == (q4 ? k / 2 : k) &&
                  q.scalar_type() == (q4 ? at::kByte : at::kChar),
              "q must be contiguous (N, K) int8 for Q8 or (N, K / 2) uint8 for Q4");
  TORCH_CHECK(d.is_contiguous() && d.scalar_type() == at::kHalf && d.numel() == n * (k / 32), "d must be (N, K / 32) float16");
  TORCH_CHECK(!q4 || (m && m->is_contiguous() && m->scalar_type() == at::kHalf && m->numel() == n * (k / 32)),
              "Q4 needs m: (N, K / 32) float16");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == n),
              "bias must be (N,) float32");
  auto y = at::empty({x.size(0), n}, x.options());
  Problem p{x.data_ptr<float>(), x.stride(0), x.size(0), k,
                  reinterpret_cast<const uint8_t*>(q.data_ptr()),
                  reinterpret_cast<const uint16_t*>(d.data_ptr()),
                  q4 ? reinterpret_cast<const uint16_t*>(m->data_ptr()) : nullptr,
                  bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), y.stride(0), format, nullptr};
  std::vector<float> xsum;
  if (q4 && x.size(0) == 1) {
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
    if (isa == 2) lorakit_quant::linear_avx512(p, 4 * begin, o_end);
    else lorakit_quant::linear_avx2(p, 4 * begin, o_end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(lorakit_quant, lib) {
  lib.def("linear(Tensor x, Tensor q, Tensor d, Tensor? m, Tensor? bias, int format, int isa) -> Tensor");
  lib.def("cpu_isa() -> int", &cpu_isa);
}

TORCH_LIBRARY_IMPL(lorakit_quant, CPU, lib) { lib.impl("linear", &linear); }
