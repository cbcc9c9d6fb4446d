// Kernel parameter blocks and the two twins' declarations.
//
// Every kernel exists twice with the same name and parameters: tilead::cpu::X
// takes host pointers and runs on a thread pool; tilead::cuda::X takes device
// pointers plus a stream. Both call the index math in geometry.h. Inputs are
// validated by the caller (the pybind11 layer); the kernels trust their
// arguments and return early on empty work.
#pragma once

#include <cstdint>
#include <vector>

#include "tilead/geometry.h"
#include "tilead/seam.h"

#if defined(TILEAD_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace tilead {

enum OutputType : int { kFloat32 = 0, kFloat16 = 1 };

// Tiling: uint8 HWC images -> normalized NCHW tiles, one block per location.
struct TileParams {
  int in_channels;   // 1 or 3 (channels of the uint8 image)
  int out_channels;  // 1 or 3 (channels the model takes); 1 -> 3 replicates
  int swap_rb;       // 1: channel c of the output reads channel 2 - c (BGR <-> RGB)
  float scale[3];    // per output channel: value = pixel * scale + bias
  float bias[3];     //   (scale = 1 / (255 * std), bias = -mean / std)
  int out_type;      // OutputType of the tile buffer
};

// Tiling without normalization (CPU only, issue #21): uint8 HWC images -> uint8 NHWC tiles for models that
// convert and normalize their input themselves (OpenVINO's PrePostProcessor). Direct policies only (shift, pad).
struct TileU8Params {
  int in_channels;   // 1 or 3 (channels of the uint8 image)
  int out_channels;  // 1 or 3 (channels the model takes); 1 -> 3 replicates
  int swap_rb;       // 1: channel c of the output reads channel 2 - c (BGR <-> RGB)
};

// Untiling: per-location maps at model resolution -> canvas map.
struct UntileParams {
  int map_h;    // rows of each location's map
  int map_w;    // columns of each location's map
  int weights;  // BlendWeights
  // Optional per-location normalization applied to every upsampled value
  // before blending (stage "tile"):
  //   v -> clamp((v - loc_threshold[l]) * loc_scale[l] + 0.5, 0, 1) (NaN for a non-finite v),
  // loc_scale = 1 / (max - min). Null for none. Host pointers for the CPU
  // twin, device pointers for the CUDA twin.
  const float* loc_threshold;
  const float* loc_scale;
};

// Normalization + threshold + per-image score.
enum NormMode : int { kNormNone = 0, kNormMinMax = 1 };
struct NormParams {
  int mode;               // NormMode
  float pixel_threshold;  // on raw values
  float pixel_min, pixel_max;
  float image_threshold;  // on raw image scores
  float image_min, image_max;
};

// Every post-processing setting after the models, as one spec (the Python PostProcessor's native form,
// tilead._kernels.PostSpec): blending, per-location normalization (stage "tile"), seams, normalization.
struct PostSpec {
  int weights = kBlendUniform;       // BlendWeights
  std::vector<float> loc_threshold;  // per-location threshold (stage "tile"); empty for none
  std::vector<float> loc_scale;      // per-location 1 / (max - min), as long as loc_threshold
  SeamParams seam{0.f, 0.f};         // off unless seam_enabled
  NormParams norm{};
};

// The non-finite rule (issue #16), shared by both twins: a NaN or infinite raw
// map value is a model failure and is never "normal". Such a pixel is
// anomalous (normalized value 1, mask set); an image with one has the raw
// score NaN and the most anomalous image score (1 after min-max
// normalization, +infinity in raw mode), so its label is anomalous whatever
// the threshold.

// The IEEE-754 bits of a float (the non-finite tests below are bit tests, so no compiler flag folds them away).
TILEAD_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

// False for NaN and +-infinity.
TILEAD_HD bool finite_value(float v) { return (float_bits(v) & 0x7f800000u) != 0x7f800000u; }

// Normalized pixel value: clamp((v - t) * scale + 0.5, 0, 1); 1 for a non-finite v.
TILEAD_HD float normalize_pixel(float v, float threshold, float scale) {
  return finite_value(v) ? clamp01((v - threshold) * scale + 0.5f) : 1.0f;
}

// Per-location normalization of an upsampled value (stage "tile"); a non-finite
// value stays non-finite (NaN) instead of being clamped to a plausible 0 or 1.
TILEAD_HD float normalize_tile_value(float v, float threshold, float scale) {
  return finite_value(v) ? clamp01((v - threshold) * scale + 0.5f) : NAN;
}

// Raw-mode mask: above the threshold, or non-finite.
TILEAD_HD uint8_t raw_pixel_anomalous(float v, float threshold) { return !finite_value(v) || v > threshold ? 1 : 0; }

// Image score from the raw score (NaN when the map held a non-finite value).
TILEAD_HD float image_score(float raw, const NormParams& p, float iscale) {
  if (!finite_value(raw)) return p.mode == kNormMinMax ? 1.0f : INFINITY;
  return p.mode == kNormMinMax ? clamp01((raw - p.image_threshold) * iscale + 0.5f) : raw;
}

// The thumbnail branch's fusion (issue #20, tilead.runtime.thumbnail): each branch normalized with its own
// validation statistics, z = (x - threshold) * scale + 0.5 (not clamped), then max(z_tiled, z_thumb) or
// weight * z_tiled + (1 - weight) * z_thumb. The thumbnail map is upsampled bilinearly (align_corners=False, the
// map resize's formula: vertical first, then horizontal) to the image at each pixel it is fused into.
struct FuseParams {
  float tiled_threshold = 0.0f;
  float tiled_scale = 1.0f;  // 1 / (max - min) of the tiled branch
  float thumb_threshold = 0.0f;
  float thumb_scale = 1.0f;  // 1 / (max - min) of the thumbnail branch
  int weighted = 0;          // 0: max, 1: weighted sum
  float weight = 0.0f;       // the tiled branch's weight (weighted only)
};

// One product and one sum, each rounded to float32 (no fused multiply-add on either twin), as NumPy computes.
TILEAD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TILEAD_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// True for NaN only.
TILEAD_HD bool nan_value(float v) { return (float_bits(v) & 0x7fffffffu) > 0x7f800000u; }

// The bilinear sample of an in_h x in_w map at pixel (y, x) of an out_h x out_w resize of it.
TILEAD_HD float bilinear_sample(const float* map, int in_h, int in_w, int out_h, int out_w, int y, int x) {
  const Lerp v = lerp_coord(y, in_h, out_h);
  const Lerp h = lerp_coord(x, in_w, out_w);
  const float* r0 = map + static_cast<int64_t>(v.i0) * in_w;
  const float* r1 = map + static_cast<int64_t>(v.i1) * in_w;
  const float a = add_rn(mul_rn(1.0f - v.w1, r0[h.i0]), mul_rn(v.w1, r1[h.i0]));
  const float b = add_rn(mul_rn(1.0f - v.w1, r0[h.i1]), mul_rn(v.w1, r1[h.i1]));
  return add_rn(mul_rn(1.0f - h.w1, a), mul_rn(h.w1, b));
}

// The fused value of a tiled value and the upsampled thumbnail value at the same pixel. NaN in either stays NaN
// (NumPy's maximum), an infinity stays infinite; the normalization after it makes such a pixel anomalous.
TILEAD_HD float fuse_value(float tiled, float thumb, const FuseParams& p) {
  const float a = add_rn(mul_rn(tiled - p.tiled_threshold, p.tiled_scale), 0.5f);
  const float b = add_rn(mul_rn(thumb - p.thumb_threshold, p.thumb_scale), 0.5f);
  if (p.weighted) return add_rn(mul_rn(p.weight, a), mul_rn(1.0f - p.weight, b));
  return (a > b || nan_value(a)) ? a : b;
}

namespace cpu {

// images: [n][h][w][in_channels] uint8 (h, w = grid image size).
// out:    [L][n][out_channels][tile_h][tile_w], float or uint16 (fp16 bits).
void tile_images(const uint8_t* images, int n, const Grid& grid, const TileParams& p, void* out);

// images: n pointers, each to one [h][w][in_channels] uint8 image (a batch need not be one array).
// out: [L][n][tile_h][tile_w][out_channels] uint8, the pixels as they are (0 off the image, pad policy).
// The grid's edge policy must not resample (the bindings refuse resize).
void tile_images_u8(const uint8_t* const* images, int n, const Grid& grid, const TileU8Params& p, uint8_t* out);

// maps: [L][n][map_h][map_w] float32. out: [n][canvas_h][canvas_w] float32.
void untile_maps(const float* maps, int n, const Grid& grid, const UntileParams& p, float* out);

// maps: [n][canvas_h][canvas_w] float32, smoothed in place.
// scratch: seam_scratch_floats(grid, n) floats for the CUDA twin; the CPU
// twin streams with small private buffers and accepts null.
void smooth_seams(float* maps, int n, const Grid& grid, const SeamParams& p, float* scratch);

// Bilinear resize (align_corners=False) of float maps: [n][in_h][in_w] -> [n][out_h][out_w].
void resize_maps(const float* in, int n, int in_h, int in_w, float* out, int out_h, int out_w);

// Area downscale (OpenCV's INTER_AREA, tilead/area.h) of uint8 images:
// [n][in_h][in_w][channels] -> [n][out_h][out_w][channels], out_h <= in_h, out_w <= in_w.
void resize_area(const uint8_t* in, int n, int in_h, int in_w, int channels, uint8_t* out, int out_h, int out_w);

// maps_in/maps_out: [n][h*w] float32 (may alias). mask: [n][h*w] uint8 or null.
// raw_scores, scores: [n] float32 (max of the raw map; normalized image score).
void normalize_maps(const float* maps_in, float* maps_out, uint8_t* mask, float* raw_scores, float* scores, int n,
                    int64_t hw, const NormParams& p);

// The thumbnail fusion, in place: maps [n][h][w] (the merged tiled maps at image size) become the fused maps;
// thumb [n][thumb_h][thumb_w] raw thumbnail maps, upsampled bilinearly to h x w on the fly (FuseParams).
void fuse_thumbnail(const float* thumb, int n, int thumb_h, int thumb_w, float* maps, int h, int w,
                    const FuseParams& p);

// Thread count used by the CPU twins (default: hardware concurrency).
void set_num_threads(int n);
// The count in effect for calls from this thread: its budget when one is set, else set_num_threads's.
int get_num_threads();
// A budget for the kernels called from the calling thread only (a Predictor's threads); n <= 0 clears it.
void set_thread_budget(int n);
int get_thread_budget();

}  // namespace cpu

// Scratch for smooth_seams, in floats: the vertical pass over n canvases plus
// per-row and per-column band flags (used by the CUDA twin).
inline int64_t seam_scratch_floats(const Grid& g, int n) {
  return static_cast<int64_t>(n) * g.y.canvas * g.x.canvas + g.y.canvas + 2LL * g.x.canvas;
}

// TensorRT needs every engine input and output address aligned to 256 bytes:
// the DevicePipeline pads each location's block to a multiple of this.
constexpr int64_t kTensorAlignBytes = 256;

// Floats from one location's block to the next for a block of `floats` float32
// values: `floats` rounded up to a multiple of kTensorAlignBytes / 4.
inline int64_t aligned_block_floats(int64_t floats) {
  constexpr int64_t q = kTensorAlignBytes / static_cast<int64_t>(sizeof(float));
  return (floats + q - 1) / q * q;
}

#if defined(TILEAD_WITH_CUDA)
namespace cuda {

// loc_stride: elements from one location's block to the next (0: dense, n * C * tile_h * tile_w).
void tile_images(const uint8_t* images, int n, const Grid& grid, const TileParams& p, void* out, cudaStream_t stream,
                 int64_t loc_stride = 0);
// loc_stride: floats from one location's maps to the next (0: dense, n * map_h * map_w).
void untile_maps(const float* maps, int n, const Grid& grid, const UntileParams& p, float* out, cudaStream_t stream,
                 int64_t loc_stride = 0);
void smooth_seams(float* maps, int n, const Grid& grid, const SeamParams& p, float* scratch, cudaStream_t stream);
void resize_maps(const float* in, int n, int in_h, int in_w, float* out, int out_h, int out_w, cudaStream_t stream);
void resize_area(const uint8_t* in, int n, int in_h, int in_w, int channels, uint8_t* out, int out_h, int out_w,
                 cudaStream_t stream);
// thumb and maps are device pointers (see cpu::fuse_thumbnail).
void fuse_thumbnail(const float* thumb, int n, int thumb_h, int thumb_w, float* maps, int h, int w, const FuseParams& p,
                    cudaStream_t stream);
// raw_scores and scores are device pointers too.
void normalize_maps(const float* maps_in, float* maps_out, uint8_t* mask, float* raw_scores, float* scores, int n,
                    int64_t hw, const NormParams& p, cudaStream_t stream);

}  // namespace cuda
#endif

}  // namespace tilead
