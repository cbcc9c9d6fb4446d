// CUDA twin of the untile kernel: one thread per canvas pixel.
#include "cuda_check.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cuda {
namespace {

__global__ void untile_kernel(const float* maps, int n, Grid g, UntileParams p, float* out, long long loc_stride) {
  const int H = g.y.canvas, W = g.x.canvas;
  const long long total = static_cast<long long>(n) * H * W;
  const long long map_plane = static_cast<long long>(p.map_h) * p.map_w;
  const bool loc_norm = p.loc_scale != nullptr && p.loc_threshold != nullptr;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int x = static_cast<int>(i % W);
    const int y = static_cast<int>((i / W) % H);
    const int img = static_cast<int>(i / (static_cast<long long>(W) * H));
    int r0 = 0, r1 = -1, c0 = 0, c1 = -1;
    axis_cover(g.y, y, &r0, &r1);
    axis_cover(g.x, x, &c0, &c1);
    float sum_wy = 0.0f, sum_wx = 0.0f;
    for (int r = r0; r <= r1; ++r) sum_wy += axis_weight(g.y, r, y - axis_origin(g.y, r), p.weights);
    for (int c = c0; c <= c1; ++c) sum_wx += axis_weight(g.x, c, x - axis_origin(g.x, c), p.weights);
    float acc = 0.0f;
    for (int r = r0; r <= r1; ++r) {
      const int ly = y - axis_origin(g.y, r);
      const float wy = axis_weight(g.y, r, ly, p.weights) / sum_wy;
      const Lerp v = lerp_coord(ly, p.map_h, g.y.tile);
      for (int c = c0; c <= c1; ++c) {
        const int lx = x - axis_origin(g.x, c);
        const float wx = axis_weight(g.x, c, lx, p.weights) / sum_wx;
        const Lerp h = lerp_coord(lx, p.map_w, g.x.tile);
        const int l = r * g.x.count + c;
        const float* m = maps + static_cast<long long>(l) * loc_stride + static_cast<long long>(img) * map_plane;
        const float* m0 = m + static_cast<long long>(v.i0) * p.map_w;
        const float* m1 = m + static_cast<long long>(v.i1) * p.map_w;
        const float top = (1.0f - h.w1) * m0[h.i0] + h.w1 * m0[h.i1];
        const float bot = (1.0f - h.w1) * m1[h.i0] + h.w1 * m1[h.i1];
        float val = (1.0f - v.w1) * top + v.w1 * bot;
        if (loc_norm) val = normalize_tile_value(val, p.loc_threshold[l], p.loc_scale[l]);
        acc += wy * wx * val;
      }
    }
    out[i] = acc;
  }
}

}  // namespace

void untile_maps(const float* maps, int n, const Grid& grid, const UntileParams& p, float* out, cudaStream_t stream,
                 int64_t loc_stride) {
  if (n <= 0) return;
  const long long stride = loc_stride > 0 ? loc_stride : static_cast<long long>(n) * p.map_h * p.map_w;
  const long long total = static_cast<long long>(n) * grid.y.canvas * grid.x.canvas;
  constexpr int kThreads = 256;
  untile_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(maps, n, grid, p, out, stride);
  check(cudaGetLastError(), "untile_kernel launch");
}

}  // namespace cuda
}  // namespace tilead
