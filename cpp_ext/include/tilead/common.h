// Portability macros and scalar helpers shared by the CPU and CUDA twins.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define TILEAD_HD __host__ __device__ __forceinline__
#else
#define TILEAD_HD inline
#endif

namespace tilead {

TILEAD_HD float clamp01(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

TILEAD_HD int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// IEEE-754 binary32 -> binary16 bit pattern, round to nearest, ties to even.
// Infinities and NaN are preserved (NaN becomes a quiet NaN), values whose
// magnitude rounds above 65504 become infinity, tiny values become subnormals.
TILEAD_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  }
  if (ax >= 0x477ff000u) {  // >= 65520 rounds to infinity
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (ax < 0x38800000u) {  // below 2^-14: zero or subnormal half
    float mag;
    std::memcpy(&mag, &ax, sizeof(mag));
    // mag * 2^24 is exact; rint rounds half to even in the default FP mode.
    // A result of 1024 is the bit pattern of the smallest normal half.
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::rint(mag * 16777216.0f)));
  }
  // Normal range: rebias the exponent (127 -> 15) and round the 13 dropped
  // mantissa bits to nearest even; a mantissa carry bumps the exponent.
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;
  return static_cast<uint16_t>(sign | (ax >> 13));
#endif
}

}  // namespace tilead
