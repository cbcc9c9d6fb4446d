// CUDA twin of the thumbnail fusion (tilead/kernels.h, fuse_value): one thread per image pixel.
#include "cuda_check.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cuda {
namespace {

__global__ void fuse_kernel(const float* thumb, int n, int thumb_h, int thumb_w, float* maps, int h, int w,
                            FuseParams p) {
  const long long total = static_cast<long long>(n) * h * w;
  const long long thumb_plane = static_cast<long long>(thumb_h) * thumb_w;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int x = static_cast<int>(i % w);
    const int y = static_cast<int>((i / w) % h);
    const long long img = i / (static_cast<long long>(w) * h);
    maps[i] = fuse_value(maps[i], bilinear_sample(thumb + img * thumb_plane, thumb_h, thumb_w, h, w, y, x), p);
  }
}

}  // namespace

void fuse_thumbnail(const float* thumb, int n, int thumb_h, int thumb_w, float* maps, int h, int w, const FuseParams& p,
                    cudaStream_t stream) {
  if (n <= 0) return;
  const long long total = static_cast<long long>(n) * h * w;
  constexpr int kThreads = 256;
  fuse_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(thumb, n, thumb_h, thumb_w, maps, h, w, p);
  check(cudaGetLastError(), "fuse_kernel launch");
}

}  // namespace cuda
}  // namespace tilead
