// CUDA twin of the tile kernel: one thread per tile pixel, all channels.
#include "cuda_check.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cuda {
namespace {

__device__ __forceinline__ void store(float* d, float v) { *d = v; }
__device__ __forceinline__ void store(uint16_t* d, float v) { *d = float_to_half_bits(v); }

// Pixel value of image channel `ch` at canvas position (cy, cx), as float (geometry.h, image -> canvas).
__device__ __forceinline__ float sample(const uint8_t* img, const Grid& g, int inc, int ch, int cy, int cx) {
  if (edge_resamples(g.y.edge)) {
    const Lerp ly = axis_image_sample(g.y, cy);
    const Lerp lx = axis_image_sample(g.x, cx);
    const long long rs = static_cast<long long>(g.x.size) * inc;
    const uint8_t* r0 = img + ly.i0 * rs;
    const uint8_t* r1 = img + ly.i1 * rs;
    const float top = (1.0f - lx.w1) * r0[lx.i0 * inc + ch] + lx.w1 * r0[lx.i1 * inc + ch];
    const float bot = (1.0f - lx.w1) * r1[lx.i0 * inc + ch] + lx.w1 * r1[lx.i1 * inc + ch];
    return (1.0f - ly.w1) * top + ly.w1 * bot;
  }
  if (!axis_in_image(g.y, cy) || !axis_in_image(g.x, cx)) return 0.0f;  // pad policy: black
  return static_cast<float>(img[(static_cast<long long>(cy) * g.x.size + cx) * inc + ch]);
}

template <typename T>
__global__ void tile_kernel(const uint8_t* images, int n, Grid g, TileParams p, T* out, long long loc_stride) {
  const int th = g.y.tile, tw = g.x.tile;
  const long long plane = static_cast<long long>(th) * tw;
  const long long total = static_cast<long long>(grid_locations(g)) * n * plane;
  const long long img_bytes = static_cast<long long>(g.y.size) * g.x.size * p.in_channels;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int x = static_cast<int>(i % tw);
    long long r = i / tw;
    const int y = static_cast<int>(r % th);
    r /= th;
    const int img = static_cast<int>(r % n);
    const int l = static_cast<int>(r / n);
    const int cy = axis_origin(g.y, l / g.x.count) + y;
    const int cx = axis_origin(g.x, l % g.x.count) + x;
    const uint8_t* src = images + img * img_bytes;
    T* dst = out + static_cast<long long>(l) * loc_stride + static_cast<long long>(img) * p.out_channels * plane +
             static_cast<long long>(y) * tw + x;
    for (int c = 0; c < p.out_channels; ++c) {
      const int ch = p.in_channels == 1 ? 0 : (p.swap_rb ? 2 - c : c);
      store(dst + c * plane, sample(src, g, p.in_channels, ch, cy, cx) * p.scale[c] + p.bias[c]);
    }
  }
}

}  // namespace

void tile_images(const uint8_t* images, int n, const Grid& grid, const TileParams& p, void* out, cudaStream_t stream,
                 int64_t loc_stride) {
  if (n <= 0) return;
  const long long stride =
      loc_stride > 0 ? loc_stride : static_cast<long long>(n) * p.out_channels * grid.y.tile * grid.x.tile;
  const long long total = static_cast<long long>(grid_locations(grid)) * n * grid.y.tile * grid.x.tile;
  constexpr int kThreads = 256;
  const unsigned blocks = blocks_for(total, kThreads);
  if (p.out_type == kFloat16) {
    tile_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(images, n, grid, p, static_cast<uint16_t*>(out), stride);
  } else {
    tile_kernel<float><<<blocks, kThreads, 0, stream>>>(images, n, grid, p, static_cast<float*>(out), stride);
  }
  check(cudaGetLastError(), "tile_kernel launch");
}

}  // namespace cuda
}  // namespace tilead
