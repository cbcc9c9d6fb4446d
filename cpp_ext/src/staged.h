// Host-staged entry points of the CUDA twins, for the Python bindings and the
// GPU self-check: they take host pointers, copy inputs to the device, run the
// CUDA kernel on a private stream, copy results back and free everything
// (RAII), so the only difference from the CPU twin is where the math runs.
// In a build without CUDA every function throws std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "tilead/kernels.h"

namespace tilead {
namespace staged {

bool built_with_cuda();
// Number of CUDA devices; 0 with `error` set when the runtime reports one
// (for example cudaErrorInsufficientDriver on a machine without a GPU).
int device_count(std::string* error);
std::string device_name(int index);
// (free, total) bytes of device memory on device `index` (cudaMemGetInfo).
std::pair<size_t, size_t> memory_info(int index);
std::string cuda_architectures();

void tile_images(const uint8_t* images, int n, const Grid& grid, const TileParams& p, void* out);
void untile_maps(const float* maps, int n, const Grid& grid, const UntileParams& p, float* out);
void smooth_seams(float* maps, int n, const Grid& grid, const SeamParams& p);
void resize_maps(const float* in, int n, int in_h, int in_w, float* out, int out_h, int out_w);
void resize_area(const uint8_t* in, int n, int in_h, int in_w, int channels, uint8_t* out, int out_h, int out_w);
void normalize_maps(const float* in, float* out, uint8_t* mask, float* raw_scores, float* scores, int n, int64_t hw,
                    const NormParams& p);
void fuse_thumbnail(const float* thumb, int n, int thumb_h, int thumb_w, float* maps, int h, int w,
                    const FuseParams& p);

}  // namespace staged
}  // namespace tilead
