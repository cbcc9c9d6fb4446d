// Fused PaDiM head kernel (#21): see mahalanobis.h.
//
// Two layouts. mahalanobis_lanes (what the runtime runs): 16 positions in vector lanes, each
// triangle element of a block's positions contiguous, so every vector operation serves 16
// positions, with no horizontal sum and no masked row tail (below, lanes_*). mahalanobis (the
// per-position layout of the head files, kept to measure against):
//
// Blocking: a block of kBlock positions of the features is transposed to
// (position, image, d) scratch with the mean subtracted (rows padded with zeros
// to d + 16). Then, per position, the packed fp16 triangle is streamed once for
// a group of up to G images (G accumulator registers): each row i is widened to
// fp32 in registers (F16C / AVX-512F), t_k = row_i * d_k[i:] is accumulated
// lane-wise with one FMA per element, then acc_k += d_k[i] * t_k (lane-wise
// too), so that only one horizontal sum per position and image remains. Every
// kFold rows the float32 sums join float64 totals: with nearly singular
// Gaussians (fitted on a few tiles) the terms cancel, and float32 totals over
// all rows lost ~8x more than ONNX Runtime's block-row graph. A row's tail
// is masked after widening; the last position's triangle is read from a padded
// copy so that no load runs past the caller's array.
#include "mahalanobis.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TILEAD_X86_SIMD 1
#endif

namespace tilead {
namespace cpu {

namespace {

constexpr int64_t kBlock = 16;  // positions transposed at a time
constexpr int64_t kPad = 16;    // zero floats after each scratch row (one vector)
constexpr int64_t kFold = 8;    // rows summed in float32 before their sum joins the float64 total

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One position, every image: diff (n, stride) scratch, tri the packed triangle.
void position_scalar(const float* diff, int64_t n, int64_t d, int64_t stride, const uint16_t* tri, float* out,
                     int64_t out_stride) {
  for (int64_t k = 0; k < n; ++k) {
    const float* x = diff + k * stride;
    const uint16_t* row = tri;
    double total = 0.0;
    float part = 0.0f;
    for (int64_t i = 0; i < d; ++i) {
      float acc = 0.0f;
      for (int64_t j = i; j < d; ++j) acc += half_to_float(row[j - i]) * x[j];
      part += x[i] * acc;
      if ((i + 1) % kFold == 0 || i + 1 == d) {
        total += static_cast<double>(part);
        part = 0.0f;
      }
      row += d - i;
    }
    out[k * out_stride] = static_cast<float>(total);
  }
}

// The lane layout's block on any CPU: what the vector paths compute, lane by lane (see lanes_avx512).
void lanes_scalar(const float* x, int64_t d, const uint16_t* tri, float* out) {
  constexpr int64_t L = kMahalanobisLanes;
  double total[L] = {};
  float acc[L] = {};
  const uint16_t* row = tri;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t len = d - i;
    float t[4][L] = {};
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t l = 0; l < L; ++l)
        t[j & 3][l] = std::fma(half_to_float(row[j * L + l]), x[(i + j) * L + l], t[j & 3][l]);
    }
    for (int64_t l = 0; l < L; ++l) acc[l] = std::fma(x[i * L + l], (t[0][l] + t[1][l]) + (t[2][l] + t[3][l]), acc[l]);
    if ((i + 1) % kFold == 0 || i + 1 == d) {
      for (int64_t l = 0; l < L; ++l) {
        total[l] += static_cast<double>(acc[l]);
        acc[l] = 0.0f;
      }
    }
    row += len * L;
  }
  for (int64_t l = 0; l < L; ++l) out[l] = static_cast<float>(total[l]);
}

#if defined(TILEAD_X86_SIMD)

#define TILEAD_AVX2_FMA __attribute__((target("avx2,fma,f16c")))
#define TILEAD_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

TILEAD_AVX2_FMA inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TILEAD_AVX2_FMA inline double hsum256d(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

alignas(32) const int32_t kTailMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

template <int G>
TILEAD_AVX2_FMA void group_avx2(const float* diff, int64_t d, int64_t stride, const uint16_t* tri, float* out,
                                int64_t out_stride) {
  __m256 acc[G];
  __m256d total[G][2];
  for (int g = 0; g < G; ++g) {
    acc[g] = _mm256_setzero_ps();
    total[g][0] = total[g][1] = _mm256_setzero_pd();
  }
  const uint16_t* row = tri;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t len = d - i;
    __m256 t[G];
    for (int g = 0; g < G; ++g) t[g] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
      for (int g = 0; g < G; ++g) t[g] = _mm256_fmadd_ps(a, _mm256_loadu_ps(diff + g * stride + i + j), t[g]);
    }
    if (j < len) {
      const __m256 mask =
          _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask + 8 - (len - j))));
      const __m256 a = _mm256_and_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j))), mask);
      for (int g = 0; g < G; ++g) t[g] = _mm256_fmadd_ps(a, _mm256_loadu_ps(diff + g * stride + i + j), t[g]);
    }
    // x_i * (row_i . x[i:]) summed lane-wise: the horizontal sum waits until the position's end.
    for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(t[g], _mm256_set1_ps(diff[g * stride + i]), acc[g]);
    if ((i + 1) % kFold == 0 || i + 1 == d) {  // float64 totals: the terms of nearly singular Gaussians cancel
      for (int g = 0; g < G; ++g) {
        total[g][0] = _mm256_add_pd(total[g][0], _mm256_cvtps_pd(_mm256_castps256_ps128(acc[g])));
        total[g][1] = _mm256_add_pd(total[g][1], _mm256_cvtps_pd(_mm256_extractf128_ps(acc[g], 1)));
        acc[g] = _mm256_setzero_ps();
      }
    }
    row += len;
  }
  for (int g = 0; g < G; ++g)
    out[g * out_stride] = static_cast<float>(hsum256d(_mm256_add_pd(total[g][0], total[g][1])));
}

TILEAD_AVX2_FMA void position_avx2(const float* diff, int64_t n, int64_t d, int64_t stride, const uint16_t* tri,
                                   float* out, int64_t out_stride) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) group_avx2<4>(diff + k * stride, d, stride, tri, out + k * out_stride, out_stride);
  if (n - k >= 2) {
    group_avx2<2>(diff + k * stride, d, stride, tri, out + k * out_stride, out_stride);
    k += 2;
  }
  if (k < n) group_avx2<1>(diff + k * stride, d, stride, tri, out + k * out_stride, out_stride);
}

template <int G>
TILEAD_AVX512 void group_avx512(const float* diff, int64_t d, int64_t stride, const uint16_t* tri, float* out,
                                int64_t out_stride) {
  __m512 acc[G];
  __m512d total[G][2];
  for (int g = 0; g < G; ++g) {
    acc[g] = _mm512_setzero_ps();
    total[g][0] = total[g][1] = _mm512_setzero_pd();
  }
  const uint16_t* row = tri;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t len = d - i;
    __m512 t[G];
    for (int g = 0; g < G; ++g) t[g] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j)));
      for (int g = 0; g < G; ++g) t[g] = _mm512_fmadd_ps(a, _mm512_loadu_ps(diff + g * stride + i + j), t[g]);
    }
    if (j < len) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (len - j)) - 1u);
      const __m512 a =
          _mm512_maskz_mov_ps(mask, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j))));
      for (int g = 0; g < G; ++g) t[g] = _mm512_fmadd_ps(a, _mm512_loadu_ps(diff + g * stride + i + j), t[g]);
    }
    for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(t[g], _mm512_set1_ps(diff[g * stride + i]), acc[g]);
    if ((i + 1) % kFold == 0 || i + 1 == d) {  // float64 totals: the terms of nearly singular Gaussians cancel
      for (int g = 0; g < G; ++g) {
        const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[g]), 1));
        total[g][0] = _mm512_add_pd(total[g][0], _mm512_cvtps_pd(_mm512_castps512_ps256(acc[g])));
        total[g][1] = _mm512_add_pd(total[g][1], _mm512_cvtps_pd(high));
        acc[g] = _mm512_setzero_ps();
      }
    }
    row += len;
  }
  for (int g = 0; g < G; ++g) {
    out[g * out_stride] = static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(total[g][0], total[g][1])));
  }
}

TILEAD_AVX512 void position_avx512(const float* diff, int64_t n, int64_t d, int64_t stride, const uint16_t* tri,
                                   float* out, int64_t out_stride) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) group_avx512<8>(diff + k * stride, d, stride, tri, out + k * out_stride, out_stride);
  if (n - k >= 4) {
    group_avx512<4>(diff + k * stride, d, stride, tri, out + k * out_stride, out_stride);
    k += 4;
  }
  if (n - k >= 2) {
    group_avx512<2>(diff + k * stride, d, stride, tri, out + k * out_stride, out_stride);
    k += 2;
  }
  if (k < n) group_avx512<1>(diff + k * stride, d, stride, tri, out + k * out_stride, out_stride);
}

// Lane layout (mahalanobis_lanes): one block of kLanes positions, one image. x (d, kLanes) differences,
// tri (T, kLanes) fp16 bits, out (kLanes). Four chains per row, then acc = fma(x_i, t, acc), float64
// totals every kFold rows: the scalar path does the same per lane (std::fma), so every path agrees bit for bit.
constexpr int64_t kLanes = kMahalanobisLanes;

// t + A_ij x_j for the block's 16 lanes, j relative to the row (a lambda would not inherit the target).
TILEAD_AVX512 inline __m512 term512(const uint16_t* row, const float* xi, int64_t j, __m512 t) {
  const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * kLanes)));
  return _mm512_fmadd_ps(a, _mm512_loadu_ps(xi + j * kLanes), t);
}

TILEAD_AVX512 void lanes_avx512(const float* x, int64_t d, const uint16_t* tri, float* out) {
  __m512 acc = _mm512_setzero_ps();
  __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
  const uint16_t* row = tri;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t len = d - i;
    const float* xi = x + i * kLanes;
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    int64_t j = 0;
    for (; j + 4 <= len; j += 4) {
      t0 = term512(row, xi, j, t0);
      t1 = term512(row, xi, j + 1, t1);
      t2 = term512(row, xi, j + 2, t2);
      t3 = term512(row, xi, j + 3, t3);
    }
    if (j < len) t0 = term512(row, xi, j, t0);
    if (j + 1 < len) t1 = term512(row, xi, j + 1, t1);
    if (j + 2 < len) t2 = term512(row, xi, j + 2, t2);
    const __m512 t = _mm512_add_ps(_mm512_add_ps(t0, t1), _mm512_add_ps(t2, t3));
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(xi), t, acc);
    if ((i + 1) % kFold == 0 || i + 1 == d) {  // float64 totals: the terms of nearly singular Gaussians cancel
      low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(acc)));
      high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
      acc = _mm512_setzero_ps();
    }
    row += len * kLanes;
  }
  _mm256_storeu_ps(out, _mm512_cvtpd_ps(low));
  _mm256_storeu_ps(out + 8, _mm512_cvtpd_ps(high));
}

// The block's 16 lanes as two 8-lane halves, one pass over the triangles (the same arithmetic per lane).
TILEAD_AVX2_FMA inline void term256x2(const uint16_t* row, const float* xi, int64_t j, __m256& lo, __m256& hi) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * kLanes));
  lo = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(a)), _mm256_loadu_ps(xi + j * kLanes), lo);
  hi = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(a, 1)), _mm256_loadu_ps(xi + j * kLanes + 8), hi);
}

TILEAD_AVX2_FMA void lanes_avx2(const float* x, int64_t d, const uint16_t* tri, float* out) {
  __m256 acc_lo = _mm256_setzero_ps(), acc_hi = acc_lo;
  __m256d tot[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const uint16_t* row = tri;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t len = d - i;
    const float* xi = x + i * kLanes;
    __m256 l0 = _mm256_setzero_ps(), l1 = l0, l2 = l0, l3 = l0, h0 = l0, h1 = l0, h2 = l0, h3 = l0;
    int64_t j = 0;
    for (; j + 4 <= len; j += 4) {
      term256x2(row, xi, j, l0, h0);
      term256x2(row, xi, j + 1, l1, h1);
      term256x2(row, xi, j + 2, l2, h2);
      term256x2(row, xi, j + 3, l3, h3);
    }
    if (j < len) term256x2(row, xi, j, l0, h0);
    if (j + 1 < len) term256x2(row, xi, j + 1, l1, h1);
    if (j + 2 < len) term256x2(row, xi, j + 2, l2, h2);
    const __m256 t_lo = _mm256_add_ps(_mm256_add_ps(l0, l1), _mm256_add_ps(l2, l3));
    const __m256 t_hi = _mm256_add_ps(_mm256_add_ps(h0, h1), _mm256_add_ps(h2, h3));
    acc_lo = _mm256_fmadd_ps(_mm256_loadu_ps(xi), t_lo, acc_lo);
    acc_hi = _mm256_fmadd_ps(_mm256_loadu_ps(xi + 8), t_hi, acc_hi);
    if ((i + 1) % kFold == 0 || i + 1 == d) {
      tot[0] = _mm256_add_pd(tot[0], _mm256_cvtps_pd(_mm256_castps256_ps128(acc_lo)));
      tot[1] = _mm256_add_pd(tot[1], _mm256_cvtps_pd(_mm256_extractf128_ps(acc_lo, 1)));
      tot[2] = _mm256_add_pd(tot[2], _mm256_cvtps_pd(_mm256_castps256_ps128(acc_hi)));
      tot[3] = _mm256_add_pd(tot[3], _mm256_cvtps_pd(_mm256_extractf128_ps(acc_hi, 1)));
      acc_lo = acc_hi = _mm256_setzero_ps();
    }
    row += len * kLanes;
  }
  for (int q = 0; q < 4; ++q) _mm_storeu_ps(out + 4 * q, _mm256_cvtpd_ps(tot[q]));
}

bool supports(MahalanobisPath path) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (path == MahalanobisPath::Avx2) return avx2;
  if (path == MahalanobisPath::Avx512) return avx2 && __builtin_cpu_supports("avx512f");
  return true;
}

#else

bool supports(MahalanobisPath path) { return path == MahalanobisPath::Scalar; }

#endif

using PositionFn = void (*)(const float*, int64_t, int64_t, int64_t, const uint16_t*, float*, int64_t);

PositionFn position_fn(MahalanobisPath path) {
#if defined(TILEAD_X86_SIMD)
  if (path == MahalanobisPath::Avx512) return &position_avx512;
  if (path == MahalanobisPath::Avx2) return &position_avx2;
#endif
  (void)path;
  return &position_scalar;
}

using LanesFn = void (*)(const float*, int64_t, const uint16_t*, float*);

LanesFn lanes_fn(MahalanobisPath path) {
#if defined(TILEAD_X86_SIMD)
  if (path == MahalanobisPath::Avx512) return &lanes_avx512;
  if (path == MahalanobisPath::Avx2) return &lanes_avx2;
#endif
  (void)path;
  return &lanes_scalar;
}

}  // namespace

const char* mahalanobis_path_name(MahalanobisPath path) {
  switch (path) {
    case MahalanobisPath::Avx512:
      return "avx512";
    case MahalanobisPath::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

std::vector<std::string> mahalanobis_paths() {
  std::vector<std::string> out{"scalar"};
  if (supports(MahalanobisPath::Avx2)) out.emplace_back("avx2");
  if (supports(MahalanobisPath::Avx512)) out.emplace_back("avx512");
  return out;
}

MahalanobisPath mahalanobis_path(const std::string& name) {
  if (name == "auto") {
    if (supports(MahalanobisPath::Avx512)) return MahalanobisPath::Avx512;
    if (supports(MahalanobisPath::Avx2)) return MahalanobisPath::Avx2;
    return MahalanobisPath::Scalar;
  }
  MahalanobisPath path;
  if (name == "scalar") {
    path = MahalanobisPath::Scalar;
  } else if (name == "avx2") {
    path = MahalanobisPath::Avx2;
  } else if (name == "avx512") {
    path = MahalanobisPath::Avx512;
  } else {
    throw std::invalid_argument("path: expected 'auto', 'scalar', 'avx2' or 'avx512', got '" + name + "'");
  }
  if (!supports(path)) {
    throw std::invalid_argument("path: this CPU cannot run '" + name + "' (it supports " +
                                std::string(mahalanobis_path_name(mahalanobis_path("auto"))) + " at best)");
  }
  return path;
}

void mahalanobis(const float* features, int64_t n, int64_t d, int64_t positions, const float* mean,
                 const uint16_t* packed, float* out, MahalanobisPath path) {
  if (n <= 0 || d <= 0 || positions <= 0) return;
  const int64_t tri = d * (d + 1) / 2;
  const int64_t stride = d + kPad;
  const PositionFn run = position_fn(path);
  std::vector<float> scratch(static_cast<size_t>(kBlock * n * stride), 0.0f);
  // The last position's triangle, padded: the vector loads of a row's tail read up to one vector past it.
  std::vector<uint16_t> last(static_cast<size_t>(tri + kPad), 0);
  std::memcpy(last.data(), packed + (positions - 1) * tri, static_cast<size_t>(tri) * sizeof(uint16_t));
  for (int64_t p0 = 0; p0 < positions; p0 += kBlock) {
    const int64_t count = positions - p0 < kBlock ? positions - p0 : kBlock;
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t j = 0; j < d; ++j) {
        const float* src = features + (k * d + j) * positions + p0;
        for (int64_t b = 0; b < count; ++b) scratch[static_cast<size_t>((b * n + k) * stride + j)] = src[b];
      }
    }
    for (int64_t b = 0; b < count; ++b) {
      const int64_t p = p0 + b;
      const float* m = mean + p * d;
      float* block = scratch.data() + b * n * stride;
      for (int64_t k = 0; k < n; ++k) {
        float* row = block + k * stride;
        for (int64_t j = 0; j < d; ++j) row[j] -= m[j];
      }
      const uint16_t* t = p == positions - 1 ? last.data() : packed + p * tri;
      run(block, n, d, stride, t, out + p, positions);
    }
  }
}

void mahalanobis_lanes(const float* features, int64_t n, int64_t d, int64_t positions, const float* mean_lanes,
                       const uint16_t* packed_lanes, float* out, MahalanobisPath path) {
  constexpr int64_t L = kMahalanobisLanes;
  if (n <= 0 || d <= 0 || positions <= 0) return;
  const int64_t tri = d * (d + 1) / 2;
  const LanesFn run = lanes_fn(path);
  std::vector<float> x(static_cast<size_t>(d * L));  // one image's differences, (d, L), L1-resident
  float result[L];
  for (int64_t p0 = 0, b = 0; p0 < positions; p0 += L, ++b) {
    const int64_t count = positions - p0 < L ? positions - p0 : L;
    const float* m = mean_lanes + b * d * L;
    const uint16_t* t = packed_lanes + b * tri * L;
    for (int64_t k = 0; k < n; ++k) {  // the block's triangles (tri * L halves) stay in L2 across images
      for (int64_t i = 0; i < d; ++i) {
        const float* src = features + (k * d + i) * positions + p0;
        float* dst = x.data() + i * L;
        for (int64_t l = 0; l < count; ++l) dst[l] = src[l] - m[i * L + l];
        for (int64_t l = count; l < L; ++l) dst[l] = 0.0f;
      }
      run(x.data(), d, t, result);
      std::memcpy(out + k * positions + p0, result, static_cast<size_t>(count) * sizeof(float));
    }
  }
}

}  // namespace cpu
}  // namespace tilead
