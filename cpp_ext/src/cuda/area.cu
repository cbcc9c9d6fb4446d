// CUDA twin of the area (box) downscale of uint8 images (tilead/area.h): one thread per output value.
#include "cuda_check.h"
#include "tilead/area.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cuda {
namespace {

__global__ void area_kernel(const uint8_t* in, int n, int in_h, int in_w, int channels, uint8_t* out, int out_h,
                            int out_w, double sy, double sx, int fy, int fx) {
  const long long total = static_cast<long long>(n) * out_h * out_w * channels;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int ch = static_cast<int>(i % channels);
    const int x = static_cast<int>((i / channels) % out_w);
    const int y = static_cast<int>((i / (static_cast<long long>(channels) * out_w)) % out_h);
    const long long img = i / (static_cast<long long>(channels) * out_w * out_h);
    const uint8_t* image = in + img * in_h * static_cast<long long>(in_w) * channels;
    if (fx > 0 && fy > 0) {
      out[i] = area_block_value(image, in_w, channels, fy, fx, y, x, ch);
    } else {
      out[i] = area_span_value(image, in_w, channels, area_span(y, in_h, sy), area_span(x, in_w, sx), ch);
    }
  }
}

}  // namespace

void resize_area(const uint8_t* in, int n, int in_h, int in_w, int channels, uint8_t* out, int out_h, int out_w,
                 cudaStream_t stream) {
  if (n <= 0) return;
  const double sy = area_scale(in_h, out_h), sx = area_scale(in_w, out_w);
  const long long total = static_cast<long long>(n) * out_h * out_w * channels;
  constexpr int kThreads = 256;
  area_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(in, n, in_h, in_w, channels, out, out_h, out_w, sy,
                                                                    sx, area_whole_factor(sy), area_whole_factor(sx));
  check(cudaGetLastError(), "area_kernel launch");
}

}  // namespace cuda
}  // namespace tilead
