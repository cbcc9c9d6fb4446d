// A device-resident inference pipeline for the TensorRT backend.
//
// One DevicePipeline owns a CUDA stream, a pinned host staging buffer and
// every device buffer a batch of up to max_batch images needs: the uint8
// images, the tile blocks (one per location, written by the tile kernel and
// read by that location's engine), the per-location maps (written by the
// engines), the canvas, the seam scratch, the image-size maps, masks and
// scores. Everything is freed by RAII. A call sequence is
//
//   upload(images, n), tile(n, swap_rb)   pinned copy, one H2D copy, tile kernel
//   thumbnail_input(n, swap_rb)           thumbnail branch only: area resize + tile kernel (one tile per image)
//   <engines enqueued on stream()>        each reads tiles_address(l, n), writes maps_address(l, n); the
//                                         thumbnail engine reads thumbnail_input_address(n), writes
//                                         thumbnail_map_address(n)
//   untile(n), smooth_seams(n), crop(n)
//   fuse(n)                               thumbnail branch only: upsample + fuse into the image-size maps
//   normalize(n)
//   download(n, ...)                      one D2H copy per output, then the stream is synchronized
//
// all on the one stream, so nothing waits between stages. upload is
// stage_images (host copy into pinned memory) + upload_staged (the H2D copy);
// download is enqueue_download (D2H copies into pinned memory) + fetch (wait,
// host copies out). Everything between upload_staged and enqueue_download,
// engines included, can be captured into a CUDA graph per batch size
// (begin_capture ... end_capture(n)) and replayed with launch(n); the host
// copies stay outside the graph.
//
// Every method that touches the GPU first makes spec.device current on the
// calling thread (the current device is per thread, and a caller may move
// between threads). The destructor waits for the stream before it frees
// anything. In a build without CUDA the constructor throws.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tilead/kernels.h"

namespace tilead {
namespace device {

// The thumbnail branch (issue #20): every image area-resized to grid's size x size on the device, preprocessed by
// the tile kernel as one tile (the pipeline's scale and bias), one more engine on it, its map (map_h x map_w)
// upsampled and fused with the cropped tiled map before normalize. map_h 0: no thumbnail branch.
struct ThumbnailSpec {
  Grid grid{};  // the one-tile grid of the resized image (size x size, tile size x size)
  int map_h = 0;
  int map_w = 0;
  FuseParams fuse{};
};

struct PipelineSpec {
  Grid grid;
  TileParams tile;  // out_type must be kFloat32 (the engines' input)
  int map_h = 0;    // rows of each location's map
  int map_w = 0;    // columns of each location's map
  PostSpec post;    // blending, per-location normalization, seams, normalization
  int max_batch = 1;
  int device = 0;                // CUDA device index
  bool location_scores = false;  // engines write a second output: one score per tile (n,) per location
  ThumbnailSpec thumbnail{};     // map_h 0: none
};

class DevicePipeline {
 public:
  explicit DevicePipeline(const PipelineSpec& spec);
  ~DevicePipeline();
  DevicePipeline(const DevicePipeline&) = delete;
  DevicePipeline& operator=(const DevicePipeline&) = delete;

  // The cudaStream_t every stage runs on, as an integer (TensorRT's execute_async_v3 takes it).
  uintptr_t stream() const;
  // Device address of location l's tile block (n, C, tile_h, tile_w) float32 for a batch of n:
  // 256-byte aligned (TensorRT's requirement), location l at l * tiles_stride(n) bytes from location 0.
  uintptr_t tiles_address(int location, int n) const;
  // Device address of location l's map block (n, 1, map_h, map_w) float32 for a batch of n, aligned likewise.
  uintptr_t maps_address(int location, int n) const;
  // Bytes from one location's tile block to the next for a batch of n: a multiple of kTensorAlignBytes.
  size_t tiles_stride(int n) const;
  // Bytes from one location's map block to the next for a batch of n: a multiple of kTensorAlignBytes.
  size_t maps_stride(int n) const;
  // What the pipeline was built for.
  const PipelineSpec& spec() const;
  // Device address of location l's per-tile scores (n,) float32 (location_scores only), 256-byte aligned.
  uintptr_t scores_address(int location, int n) const;
  // Bytes of device memory this pipeline holds (buffers and the shared context memory).
  size_t device_bytes() const;
  // One device buffer of at least `bytes` for the engines' execution contexts (TensorRT USER_MANAGED
  // allocation): they run one after another on stream(), so one buffer serves all. Grows when asked for more
  // (waiting for the stream first and dropping every captured graph, which holds the old address).
  uintptr_t context_memory(size_t bytes);
  // Make spec().device the calling thread's current CUDA device (TensorRT enqueues on it).
  void use_device() const;

  // Each stage is enqueued on stream() and returns at once (download waits).
  // images: host (n, H, W, in_channels) uint8, n <= max_batch; staged through pinned memory.
  void upload(const uint8_t* images, int n);
  // The two halves of upload: wait for the stream and copy into pinned memory (host), then enqueue the H2D copy.
  void stage_images(const uint8_t* images, int n);
  void upload_staged(int n);
  // maps: host (L, n, map_h, map_w) float32 into the engines' output blocks (for the GPU self-check).
  void upload_location_maps(const float* maps, int n);
  // Tile kernel into every location's block; swap_rb: the images' channel order differs from the model's.
  void tile(int n, bool swap_rb);
  // Untile the locations' maps (with the per-location normalization of stage "tile") onto the canvas.
  void untile(int n);
  // Seam smoothing of the canvas (nothing when the seam spec is off: seam_enabled false).
  void smooth_seams(int n);
  // Canvas to image size: nothing (shift), crop (pad) or bilinear resize (resize).
  void crop(int n);
  // Normalize, threshold and score the image-size maps.
  void normalize(int n);
  // Thumbnail branch (throws std::logic_error on a pipeline without one). Its engine's input block
  // (n, C, size, size) float32 and output block (n, 1, map_h, map_w) float32, 256-byte aligned:
  uintptr_t thumbnail_input_address(int n) const;
  uintptr_t thumbnail_map_address(int n) const;
  // Area resize of the uploaded images to size x size (they must not be smaller), then the tile kernel.
  void thumbnail_input(int n, bool swap_rb);
  // After crop: fuse the upsampled thumbnail maps into the image-size maps (before normalize).
  void fuse(int n);
  // Host thumbnail maps (n, map_h, map_w) float32: into the engine's output block (self-check), or back.
  void upload_thumbnail_maps(const float* maps, int n);
  void download_thumbnail_maps(int n, float* maps);
  // Host outputs: maps (n, H, W) float32, mask (n, H, W) uint8, raw_scores and scores (n,) float32.
  void download(int n, float* maps, uint8_t* mask, float* raw_scores, float* scores);
  // The two halves of download: enqueue the D2H copies into pinned memory, then wait and copy out (host).
  void enqueue_download(int n);
  void fetch(int n, float* maps, uint8_t* mask, float* raw_scores, float* scores) const;
  // After fetch: the per-tile scores (L, n) float32 the engines wrote (location_scores only).
  void fetch_location_scores(int n, float* scores) const;
  // Host output: every location's raw map (L, n, map_h, map_w) float32, as the engines wrote them.
  void download_location_maps(int n, float* maps);
  // Host output: every location's per-tile scores (L, n) float32 (location_scores only).
  void download_location_scores(int n, float* scores);
  void synchronize();

  // CUDA graphs. begin_capture starts capturing stream() (thread-local mode); the caller enqueues a batch's
  // stages and engines; end_capture(key) instantiates the graph and keeps it under `key` (>= 0, the caller's
  // label: the backend uses the batch size and channel order, both baked into the graph); it throws on a capture
  // error, with the capture ended and nothing kept. abort_capture ends a capture the caller gave up on.
  // launch(key) replays the graph on stream().
  void begin_capture();
  void end_capture(int key);
  void abort_capture();
  bool has_graph(int key) const;
  int graph_count() const;
  void launch(int key);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace device
}  // namespace tilead
