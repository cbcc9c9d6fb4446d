// Tile geometry: the one definition of the edge policies, tile origins, canvas
// size, the image <-> canvas mapping, bilinear source coordinates, blend weights
// and seam bands. Every kernel (CPU twin and CUDA twin), the device pipeline and
// the Python TileGrid (through the bindings) call these functions; nothing else
// computes tile positions or decides how an image becomes the canvas.
//
// Conventions (see DESIGN.md, "Tile geometry"):
//  * Along one axis of length `size`, tiles of length `tile` start at
//    0, stride, 2*stride, ... while origin + tile <= size. If the last tile does
//    not reach the edge, one more tile is added; the edge policy decides where:
//      - shift:  at size - tile (the canvas is the image),
//      - pad:    at n*stride, the canvas is zero-padded to (n-1)*stride + tile,
//      - resize: at n*stride, the image is resized to the canvas size.
//    The tile count is therefore ceil((size - tile) / stride) + 1 for every
//    policy.
//  * Bilinear resampling uses half-pixel centres (align_corners=False) with
//    PyTorch's clamping rules, so upsampled maps match F.interpolate.
#pragma once

#include "tilead/common.h"

namespace tilead {

// The edge policies: the one list of their codes and names. The enum, the name
// table and the bindings' EDGE_POLICIES (from which Python's EDGE_POLICIES, the
// config schema and the manifest parser take their names) all expand this list,
// so a policy is added here, with its rules below (edge_shifts_last_tile,
// edge_resamples) and, for a new kind of mapping, in canvas_map's users.
#define TILEAD_EDGE_POLICIES(X) \
  X(kEdgeShift, "shift")        \
  X(kEdgePad, "pad")            \
  X(kEdgeResize, "resize")

// Codes 0, 1, 2, ... in the list's order.
#define TILEAD_EDGE_ENUMERATOR(id, name) id,
enum EdgePolicy : int { TILEAD_EDGE_POLICIES(TILEAD_EDGE_ENUMERATOR) };
#undef TILEAD_EDGE_ENUMERATOR

#define TILEAD_EDGE_ONE(id, name) +1
constexpr int kEdgePolicyCount = 0 TILEAD_EDGE_POLICIES(TILEAD_EDGE_ONE);
#undef TILEAD_EDGE_ONE

#define TILEAD_EDGE_NAME(id, name) name,
// Policy names indexed by code (host only).
constexpr const char* kEdgePolicyNames[kEdgePolicyCount] = {TILEAD_EDGE_POLICIES(TILEAD_EDGE_NAME)};
#undef TILEAD_EDGE_NAME

// True when the last tile of an axis is shifted back to end at the image edge
// (the canvas is the image); otherwise it continues the stride and the canvas
// grows to the grid span.
TILEAD_HD bool edge_shifts_last_tile(int edge) { return edge == kEdgeShift; }

// True when the image is resampled (bilinear) onto the canvas; otherwise canvas
// pixel p is image pixel p, black (0 before normalization) past the image.
TILEAD_HD bool edge_resamples(int edge) { return edge == kEdgeResize; }

enum BlendWeights : int { kBlendUniform = 0, kBlendFeather = 1 };

// Geometry of one axis. Plain data: passed by value into CUDA kernels.
struct Axis {
  int size;    // image length along this axis
  int tile;    // tile length
  int stride;  // distance between consecutive tile origins (<= tile)
  int edge;    // EdgePolicy
  int count;   // number of tiles (derived)
  int canvas;  // canvas length (derived): size for shift, grid span otherwise
};

TILEAD_HD int axis_count(int size, int tile, int stride) {
  const int span = size - tile;
  return span / stride + 1 + (span % stride != 0 ? 1 : 0);
}

// Builds an Axis; the caller has validated 0 < stride <= tile <= size.
TILEAD_HD Axis make_axis(int size, int tile, int stride, int edge) {
  Axis a;
  a.size = size;
  a.tile = tile;
  a.stride = stride;
  a.edge = edge;
  a.count = axis_count(size, tile, stride);
  a.canvas = edge_shifts_last_tile(edge) ? size : (a.count - 1) * stride + tile;
  return a;
}

// Origin of tile i on the canvas.
TILEAD_HD int axis_origin(const Axis& a, int i) {
  const int o = i * a.stride;
  return (edge_shifts_last_tile(a.edge) && o + a.tile > a.size) ? a.size - a.tile : o;
}

// Range [first, last] of tiles that cover canvas coordinate p (origins are
// non-decreasing, so the covering tiles are contiguous). Returns false when no
// tile covers p (p outside the canvas).
TILEAD_HD bool axis_cover(const Axis& a, int p, int* first, int* last) {
  if (p < 0 || p >= a.canvas) return false;
  int hi = p / a.stride;
  if (hi > a.count - 1) hi = a.count - 1;
  if (hi < a.count - 1 && axis_origin(a, a.count - 1) <= p) hi = a.count - 1;
  int lo = p >= a.tile ? (p - a.tile) / a.stride + 1 : 0;
  if (lo > hi) lo = hi;
  while (lo < hi && axis_origin(a, lo) + a.tile <= p) ++lo;
  *first = lo;
  *last = hi;
  return true;
}

// Bilinear source sample for destination index `dst` when resampling a length
// `in_size` signal to `out_size` (align_corners=False, PyTorch's rules: the
// source coordinate is clamped at 0 and the upper neighbour at in_size - 1).
struct Lerp {
  int i0;    // lower source index
  int i1;    // upper source index (== i0 at the last sample)
  float w1;  // weight of i1; i0 gets 1 - w1
};

TILEAD_HD Lerp lerp_coord(int dst, int in_size, int out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = (static_cast<float>(dst) + 0.5f) * scale - 0.5f;
  if (src < 0.0f) src = 0.0f;
  Lerp l;
  l.i0 = static_cast<int>(src);
  if (l.i0 > in_size - 1) l.i0 = in_size - 1;
  l.i1 = l.i0 < in_size - 1 ? l.i0 + 1 : l.i0;
  l.w1 = src - static_cast<float>(l.i0);
  return l;
}

// A 2-D tile grid: one Axis per image dimension (both with the same edge
// policy). Locations are row-major: location l = row * cols + col.
struct Grid {
  Axis y;
  Axis x;
};

TILEAD_HD int grid_locations(const Grid& g) { return g.y.count * g.x.count; }

// ---- Image <-> canvas: the edge policy's mapping, for every consumer --------
//
// Image -> canvas (the tile kernels read the image through it; Python's
// TileGrid.image_to_canvas brings ground-truth masks onto the canvas):
//  * direct policies (edge_resamples false): canvas pixel p is image pixel p
//    where axis_in_image(p), black (0 before normalization) elsewhere (pad);
//  * resampling policies: canvas pixel p is the bilinear sample
//    axis_image_sample(p) of the image.
// Canvas -> image (TileGrid.canvas_to_image and the device pipeline's crop),
// by canvas_map: nothing, a crop of the top-left image region, or a bilinear
// resize back to the image size.

// True when canvas coordinate p of a direct policy lies on the image.
TILEAD_HD bool axis_in_image(const Axis& a, int p) { return p < a.size; }

// How many of the canvas coordinates [p, p + len) lie on the image (direct policies).
TILEAD_HD int axis_image_run(const Axis& a, int p, int len) {
  const int left = a.size - p;
  return left <= 0 ? 0 : (left < len ? left : len);
}

// Bilinear image sample of canvas coordinate p (resampling policies).
TILEAD_HD Lerp axis_image_sample(const Axis& a, int p) { return lerp_coord(p, a.size, a.canvas); }

// How the canvas relates to the image, and so how maps get back to it.
enum CanvasMap : int {
  kCanvasIsImage = 0,  // the canvas is the image (shift, or a grid that fits exactly): nothing to do
  kCanvasPadded = 1,   // the image zero-padded right/bottom: crop the top-left image region
  kCanvasResized = 2,  // the image resampled onto the canvas: bilinear resize back to the image size
};

TILEAD_HD int canvas_map(const Grid& g) {
  if (g.y.canvas == g.y.size && g.x.canvas == g.x.size) return kCanvasIsImage;
  return edge_resamples(g.y.edge) ? kCanvasResized : kCanvasPadded;
}

// Unnormalised 1-D blend weight of tile i at local coordinate q in [0, tile).
// uniform: 1. feather: a linear ramp across each overlap band with the
// neighbouring tile, (distance + 0.5) / overlap, so that two overlapping
// tiles cross-fade with weights summing to one; 1 elsewhere. Edges of the
// canvas get no ramp.
TILEAD_HD float axis_weight(const Axis& a, int i, int q, int weights) {
  if (weights != kBlendFeather) return 1.0f;
  const int o = axis_origin(a, i);
  float w = 1.0f;
  if (i > 0) {
    const int overlap = axis_origin(a, i - 1) + a.tile - o;
    if (overlap > 0 && q < overlap) {
      const float r = (static_cast<float>(q) + 0.5f) / static_cast<float>(overlap);
      if (r < w) w = r;
    }
  }
  if (i < a.count - 1) {
    const int overlap = o + a.tile - axis_origin(a, i + 1);
    const int d = a.tile - 1 - q;  // distance from the tile's far edge
    if (overlap > 0 && d < overlap) {
      const float r = (static_cast<float>(d) + 0.5f) / static_cast<float>(overlap);
      if (r < w) w = r;
    }
  }
  return w;
}

// True when canvas coordinate p lies in a seam band: within [s - half, s + half)
// of an interior tile edge s (a tile origin > 0 or a tile end < canvas).
TILEAD_HD bool axis_in_band(const Axis& a, int p, int half) {
  if (half <= 0) return false;
  for (int i = 0; i < a.count; ++i) {
    const int o = axis_origin(a, i);
    if (o > 0 && p >= o - half && p < o + half) return true;
    const int e = o + a.tile;
    if (e < a.canvas && p >= e - half && p < e + half) return true;
  }
  return false;
}

// Half-width of the seam band: int(tile * width), as anomalib computes it.
TILEAD_HD int band_half_width(int tile, float width) { return static_cast<int>(static_cast<float>(tile) * width); }

// Gaussian radius for sigma: kernel size 2 * int(4 * sigma + 0.5) + 1.
TILEAD_HD int gaussian_radius(float sigma) { return static_cast<int>(4.0f * sigma + 0.5f); }

// Largest supported Gaussian radius: the CUDA twin passes the taps by value in
// the kernel parameters (the sigma limit, kMaxSeamSigma, is in seam.h).
constexpr int kMaxGaussianRadius = 64;

// Index reflection without repeating the edge sample ("reflect" in NumPy and
// PyTorch, BORDER_REFLECT_101 in OpenCV, "mirror" in SciPy), valid for any
// offset, also when it exceeds the length.
TILEAD_HD int reflect_index(int p, int n) {
  if (n == 1) return 0;
  const int period = 2 * (n - 1);
  p %= period;
  if (p < 0) p += period;
  return p < n ? p : period - p;
}

}  // namespace tilead
