// The fused post-processing pass of the CPU twins: untile + seam smoothing + normalization.
//
// The chain of kernels writes the canvas (untile), rewrites its seam bands (seams) and reads it
// again to write the normalized maps and masks (normalize): three passes over an image-size
// map. Here every unit (a range of rows of one image) streams its rows instead: canvas rows are
// untiled into a ring of 2R + 1 rows (R: the Gaussian radius; 1 row without seams), the seam
// pixels of row y are smoothed from the ring once row y + R is in it, and the row is normalized
// and thresholded straight into the outputs. Each row's values come from the same compiled row
// functions as the kernels' (rows.h), so the outputs are those of the chain, bit for bit; the
// maps are written once and the canvas is never stored. A unit untiles the R rows on each side
// of its range itself (its halo), so units share nothing but the read-only maps.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "rows.h"

namespace tilead {
namespace cpu {

void postprocess_maps(const float* maps, int n, const Grid& grid, const UntileParams& up, const SeamParams& sp,
                      const NormParams& np, float* out, uint8_t* mask, float* raw_scores, float* scores) {
  if (n <= 0) return;
  const int H = grid.y.canvas, W = grid.x.canvas;
  const UntileRows untile(maps, n, grid, up);
  const SeamPlan seam = seam_plan(grid, sp);
  const int R = seam.active ? seam.R : 0;
  const int ring_rows = 2 * R + 1;
  // Units of rows: about two per thread over the batch (load balance), each at least 2R + 1 rows
  // long unless the image is shorter (a unit untiles up to 2R rows beyond its range).
  const int threads = std::max(1, get_num_threads());
  const int want = std::max(1, (2 * threads + n - 1) / n);
  const int parts = std::max(1, std::min(want, H / std::max(1, 4 * R + 1)));
  const int64_t units = static_cast<int64_t>(n) * parts;
  std::vector<float> partial(static_cast<size_t>(units));
  parallel_for(units, 1, [&](int64_t b, int64_t e) {
    std::vector<float> ring(static_cast<size_t>(ring_rows) * W);
    std::vector<float> row(static_cast<size_t>(W));
    std::vector<float> scratch(static_cast<size_t>(untile.scratch_floats()));
    std::vector<const float*> taps(static_cast<size_t>(ring_rows));
    SeamScratch seam_scratch(seam);
    auto slot = [&](int r) { return ring.data() + static_cast<int64_t>(r % ring_rows) * W; };
    for (int64_t u = b; u < e; ++u) {
      const int img = static_cast<int>(u / parts);
      const int k = static_cast<int>(u % parts);
      const int y0 = static_cast<int>(static_cast<int64_t>(H) * k / parts);
      const int y1 = static_cast<int>(static_cast<int64_t>(H) * (k + 1) / parts);
      int next = std::max(0, y0 - R);  // next canvas row to untile into the ring
      float mx = -std::numeric_limits<float>::infinity();
      bool bad = false;
      for (int y = y0; y < y1; ++y) {
        // The ring holds rows [next - 2R - 1, next): every row y's taps read (reflections included).
        for (const int last = std::min(H, y + R + 1); next < last; ++next) {
          untile.row(img, next, slot(next), scratch.data());
        }
        const float* src = slot(y);
        if (seam.active && seam.has_output(y)) {
          // A band row is smoothed across its whole width; another keeps its pixels between the column bands.
          if (!seam.row_band[static_cast<size_t>(y)]) std::copy(src, src + W, row.data());
          for (int j = -R; j <= R; ++j) taps[static_cast<size_t>(j + R)] = slot(reflect_index(y + j, H));
          seam_row(seam, y, taps.data(), seam_scratch, row.data());
          src = row.data();
        }
        const int64_t off = (static_cast<int64_t>(img) * H + y) * W;
        const float m = normalize_span(src, out + off, mask != nullptr ? mask + off : nullptr, W, np);
        if (std::isnan(m)) {
          bad = true;
        } else {
          mx = std::max(mx, m);
        }
      }
      partial[static_cast<size_t>(u)] = bad ? std::numeric_limits<float>::quiet_NaN() : mx;
    }
  });
  fold_image_scores(partial.data(), n, parts, np, raw_scores, scores);
}

}  // namespace cpu
}  // namespace tilead
