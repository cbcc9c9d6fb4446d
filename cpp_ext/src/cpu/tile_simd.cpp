#include "tile_simd.h"

#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TILEAD_X86_SIMD 1
#endif

namespace tilead {
namespace cpu {

#if defined(TILEAD_X86_SIMD)
namespace {

#define TILEAD_AVX2 __attribute__((target("avx2,f16c")))

// pshufb masks gathering channel k of 16 interleaved pixels (48 bytes in
// three 16-byte registers a, b, c) into one register.
struct Deinterleave {
  __m128i a[3], b[3], c[3];
};

TILEAD_AVX2 Deinterleave make_masks() {
  Deinterleave m;
  for (int k = 0; k < 3; ++k) {
    alignas(16) int8_t ma[16], mb[16], mc[16];
    for (int i = 0; i < 16; ++i) {
      const int byte = 3 * i + k;  // position of pixel i, channel k in the 48 bytes
      ma[i] = byte < 16 ? static_cast<int8_t>(byte) : -1;
      mb[i] = byte >= 16 && byte < 32 ? static_cast<int8_t>(byte - 16) : -1;
      mc[i] = byte >= 32 ? static_cast<int8_t>(byte - 32) : -1;
    }
    m.a[k] = _mm_load_si128(reinterpret_cast<const __m128i*>(ma));
    m.b[k] = _mm_load_si128(reinterpret_cast<const __m128i*>(mb));
    m.c[k] = _mm_load_si128(reinterpret_cast<const __m128i*>(mc));
  }
  return m;
}

// 16 uint8 -> two vectors of 8 normalized floats.
TILEAD_AVX2 inline void widen(__m128i v, __m256 s, __m256 b, __m256* lo, __m256* hi) {
  *lo = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), s), b);
  *hi = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), s), b);
}

TILEAD_AVX2 inline void put(float* d, __m256 lo, __m256 hi) {
  _mm256_storeu_ps(d, lo);
  _mm256_storeu_ps(d + 8, hi);
}

TILEAD_AVX2 inline void put(uint16_t* d, __m256 lo, __m256 hi) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T>
TILEAD_AVX2 void rgb_row(const uint8_t* src, int count, const int order[3], const float* scale, const float* bias,
                         T* d0, T* d1, T* d2) {
  static const Deinterleave m = make_masks();
  T* dst[3] = {d0, d1, d2};
  __m256 s[3], b[3];
  for (int c = 0; c < 3; ++c) {
    s[c] = _mm256_set1_ps(scale[c]);
    b[c] = _mm256_set1_ps(bias[c]);
  }
  for (int x = 0; x < count; x += 16) {
    const uint8_t* p = src + 3 * x;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i bb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    const __m128i cc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
    for (int c = 0; c < 3; ++c) {
      const int k = order[c];
      const __m128i ch = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, m.a[k]), _mm_shuffle_epi8(bb, m.b[k])),
                                      _mm_shuffle_epi8(cc, m.c[k]));
      __m256 lo, hi;
      widen(ch, s[c], b[c], &lo, &hi);
      put(dst[c] + x, lo, hi);
    }
  }
}

template <typename T>
TILEAD_AVX2 void gray_row(const uint8_t* src, int count, int outc, const float* scale, const float* bias, T* const* d) {
  for (int x = 0; x < count; x += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + x));
    for (int c = 0; c < outc; ++c) {
      __m256 lo, hi;
      widen(v, _mm256_set1_ps(scale[c]), _mm256_set1_ps(bias[c]), &lo, &hi);
      put(d[c] + x, lo, hi);
    }
  }
}

RowConverters detect() {
  RowConverters r{};
  const char* off = std::getenv("TILEAD_DISABLE_SIMD");  // for tests comparing both paths
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return r;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    r.rgb_f32 = &rgb_row<float>;
    r.rgb_f16 = &rgb_row<uint16_t>;
    r.gray_f32 = &gray_row<float>;
    r.gray_f16 = &gray_row<uint16_t>;
  }
  return r;
}

}  // namespace

const RowConverters& row_converters() {
  static const RowConverters r = detect();
  return r;
}

#else

const RowConverters& row_converters() {
  static const RowConverters r{};
  return r;
}

#endif

}  // namespace cpu
}  // namespace tilead
