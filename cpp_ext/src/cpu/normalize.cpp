// CPU twin of normalize + threshold + per-image score.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {
namespace {

// Max over a chunk with independent accumulators so the loop vectorizes; NaN
// when the chunk holds any non-finite value (the non-finite rule, kernels.h).
float chunk_max(const float* v, int64_t n) {
  constexpr int K = 8;
  float acc[K];
  uint32_t bad = 0;
  for (int k = 0; k < K; ++k) acc[k] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    for (int k = 0; k < K; ++k) {
      acc[k] = v[i + k] > acc[k] ? v[i + k] : acc[k];
      bad |= finite_value(v[i + k]) ? 0u : 1u;
    }
  }
  for (; i < n; ++i) {
    acc[0] = v[i] > acc[0] ? v[i] : acc[0];
    bad |= finite_value(v[i]) ? 0u : 1u;
  }
  if (bad != 0) return std::numeric_limits<float>::quiet_NaN();
  float m = acc[0];
  for (int k = 1; k < K; ++k) m = acc[k] > m ? acc[k] : m;
  return m;
}

}  // namespace

void normalize_maps(const float* in, float* out, uint8_t* mask, float* raw_scores, float* scores, int n, int64_t hw,
                    const NormParams& p) {
  if (n <= 0) return;
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks_per_image = std::max<int64_t>(1, (hw + kChunk - 1) / kChunk);
  std::vector<float> partial(static_cast<size_t>(n * chunks_per_image));
  const bool minmax = p.mode == kNormMinMax;
  const float pr = p.pixel_max - p.pixel_min;
  const float pscale = minmax && pr > 0.0f ? 1.0f / pr : 0.0f;
  parallel_for(n * chunks_per_image, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t img = c / chunks_per_image;
      const int64_t lo = (c % chunks_per_image) * kChunk;
      const int64_t len = std::min(kChunk, hw - lo);
      const int64_t off = img * hw + lo;
      partial[static_cast<size_t>(c)] = len > 0 ? chunk_max(in + off, len) : -std::numeric_limits<float>::infinity();
      if (len <= 0) continue;
      const float* s = in + off;
      float* d = out + off;
      if (minmax) {
        // (x - t) first: exact for x near t, where the 0.5 cut is decided.
        const float t = p.pixel_threshold;
        for (int64_t i = 0; i < len; ++i) d[i] = normalize_pixel(s[i], t, pscale);
        if (mask != nullptr) {
          uint8_t* m = mask + off;
          for (int64_t i = 0; i < len; ++i) m[i] = d[i] > 0.5f ? 1 : 0;
        }
      } else {
        if (d != s) std::copy(s, s + len, d);
        if (mask != nullptr) {
          uint8_t* m = mask + off;
          const float t = p.pixel_threshold;
          for (int64_t i = 0; i < len; ++i) m[i] = raw_pixel_anomalous(s[i], t);
        }
      }
    }
  });
  const float ir = p.image_max - p.image_min;
  const float iscale = ir > 0.0f ? 1.0f / ir : 0.0f;
  for (int img = 0; img < n; ++img) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks_per_image; ++c) {
      const float part = partial[static_cast<size_t>(img * chunks_per_image + c)];
      if (std::isnan(part)) {  // a chunk with a non-finite value: the image's raw score is NaN
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
