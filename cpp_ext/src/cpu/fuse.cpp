// CPU twin of the thumbnail fusion (tilead/kernels.h, fuse_value): the merged tiled maps fused in place with the
// raw thumbnail maps, each upsampled to the image on the fly.
#include "parallel.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {

void fuse_thumbnail(const float* thumb, int n, int thumb_h, int thumb_w, float* maps, int h, int w,
                    const FuseParams& p) {
  if (n <= 0) return;
  const int64_t thumb_plane = static_cast<int64_t>(thumb_h) * thumb_w;
  parallel_for(static_cast<int64_t>(n) * h, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t img = i / h;
      const int y = static_cast<int>(i % h);
      const float* t = thumb + img * thumb_plane;
      float* row = maps + i * w;
      for (int x = 0; x < w; ++x) row[x] = fuse_value(row[x], bilinear_sample(t, thumb_h, thumb_w, h, w, y, x), p);
    }
  });
}

}  // namespace cpu
}  // namespace tilead
