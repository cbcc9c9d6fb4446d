// Row-level pieces of the CPU twins (untile, seam smoothing, normalization), shared by the
// stand-alone kernels and by the fused post-processing pass (postprocess.cpp): both call the
// same compiled code, so the fused pass computes exactly what the chain of kernels computes.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "tilead/kernels.h"

namespace tilead {
namespace cpu {

// One canvas row of the untiled maps at a time (untile.cpp).
class UntileRows {
 public:
  // maps: [L][n][map_h][map_w] float32; kept by pointer, read by row().
  UntileRows(const float* maps, int n, const Grid& grid, const UntileParams& p);
  ~UntileRows();
  UntileRows(const UntileRows&) = delete;
  UntileRows& operator=(const UntileRows&) = delete;

  // Canvas row y of image img into out (canvas_w floats); scratch: scratch_floats() floats.
  void row(int img, int y, float* out, float* scratch) const;
  int scratch_floats() const;

 private:
  struct Plan;
  std::unique_ptr<Plan> plan_;
};

using Runs = std::vector<std::pair<int, int>>;  // [begin, end) segments

// Which pixels seam smoothing writes and the Gaussian taps (seam.cpp).
struct SeamPlan {
  bool active = false;  // anything to smooth (settings on and at least one band)
  int R = 0;            // Gaussian radius: 2R + 1 taps
  int W = 0;            // canvas width
  std::vector<char> row_band;
  bool any_col = false;
  Runs band_runs, need_runs, full_row;
  std::vector<float> g;
  // Row y has smoothed pixels (all of a band row, the column bands of another).
  bool has_output(int y) const { return row_band[static_cast<size_t>(y)] != 0 || any_col; }
};

SeamPlan seam_plan(const Grid& grid, const SeamParams& p);

// Per-thread scratch of seam_row.
struct SeamScratch {
  std::vector<float> vrow, pad;
  std::vector<const float*> shifted;
  explicit SeamScratch(const SeamPlan& s);
};

// The smoothed pixels of canvas row y (has_output(y)) written into out (canvas_w floats; other pixels
// untouched); rows: the 2R + 1 original canvas rows reflect_index(y + k, H), k = -R..R.
void seam_row(const SeamPlan& s, int y, const float* const* rows, SeamScratch& scratch, float* out);

// Normalize + threshold len values (normalize.cpp, the normalize_maps kernel's code): s -> d (may alias),
// mask m (or null). Returns the max of s, NaN when s holds a non-finite value.
float normalize_span(const float* s, float* d, uint8_t* m, int64_t len, const NormParams& p);

// Each image's raw score, the max of its parts' maxima (partial: [n][parts]; NaN when a part holds a
// non-finite value), and its normalized score (normalize.cpp): the last step of normalize_maps and of
// the fused pass.
void fold_image_scores(const float* partial, int n, int64_t parts, const NormParams& p, float* raw_scores,
                       float* scores);

// The fused post-processing pass (postprocess.cpp): untile_maps, smooth_seams and normalize_maps in one
// streaming pass over each output row, with the same results. maps: [L][n][map_h][map_w] float32;
// out: [n][canvas_h][canvas_w] float32; mask: [n][canvas_h][canvas_w] uint8 or null; raw_scores, scores: [n].
void postprocess_maps(const float* maps, int n, const Grid& grid, const UntileParams& up, const SeamParams& sp,
                      const NormParams& np, float* out, uint8_t* mask, float* raw_scores, float* scores);

}  // namespace cpu
}  // namespace tilead
