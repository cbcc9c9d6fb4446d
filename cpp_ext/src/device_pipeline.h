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
//   <engines enqueued on stream()>        each reads tiles_address(l, n), writes maps_address(l, n)
//   untile(n), smooth_seams(n), crop(n), normalize(n)
//   download(n, ...)                      one D2H copy per output, then the stream is synchronized
//
// all on the one stream, so nothing waits between stages. In a build without
// CUDA the constructor throws.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tilead/kernels.h"

namespace tilead {
namespace device {

struct PipelineSpec {
  Grid grid;
  TileParams tile;                   // out_type must be kFloat32 (the engines' input)
  int map_h = 0;                     // rows of each location's map
  int map_w = 0;                     // columns of each location's map
  int weights = 0;                   // BlendWeights
  std::vector<float> loc_threshold;  // per-location normalization (stage "tile"); empty for none
  std::vector<float> loc_scale;
  SeamParams seam{0.f, 0.f};  // sigma <= 0: no seam smoothing
  NormParams norm{};
  int max_batch = 1;
  int device = 0;  // CUDA device index
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
  // Bytes of device memory this pipeline holds.
  size_t device_bytes() const;

  // Each stage is enqueued on stream() and returns at once (download waits).
  // images: host (n, H, W, in_channels) uint8, n <= max_batch; staged through pinned memory.
  void upload(const uint8_t* images, int n);
  // maps: host (L, n, map_h, map_w) float32 into the engines' output blocks (for the GPU self-check).
  void upload_location_maps(const float* maps, int n);
  // Tile kernel into every location's block; swap_rb: the images' channel order differs from the model's.
  void tile(int n, bool swap_rb);
  // Untile the locations' maps (with the per-location normalization of stage "tile") onto the canvas.
  void untile(int n);
  // Seam smoothing of the canvas (nothing when sigma <= 0).
  void smooth_seams(int n);
  // Canvas to image size: nothing (shift), crop (pad) or bilinear resize (resize).
  void crop(int n);
  // Normalize, threshold and score the image-size maps.
  void normalize(int n);
  // Host outputs: maps (n, H, W) float32, mask (n, H, W) uint8, raw_scores and scores (n,) float32.
  void download(int n, float* maps, uint8_t* mask, float* raw_scores, float* scores);
  // Host output: every location's raw map (L, n, map_h, map_w) float32, as the engines wrote them.
  void download_location_maps(int n, float* maps);
  void synchronize();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace device
}  // namespace tilead
