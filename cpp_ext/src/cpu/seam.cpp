// CPU twin of seam smoothing: a separable Gaussian evaluated only where it is
// needed and written only to seam-band pixels, in place, streaming.
//
// Each work unit is a contiguous range of rows of one image. Row y's output
// needs the original rows within R of y (also after reflection at the borders),
// so a unit writes row y back only after it has computed row y + R, keeping
// the pending rows in a small ring. Rows just outside the unit, which a
// neighbouring unit may overwrite, are copied into halos before any unit
// writes. Memory: O(units x R x W), no canvas-sized scratch (the CUDA twin,
// which runs on pre-allocated device memory, uses the scratch argument).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel.h"
#include "rows.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {
namespace {

Runs runs_of(const std::vector<char>& flags) {
  Runs r;
  const int n = static_cast<int>(flags.size());
  for (int i = 0; i < n;) {
    if (!flags[static_cast<size_t>(i)]) {
      ++i;
      continue;
    }
    int j = i;
    while (j < n && flags[static_cast<size_t>(j)]) ++j;
    r.emplace_back(i, j);
    i = j;
  }
  return r;
}

constexpr int kBlock = 16;  // outputs accumulated in registers across all taps

// The tap loops are compute-bound: on x86-64 they are also compiled for
// x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA), and the clone is picked at
// load time (the portable build targets SSE2 only).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define TILEAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TILEAD_CLONES
#endif

#if defined(__GNUC__)
// out[at + k] for k < 4 kBlock (see weighted_rows): inlined into each clone, so compiled for its target.
__attribute__((always_inline)) inline void wide_block(const float* const* rows, const float* g, int taps, int at,
                                                      float* __restrict out) {
  typedef float f8 __attribute__((vector_size(32)));
  f8 acc[8] = {};
  for (int j = 0; j < taps; ++j) {
    const float gj = g[j];
    const float* row = rows[j] + at;
    for (int k = 0; k < 8; ++k) {
      f8 v;
      std::memcpy(&v, row + 8 * k, sizeof(v));
      acc[k] += gj * v;
    }
  }
  std::memcpy(out + at, acc, sizeof(acc));
}
#endif

// out[x] = sum_j g[j] * rows[j][x] for x in [a, b): a 1-D convolution across
// 2R+1 row pointers, blocked so each output is loaded and stored once: blocks
// of kBlock outputs, then kBlock / 2 (run ends), then one at a time. Every output
// sums its taps in the same order whatever block it falls in, so the result does
// not depend on the blocking.
TILEAD_CLONES void weighted_rows(const float* const* rows, const float* g, int taps, int a, int b,
                                 float* __restrict out) {
  int x = a;
#if defined(__GNUC__)
  // Accumulators as vector values, so they stay in registers across the taps (an array of floats
  // went through the stack on every tap); the same operation per lane as the scalar form.
  typedef float f8 __attribute__((vector_size(32)));
  // Blocks of 4 kBlock outputs first: eight independent accumulators hide the FMA latency that the two of
  // a kBlock block wait on at every tap (each tap's add depends on the previous one's). A run of at least
  // one such block ends with one more ending at b, recomputing a few outputs with the same taps in the
  // same order (the same values), instead of the smaller blocks.
  if (b - a >= 4 * kBlock) {
    for (; x + 4 * kBlock <= b; x += 4 * kBlock) wide_block(rows, g, taps, x, out);
    if (x < b) wide_block(rows, g, taps, b - 4 * kBlock, out);
    x = b;
  }
  for (; x + kBlock <= b; x += kBlock) {
    f8 acc0 = {}, acc1 = {};
    for (int j = 0; j < taps; ++j) {
      const float gj = g[j];
      f8 s0, s1;
      std::memcpy(&s0, rows[j] + x, sizeof(s0));
      std::memcpy(&s1, rows[j] + x + 8, sizeof(s1));
      acc0 += gj * s0;
      acc1 += gj * s1;
    }
    std::memcpy(out + x, &acc0, sizeof(acc0));
    std::memcpy(out + x + 8, &acc1, sizeof(acc1));
  }
  while (x < b && b - a >= kBlock / 2) {
    // Blocks of kBlock / 2; the last 1 to 7 outputs as one block ending at b: it recomputes a few
    // outputs of the block before it, with the same taps in the same order, so they get the same values.
    if (x + kBlock / 2 > b) x = b - kBlock / 2;
    f8 acc0 = {};
    for (int j = 0; j < taps; ++j) {
      const float gj = g[j];
      f8 s0;
      std::memcpy(&s0, rows[j] + x, sizeof(s0));
      acc0 += gj * s0;
    }
    std::memcpy(out + x, &acc0, sizeof(acc0));
    x += kBlock / 2;
  }
#else
  for (; x + kBlock <= b; x += kBlock) {
    float acc[kBlock] = {};
    for (int j = 0; j < taps; ++j) {
      const float gj = g[j];
      const float* s = rows[j] + x;
      for (int k = 0; k < kBlock; ++k) acc[k] += gj * s[k];
    }
    for (int k = 0; k < kBlock; ++k) out[x + k] = acc[k];
  }
  for (; x + kBlock / 2 <= b; x += kBlock / 2) {
    float acc[kBlock / 2] = {};
    for (int j = 0; j < taps; ++j) {
      const float gj = g[j];
      const float* s = rows[j] + x;
      for (int k = 0; k < kBlock / 2; ++k) acc[k] += gj * s[k];
    }
    for (int k = 0; k < kBlock / 2; ++k) out[x + k] = acc[k];
  }
#endif
  for (; x < b; ++x) {
    float acc = 0.0f;
    for (int j = 0; j < taps; ++j) acc += g[j] * rows[j][x];
    out[x] = acc;
  }
}

// out[x - a] = sum_j g[j] * vrow[reflect(x - R + j)] for x in [a, b).
void horizontal(const float* vrow, int W, int a, int b, const float* g, int R, float* pad,
                std::vector<const float*>& shifted, float* out) {
  const int lo = a - R, hi = b + R;  // padded source range [lo, hi): reflected ends, a plain copy between
  const int c0 = std::max(lo, 0), c1 = std::min(hi, W);
  for (int k = lo; k < std::min(hi, 0); ++k) pad[k - lo] = vrow[reflect_index(k, W)];
  if (c1 > c0) std::copy(vrow + c0, vrow + c1, pad + (c0 - lo));
  for (int k = std::max(lo, W); k < hi; ++k) pad[k - lo] = vrow[reflect_index(k, W)];
  // Output x (0-based in the run) reads pad[x + j] for tap j: row pointers shifted by j.
  shifted.resize(static_cast<size_t>(2 * R + 1));
  for (int j = 0; j <= 2 * R; ++j) shifted[static_cast<size_t>(j)] = pad + j;
  weighted_rows(shifted.data(), g, 2 * R + 1, 0, b - a, out);
}

// One unit: rows [y0, y1) of one image plane.
struct Unit {
  float* plane;
  int y0, y1;
  std::vector<float> halo;  // original rows [y0 - R, y0) then [y1, y1 + R), clipped to the plane
  int top;                  // first row held in the top halo
  int top_rows, bottom_rows;
};

}  // namespace

SeamPlan seam_plan(const Grid& grid, const SeamParams& p) {
  SeamPlan s;
  const int H = grid.y.canvas, W = grid.x.canvas;
  s.W = W;
  if (!seam_enabled(p)) return s;
  const int half_y = band_half_width(grid.y.tile, p.width);
  const int half_x = band_half_width(grid.x.tile, p.width);
  const int R = gaussian_radius(p.sigma);
  s.R = R;
  s.row_band.assign(static_cast<size_t>(H), 0);
  std::vector<char> col_band(static_cast<size_t>(W)), col_need(static_cast<size_t>(W), 0);
  bool any_row = false, any_col = false;
  for (int y = 0; y < H; ++y) {
    any_row |= (s.row_band[static_cast<size_t>(y)] = axis_in_band(grid.y, y, half_y)) != 0;
  }
  for (int x = 0; x < W; ++x) {
    any_col |= (col_band[static_cast<size_t>(x)] = axis_in_band(grid.x, x, half_x)) != 0;
  }
  if (!any_row && !any_col) return s;
  for (int x = 0; x < W; ++x) {
    if (!col_band[static_cast<size_t>(x)]) continue;
    for (int j = -R; j <= R; ++j) col_need[static_cast<size_t>(reflect_index(x + j, W))] = 1;
  }
  s.active = true;
  s.any_col = any_col;
  s.band_runs = runs_of(col_band);
  s.need_runs = runs_of(col_need);
  s.full_row = Runs{{0, W}};
  s.g = gaussian_taps(p.sigma);  // 2R + 1 taps (tilead/seam.h)
  return s;
}

SeamScratch::SeamScratch(const SeamPlan& s) : vrow(static_cast<size_t>(s.W)), pad(static_cast<size_t>(s.W + 2 * s.R)) {}

void seam_row(const SeamPlan& s, int y, const float* const* rows, SeamScratch& scratch, float* out) {
  const bool full = s.row_band[static_cast<size_t>(y)] != 0;
  const int taps = 2 * s.R + 1;
  for (const auto& run : full ? s.full_row : s.need_runs) {
    weighted_rows(rows, s.g.data(), taps, run.first, run.second, scratch.vrow.data());
  }
  for (const auto& run : full ? s.full_row : s.band_runs) {
    horizontal(scratch.vrow.data(), s.W, run.first, run.second, s.g.data(), s.R, scratch.pad.data(), scratch.shifted,
               out + run.first);
  }
}

void smooth_seams(float* maps, int n, const Grid& grid, const SeamParams& p, float* /*scratch*/) {
  if (n <= 0) return;
  const SeamPlan plan = seam_plan(grid, p);
  if (!plan.active) return;
  const int H = grid.y.canvas, W = grid.x.canvas;
  const int R = plan.R;
  const int taps = 2 * R + 1;

  // Units: each image split into up to get_num_threads() row ranges of at least R + 1 rows.
  const int parts = std::max(1, std::min(get_num_threads(), H / (R + 1)));
  std::vector<Unit> units;
  units.reserve(static_cast<size_t>(n) * parts);
  for (int img = 0; img < n; ++img) {
    for (int k = 0; k < parts; ++k) {
      Unit u;
      u.plane = maps + static_cast<int64_t>(img) * H * W;
      u.y0 = static_cast<int>(static_cast<int64_t>(H) * k / parts);
      u.y1 = static_cast<int>(static_cast<int64_t>(H) * (k + 1) / parts);
      u.top = std::max(0, u.y0 - R);
      u.top_rows = u.y0 - u.top;
      u.bottom_rows = std::min(H, u.y1 + R) - u.y1;
      units.push_back(std::move(u));
    }
  }
  const int64_t count = static_cast<int64_t>(units.size());

  // Phase 1: every unit copies the original rows it borrows from its neighbours.
  parallel_for(count, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      Unit& u = units[static_cast<size_t>(i)];
      u.halo.resize(static_cast<size_t>(u.top_rows + u.bottom_rows) * W);
      std::copy(u.plane + static_cast<int64_t>(u.top) * W, u.plane + static_cast<int64_t>(u.y0) * W, u.halo.begin());
      std::copy(u.plane + static_cast<int64_t>(u.y1) * W, u.plane + static_cast<int64_t>(u.y1 + u.bottom_rows) * W,
                u.halo.begin() + static_cast<int64_t>(u.top_rows) * W);
    }
  });

  // Phase 2: stream every unit's rows; output row y is written back once row
  // y + R has been computed (no later row of the unit reads its original).
  parallel_for(count, 1, [&](int64_t b, int64_t e) {
    std::vector<const float*> tap_rows(static_cast<size_t>(taps));
    SeamScratch scratch(plan);
    std::vector<float> ring(static_cast<size_t>(R + 1) * W);
    for (int64_t i = b; i < e; ++i) {
      const Unit& u = units[static_cast<size_t>(i)];
      auto original = [&](int r) -> const float* {
        if (r < u.y0) return u.halo.data() + static_cast<int64_t>(r - u.top) * W;
        if (r >= u.y1) return u.halo.data() + static_cast<int64_t>(u.top_rows + r - u.y1) * W;
        return u.plane + static_cast<int64_t>(r) * W;
      };
      auto write_back = [&](int y) {
        if (y < u.y0 || !plan.has_output(y)) return;
        const float* src = ring.data() + static_cast<int64_t>(y % (R + 1)) * W;
        float* dst = u.plane + static_cast<int64_t>(y) * W;
        const Runs& runs = plan.row_band[static_cast<size_t>(y)] ? plan.full_row : plan.band_runs;
        for (const auto& run : runs) std::copy(src + run.first, src + run.second, dst + run.first);
      };
      for (int y = u.y0; y < u.y1; ++y) {
        write_back(y - R - 1);  // its original is needed by rows up to y - 1 only
        if (!plan.has_output(y)) continue;
        for (int k = -R; k <= R; ++k) tap_rows[static_cast<size_t>(k + R)] = original(reflect_index(y + k, H));
        seam_row(plan, y, tap_rows.data(), scratch, ring.data() + static_cast<int64_t>(y % (R + 1)) * W);
      }
      for (int y = std::max(u.y0, u.y1 - R - 1); y < u.y1; ++y) write_back(y);
    }
  });
}

}  // namespace cpu
}  // namespace tilead
