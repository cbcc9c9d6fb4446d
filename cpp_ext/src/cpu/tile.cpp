// CPU twin of the tile kernel: uint8 HWC images -> normalized NCHW tiles.
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "tile_simd.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {
namespace {

TILEAD_HD void store(float* dst, float v) { *dst = v; }
TILEAD_HD void store(uint16_t* dst, float v) { *dst = float_to_half_bits(v); }

// One unit of work: row `ty` of location `l`'s tile for image `img`.
struct RowTask {
  int l, img, ty;  // location, image, row inside the tile
  int cy, ox;      // canvas row of that tile row; canvas column of the tile's left edge
};

RowTask make_task(int64_t i, int n, const Grid& g) {
  RowTask t;
  const int th = g.y.tile;
  t.ty = static_cast<int>(i % th);
  t.img = static_cast<int>((i / th) % n);
  t.l = static_cast<int>(i / (static_cast<int64_t>(th) * n));
  t.cy = axis_origin(g.y, t.l / g.x.count) + t.ty;
  t.ox = axis_origin(g.x, t.l % g.x.count);
  return t;
}

// Start of output channel c's row for task t in the [L][n][C][th][tw] buffer.
template <typename T>
T* dest_row(T* out, const Grid& g, int n, int channels, const RowTask& t, int c) {
  const int64_t plane = static_cast<int64_t>(g.y.tile) * g.x.tile;
  return out + ((static_cast<int64_t>(t.l) * n + t.img) * channels + c) * plane + static_cast<int64_t>(t.ty) * g.x.tile;
}

// One tile row, every output channel, direct sampling (shift / pad: geometry.h, image -> canvas).
// InC/OutC are compile-time so the inner loops vectorize.
template <typename T, int InC, int OutC, bool Swap>
void tile_row_direct(const uint8_t* images, const Grid& g, const TileParams& p, T* out, int n, RowTask t) {
  const int tw = g.x.tile;
  T* dst[3];
  for (int c = 0; c < OutC; ++c) dst[c] = dest_row(out, g, n, OutC, t, c);
  // Pixels outside the image (pad policy) are black: value 0 before normalization.
  const int valid = axis_in_image(g.y, t.cy) ? axis_image_run(g.x, t.ox, tw) : 0;
  const uint8_t* src =
      valid > 0 ? images + ((static_cast<int64_t>(t.img) * g.y.size + t.cy) * g.x.size + t.ox) * InC : images;
  const float s0 = p.scale[0], s1 = p.scale[OutC > 1 ? 1 : 0], s2 = p.scale[OutC > 2 ? 2 : 0];
  const float b0 = p.bias[0], b1 = p.bias[OutC > 1 ? 1 : 0], b2 = p.bias[OutC > 2 ? 2 : 0];
  // Hot path: 16-pixel blocks through the CPU's SIMD converters when it has
  // them; the portable loops below handle the rest (and every pixel elsewhere).
  int start = 0;
  const RowConverters& simd = row_converters();
  const int blocks = valid / 16 * 16;
  if (blocks > 0) {
    if (InC == 3 && OutC == 3) {
      const int order[3] = {Swap ? 2 : 0, 1, Swap ? 0 : 2};
      if (std::is_same<T, float>::value && simd.rgb_f32 != nullptr) {
        simd.rgb_f32(src, blocks, order, p.scale, p.bias, reinterpret_cast<float*>(dst[0]),
                     reinterpret_cast<float*>(dst[1]), reinterpret_cast<float*>(dst[2]));
        start = blocks;
      } else if (std::is_same<T, uint16_t>::value && simd.rgb_f16 != nullptr) {
        simd.rgb_f16(src, blocks, order, p.scale, p.bias, reinterpret_cast<uint16_t*>(dst[0]),
                     reinterpret_cast<uint16_t*>(dst[1]), reinterpret_cast<uint16_t*>(dst[2]));
        start = blocks;
      }
    } else if (InC == 1) {
      if (std::is_same<T, float>::value && simd.gray_f32 != nullptr) {
        simd.gray_f32(src, blocks, OutC, p.scale, p.bias, reinterpret_cast<float* const*>(dst));
        start = blocks;
      } else if (std::is_same<T, uint16_t>::value && simd.gray_f16 != nullptr) {
        simd.gray_f16(src, blocks, OutC, p.scale, p.bias, reinterpret_cast<uint16_t* const*>(dst));
        start = blocks;
      }
    }
  }
  if (InC == 3) {
    constexpr int c0 = Swap ? 2 : 0;
    constexpr int c2 = Swap ? 0 : 2;
    T* d0 = dst[0];
    T* d1 = dst[OutC > 1 ? 1 : 0];
    T* d2 = dst[OutC > 2 ? 2 : 0];
    for (int x = start; x < valid; ++x) {
      const uint8_t* px = src + 3 * x;
      store(d0 + x, static_cast<float>(px[c0]) * s0 + b0);
      store(d1 + x, static_cast<float>(px[1]) * s1 + b1);
      store(d2 + x, static_cast<float>(px[c2]) * s2 + b2);
    }
  } else {
    for (int x = start; x < valid; ++x) {
      const float v = static_cast<float>(src[x]);
      store(dst[0] + x, v * s0 + b0);
      if (OutC == 3) {
        store(dst[1] + x, v * s1 + b1);
        store(dst[2] + x, v * s2 + b2);
      }
    }
  }
  for (int c = 0; c < OutC; ++c) {
    for (int x = valid; x < tw; ++x) store(dst[c] + x, p.bias[c]);
  }
}

// One tile row with bilinear sampling of the image onto the canvas (resize policy: geometry.h, image -> canvas).
template <typename T>
void tile_row_resize(const uint8_t* images, const Grid& g, const TileParams& p, T* out, int n, RowTask t,
                     const std::vector<Lerp>& xl) {
  const int tw = g.x.tile;
  const int inc = p.in_channels;
  const int outc = p.out_channels;
  const Lerp yl = axis_image_sample(g.y, t.cy);
  const int64_t row_stride = static_cast<int64_t>(g.x.size) * inc;
  const uint8_t* base = images + static_cast<int64_t>(t.img) * g.y.size * row_stride;
  const uint8_t* r0 = base + yl.i0 * row_stride;
  const uint8_t* r1 = base + yl.i1 * row_stride;
  for (int c = 0; c < outc; ++c) {
    const int ch = inc == 1 ? 0 : (p.swap_rb ? 2 - c : c);
    T* d = dest_row(out, g, n, outc, t, c);
    for (int x = 0; x < tw; ++x) {
      const Lerp& l = xl[static_cast<size_t>(t.ox + x)];
      const float top = (1.0f - l.w1) * r0[l.i0 * inc + ch] + l.w1 * r0[l.i1 * inc + ch];
      const float bot = (1.0f - l.w1) * r1[l.i0 * inc + ch] + l.w1 * r1[l.i1 * inc + ch];
      const float v = (1.0f - yl.w1) * top + yl.w1 * bot;
      store(d + x, v * p.scale[c] + p.bias[c]);
    }
  }
}

template <typename T>
void tile_typed(const uint8_t* images, int n, const Grid& g, const TileParams& p, T* out) {
  const int64_t rows = static_cast<int64_t>(grid_locations(g)) * n * g.y.tile;
  auto task = [&](int64_t i) { return make_task(i, n, g); };
  if (edge_resamples(g.y.edge)) {
    std::vector<Lerp> xl(static_cast<size_t>(g.x.canvas));
    for (int x = 0; x < g.x.canvas; ++x) xl[static_cast<size_t>(x)] = axis_image_sample(g.x, x);
    parallel_for(rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) tile_row_resize(images, g, p, out, n, task(i), xl);
    });
    return;
  }
  using RowFn = void (*)(const uint8_t*, const Grid&, const TileParams&, T*, int, RowTask);
  RowFn fn = nullptr;
  if (p.in_channels == 3 && p.out_channels == 3) {
    fn = p.swap_rb ? &tile_row_direct<T, 3, 3, true> : &tile_row_direct<T, 3, 3, false>;
  } else if (p.in_channels == 1 && p.out_channels == 3) {
    fn = &tile_row_direct<T, 1, 3, false>;
  } else {
    fn = &tile_row_direct<T, 1, 1, false>;
  }
  parallel_for(rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(images, g, p, out, n, task(i));
  });
}

}  // namespace

void tile_images(const uint8_t* images, int n, const Grid& grid, const TileParams& p, void* out) {
  if (n <= 0) return;
  if (p.out_type == kFloat16) {
    tile_typed(images, n, grid, p, static_cast<uint16_t*>(out));
  } else {
    tile_typed(images, n, grid, p, static_cast<float*>(out));
  }
}

}  // namespace cpu
}  // namespace tilead
