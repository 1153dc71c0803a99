// AVX-512F (+ F16C) build of the kernel (kernel_impl.h): 16 floats per vector.
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx2,fma,f16c")
#include "simd_avx512.h"

#include "kernel_impl.h"

void lorakit_quant::linear_avx512(const Problem& p, int64_t o_begin, int64_t o_end) {
  if (p.format == kQ4) run<true>(p, o_begin, o_end);
  else run<false>(p, o_begin, o_end);
}
#else
void lorakit_quant::linear_avx512(const Problem&, int64_t, int64_t) {}  // never called: cpu_isa() is 0 here
#endif
