// DevicePipeline in a build without CUDA: the constructor says so.
#include <stdexcept>

#include "device_pipeline.h"

namespace tilead {
namespace device {

struct DevicePipeline::Impl {};

DevicePipeline::DevicePipeline(const PipelineSpec&) {
  throw std::runtime_error(
      "DevicePipeline needs the CUDA kernels, but tilead._kernels was built without CUDA (no nvcc at build time "
      "or TILEAD_CUDA=OFF); rebuild with nvcc on PATH and TILEAD_CUDA=ON");
}
DevicePipeline::~DevicePipeline() = default;
uintptr_t DevicePipeline::stream() const { return 0; }
uintptr_t DevicePipeline::tiles_address(int, int) const { return 0; }
uintptr_t DevicePipeline::maps_address(int, int) const { return 0; }
size_t DevicePipeline::tiles_stride(int) const { return 0; }
size_t DevicePipeline::maps_stride(int) const { return 0; }
uintptr_t DevicePipeline::scores_address(int, int) const { return 0; }
size_t DevicePipeline::device_bytes() const { return 0; }
uintptr_t DevicePipeline::context_memory(size_t) { return 0; }
void DevicePipeline::use_device() const {}
void DevicePipeline::stage_images(const uint8_t*, int) {}
void DevicePipeline::upload_staged(int) {}
void DevicePipeline::enqueue_download(int) {}
void DevicePipeline::fetch(int, float*, uint8_t*, float*, float*) const {}
void DevicePipeline::fetch_location_scores(int, float*) const {}
void DevicePipeline::download_location_scores(int, float*) {}
void DevicePipeline::begin_capture() {}
void DevicePipeline::end_capture(int) {}
void DevicePipeline::abort_capture() {}
bool DevicePipeline::has_graph(int) const { return false; }
int DevicePipeline::graph_count() const { return 0; }
void DevicePipeline::launch(int) {}
const PipelineSpec& DevicePipeline::spec() const { throw std::runtime_error("no CUDA"); }
void DevicePipeline::upload(const uint8_t*, int) {}
void DevicePipeline::upload_location_maps(const float*, int) {}
void DevicePipeline::tile(int, bool) {}
void DevicePipeline::untile(int) {}
void DevicePipeline::smooth_seams(int) {}
void DevicePipeline::crop(int) {}
void DevicePipeline::normalize(int) {}
uintptr_t DevicePipeline::thumbnail_input_address(int) const { return 0; }
uintptr_t DevicePipeline::thumbnail_map_address(int) const { return 0; }
void DevicePipeline::thumbnail_input(int, bool) {}
void DevicePipeline::fuse(int) {}
void DevicePipeline::upload_thumbnail_maps(const float*, int) {}
void DevicePipeline::download_thumbnail_maps(int, float*) {}
void DevicePipeline::download(int, float*, uint8_t*, float*, float*) {}
void DevicePipeline::download_location_maps(int, float*) {}
void DevicePipeline::synchronize() {}

}  // namespace device
}  // namespace tilead
