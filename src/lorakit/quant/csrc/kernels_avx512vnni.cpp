// AVX-512F + VL + BW + VNNI build of the kernel (kernel_impl.h): as kernels_avx512.cpp, with int8 activations
// multiplied by VNNI's dpbusd (one instruction for maddubs + madd).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c")
#define LORAKIT_VNNI
#include "simd_avx512.h"

#include "kernel_impl.h"

void lorakit_quant::linear_avx512vnni(const Problem& p, int64_t o_begin, int64_t o_end) {
  if (p.format == kQ4) run<true>(p, o_begin, o_end);
  else run<false>(p, o_begin, o_end);
}
#else
void lorakit_quant::linear_avx512vnni(const Problem&, int64_t, int64_t) {}  // never called: cpu_isa() is 0 here
#endif
