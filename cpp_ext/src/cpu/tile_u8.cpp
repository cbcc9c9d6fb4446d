// Tile kernel for uint8 model inputs (issue #21): uint8 HWC images -> uint8 NHWC tiles, no normalization.
//
// A backend whose compiled model converts and normalizes its input itself (OpenVINO's PrePostProcessor) takes
// the pixels as they are; each tile row is then one copy of an image row (a byte shuffle when the channel
// order changes), a quarter of the float tiles' bytes. Direct sampling only (edge policies shift and pad):
// bilinear resampling (resize) gives values between the uint8 levels, so that policy keeps the float kernel.
#include <cstring>

#include "parallel.h"
#include "tilead/kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TILEAD_U8_SSSE3 1
#endif

namespace tilead {
namespace cpu {
namespace {

// Red and blue swapped in 3-channel pixels [0, valid): returns the first pixel not done (the portable loop
// does the rest). x86-64 with SSSE3: 5 pixels per byte shuffle of 16 bytes; the 16th byte is the next
// pixel's first, rewritten by the next step or by the portable loop.
#if defined(TILEAD_U8_SSSE3)
__attribute__((target("ssse3"))) int swap_rb_ssse3(const uint8_t* src, uint8_t* dst, int valid) {
  const __m128i order = _mm_setr_epi8(2, 1, 0, 5, 4, 3, 8, 7, 6, 11, 10, 9, 14, 13, 12, 15);
  int x = 0;
  for (; 3 * x + 16 <= 3 * valid; x += 5) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 3 * x));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * x), _mm_shuffle_epi8(v, order));
  }
  return x;
}

bool has_ssse3() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("ssse3") != 0;
  }();
  return yes;
}
#endif

int swap_rb_fast(const uint8_t* src, uint8_t* dst, int valid) {
#if defined(TILEAD_U8_SSSE3)
  if (has_ssse3()) return swap_rb_ssse3(src, dst, valid);
#endif
  (void)src;
  (void)dst;
  (void)valid;
  return 0;
}

// One tile row, every channel: canvas row `cy` from column `ox` of `image` into `dst` (tw * OutC bytes).
template <int InC, int OutC, bool Swap>
void tile_row_u8(const uint8_t* image, const Grid& g, int cy, int ox, uint8_t* dst) {
  const int tw = g.x.tile;
  // Pixels outside the image (pad policy) are black: 0, as the float kernel's value before normalization.
  const int valid = axis_in_image(g.y, cy) ? axis_image_run(g.x, ox, tw) : 0;
  if (valid > 0) {
    const uint8_t* src = image + (static_cast<int64_t>(cy) * g.x.size + ox) * InC;
    if (InC == OutC && !Swap) {
      std::memcpy(dst, src, static_cast<size_t>(valid) * InC);
    } else if (InC == 3) {
      for (int x = swap_rb_fast(src, dst, valid); x < valid; ++x) {
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

void tile_images_u8(const uint8_t* const* images, int n, const Grid& grid, const TileU8Params& p, uint8_t* out) {
  if (n <= 0) return;
  using RowFn = void (*)(const uint8_t*, const Grid&, int, int, uint8_t*);
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
      fn(images[img], grid, cy, ox, out + i * row_bytes);
    }
  });
}

}  // namespace cpu
}  // namespace tilead
