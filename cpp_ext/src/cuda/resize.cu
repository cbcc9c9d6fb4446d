// CUDA twin of the bilinear map resize.
#include "cuda_check.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cuda {
namespace {

__global__ void resize_kernel(const float* in, int n, int in_h, int in_w, float* out, int out_h, int out_w) {
  const long long total = static_cast<long long>(n) * out_h * out_w;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int x = static_cast<int>(i % out_w);
    const int y = static_cast<int>((i / out_w) % out_h);
    const long long img = i / (static_cast<long long>(out_w) * out_h);
    const Lerp v = lerp_coord(y, in_h, out_h);
    const Lerp h = lerp_coord(x, in_w, out_w);
    const float* r0 = in + (img * in_h + v.i0) * in_w;
    const float* r1 = in + (img * in_h + v.i1) * in_w;
    // Same order as the CPU twin: vertical first, then horizontal.
    const float a = (1.0f - v.w1) * r0[h.i0] + v.w1 * r1[h.i0];
    const float b = (1.0f - v.w1) * r0[h.i1] + v.w1 * r1[h.i1];
    out[i] = (1.0f - h.w1) * a + h.w1 * b;
  }
}

}  // namespace

void resize_maps(const float* in, int n, int in_h, int in_w, float* out, int out_h, int out_w, cudaStream_t stream) {
  if (n <= 0) return;
  const long long total = static_cast<long long>(n) * out_h * out_w;
  constexpr int kThreads = 256;
  resize_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(in, n, in_h, in_w, out, out_h, out_w);
  check(cudaGetLastError(), "resize_kernel launch");
}

}  // namespace cuda
}  // namespace tilead
