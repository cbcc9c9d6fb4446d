// CPU twin of normalize + threshold + per-image score.
//
// One pass over each chunk of a map: the raw max (NaN when the chunk holds a
// non-finite value), the normalized value and the mask bit are computed from
// one load of each pixel, in 8-lane vectors (GCC / Clang vector extensions, AVX2 where the CPU has it;
// a scalar loop elsewhere), also when the output is the input (in place).
// Built with -ffp-contract=off (CMakeLists.txt): no fused multiply-add, so the
// values are those of float32 NumPy, clamp((x - t) * scale + 0.5, 0, 1).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"
#include "rows.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {
namespace {

constexpr int kBlock = 16;

inline uint32_t nonfinite_bit(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x7f800000u) == 0x7f800000u ? 1u : 0u;
}

// One pixel, scalar: the reference the vector block below computes lane by lane.
template <bool MinMax, bool Mask>
inline void pixel(float v, float* d, uint8_t* m, float t, float scale, float& acc, uint32_t& bad) {
  acc = v > acc ? v : acc;
  bad |= nonfinite_bit(v);
  if (MinMax) {
    const float r = normalize_pixel(v, t, scale);
    *d = r;
    if (Mask) *m = r > 0.5f ? 1 : 0;
  } else {
    *d = v;
    if (Mask) *m = raw_pixel_anomalous(v, t);
  }
}

#if defined(__GNUC__)
// GCC / Clang vector extensions, 8 lanes: two SSE2 (NEON) registers in the portable build, one AVX2
// register in the x86-64-v3 clone, same lane-wise operations as pixel() (bit test for non-finite,
// compare-selects for max and clamp; no fused multiply-add either way: -ffp-contract=off).
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint8_t u8 __attribute__((vector_size(8)));
typedef uint8_t b32 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// 0/1 bytes from a lane mask (-1 / 0 per 32-bit lane): the low byte of each lane, by one shuffle
// (__builtin_convertvector to bytes is lowered to per-lane extracts).
__attribute__((always_inline)) inline u8 mask_bytes(const i8& lanes) {
#if defined(__clang__) || __GNUC__ >= 12
  const b32 bytes = (b32)lanes;
  return __builtin_shufflevector(bytes, bytes, 0, 4, 8, 12, 16, 20, 24, 28) & static_cast<uint8_t>(1);
#else
  return __builtin_convertvector(lanes, u8) & static_cast<uint8_t>(1);
#endif
}

// The element-wise pass is compute-bound once its rows are in cache (the fused pass): on x86-64 it is
// also compiled for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2), picked at load time, as seam.cpp's tap
// loops. Built with -ffp-contract=off: every clone computes the same values (checked bit for bit, #21).
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 12
#define TILEAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TILEAD_CLONES
#endif

template <bool MinMax, bool Mask>
__attribute__((always_inline)) inline float chunk_body(const float* s, float* d, uint8_t* m, int64_t len, float t,
                                                       float scale) {
  constexpr int V = kBlock / kLanes;
  const float ninf = -std::numeric_limits<float>::infinity();
  const f8 vt = f8{} + t, vs = f8{} + scale;
  const f8 zero = f8{}, one = f8{} + 1.0f, half = f8{} + 0.5f;
  const i8 expo = i8{} + 0x7f800000;
  f8 acc[V];
  i8 bad[V];
  for (int k = 0; k < V; ++k) {
    acc[k] = f8{} + ninf;
    bad[k] = i8{};
  }
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    f8 v[V];
    std::memcpy(v, s + i, sizeof(v));  // every load before any store: d may be s
    for (int k = 0; k < V; ++k) {
      const i8 nonfinite = ((i8)v[k] & expo) == expo;
      acc[k] = v[k] > acc[k] ? v[k] : acc[k];
      bad[k] |= nonfinite;
      if (MinMax) {
        f8 r = (v[k] - vt) * vs + half;
        r = r < zero ? zero : r;
        r = r > one ? one : r;
        r = nonfinite ? one : r;
        std::memcpy(d + i + kLanes * k, &r, sizeof(r));
        if (Mask) {
          const u8 b = mask_bytes(r > half);
          std::memcpy(m + i + kLanes * k, &b, sizeof(b));
        }
      } else {
        if (d != s) std::memcpy(d + i + kLanes * k, &v[k], sizeof(f8));
        if (Mask) {
          const u8 b = mask_bytes(nonfinite | (v[k] > vt));
          std::memcpy(m + i + kLanes * k, &b, sizeof(b));
        }
      }
    }
  }
  float mx = ninf;
  uint32_t any_bad = 0;
  for (int k = 0; k < V; ++k) {
    for (int l = 0; l < kLanes; ++l) {
      mx = acc[k][l] > mx ? acc[k][l] : mx;
      any_bad |= bad[k][l] != 0 ? 1u : 0u;
    }
  }
  for (; i < len; ++i) pixel<MinMax, Mask>(s[i], d + i, Mask ? m + i : nullptr, t, scale, mx, any_bad);
  return any_bad != 0 ? std::numeric_limits<float>::quiet_NaN() : mx;
}

// One cloned entry per instantiation (target_clones does not apply to templates).
TILEAD_CLONES float chunk_mm(const float* s, float* d, uint8_t* m, int64_t len, float t, float scale) {
  return chunk_body<true, true>(s, d, m, len, t, scale);
}
TILEAD_CLONES float chunk_m(const float* s, float* d, uint8_t* m, int64_t len, float t, float scale) {
  return chunk_body<true, false>(s, d, m, len, t, scale);
}
TILEAD_CLONES float chunk_rm(const float* s, float* d, uint8_t* m, int64_t len, float t, float scale) {
  return chunk_body<false, true>(s, d, m, len, t, scale);
}
TILEAD_CLONES float chunk_r(const float* s, float* d, uint8_t* m, int64_t len, float t, float scale) {
  return chunk_body<false, false>(s, d, m, len, t, scale);
}

template <bool MinMax, bool Mask>
float chunk(const float* s, float* d, uint8_t* m, int64_t len, float t, float scale) {
  if (MinMax) return Mask ? chunk_mm(s, d, m, len, t, scale) : chunk_m(s, d, m, len, t, scale);
  return Mask ? chunk_rm(s, d, m, len, t, scale) : chunk_r(s, d, m, len, t, scale);
}
#else
template <bool MinMax, bool Mask>
float chunk(const float* s, float* d, uint8_t* m, int64_t len, float t, float scale) {
  float mx = -std::numeric_limits<float>::infinity();
  uint32_t any_bad = 0;
  for (int64_t i = 0; i < len; ++i) pixel<MinMax, Mask>(s[i], d + i, Mask ? m + i : nullptr, t, scale, mx, any_bad);
  return any_bad != 0 ? std::numeric_limits<float>::quiet_NaN() : mx;
}
#endif

}  // namespace

// The pixel scale of min-max normalization (0 in raw mode), as normalize_maps computes it.
float pixel_scale(const NormParams& p) {
  const float pr = p.pixel_max - p.pixel_min;
  return p.mode == kNormMinMax && pr > 0.0f ? 1.0f / pr : 0.0f;
}

float normalize_span(const float* s, float* d, uint8_t* m, int64_t len, const NormParams& p) {
  const float t = p.pixel_threshold;
  const float pscale = pixel_scale(p);
  if (p.mode == kNormMinMax) {
    return m != nullptr ? chunk<true, true>(s, d, m, len, t, pscale) : chunk<true, false>(s, d, m, len, t, pscale);
  }
  return m != nullptr ? chunk<false, true>(s, d, m, len, t, pscale) : chunk<false, false>(s, d, m, len, t, pscale);
}

void normalize_maps(const float* in, float* out, uint8_t* mask, float* raw_scores, float* scores, int n, int64_t hw,
                    const NormParams& p) {
  if (n <= 0) return;
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks_per_image = std::max<int64_t>(1, (hw + kChunk - 1) / kChunk);
  std::vector<float> partial(static_cast<size_t>(n * chunks_per_image));
  const bool minmax = p.mode == kNormMinMax;
  const float pr = p.pixel_max - p.pixel_min;
  const float pscale = minmax && pr > 0.0f ? 1.0f / pr : 0.0f;
  const float t = p.pixel_threshold;
  parallel_for(n * chunks_per_image, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t img = c / chunks_per_image;
      const int64_t lo = (c % chunks_per_image) * kChunk;
      const int64_t len = std::min(kChunk, hw - lo);
      if (len <= 0) {
        partial[static_cast<size_t>(c)] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const int64_t off = img * hw + lo;
      uint8_t* m = mask != nullptr ? mask + off : nullptr;
      float r;
      if (minmax) {
        r = m != nullptr ? chunk<true, true>(in + off, out + off, m, len, t, pscale)
                         : chunk<true, false>(in + off, out + off, m, len, t, pscale);
      } else {
        r = m != nullptr ? chunk<false, true>(in + off, out + off, m, len, t, pscale)
                         : chunk<false, false>(in + off, out + off, m, len, t, pscale);
      }
      partial[static_cast<size_t>(c)] = r;
    }
  });
  fold_image_scores(partial.data(), n, chunks_per_image, p, raw_scores, scores);
}

void fold_image_scores(const float* partial, int n, int64_t parts, const NormParams& p, float* raw_scores,
                       float* scores) {
  const float ir = p.image_max - p.image_min;
  const float iscale = ir > 0.0f ? 1.0f / ir : 0.0f;
  for (int img = 0; img < n; ++img) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < parts; ++c) {
      const float part = partial[static_cast<size_t>(img) * static_cast<size_t>(parts) + static_cast<size_t>(c)];
      if (std::isnan(part)) {  // a part with a non-finite value: the image's raw score is NaN
        m = part;
        break;
      }
      m = std::max(m, part);
    }
    raw_scores[img] = m;
    scores[img] = image_score(m, p, iscale);
  }
}

}  // namespace cpu
}  // namespace tilead
