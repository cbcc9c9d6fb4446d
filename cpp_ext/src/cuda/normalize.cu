// CUDA twin of normalize + threshold + per-image score. The per-image max is
// reduced per block in shared memory, then merged with an atomicMax, both on an
// order-preserving integer encoding of the float. A non-finite value enters the
// reduction as a positive quiet NaN, whose encoding exceeds every number's, so
// the raw score becomes NaN as on the CPU twin (the non-finite rule, kernels.h).
#include <cfloat>

#include "cuda_check.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cuda {
namespace {

__device__ __forceinline__ int ordered(float f) {
  const int i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float unordered(int i) { return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff); }

__global__ void init_max(int* acc, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) acc[i] = ordered(-INFINITY);
}

constexpr int kThreads = 256;

constexpr int kPoison = 0x7fc00000;  // ordered(+quiet NaN): above ordered(+inf) = 0x7f800000

__global__ void normalize_kernel(const float* in, float* out, uint8_t* mask, int* acc, int n, long long hw,
                                 NormParams p, float pscale) {
  __shared__ int smax[kThreads];
  // Images along gridDim.y, folded: a batch over 65535 images loops (every thread of a block takes the same
  // images, so the __syncthreads below are reached by all of them).
  for (long long img = blockIdx.y; img < n; img += gridDim.y) {
    const float* s = in + img * hw;
    float* d = out + img * hw;
    uint8_t* m = mask != nullptr ? mask + img * hw : nullptr;
    int local = ordered(-INFINITY);
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < hw;
         i += static_cast<long long>(blockDim.x) * gridDim.x) {
      const float v = s[i];
      const int key = finite_value(v) ? ordered(v) : kPoison;
      if (key > local) local = key;
      if (p.mode == kNormMinMax) {
        const float nv = normalize_pixel(v, p.pixel_threshold, pscale);
        d[i] = nv;
        if (m != nullptr) m[i] = nv > 0.5f ? 1 : 0;
      } else {
        d[i] = v;
        if (m != nullptr) m[i] = raw_pixel_anomalous(v, p.pixel_threshold);
      }
    }
    smax[threadIdx.x] = local;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w && smax[threadIdx.x + w] > smax[threadIdx.x]) smax[threadIdx.x] = smax[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) atomicMax(acc + img, smax[0]);
    __syncthreads();  // smax is rewritten for the next image
  }
}

__global__ void finish_scores(const int* acc, float* raw_scores, float* scores, int n, NormParams p, float iscale) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float raw = unordered(acc[i]);
  raw_scores[i] = raw;
  scores[i] = image_score(raw, p, iscale);
}

}  // namespace

void normalize_maps(const float* in, float* out, uint8_t* mask, float* raw_scores, float* scores, int n, int64_t hw,
                    const NormParams& p, cudaStream_t stream) {
  if (n <= 0) return;
  static_assert(sizeof(int) == sizeof(float), "scores double as integer accumulators");
  int* acc = reinterpret_cast<int*>(raw_scores);
  init_max<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(acc, n);
  check(cudaGetLastError(), "init_max launch");
  const float pr = p.pixel_max - p.pixel_min;
  const float pscale = p.mode == kNormMinMax && pr > 0.0f ? 1.0f / pr : 0.0f;
  long long bx = (hw + kThreads - 1) / kThreads;
  if (bx > 1024) bx = 1024;
  if (bx < 1) bx = 1;
  const dim3 blocks(static_cast<unsigned>(bx), grid_yz(n));  // gridDim.y <= 65535: the kernel loops past it
  normalize_kernel<<<blocks, kThreads, 0, stream>>>(in, out, mask, acc, n, hw, p, pscale);
  check(cudaGetLastError(), "normalize_kernel launch");
  const float ir = p.image_max - p.image_min;
  const float iscale = ir > 0.0f ? 1.0f / ir : 0.0f;
  finish_scores<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(acc, raw_scores, scores, n, p, iscale);
  check(cudaGetLastError(), "finish_scores launch");
}

}  // namespace cuda
}  // namespace tilead
