// DevicePipeline: see device_pipeline.h.
#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
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
  DeviceBuffer images, tiles, maps, canvas, scratch, out, mask, raw, scores, loc_threshold, loc_scale, loc_scores;
  DeviceBuffer context;  // shared by every engine's execution context (USER_MANAGED), may stay empty
  // Thumbnail branch (empty without one): resized uint8 images, the engine's input and output blocks.
  DeviceBuffer small, thumb_in, thumb_map;
  size_t small_bytes = 0;        // one resized uint8 image
  size_t thumb_tile_floats = 0;  // one thumbnail input, all channels
  size_t thumb_map_floats = 0;   // one thumbnail map
  PinnedBuffer staging;          // uint8 images in, float maps + uint8 masks + scores (+ per-tile scores) out
  size_t staging_bytes = 0;
  std::map<int, cuda::GraphExec> graphs;  // batch size -> instantiated graph; declared last, destroyed first

  explicit Impl(const PipelineSpec& s) : spec(s) {}
  // Nothing may be freed while the stream still uses it: wait first (errors ignored: a destructor must not throw).
  ~Impl() {
    if (cudaSetDevice(spec.device) == cudaSuccess && stream.get() != nullptr) {
      cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream.get(), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
        cudaGraph_t partial = nullptr;
        if (cudaStreamEndCapture(stream.get(), &partial) == cudaSuccess && partial != nullptr) {
          cudaGraphDestroy(partial);
        }
      }
      cudaStreamSynchronize(stream.get());
    }
    cudaGetLastError();
  }

  void use_device() const { check(cudaSetDevice(spec.device), "cudaSetDevice"); }

  // Pinned output layout of a batch of n: maps | masks | pad to 4 bytes | raw (n) | scores (n) | tile scores (L n).
  struct Outputs {
    float* maps;
    uint8_t* mask;
    float* raw;
    float* scores;
    float* loc_scores;
  };
  Outputs outputs(int n) const {
    const size_t mask_bytes = static_cast<size_t>(n) * out_floats;
    uint8_t* host = staging.as<uint8_t>();
    Outputs o;
    o.maps = reinterpret_cast<float*>(host);
    o.mask = host + sizeof(float) * n * out_floats;
    o.raw = reinterpret_cast<float*>(o.mask + mask_bytes + (4 - mask_bytes % 4) % 4);
    o.scores = o.raw + n;
    o.loc_scores = o.scores + n;
    return o;
  }
  // Floats from one location's score block to the next for a batch of n.
  size_t scores_stride(int n) const { return static_cast<size_t>(aligned_block_floats(n)); }

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
  bool has_thumbnail() const { return spec.thumbnail.map_h > 0; }
  void check_thumbnail(int n, const char* what) const {
    if (!has_thumbnail()) {
      throw std::logic_error(std::string("DevicePipeline::") + what + ": built without a thumbnail branch");
    }
    check_batch(n);
  }
  // Image-size maps: the canvas itself where it is the image (geometry.h, canvas_map), else a separate buffer.
  float* image_maps() const { return canvas_map(spec.grid) == kCanvasIsImage ? canvas.as<float>() : out.as<float>(); }
};

DevicePipeline::DevicePipeline(const PipelineSpec& spec) {
  if (spec.max_batch < 1) throw std::invalid_argument("DevicePipeline: max_batch must be >= 1");
  if (spec.tile.out_type != kFloat32) throw std::invalid_argument("DevicePipeline: tiles must be float32");
  check(cudaSetDevice(spec.device), "cudaSetDevice");  // before the stream is created: it belongs to this device
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
  if (canvas_map(g) != kCanvasIsImage) m.out = DeviceBuffer(sizeof(float) * n * m.out_floats);
  m.mask = DeviceBuffer(n * m.out_floats);
  m.raw = DeviceBuffer(sizeof(float) * n);
  m.scores = DeviceBuffer(sizeof(float) * n);
  if (!spec.post.loc_threshold.empty()) {
    if (spec.post.loc_threshold.size() != static_cast<size_t>(m.locations) ||
        spec.post.loc_scale.size() != spec.post.loc_threshold.size()) {
      throw std::invalid_argument("DevicePipeline: loc_threshold and loc_scale need one value per location");
    }
    m.loc_threshold = DeviceBuffer(sizeof(float) * m.locations);
    m.loc_scale = DeviceBuffer(sizeof(float) * m.locations);
    check(cudaMemcpy(m.loc_threshold.as<void>(), spec.post.loc_threshold.data(), sizeof(float) * m.locations,
                     cudaMemcpyHostToDevice),
          "upload loc_threshold");
    check(cudaMemcpy(m.loc_scale.as<void>(), spec.post.loc_scale.data(), sizeof(float) * m.locations,
                     cudaMemcpyHostToDevice),
          "upload loc_scale");
  }
  const ThumbnailSpec& t = spec.thumbnail;
  if (t.map_h > 0) {
    if (grid_locations(t.grid) != 1 || t.grid.y.tile != t.grid.y.size || t.grid.x.tile != t.grid.x.size ||
        t.map_w < 1) {
      throw std::invalid_argument("DevicePipeline: the thumbnail grid must be one tile of the resized image's size");
    }
    if (t.grid.y.size > g.y.size || t.grid.x.size > g.x.size) {
      throw std::invalid_argument("DevicePipeline: the thumbnail (" + std::to_string(t.grid.y.size) + " x " +
                                  std::to_string(t.grid.x.size) + ") must not be larger than the image (" +
                                  std::to_string(g.y.size) + " x " + std::to_string(g.x.size) +
                                  "): the device resizes it by area only");
    }
    m.small_bytes = static_cast<size_t>(t.grid.y.size) * t.grid.x.size * spec.tile.in_channels;
    m.thumb_tile_floats = static_cast<size_t>(spec.tile.out_channels) * t.grid.y.size * t.grid.x.size;
    m.thumb_map_floats = static_cast<size_t>(t.map_h) * t.map_w;
    m.small = DeviceBuffer(n * m.small_bytes);
    m.thumb_in = DeviceBuffer(sizeof(float) * n * m.thumb_tile_floats);  // cudaMalloc: 256-byte aligned
    m.thumb_map = DeviceBuffer(sizeof(float) * n * m.thumb_map_floats);
  }
  const size_t score_floats = spec.location_scores ? static_cast<size_t>(m.locations) : 0;
  if (spec.location_scores) m.loc_scores = DeviceBuffer(sizeof(float) * score_floats * m.scores_stride(spec.max_batch));
  // Downloads share it: maps, masks, up to 3 bytes of alignment, raw scores, scores and per-tile scores.
  m.staging_bytes =
      max_of(n * m.image_bytes, n * (m.out_floats * (sizeof(float) + 1) + (2 + score_floats) * sizeof(float)) + 4);
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

uintptr_t DevicePipeline::scores_address(int location, int n) const {
  const Impl& m = *impl_;
  m.check_location(location, n, "scores_address");
  if (m.loc_scores.bytes() == 0) {
    throw std::logic_error("DevicePipeline::scores_address: built without location_scores (no per-tile score output)");
  }
  return reinterpret_cast<uintptr_t>(m.loc_scores.as<float>() + static_cast<size_t>(location) * m.scores_stride(n));
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
         m.mask.bytes() + m.raw.bytes() + m.scores.bytes() + m.loc_threshold.bytes() + m.loc_scale.bytes() +
         m.loc_scores.bytes() + m.context.bytes() + m.small.bytes() + m.thumb_in.bytes() + m.thumb_map.bytes();
}

uintptr_t DevicePipeline::context_memory(size_t bytes) {
  Impl& m = *impl_;
  if (bytes > m.context.bytes()) {
    m.use_device();
    m.stream.sync();   // the old buffer may still be in use
    m.graphs.clear();  // they hold the old address
    m.context = DeviceBuffer();
    m.context = DeviceBuffer(bytes);  // cudaMalloc: 256-byte aligned, as TensorRT requires
  }
  return reinterpret_cast<uintptr_t>(m.context.as<void>());
}

void DevicePipeline::use_device() const { impl_->use_device(); }

void DevicePipeline::upload(const uint8_t* images, int n) {
  stage_images(images, n);
  upload_staged(n);
}

void DevicePipeline::stage_images(const uint8_t* images, int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  // The staging buffer may still be read by the previous batch's download: wait for the stream first.
  m.stream.sync();
  std::memcpy(m.staging.as<uint8_t>(), images, static_cast<size_t>(n) * m.image_bytes);
}

void DevicePipeline::upload_staged(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  check(cudaMemcpyAsync(m.images.as<void>(), m.staging.as<void>(), static_cast<size_t>(n) * m.image_bytes,
                        cudaMemcpyHostToDevice, m.stream.get()),
        "upload images");
}

void DevicePipeline::upload_location_maps(const float* maps, int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  const size_t row = sizeof(float) * n * m.map_floats;  // one location's maps, dense on the host
  check(cudaMemcpy2DAsync(m.maps.as<void>(), sizeof(float) * m.maps_stride(n), maps, row, row,
                          static_cast<size_t>(m.locations), cudaMemcpyHostToDevice, m.stream.get()),
        "upload maps");
  m.stream.sync();  // pageable source: done before returning
}

void DevicePipeline::tile(int n, bool swap_rb) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  TileParams p = m.spec.tile;
  p.swap_rb = swap_rb && p.in_channels == 3 ? 1 : 0;
  cuda::tile_images(m.images.as<uint8_t>(), n, m.spec.grid, p, m.tiles.as<void>(), m.stream.get(),
                    static_cast<int64_t>(m.tiles_stride(n)));
}

void DevicePipeline::untile(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  UntileParams up{m.spec.map_h, m.spec.map_w, m.spec.post.weights, nullptr, nullptr};
  if (!m.spec.post.loc_threshold.empty()) {
    up.loc_threshold = m.loc_threshold.as<float>();
    up.loc_scale = m.loc_scale.as<float>();
  }
  cuda::untile_maps(m.maps.as<float>(), n, m.spec.grid, up, m.canvas.as<float>(), m.stream.get(),
                    static_cast<int64_t>(m.maps_stride(n)));
}

void DevicePipeline::smooth_seams(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  if (seam_enabled(m.spec.post.seam)) {
    cuda::smooth_seams(m.canvas.as<float>(), n, m.spec.grid, m.spec.post.seam, m.scratch.as<float>(), m.stream.get());
  }
}

void DevicePipeline::crop(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  const Grid& g = m.spec.grid;
  const int mapping = canvas_map(g);  // geometry.h: the one canvas -> image rule
  if (mapping == kCanvasIsImage) return;
  cudaStream_t s = m.stream.get();
  if (mapping == kCanvasResized) {
    cuda::resize_maps(m.canvas.as<float>(), n, g.y.canvas, g.x.canvas, m.out.as<float>(), g.y.size, g.x.size, s);
    return;
  }
  for (int i = 0; i < n; ++i) {  // kCanvasPadded: the top-left image region of every canvas
    check(cudaMemcpy2DAsync(m.out.as<float>() + static_cast<size_t>(i) * m.out_floats, sizeof(float) * g.x.size,
                            m.canvas.as<float>() + static_cast<size_t>(i) * m.canvas_floats, sizeof(float) * g.x.canvas,
                            sizeof(float) * g.x.size, g.y.size, cudaMemcpyDeviceToDevice, s),
          "crop canvas");
  }
}

void DevicePipeline::normalize(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  float* image_maps = m.image_maps();
  cuda::normalize_maps(image_maps, image_maps, m.mask.as<uint8_t>(), m.raw.as<float>(), m.scores.as<float>(), n,
                       static_cast<int64_t>(m.out_floats), m.spec.post.norm, m.stream.get());
}

uintptr_t DevicePipeline::thumbnail_input_address(int n) const {
  impl_->check_thumbnail(n, "thumbnail_input_address");
  return reinterpret_cast<uintptr_t>(impl_->thumb_in.as<void>());
}

uintptr_t DevicePipeline::thumbnail_map_address(int n) const {
  impl_->check_thumbnail(n, "thumbnail_map_address");
  return reinterpret_cast<uintptr_t>(impl_->thumb_map.as<void>());
}

void DevicePipeline::thumbnail_input(int n, bool swap_rb) {
  Impl& m = *impl_;
  m.check_thumbnail(n, "thumbnail_input");
  m.use_device();
  const Grid& g = m.spec.grid;
  const Grid& t = m.spec.thumbnail.grid;
  cudaStream_t s = m.stream.get();
  cuda::resize_area(m.images.as<uint8_t>(), n, g.y.size, g.x.size, m.spec.tile.in_channels, m.small.as<uint8_t>(),
                    t.y.size, t.x.size, s);
  TileParams p = m.spec.tile;
  p.swap_rb = swap_rb && p.in_channels == 3 ? 1 : 0;
  cuda::tile_images(m.small.as<uint8_t>(), n, t, p, m.thumb_in.as<void>(), s);
}

void DevicePipeline::fuse(int n) {
  Impl& m = *impl_;
  m.check_thumbnail(n, "fuse");
  m.use_device();
  const Grid& g = m.spec.grid;
  const ThumbnailSpec& t = m.spec.thumbnail;
  cuda::fuse_thumbnail(m.thumb_map.as<float>(), n, t.map_h, t.map_w, m.image_maps(), g.y.size, g.x.size, t.fuse,
                       m.stream.get());
}

void DevicePipeline::upload_thumbnail_maps(const float* maps, int n) {
  Impl& m = *impl_;
  m.check_thumbnail(n, "upload_thumbnail_maps");
  m.use_device();
  check(cudaMemcpyAsync(m.thumb_map.as<void>(), maps, sizeof(float) * n * m.thumb_map_floats, cudaMemcpyHostToDevice,
                        m.stream.get()),
        "upload thumbnail maps");
  m.stream.sync();  // pageable source: done before returning
}

void DevicePipeline::download_thumbnail_maps(int n, float* maps) {
  Impl& m = *impl_;
  m.check_thumbnail(n, "download_thumbnail_maps");
  m.use_device();
  check(cudaMemcpyAsync(maps, m.thumb_map.as<void>(), sizeof(float) * n * m.thumb_map_floats, cudaMemcpyDeviceToHost,
                        m.stream.get()),
        "download thumbnail maps");
  m.stream.sync();
}

void DevicePipeline::download_location_maps(int n, float* maps) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  const size_t row = sizeof(float) * n * m.map_floats;  // one location's maps, dense on the host
  check(cudaMemcpy2DAsync(maps, row, m.maps.as<void>(), sizeof(float) * m.maps_stride(n), row,
                          static_cast<size_t>(m.locations), cudaMemcpyDeviceToHost, m.stream.get()),
        "download maps");
  m.stream.sync();
}

void DevicePipeline::download_location_scores(int n, float* scores) {
  Impl& m = *impl_;
  m.check_batch(n);
  if (m.loc_scores.bytes() == 0) throw std::logic_error("DevicePipeline: built without location_scores");
  m.use_device();
  const size_t row = sizeof(float) * n;
  check(cudaMemcpy2DAsync(scores, row, m.loc_scores.as<void>(), sizeof(float) * m.scores_stride(n), row,
                          static_cast<size_t>(m.locations), cudaMemcpyDeviceToHost, m.stream.get()),
        "download tile scores");
  m.stream.sync();
}

void DevicePipeline::download(int n, float* maps, uint8_t* mask, float* raw_scores, float* scores) {
  enqueue_download(n);
  fetch(n, maps, mask, raw_scores, scores);
}

void DevicePipeline::enqueue_download(int n) {
  Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  cudaStream_t s = m.stream.get();
  const Impl::Outputs o = m.outputs(n);
  const size_t map_bytes = sizeof(float) * n * m.out_floats;
  const size_t mask_bytes = static_cast<size_t>(n) * m.out_floats;
  check(cudaMemcpyAsync(o.maps, m.image_maps(), map_bytes, cudaMemcpyDeviceToHost, s), "download maps");
  check(cudaMemcpyAsync(o.mask, m.mask.as<void>(), mask_bytes, cudaMemcpyDeviceToHost, s), "download masks");
  check(cudaMemcpyAsync(o.raw, m.raw.as<void>(), sizeof(float) * n, cudaMemcpyDeviceToHost, s), "download raw");
  check(cudaMemcpyAsync(o.scores, m.scores.as<void>(), sizeof(float) * n, cudaMemcpyDeviceToHost, s),
        "download scores");
  if (m.loc_scores.bytes() > 0) {
    const size_t row = sizeof(float) * n;
    check(cudaMemcpy2DAsync(o.loc_scores, row, m.loc_scores.as<void>(), sizeof(float) * m.scores_stride(n), row,
                            static_cast<size_t>(m.locations), cudaMemcpyDeviceToHost, s),
          "download tile scores");
  }
}

void DevicePipeline::fetch(int n, float* maps, uint8_t* mask, float* raw_scores, float* scores) const {
  const Impl& m = *impl_;
  m.check_batch(n);
  m.use_device();
  m.stream.sync();
  const Impl::Outputs o = m.outputs(n);
  std::memcpy(maps, o.maps, sizeof(float) * n * m.out_floats);
  std::memcpy(mask, o.mask, static_cast<size_t>(n) * m.out_floats);
  std::memcpy(raw_scores, o.raw, sizeof(float) * n);
  std::memcpy(scores, o.scores, sizeof(float) * n);
}

void DevicePipeline::fetch_location_scores(int n, float* scores) const {
  const Impl& m = *impl_;
  m.check_batch(n);
  if (m.loc_scores.bytes() == 0) throw std::logic_error("DevicePipeline: built without location_scores");
  std::memcpy(scores, m.outputs(n).loc_scores, sizeof(float) * m.locations * n);
}

void DevicePipeline::synchronize() {
  impl_->use_device();
  impl_->stream.sync();
}

void DevicePipeline::begin_capture() {
  Impl& m = *impl_;
  m.use_device();
  // Thread-local mode: an unsafe CUDA call on this thread (a cudaMalloc inside an engine, say) fails the capture
  // instead of racing; other threads are not affected.
  check(cudaStreamBeginCapture(m.stream.get(), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
}

void DevicePipeline::end_capture(int key) {
  Impl& m = *impl_;
  if (key < 0) throw std::out_of_range("DevicePipeline::end_capture: graph key must be >= 0");
  m.use_device();
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(m.stream.get(), &graph);
  if (ended != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // a failed capture is not sticky: clear it so later calls start clean
    check(ended, "cudaStreamEndCapture");
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (made != cudaSuccess) {
    cudaGetLastError();
    check(made, "cudaGraphInstantiate");
  }
  m.graphs[key] = cuda::GraphExec(exec);
}

void DevicePipeline::abort_capture() {
  Impl& m = *impl_;
  m.use_device();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(m.stream.get(), &status), "cudaStreamIsCapturing");
  if (status != cudaStreamCaptureStatusNone) {
    cudaGraph_t partial = nullptr;
    if (cudaStreamEndCapture(m.stream.get(), &partial) == cudaSuccess && partial != nullptr) cudaGraphDestroy(partial);
  }
  cudaGetLastError();
}

bool DevicePipeline::has_graph(int key) const { return impl_->graphs.count(key) > 0; }

int DevicePipeline::graph_count() const { return static_cast<int>(impl_->graphs.size()); }

void DevicePipeline::launch(int key) {
  Impl& m = *impl_;
  const auto it = m.graphs.find(key);
  if (it == m.graphs.end()) {
    throw std::out_of_range("DevicePipeline::launch: no graph captured under key " + std::to_string(key));
  }
  m.use_device();
  check(cudaGraphLaunch(it->second.get(), m.stream.get()), "cudaGraphLaunch");
}

}  // namespace device
}  // namespace tilead
