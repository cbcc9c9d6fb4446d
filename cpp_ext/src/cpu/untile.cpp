// CPU twin of the untile kernel: per-location maps -> canvas map.
//
// Each location's map is upsampled bilinearly to the tile size and blended
// with separable per-axis weights normalized so that the weights of the tiles
// covering a pixel sum to one. Work is done one output row at a time: the two
// source rows of each covering tile are interpolated vertically once, then
// resampled horizontally into the output row.
#include <cstring>
#include <vector>

#include "parallel.h"
#include "rows.h"
#include "tilead/kernels.h"

namespace tilead {
namespace cpu {
namespace {

// Normalized weights of every tile at every local coordinate of one axis:
// w[i * tile + q] = weight(i, q) / sum over tiles covering origin(i) + q.
std::vector<float> normalized_axis_weights(const Axis& a, int weights) {
  std::vector<float> total(static_cast<size_t>(a.canvas), 0.0f);
  std::vector<float> w(static_cast<size_t>(a.count) * a.tile);
  for (int i = 0; i < a.count; ++i) {
    const int o = axis_origin(a, i);
    for (int q = 0; q < a.tile; ++q) {
      const float v = axis_weight(a, i, q, weights);
      w[static_cast<size_t>(i) * a.tile + q] = v;
      total[static_cast<size_t>(o + q)] += v;
    }
  }
  for (int i = 0; i < a.count; ++i) {
    const int o = axis_origin(a, i);
    for (int q = 0; q < a.tile; ++q) w[static_cast<size_t>(i) * a.tile + q] /= total[static_cast<size_t>(o + q)];
  }
  return w;
}

// Horizontal resampling plan shared by every tile column: local x in
// [begin, end) interpolates between source samples j and j + 1 with weights
// (1 - w1[x], w1[x]). Runs are contiguous, so the blend loop over a run
// vectorizes (no gathers).
struct Run {
  int j, begin, end;
};

struct HorizontalPlan {
  std::vector<Run> runs;
  std::vector<float> w0, w1;  // plain lerp weights per local x
  std::vector<float> a0, a1;  // per tile column c and local x: wx * w0, wx * w1
};

HorizontalPlan horizontal_plan(const Axis& a, int map_w, const std::vector<float>& wx) {
  HorizontalPlan h;
  h.w0.resize(static_cast<size_t>(a.tile));
  h.w1.resize(static_cast<size_t>(a.tile));
  for (int q = 0; q < a.tile; ++q) {
    // The upper neighbour is read as j + 1; the row carries a padding copy of
    // its last sample, which is exactly what the clamped neighbour reads.
    const Lerp l = lerp_coord(q, map_w, a.tile);
    h.w0[static_cast<size_t>(q)] = 1.0f - l.w1;
    h.w1[static_cast<size_t>(q)] = l.w1;
    if (h.runs.empty() || h.runs.back().j != l.i0) {
      h.runs.push_back({l.i0, q, q + 1});
    } else {
      h.runs.back().end = q + 1;
    }
  }
  const size_t n = static_cast<size_t>(a.count) * a.tile;
  h.a0.resize(n);
  h.a1.resize(n);
  for (size_t k = 0; k < n; ++k) {
    const size_t q = k % static_cast<size_t>(a.tile);
    h.a0[k] = wx[k] * h.w0[q];
    h.a1[k] = wx[k] * h.w1[q];
  }
  return h;
}

// o[x] += a0[x] * v[j] + a1[x] * v[j + 1] over every run.
inline void blend_row(const float* v, const std::vector<Run>& runs, const float* __restrict a0,
                      const float* __restrict a1, float* __restrict o) {
  for (const Run& r : runs) {
    const float v0 = v[r.j], v1 = v[r.j + 1];
    int x = r.begin;
#if defined(__GNUC__)
    // Runs are short (the upsampling factor: 8 outputs for maps at stride 8): 8 lanes at a time as one
    // vector value, not the loop vectorizer's peeled form; the same operations per element.
    typedef float f8 __attribute__((vector_size(32)));
    for (; x + 8 <= r.end; x += 8) {
      f8 w0, w1, acc;
      std::memcpy(&w0, a0 + x, sizeof(w0));
      std::memcpy(&w1, a1 + x, sizeof(w1));
      std::memcpy(&acc, o + x, sizeof(acc));
      acc += w0 * v0 + w1 * v1;
      std::memcpy(o + x, &acc, sizeof(acc));
    }
#endif
    for (; x < r.end; ++x) o[x] += a0[x] * v0 + a1[x] * v1;
  }
}

// Per-location normalization of the interpolated value before weighting:
// o[x] += wy * wx[x] * clamp((lerp - t) * s + 0.5, 0, 1), NaN for a non-finite lerp.
inline void blend_row_normalized(const float* v, const HorizontalPlan& h, const float* __restrict wx, float wy, float t,
                                 float s, float* __restrict o) {
  const float* w0 = h.w0.data();
  const float* w1 = h.w1.data();
  for (const Run& r : h.runs) {
    const float v0 = v[r.j], v1 = v[r.j + 1];
    for (int x = r.begin; x < r.end; ++x) {
      o[x] += wy * wx[x] * normalize_tile_value(w0[x] * v0 + w1[x] * v1, t, s);
    }
  }
}

// Canvas row y of image img into orow; vrow: map_w + 1 floats of scratch.
template <bool LocNorm>
__attribute__((always_inline)) inline void untile_row(const float* maps, int n, const Grid& g, const UntileParams& p,
                                                      int img, int y, float* orow, float* vrow,
                                                      const std::vector<Lerp>& vl, const std::vector<float>& wy,
                                                      const std::vector<float>& wx, const HorizontalPlan& hp) {
  const int mh = p.map_h, mw = p.map_w;
  const int th = g.y.tile, tw = g.x.tile;
  const int cols = g.x.count;
  const int W = g.x.canvas;
  const int64_t map_plane = static_cast<int64_t>(mh) * mw;
  for (int x = 0; x < W; ++x) orow[x] = 0.0f;
  int r0 = 0, r1 = -1;
  axis_cover(g.y, y, &r0, &r1);
  for (int r = r0; r <= r1; ++r) {
    const int ly = y - axis_origin(g.y, r);
    const Lerp& v = vl[static_cast<size_t>(ly)];
    const float wyv = wy[static_cast<size_t>(r) * th + ly];
    // Vertical pass once per tile row; the row weight is folded in unless
    // the per-location clamp needs the unweighted value.
    const float fold = LocNorm ? 1.0f : wyv;
    const float a = (1.0f - v.w1) * fold;
    const float b = v.w1 * fold;
    for (int c = 0; c < cols; ++c) {
      const int l = r * cols + c;
      const float* m = maps + (static_cast<int64_t>(l) * n + img) * map_plane;
      const float* m0 = m + static_cast<int64_t>(v.i0) * mw;
      const float* m1 = m + static_cast<int64_t>(v.i1) * mw;
      for (int j = 0; j < mw; ++j) vrow[j] = a * m0[j] + b * m1[j];
      vrow[mw] = vrow[mw - 1];
      const size_t k = static_cast<size_t>(c) * tw;
      float* o = orow + axis_origin(g.x, c);
      if (LocNorm) {
        blend_row_normalized(vrow, hp, wx.data() + k, wyv, p.loc_threshold[l], p.loc_scale[l], o);
      } else {
        blend_row(vrow, hp.runs, hp.a0.data() + k, hp.a1.data() + k, o);
      }
    }
  }
}

// The row loops are compute-bound once the rows are in cache (the fused pass): on x86-64 they are also
// compiled for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2), picked at load time. Built with -ffp-contract=off
// (CMakeLists.txt), so every clone computes the same values (no fused multiply-add).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define TILEAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TILEAD_CLONES
#endif

TILEAD_CLONES void untile_row_plain(const float* maps, int n, const Grid& g, const UntileParams& p, int img, int y,
                                    float* orow, float* vrow, const std::vector<Lerp>& vl, const std::vector<float>& wy,
                                    const std::vector<float>& wx, const HorizontalPlan& hp) {
  untile_row<false>(maps, n, g, p, img, y, orow, vrow, vl, wy, wx, hp);
}

TILEAD_CLONES void untile_row_norm(const float* maps, int n, const Grid& g, const UntileParams& p, int img, int y,
                                   float* orow, float* vrow, const std::vector<Lerp>& vl, const std::vector<float>& wy,
                                   const std::vector<float>& wx, const HorizontalPlan& hp) {
  untile_row<true>(maps, n, g, p, img, y, orow, vrow, vl, wy, wx, hp);
}

}  // namespace

struct UntileRows::Plan {
  const float* maps;
  int n;
  Grid g;
  UntileParams p;
  std::vector<Lerp> vl;
  std::vector<float> wy, wx;
  HorizontalPlan hp;
  bool loc_norm;
};

UntileRows::UntileRows(const float* maps, int n, const Grid& g, const UntileParams& p) : plan_(new Plan) {
  Plan& q = *plan_;
  q.maps = maps;
  q.n = n;
  q.g = g;
  q.p = p;
  q.vl.resize(static_cast<size_t>(g.y.tile));
  for (int i = 0; i < g.y.tile; ++i) q.vl[static_cast<size_t>(i)] = lerp_coord(i, p.map_h, g.y.tile);
  q.wy = normalized_axis_weights(g.y, p.weights);
  q.wx = normalized_axis_weights(g.x, p.weights);
  q.hp = horizontal_plan(g.x, p.map_w, q.wx);
  q.loc_norm = p.loc_scale != nullptr && p.loc_threshold != nullptr;
}

UntileRows::~UntileRows() = default;

int UntileRows::scratch_floats() const { return plan_->p.map_w + 1; }

void UntileRows::row(int img, int y, float* out, float* scratch) const {
  const Plan& q = *plan_;
  if (q.loc_norm) {
    untile_row_norm(q.maps, q.n, q.g, q.p, img, y, out, scratch, q.vl, q.wy, q.wx, q.hp);
  } else {
    untile_row_plain(q.maps, q.n, q.g, q.p, img, y, out, scratch, q.vl, q.wy, q.wx, q.hp);
  }
}

void untile_maps(const float* maps, int n, const Grid& g, const UntileParams& p, float* out) {
  if (n <= 0) return;
  const UntileRows rows(maps, n, g, p);
  const int64_t count = static_cast<int64_t>(n) * g.y.canvas;
  parallel_for(count, 8, [&](int64_t b, int64_t e) {
    std::vector<float> vrow(static_cast<size_t>(rows.scratch_floats()));
    for (int64_t i = b; i < e; ++i) {
      rows.row(static_cast<int>(i / g.y.canvas), static_cast<int>(i % g.y.canvas), out + i * g.x.canvas, vrow.data());
    }
  });
}

}  // namespace cpu
}  // namespace tilead
