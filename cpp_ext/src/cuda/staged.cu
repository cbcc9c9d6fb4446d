// Host-staged entry points of the CUDA twins (see staged.h).
#include <string>
#include <vector>

#include "../staged.h"
#include "cuda_check.h"

#ifndef TILEAD_CUDA_ARCHS
#define TILEAD_CUDA_ARCHS ""
#endif

namespace tilead {
namespace staged {
namespace {

using cuda::check;
using cuda::DeviceBuffer;
using cuda::Stream;

int64_t tile_bytes(int n, const Grid& g, const TileParams& p) {
  return static_cast<int64_t>(grid_locations(g)) * n * p.out_channels * g.y.tile * g.x.tile *
         (p.out_type == kFloat16 ? 2 : 4);
}

DeviceBuffer upload(const void* host, size_t bytes, const Stream& s) {
  DeviceBuffer d(bytes);
  if (bytes > 0) check(cudaMemcpyAsync(d.as<void>(), host, bytes, cudaMemcpyHostToDevice, s.get()), "upload");
  return d;
}

void download(void* host, const DeviceBuffer& d, size_t bytes, const Stream& s) {
  if (bytes > 0) check(cudaMemcpyAsync(host, d.as<void>(), bytes, cudaMemcpyDeviceToHost, s.get()), "download");
}

}  // namespace

bool built_with_cuda() { return true; }

int device_count(std::string* error) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (error != nullptr) {
      *error = std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ", code " +
               std::to_string(static_cast<int>(err)) + ")";
    }
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

std::string device_name(int index) {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties");
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
}

std::pair<size_t, size_t> memory_info(int index) {
  check(cudaSetDevice(index), "cudaSetDevice");
  size_t free_bytes = 0, total = 0;
  check(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo");
  return {free_bytes, total};
}

std::string cuda_architectures() { return TILEAD_CUDA_ARCHS; }

void tile_images(const uint8_t* images, int n, const Grid& g, const TileParams& p, void* out) {
  Stream s;
  const size_t in_bytes = static_cast<size_t>(n) * g.y.size * g.x.size * p.in_channels;
  DeviceBuffer d_in = upload(images, in_bytes, s);
  const size_t out_bytes = static_cast<size_t>(tile_bytes(n, g, p));
  DeviceBuffer d_out(out_bytes);
  cuda::tile_images(d_in.as<uint8_t>(), n, g, p, d_out.as<void>(), s.get());
  download(out, d_out, out_bytes, s);
  s.sync();
}

void untile_maps(const float* maps, int n, const Grid& g, const UntileParams& p, float* out) {
  Stream s;
  const int L = grid_locations(g);
  DeviceBuffer d_maps = upload(maps, sizeof(float) * L * n * p.map_h * p.map_w, s);
  DeviceBuffer d_threshold, d_scale;
  UntileParams dp = p;
  if (p.loc_scale != nullptr && p.loc_threshold != nullptr) {
    d_threshold = upload(p.loc_threshold, sizeof(float) * L, s);
    d_scale = upload(p.loc_scale, sizeof(float) * L, s);
    dp.loc_threshold = d_threshold.as<float>();
    dp.loc_scale = d_scale.as<float>();
  }
  const size_t out_bytes = sizeof(float) * n * g.y.canvas * g.x.canvas;
  DeviceBuffer d_out(out_bytes);
  cuda::untile_maps(d_maps.as<float>(), n, g, dp, d_out.as<float>(), s.get());
  download(out, d_out, out_bytes, s);
  s.sync();
}

void smooth_seams(float* maps, int n, const Grid& g, const SeamParams& p) {
  Stream s;
  const size_t bytes = sizeof(float) * n * g.y.canvas * g.x.canvas;
  DeviceBuffer d_maps = upload(maps, bytes, s);
  DeviceBuffer scratch(sizeof(float) * static_cast<size_t>(seam_scratch_floats(g, n)));
  cuda::smooth_seams(d_maps.as<float>(), n, g, p, scratch.as<float>(), s.get());
  download(maps, d_maps, bytes, s);
  s.sync();
}

void resize_maps(const float* in, int n, int in_h, int in_w, float* out, int out_h, int out_w) {
  Stream s;
  DeviceBuffer d_in = upload(in, sizeof(float) * n * in_h * in_w, s);
  const size_t out_bytes = sizeof(float) * n * out_h * out_w;
  DeviceBuffer d_out(out_bytes);
  cuda::resize_maps(d_in.as<float>(), n, in_h, in_w, d_out.as<float>(), out_h, out_w, s.get());
  download(out, d_out, out_bytes, s);
  s.sync();
}

void resize_area(const uint8_t* in, int n, int in_h, int in_w, int channels, uint8_t* out, int out_h, int out_w) {
  Stream s;
  DeviceBuffer d_in = upload(in, static_cast<size_t>(n) * in_h * in_w * channels, s);
  const size_t out_bytes = static_cast<size_t>(n) * out_h * out_w * channels;
  DeviceBuffer d_out(out_bytes);
  cuda::resize_area(d_in.as<uint8_t>(), n, in_h, in_w, channels, d_out.as<uint8_t>(), out_h, out_w, s.get());
  download(out, d_out, out_bytes, s);
  s.sync();
}

void fuse_thumbnail(const float* thumb, int n, int thumb_h, int thumb_w, float* maps, int h, int w,
                    const FuseParams& p) {
  Stream s;
  DeviceBuffer d_thumb = upload(thumb, sizeof(float) * n * thumb_h * thumb_w, s);
  const size_t bytes = sizeof(float) * n * h * w;
  DeviceBuffer d_maps = upload(maps, bytes, s);
  cuda::fuse_thumbnail(d_thumb.as<float>(), n, thumb_h, thumb_w, d_maps.as<float>(), h, w, p, s.get());
  download(maps, d_maps, bytes, s);
  s.sync();
}

void normalize_maps(const float* in, float* out, uint8_t* mask, float* raw_scores, float* scores, int n, int64_t hw,
                    const NormParams& p) {
  Stream s;
  const size_t bytes = sizeof(float) * n * hw;
  DeviceBuffer d_in = upload(in, bytes, s);
  DeviceBuffer d_out(bytes);
  DeviceBuffer d_mask(mask != nullptr ? static_cast<size_t>(n * hw) : 0);
  DeviceBuffer d_raw(sizeof(float) * n), d_scores(sizeof(float) * n);
  cuda::normalize_maps(d_in.as<float>(), d_out.as<float>(), mask != nullptr ? d_mask.as<uint8_t>() : nullptr,
                       d_raw.as<float>(), d_scores.as<float>(), n, hw, p, s.get());
  download(out, d_out, bytes, s);
  if (mask != nullptr) download(mask, d_mask, static_cast<size_t>(n * hw), s);
  download(raw_scores, d_raw, sizeof(float) * n, s);
  download(scores, d_scores, sizeof(float) * n, s);
  s.sync();
}

}  // namespace staged
}  // namespace tilead
