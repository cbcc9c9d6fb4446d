// DevicePipeline: see device_pipeline.h.
#include <cuda_runtime_api.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "../device_pipeline.h"
#include "cuda_check.h"

namespace tilead {
namespace device {
namespace {

using cuda::check;
using cuda::DeviceBuffer;
using cuda::PinnedBuffer;

size_t max_of(size_t a, size_t b) { return a > b ? a : b; }

}  // namespace

struct DevicePipeline::Impl {
  PipelineSpec spec;
  cuda::Stream stream;
  int locations = 0;
  size_t image_bytes = 0;    // one uint8 image
  size_t tile_floats = 0;    // one tile, all channels
  size_t map_floats = 0;     // one location map
  size_t canvas_floats = 0;  // one canvas
  size_t out_floats = 0;     // one image-size map
  DeviceBuffer images, tiles, maps, canvas, scratch, out, mask, raw, scores, loc_threshold, loc_scale;
  PinnedBuffer staging;  // uint8 images in, float maps + uint8 masks + scores out
  size_t staging_bytes = 0;

  explicit Impl(const PipelineSpec& s) : spec(s) {}

  // Floats from one location's block to the next for a batch of n (256-byte aligned blocks).
  size_t tiles_stride(int n) const {
    return static_cast<size_t>(aligned_block_floats(static_cast<int64_t>(n) * static_cast<int64_t>(tile_floats)));
  }
  size_t maps_stride(int n) const {
    return static_cast<size_t>(aligned_block_floats(static_cast<int64_t>(n) * static_cast<int64_t>(map_floats)));
  }
  void check_location(int location, int n, const char* what) const {
    if (location < 0 || location >= locations || n < 1 || n > spec.max_batch) {
      throw std::out_of_range(std::string("DevicePipeline::") + what + ": location " + std::to_string(location) +
                              " or batch " + std::to_string(n) + " out of range (0 to " +
                              std::to_string(locations - 1) + ", 1 to " + std::to_string(spec.max_batch) + ")");
    }
  }
  void check_batch(int n) const {
    if (n < 1 || n > spec.max_batch) {
      throw std::out_of_range("DevicePipeline: batch of " + std::to_string(n) + " images, expected 1 to " +
                              std::to_string(spec.max_batch) + " (max_batch)");
    }
  }
  // Image-size maps: a separate buffer for pad/resize grids, else the canvas itself.
  float* image_maps() const { return out.bytes() > 0 ? out.as<float>() : canvas.as<float>(); }
};

DevicePipeline::DevicePipeline(const PipelineSpec& spec) {
  if (spec.max_batch < 1) throw std::invalid_argument("DevicePipeline: max_batch must be >= 1");
  if (spec.tile.out_type != kFloat32) throw std::invalid_argument("DevicePipeline: tiles must be float32");
  check(cudaSetDevice(spec.device), "cudaSetDevice");
  impl_ = std::make_unique<Impl>(spec);
  Impl& m = *impl_;
  const Grid& g = spec.grid;
  const size_t n = static_cast<size_t>(spec.max_batch);
  m.locations = grid_locations(g);
  m.image_bytes = static_cast<size_t>(g.y.size) * g.x.size * spec.tile.in_channels;
  m.tile_floats = static_cast<size_t>(spec.tile.out_channels) * g.y.tile * g.x.tile;
  m.map_floats = static_cast<size_t>(spec.map_h) * spec.map_w;
  m.canvas_floats = static_cast<size_t>(g.y.canvas) * g.x.canvas;
  m.out_floats = static_cast<size_t>(g.y.size) * g.x.size;
  m.images = DeviceBuffer(n * m.image_bytes);
  // Each location's block padded to 256 bytes for the largest batch: every smaller batch's stride fits.
  m.tiles = DeviceBuffer(sizeof(float) * m.locations * m.tiles_stride(spec.max_batch));
  m.maps = DeviceBuffer(sizeof(float) * m.locations * m.maps_stride(spec.max_batch));
  m.canvas = DeviceBuffer(sizeof(float) * n * m.canvas_floats);
  m.scratch = DeviceBuffer(sizeof(float) * static_cast<size_t>(seam_scratch_floats(g, spec.max_batch)));
  const bool same = g.y.canvas == g.y.size && g.x.canvas == g.x.size;
  if (!same) m.out = DeviceBuffer(sizeof(float) * n * m.out_floats);
  m.mask = DeviceBuffer(n * m.out_floats);
  m.raw = DeviceBuffer(sizeof(float) * n);
  m.scores = DeviceBuffer(sizeof(float) * n);
  if (!spec.loc_threshold.empty()) {
    if (spec.loc_threshold.size() != static_cast<size_t>(m.locations) ||
        spec.loc_scale.size() != spec.loc_threshold.size()) {
      throw std::invalid_argument("DevicePipeline: loc_threshold and loc_scale need one value per location");
    }
    m.loc_threshold = DeviceBuffer(sizeof(float) * m.locations);
    m.loc_scale = DeviceBuffer(sizeof(float) * m.locations);
    check(cudaMemcpy(m.loc_threshold.as<void>(), spec.loc_threshold.data(), sizeof(float) * m.locations,
                     cudaMemcpyHostToDevice),
          "upload loc_threshold");
    check(
        cudaMemcpy(m.loc_scale.as<void>(), spec.loc_scale.data(), sizeof(float) * m.locations, cudaMemcpyHostToDevice),
        "upload loc_scale");
  }
  // Downloads share it: maps, masks, up to 3 bytes of alignment, raw scores and scores.
  m.staging_bytes = max_of(n * m.image_bytes, n * (m.out_floats * (sizeof(float) + 1) + 2 * sizeof(float)) + 4);
  m.staging = PinnedBuffer(m.staging_bytes);
}

DevicePipeline::~DevicePipeline() = default;

uintptr_t DevicePipeline::stream() const { return reinterpret_cast<uintptr_t>(impl_->stream.get()); }

uintptr_t DevicePipeline::tiles_address(int location, int n) const {
  const Impl& m = *impl_;
  m.check_location(location, n, "tiles_address");
  // Layout of the tile kernel's output for a batch of n: [L][stride >= n*C*th*tw], blocks 256-byte aligned.
  return reinterpret_cast<uintptr_t>(m.tiles.as<float>() + static_cast<size_t>(location) * m.tiles_stride(n));
}

uintptr_t DevicePipeline::maps_address(int location, int n) const {
  const Impl& m = *impl_;
  m.check_location(location, n, "maps_address");
  // Layout the untile kernel reads for a batch of n: [L][stride >= n*map_h*map_w], blocks 256-byte aligned.
  return reinterpret_cast<uintptr_t>(m.maps.as<float>() + static_cast<size_t>(location) * m.maps_stride(n));
}

size_t DevicePipeline::tiles_stride(int n) const {
  impl_->check_location(0, n, "tiles_stride");
  return sizeof(float) * impl_->tiles_stride(n);
}

size_t DevicePipeline::maps_stride(int n) const {
  impl_->check_location(0, n, "maps_stride");
  return sizeof(float) * impl_->maps_stride(n);
}

const PipelineSpec& DevicePipeline::spec() const { return impl_->spec; }

size_t DevicePipeline::device_bytes() const {
  const Impl& m = *impl_;
  return m.images.bytes() + m.tiles.bytes() + m.maps.bytes() + m.canvas.bytes() + m.scratch.bytes() + m.out.bytes() +
         m.mask.bytes() + m.raw.bytes() + m.scores.bytes() + m.loc_threshold.bytes() + m.loc_scale.bytes();
}

void DevicePipeline::upload(const uint8_t* images, int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  const size_t bytes = static_cast<size_t>(n) * m.image_bytes;
  // The staging buffer may still be read by the previous batch's download: wait for the stream first.
  m.stream.sync();
  std::memcpy(m.staging.as<uint8_t>(), images, bytes);
  check(cudaMemcpyAsync(m.images.as<void>(), m.staging.as<void>(), bytes, cudaMemcpyHostToDevice, m.stream.get()),
        "upload images");
}

void DevicePipeline::upload_location_maps(const float* maps, int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  const size_t row = sizeof(float) * n * m.map_floats;  // one location's maps, dense on the host
  check(cudaMemcpy2DAsync(m.maps.as<void>(), sizeof(float) * m.maps_stride(n), maps, row, row,
                          static_cast<size_t>(m.locations), cudaMemcpyHostToDevice, m.stream.get()),
        "upload maps");
  m.stream.sync();  // pageable source: done before returning
}

void DevicePipeline::tile(int n, bool swap_rb) {
  Impl& m = *impl_;
  m.check_batch(n);
  TileParams p = m.spec.tile;
  p.swap_rb = swap_rb && p.in_channels == 3 ? 1 : 0;
  cuda::tile_images(m.images.as<uint8_t>(), n, m.spec.grid, p, m.tiles.as<void>(), m.stream.get(),
                    static_cast<int64_t>(m.tiles_stride(n)));
}

void DevicePipeline::untile(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  UntileParams up{m.spec.map_h, m.spec.map_w, m.spec.weights, nullptr, nullptr};
  if (!m.spec.loc_threshold.empty()) {
    up.loc_threshold = m.loc_threshold.as<float>();
    up.loc_scale = m.loc_scale.as<float>();
  }
  cuda::untile_maps(m.maps.as<float>(), n, m.spec.grid, up, m.canvas.as<float>(), m.stream.get(),
                    static_cast<int64_t>(m.maps_stride(n)));
}

void DevicePipeline::smooth_seams(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  if (m.spec.seam.sigma > 0.f) {
    cuda::smooth_seams(m.canvas.as<float>(), n, m.spec.grid, m.spec.seam, m.scratch.as<float>(), m.stream.get());
  }
}

void DevicePipeline::crop(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  if (m.out.bytes() == 0) return;  // shift: the canvas is the image
  const Grid& g = m.spec.grid;
  cudaStream_t s = m.stream.get();
  if (g.y.edge == kEdgeResize || g.x.edge == kEdgeResize) {
    cuda::resize_maps(m.canvas.as<float>(), n, g.y.canvas, g.x.canvas, m.out.as<float>(), g.y.size, g.x.size, s);
    return;
  }
  for (int i = 0; i < n; ++i) {  // pad: the top-left image region of every canvas
    check(cudaMemcpy2DAsync(m.out.as<float>() + static_cast<size_t>(i) * m.out_floats, sizeof(float) * g.x.size,
                            m.canvas.as<float>() + static_cast<size_t>(i) * m.canvas_floats, sizeof(float) * g.x.canvas,
                            sizeof(float) * g.x.size, g.y.size, cudaMemcpyDeviceToDevice, s),
          "crop canvas");
  }
}

void DevicePipeline::normalize(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  float* image_maps = m.image_maps();
  cuda::normalize_maps(image_maps, image_maps, m.mask.as<uint8_t>(), m.raw.as<float>(), m.scores.as<float>(), n,
                       static_cast<int64_t>(m.out_floats), m.spec.norm, m.stream.get());
}

void DevicePipeline::download_location_maps(int n, float* maps) {
  Impl& m = *impl_;
  m.check_batch(n);
  const size_t row = sizeof(float) * n * m.map_floats;  // one location's maps, dense on the host
  check(cudaMemcpy2DAsync(maps, row, m.maps.as<void>(), sizeof(float) * m.maps_stride(n), row,
                          static_cast<size_t>(m.locations), cudaMemcpyDeviceToHost, m.stream.get()),
        "download maps");
  m.stream.sync();
}

void DevicePipeline::download(int n, float* maps, uint8_t* mask, float* raw_scores, float* scores) {
  Impl& m = *impl_;
  m.check_batch(n);
  cudaStream_t s = m.stream.get();
  const size_t map_bytes = sizeof(float) * n * m.out_floats;
  const size_t mask_bytes = static_cast<size_t>(n) * m.out_floats;
  const float* image_maps = m.image_maps();
  uint8_t* host = m.staging.as<uint8_t>();
  float* h_maps = reinterpret_cast<float*>(host);
  uint8_t* h_mask = host + map_bytes;
  float* h_raw = reinterpret_cast<float*>(h_mask + mask_bytes + (4 - mask_bytes % 4) % 4);
  float* h_scores = h_raw + n;
  check(cudaMemcpyAsync(h_maps, image_maps, map_bytes, cudaMemcpyDeviceToHost, s), "download maps");
  check(cudaMemcpyAsync(h_mask, m.mask.as<void>(), mask_bytes, cudaMemcpyDeviceToHost, s), "download masks");
  check(cudaMemcpyAsync(h_raw, m.raw.as<void>(), sizeof(float) * n, cudaMemcpyDeviceToHost, s), "download raw");
  check(cudaMemcpyAsync(h_scores, m.scores.as<void>(), sizeof(float) * n, cudaMemcpyDeviceToHost, s),
        "download scores");
  m.stream.sync();
  std::memcpy(maps, h_maps, map_bytes);
  std::memcpy(mask, h_mask, mask_bytes);
  std::memcpy(raw_scores, h_raw, sizeof(float) * n);
  std::memcpy(scores, h_scores, sizeof(float) * n);
}

void DevicePipeline::synchronize() { impl_->stream.sync(); }

}  // namespace device
}  // namespace tilead
