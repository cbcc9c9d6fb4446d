// Host-staged CUDA entry points for a build without CUDA: each says so.
#include <stdexcept>

#include "staged.h"

namespace tilead {
namespace staged {
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "tilead._kernels was built without CUDA (no nvcc at build time or TILEAD_CUDA=OFF); "
      "rebuild with nvcc on PATH and TILEAD_CUDA=ON to get the CUDA kernels");
}
}  // namespace

bool built_with_cuda() { return false; }
int device_count(std::string* error) {
  if (error != nullptr) *error = "built without CUDA";
  return 0;
}
std::string device_name(int) { no_cuda(); }
std::pair<size_t, size_t> memory_info(int) { no_cuda(); }
std::string cuda_architectures() { return ""; }
void tile_images(const uint8_t*, int, const Grid&, const TileParams&, void*) { no_cuda(); }
void untile_maps(const float*, int, const Grid&, const UntileParams&, float*) { no_cuda(); }
void smooth_seams(float*, int, const Grid&, const SeamParams&) { no_cuda(); }
void resize_maps(const float*, int, int, int, float*, int, int) { no_cuda(); }
void resize_area(const uint8_t*, int, int, int, int, uint8_t*, int, int) { no_cuda(); }
void fuse_thumbnail(const float*, int, int, int, float*, int, int, const FuseParams&) { no_cuda(); }
void normalize_maps(const float*, float*, uint8_t*, float*, float*, int, int64_t, const NormParams&) { no_cuda(); }

}  // namespace staged
}  // namespace tilead
