// CPU twin of the bilinear map resize (canvas -> image for the resize policy).
#include <vector>

#include "parallel.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {

void resize_maps(const float* in, int n, int in_h, int in_w, float* out, int out_h, int out_w) {
  if (n <= 0) return;
  std::vector<Lerp> hl(static_cast<size_t>(out_w));
  for (int x = 0; x < out_w; ++x) hl[static_cast<size_t>(x)] = lerp_coord(x, in_w, out_w);
  const int64_t in_plane = static_cast<int64_t>(in_h) * in_w;
  parallel_for(static_cast<int64_t>(n) * out_h, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(static_cast<size_t>(in_w));
    for (int64_t i = b; i < e; ++i) {
      const int64_t img = i / out_h;
      const int y = static_cast<int>(i % out_h);
      const Lerp v = lerp_coord(y, in_h, out_h);
      const float* r0 = in + img * in_plane + static_cast<int64_t>(v.i0) * in_w;
      const float* r1 = in + img * in_plane + static_cast<int64_t>(v.i1) * in_w;
      for (int x = 0; x < in_w; ++x) row[static_cast<size_t>(x)] = (1.0f - v.w1) * r0[x] + v.w1 * r1[x];
      float* o = out + i * out_w;
      for (int x = 0; x < out_w; ++x) {
        const Lerp& h = hl[static_cast<size_t>(x)];
        o[x] = (1.0f - h.w1) * row[static_cast<size_t>(h.i0)] + h.w1 * row[static_cast<size_t>(h.i1)];
      }
    }
  });
}

}  // namespace cpu
}  // namespace tilead
