// Tile kernel for uint8 model inputs (issue #21): uint8 HWC images -> uint8 NHWC tiles, no normalization.
//
// A backend whose compiled model converts and normalizes its input itself (OpenVINO's PrePostProcessor) takes
// the pixels as they are; each tile row is then one copy of an image row (a byte shuffle when the channel
// order changes), a quarter of the float tiles' bytes. Direct sampling only (edge policies shift and pad):
// bilinear resampling (resize) gives values between the uint8 levels, so that policy keeps the float kernel.
#include <cstring>

#include "parallel.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {
namespace {

// One tile row, every channel: canvas row `cy` from column `ox` of image `img` into `dst` (tw * OutC bytes).
template <int InC, int OutC, bool Swap>
void tile_row_u8(const uint8_t* images, const Grid& g, int img, int cy, int ox, uint8_t* dst) {
  const int tw = g.x.tile;
  // Pixels outside the image (pad policy) are black: 0, as the float kernel's value before normalization.
  const int valid = axis_in_image(g.y, cy) ? axis_image_run(g.x, ox, tw) : 0;
  if (valid > 0) {
    const uint8_t* src = images + ((static_cast<int64_t>(img) * g.y.size + cy) * g.x.size + ox) * InC;
    if (InC == OutC && !Swap) {
      std::memcpy(dst, src, static_cast<size_t>(valid) * InC);
    } else if (InC == 3) {
      for (int x = 0; x < valid; ++x) {
        dst[3 * x] = src[3 * x + 2];
        dst[3 * x + 1] = src[3 * x + 1];
        dst[3 * x + 2] = src[3 * x];
      }
    } else {
      for (int x = 0; x < valid; ++x) {
        const uint8_t v = src[x];
        dst[3 * x] = v;
        dst[3 * x + 1] = v;
        dst[3 * x + 2] = v;
      }
    }
  }
  if (valid < tw) std::memset(dst + static_cast<int64_t>(valid) * OutC, 0, static_cast<size_t>(tw - valid) * OutC);
}

}  // namespace

void tile_images_u8(const uint8_t* images, int n, const Grid& grid, const TileU8Params& p, uint8_t* out) {
  if (n <= 0) return;
  using RowFn = void (*)(const uint8_t*, const Grid&, int, int, int, uint8_t*);
  RowFn fn = nullptr;
  if (p.in_channels == 3) {
    fn = p.swap_rb ? &tile_row_u8<3, 3, true> : &tile_row_u8<3, 3, false>;
  } else if (p.out_channels == 3) {
    fn = &tile_row_u8<1, 3, false>;
  } else {
    fn = &tile_row_u8<1, 1, false>;
  }
  const int th = grid.y.tile;
  const int64_t row_bytes = static_cast<int64_t>(grid.x.tile) * p.out_channels;
  const int64_t rows = static_cast<int64_t>(grid_locations(grid)) * n * th;
  // Rows are short copies: a few dozen per chunk so that thread starts stay rare.
  parallel_for(rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int ty = static_cast<int>(i % th);
      const int img = static_cast<int>((i / th) % n);
      const int l = static_cast<int>(i / (static_cast<int64_t>(th) * n));
      const int cy = axis_origin(grid.y, l / grid.x.count) + ty;
      const int ox = axis_origin(grid.x, l % grid.x.count);
      fn(images, grid, img, cy, ox, out + i * row_bytes);
    }
  });
}

}  // namespace cpu
}  // namespace tilead
