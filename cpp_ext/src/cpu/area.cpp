// CPU twin of the area (box) downscale of uint8 images (tilead/area.h).
#include "tilead/area.h"

#include <vector>

#include "parallel.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {

void resize_area(const uint8_t* in, int n, int in_h, int in_w, int channels, uint8_t* out, int out_h, int out_w) {
  if (n <= 0) return;
  const double sy = area_scale(in_h, out_h), sx = area_scale(in_w, out_w);
  const int fy = area_whole_factor(sy), fx = area_whole_factor(sx);
  const int64_t in_image = static_cast<int64_t>(in_h) * in_w * channels;
  const int64_t out_row = static_cast<int64_t>(out_w) * channels;
  std::vector<AreaSpan> columns(static_cast<size_t>(out_w));
  for (int x = 0; x < out_w; ++x) columns[static_cast<size_t>(x)] = area_span(x, in_w, sx);
  // One task per output row: each reads its own band of source rows, nothing else is allocated.
  parallel_for(static_cast<int64_t>(n) * out_h, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t img = i / out_h;
      const int y = static_cast<int>(i % out_h);
      const uint8_t* image = in + img * in_image;
      uint8_t* o = out + i * out_row;
      if (fx > 0 && fy > 0) {
        for (int x = 0; x < out_w; ++x) {
          for (int ch = 0; ch < channels; ++ch) {
            o[x * channels + ch] = area_block_value(image, in_w, channels, fy, fx, y, x, ch);
          }
        }
        continue;
      }
      const AreaSpan v = area_span(y, in_h, sy);
      for (int x = 0; x < out_w; ++x) {
        const AreaSpan& h = columns[static_cast<size_t>(x)];
        for (int ch = 0; ch < channels; ++ch) o[x * channels + ch] = area_span_value(image, in_w, channels, v, h, ch);
      }
    }
  });
}

}  // namespace cpu
}  // namespace tilead
