// CUDA twin of seam smoothing. Same two phases as the CPU twin: a vertical
// pass into scratch where needed, then a horizontal pass that overwrites band
// pixels only (it reads scratch alone, so the update is in place).
//
// scratch layout (floats): V [n][H][W], then row_band [H], col_band [W],
// col_need [W] flags stored as 0/1 floats; seam_scratch_floats() covers it.
#include <cmath>
#include <vector>

#include "cuda_check.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cuda {
namespace {

struct Taps {
  int radius;
  float g[2 * kMaxGaussianRadius + 1];
};

__global__ void band_flags(Grid g, int half_y, int half_x, int R, float* row_band, float* col_band, float* col_need) {
  const int H = g.y.canvas, W = g.x.canvas;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H + W; i += blockDim.x * gridDim.x) {
    if (i < H) {
      row_band[i] = axis_in_band(g.y, i, half_y) ? 1.0f : 0.0f;
    } else {
      const int x = i - H;
      col_band[x] = axis_in_band(g.x, x, half_x) ? 1.0f : 0.0f;
      // A horizontal pass at band column b reads reflect(b + j), |j| <= R.
      // When W > 2R + 1 that index is within R of b, so x is needed iff a band
      // column lies within R of it; tiny canvases need every column.
      bool need = W <= 2 * R + 1;
      for (int j = -R; j <= R && !need; ++j) {
        const int b = x + j;
        need = b >= 0 && b < W && axis_in_band(g.x, b, half_x);
      }
      col_need[x] = need ? 1.0f : 0.0f;
    }
  }
}

__global__ void vertical_pass(const float* maps, int n, int H, int W, Taps t, const float* row_band,
                              const float* col_need, float* v) {
  const long long total = static_cast<long long>(n) * H * W;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int x = static_cast<int>(i % W);
    const int y = static_cast<int>((i / W) % H);
    if (row_band[y] == 0.0f && col_need[x] == 0.0f) continue;
    const float* img = maps + (i / (static_cast<long long>(W) * H)) * H * W;
    float acc = 0.0f;
    for (int k = -t.radius; k <= t.radius; ++k) {
      acc += t.g[k + t.radius] * img[static_cast<long long>(reflect_index(y + k, H)) * W + x];
    }
    v[i] = acc;
  }
}

__global__ void horizontal_pass(float* maps, int n, int H, int W, Taps t, const float* row_band, const float* col_band,
                                const float* v) {
  const long long total = static_cast<long long>(n) * H * W;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int x = static_cast<int>(i % W);
    const int y = static_cast<int>((i / W) % H);
    if (row_band[y] == 0.0f && col_band[x] == 0.0f) continue;
    const float* row = v + (i - x);
    float acc = 0.0f;
    for (int j = -t.radius; j <= t.radius; ++j) acc += t.g[j + t.radius] * row[reflect_index(x + j, W)];
    maps[i] = acc;
  }
}

}  // namespace

void smooth_seams(float* maps, int n, const Grid& grid, const SeamParams& p, float* scratch, cudaStream_t stream) {
  if (n <= 0 || !seam_enabled(p)) return;
  const int H = grid.y.canvas, W = grid.x.canvas;
  const int half_y = band_half_width(grid.y.tile, p.width);
  const int half_x = band_half_width(grid.x.tile, p.width);
  if (half_y <= 0 && half_x <= 0) return;
  Taps t;
  t.radius = gaussian_radius(p.sigma);
  if (t.radius > kMaxGaussianRadius) throw std::invalid_argument("seam sigma too large for the CUDA twin");
  const std::vector<float> taps = gaussian_taps(p.sigma);  // the CPU twin's taps (tilead/seam.h)
  for (int i = 0; i <= 2 * t.radius; ++i) t.g[i] = taps[static_cast<size_t>(i)];
  float* v = scratch;
  float* row_band = scratch + static_cast<long long>(n) * H * W;
  float* col_band = row_band + H;
  float* col_need = col_band + W;
  constexpr int kThreads = 256;
  band_flags<<<blocks_for(H + W, kThreads), kThreads, 0, stream>>>(grid, half_y, half_x, t.radius, row_band, col_band,
                                                                   col_need);
  check(cudaGetLastError(), "band_flags launch");
  const long long total = static_cast<long long>(n) * H * W;
  vertical_pass<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(maps, n, H, W, t, row_band, col_need, v);
  check(cudaGetLastError(), "vertical_pass launch");
  horizontal_pass<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(maps, n, H, W, t, row_band, col_band, v);
  check(cudaGetLastError(), "horizontal_pass launch");
}

}  // namespace cuda
}  // namespace tilead
