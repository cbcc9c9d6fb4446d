// Area (box) downscaling of uint8 images: the one definition both twins call,
// and the one training uses (OpenCV's cv::resize with INTER_AREA when an image
// shrinks along both axes; checked bit for bit against OpenCV in the tests).
//
// Along one axis of length `in` shrunk to `out`, the scale is s = 1 / (out / in)
// (double, as OpenCV computes it) and output pixel d covers [d*s, (d+1)*s):
//  * When s is a whole number k on both axes (to DBL_EPSILON), each output pixel
//    is the mean of its k_y x k_x block: (sum + 2) >> 2 for 2x2 blocks, else
//    sum * float(1 / (k_y * k_x)) rounded half to even.
//  * Otherwise every source pixel the cell touches is weighted by the covered
//    fraction of it divided by the cell width (min(s, in - d*s)), rounded to
//    float; partial edge fractions under 1e-3 are dropped. The value is
//    summed in float32 per source row (horizontal weights, source columns in
//    increasing order), the rows are summed with their vertical weights (source
//    rows in increasing order), each product rounded before its add (no fused
//    multiply-add), and the result rounded half to even and saturated to 0..255.
#pragma once

#include <cmath>
#include <cstdint>

#include "tilead/common.h"

namespace tilead {

// Source pixels one output pixel covers along one axis, and their weights.
struct AreaSpan {
  int begin;     // first source index (the partial head pixel when head_w applies)
  int body;      // first fully covered source index
  int tail;      // first source index after the fully covered ones
  int end;       // one past the last source index
  float head_w;  // weight of source index begin when begin < body
  float body_w;  // weight of body..tail-1
  float tail_w;  // weight of source index tail when tail < end
};

// Scale of an axis shrunk from in_size to out_size, as OpenCV computes it.
TILEAD_HD double area_scale(int in_size, int out_size) {
  return 1.0 / (static_cast<double>(out_size) / static_cast<double>(in_size));
}

// The whole-number factor of a scale (round half to even, as cvRound), or 0 when
// the scale is more than DBL_EPSILON away from one.
TILEAD_HD int area_whole_factor(double scale) {
  const double r = rint(scale);
  return fabs(scale - r) < 2.220446049250313e-16 ? static_cast<int>(r) : 0;
}

TILEAD_HD AreaSpan area_span(int d, int in_size, double scale) {
  const double f1 = d * scale;
  const double f2 = f1 + scale;
  const double cell = scale < in_size - f1 ? scale : in_size - f1;
  int s2 = static_cast<int>(floor(f2));
  if (s2 > in_size - 1) s2 = in_size - 1;
  int s1 = static_cast<int>(ceil(f1));
  if (s1 > s2) s1 = s2;
  AreaSpan a;
  a.body = s1;
  a.tail = s2;
  a.begin = s1 - f1 > 1e-3 ? s1 - 1 : s1;
  a.end = f2 - s2 > 1e-3 ? s2 + 1 : s2;
  a.head_w = static_cast<float>((s1 - f1) / cell);
  a.body_w = static_cast<float>(1.0 / cell);
  double part = f2 - s2 < 1.0 ? f2 - s2 : 1.0;
  part = part < cell ? part : cell;
  a.tail_w = static_cast<float>(part / cell);
  return a;
}

TILEAD_HD float area_weight(const AreaSpan& a, int s) {
  return s < a.body ? a.head_w : (s < a.tail ? a.body_w : a.tail_w);
}

// acc + v * w with the product rounded to float before the add (never fused).
TILEAD_HD float area_mad(float acc, float v, float w) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(acc, __fmul_rn(v, w));
#else
  return acc + v * w;  // the CPU twin's file is compiled with -ffp-contract=off
#endif
}

// Round half to even and saturate to uint8.
TILEAD_HD uint8_t area_round(float v) {
  const float r = rintf(v);
  return static_cast<uint8_t>(r < 0.0f ? 0.0f : (r > 255.0f ? 255.0f : r));
}

// One output value of the whole-factor path: the mean of a fy x fx block.
// image: one uint8 (H, W, C) image; (y, x, ch): the output pixel and channel.
TILEAD_HD uint8_t area_block_value(const uint8_t* image, int in_w, int channels, int fy, int fx, int y, int x, int ch) {
  int sum = 0;
  for (int sy = y * fy; sy < (y + 1) * fy; ++sy) {
    const uint8_t* row = image + (static_cast<int64_t>(sy) * in_w + static_cast<int64_t>(x) * fx) * channels + ch;
    for (int sx = 0; sx < fx; ++sx) sum += row[sx * channels];
  }
  if (fx == 2 && fy == 2) return static_cast<uint8_t>((sum + 2) >> 2);
  return area_round(static_cast<float>(sum) * (1.0f / static_cast<float>(fx * fy)));
}

// One output value of the general path: rows v of the source, columns h.
TILEAD_HD uint8_t area_span_value(const uint8_t* image, int in_w, int channels, const AreaSpan& v, const AreaSpan& h,
                                  int ch) {
  float sum = 0.0f;
  for (int sy = v.begin; sy < v.end; ++sy) {
    const uint8_t* row = image + static_cast<int64_t>(sy) * in_w * channels + ch;
    float acc = 0.0f;
    for (int sx = h.begin; sx < h.end; ++sx) {
      acc = area_mad(acc, static_cast<float>(row[static_cast<int64_t>(sx) * channels]), area_weight(h, sx));
    }
    sum = area_mad(sum, acc, area_weight(v, sy));
  }
  return area_round(sum);
}

}  // namespace tilead
