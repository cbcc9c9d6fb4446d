// Seam smoothing settings shared by the CPU and CUDA twins and the bindings:
// the one sigma limit, the one meaning of "off" and the one computation of the
// Gaussian taps. Python reads the limit (MAX_SEAM_SIGMA) and the taps
// (gaussian_taps) through the bindings; nothing else computes them.
#pragma once

#include <cmath>
#include <vector>

#include "tilead/geometry.h"

namespace tilead {

// Seam smoothing: Gaussian of `sigma` on the seam bands only.
struct SeamParams {
  float sigma;  // Gaussian sigma in pixels, in [0, kMaxSeamSigma]
  float width;  // band half-width as a fraction of the tile size, in [0, 1]
};

// Largest accepted seam sigma. Its kernel radius int(4 * 15.8 + 0.5) = 63 stays within
// kMaxGaussianRadius, so the CUDA twin can pass the taps by value in the kernel parameters.
constexpr double kMaxSeamSigma = 15.8;
static_assert(static_cast<int>(4.0 * kMaxSeamSigma + 0.5) <= kMaxGaussianRadius,
              "kMaxSeamSigma's Gaussian radius must fit kMaxGaussianRadius");

// Valid settings: finite sigma in [0, kMaxSeamSigma] (compared in float, as the kernels get it) and width in [0, 1].
inline bool seam_sigma_valid(float sigma) { return sigma >= 0.0f && sigma <= static_cast<float>(kMaxSeamSigma); }
inline bool seam_width_valid(float width) { return width >= 0.0f && width <= 1.0f; }

// "Off": sigma 0 or width 0 (no blur, or no band). Both twins and the device pipeline skip the stage then.
TILEAD_HD bool seam_enabled(const SeamParams& p) { return p.sigma > 0.0f && p.width > 0.0f; }

// The normalized Gaussian taps of `sigma` (> 0): 2R + 1 values, R = gaussian_radius(sigma), tap k at offset
// k - R is exp(-(k - R)^2 / (2 sigma^2)) / sum, accumulated in double and rounded once to float.
inline std::vector<float> gaussian_taps(float sigma) {
  const int radius = gaussian_radius(sigma);
  std::vector<double> t(static_cast<size_t>(2 * radius + 1));
  double sum = 0.0;
  for (int i = -radius; i <= radius; ++i) {
    const double v = std::exp(-static_cast<double>(i) * i / (2.0 * sigma * sigma));
    t[static_cast<size_t>(i + radius)] = v;
    sum += v;
  }
  std::vector<float> out(t.size());
  for (size_t i = 0; i < t.size(); ++i) out[i] = static_cast<float>(t[i] / sum);
  return out;
}

}  // namespace tilead
