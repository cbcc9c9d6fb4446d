// pybind11 bindings of tilead._kernels.
//
// Every entry point validates its arrays (dtype, rank, shape, C-contiguity,
// writability, no overlap between inputs and outputs) and raises ValueError
// with what was expected and what was given; the kernels themselves trust
// their arguments. The GIL is released while a kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cctype>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/mahalanobis.h"
#include "cpu/rows.h"
#include "cpu/tile_simd.h"
#include "device_pipeline.h"
#include "staged.h"
#include "tilead/kernels.h"

#ifndef TILEAD_VERSION
#define TILEAD_VERSION "0.0.0"
#endif

namespace py = pybind11;
using namespace tilead;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) s << ",";
  s << ")";
  return s.str();
}

std::string shape_str(const std::vector<py::ssize_t>& v) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  if (v.size() == 1) s << ",";
  s << ")";
  return s.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// Checks dtype, C-contiguity, exact shape and (for outputs) writability.
void check_array(const py::array& a, const char* name, const py::dtype& dtype, const std::vector<py::ssize_t>& shape,
                 bool writable) {
  if (!a.dtype().equal(dtype)) {
    fail(std::string(name) + ": expected dtype " + py::str(dtype).cast<std::string>() + ", got " + dtype_str(a));
  }
  if (a.ndim() != static_cast<py::ssize_t>(shape.size())) {
    fail(std::string(name) + ": expected " + std::to_string(shape.size()) + " dimensions with shape " +
         shape_str(shape) + ", got " + std::to_string(a.ndim()) + " dimensions with shape " + shape_str(a));
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    if (a.shape(static_cast<py::ssize_t>(i)) != shape[i]) {
      fail(std::string(name) + ": expected shape " + shape_str(shape) + ", got " + shape_str(a));
    }
  }
  if (!(a.flags() & py::array::c_style)) {
    fail(std::string(name) +
         ": expected a C-contiguous array, got strides that are not C-contiguous "
         "(use numpy.ascontiguousarray)");
  }
  if (writable && !a.writeable()) fail(std::string(name) + ": expected a writable array, got a read-only one");
}

void check_disjoint(const py::array& a, const char* an, const py::array& b, const char* bn) {
  const auto* a0 = static_cast<const char*>(a.data());
  const auto* b0 = static_cast<const char*>(b.data());
  const auto* a1 = a0 + a.nbytes();
  const auto* b1 = b0 + b.nbytes();
  if (a.nbytes() > 0 && b.nbytes() > 0 && a0 < b1 && b0 < a1) {
    fail(std::string(an) + " and " + bn + " must not share memory");
  }
}

template <typename T>
py::dtype dt() {
  return py::dtype::of<T>();
}
py::dtype dt_half() { return py::dtype("float16"); }

Grid make_grid(int image_h, int image_w, int tile_h, int tile_w, int stride_h, int stride_w, int edge) {
  auto axis_check = [](const char* axis, int size, int tile, int stride) {
    if (size <= 0 || tile <= 0 || stride <= 0) {
      fail(std::string("grid ") + axis + ": image, tile and stride must be positive, got image=" +
           std::to_string(size) + " tile=" + std::to_string(tile) + " stride=" + std::to_string(stride));
    }
    if (tile > size) {
      fail(std::string("grid ") + axis + ": tile (" + std::to_string(tile) + ") must not exceed the image (" +
           std::to_string(size) + ")");
    }
    if (stride > tile) {
      fail(std::string("grid ") + axis + ": stride (" + std::to_string(stride) + ") must not exceed the tile (" +
           std::to_string(tile) + ")");
    }
  };
  axis_check("height", image_h, tile_h, stride_h);
  axis_check("width", image_w, tile_w, stride_w);
  if (edge < 0 || edge >= kEdgePolicyCount) {
    std::string known;
    for (int i = 0; i < kEdgePolicyCount; ++i) {
      if (i > 0) known += i + 1 == kEdgePolicyCount ? " or " : ", ";
      known += std::to_string(i) + " (" + kEdgePolicyNames[i] + ")";
    }
    fail("grid: edge must be " + known + ", got " + std::to_string(edge));
  }
  Grid g;
  g.y = make_axis(image_h, tile_h, stride_h, edge);
  g.x = make_axis(image_w, tile_w, stride_w, edge);
  return g;
}

std::vector<int> origins(const Axis& a) {
  std::vector<int> o(static_cast<size_t>(a.count));
  for (int i = 0; i < a.count; ++i) o[static_cast<size_t>(i)] = axis_origin(a, i);
  return o;
}

// ---- argument checks shared by the CPU and CUDA entry points ---------------

struct TileCall {
  TileParams p;
  int n;
};

// uint8 images (n, H, W, C) at the grid's image size, C in {1, 3}, and a 5-dimensional tile buffer whose
// channel count (at out_axis) is 1 or 3 and can take the images' channels: (n, C, out channels).
struct TileShapes {
  py::ssize_t n, c, oc;
};

TileShapes check_tile_shapes(const py::array& images, const Grid& g, const py::array& out, int out_axis,
                             const char* out_layout) {
  if (images.ndim() != 4) {
    fail("images: expected 4 dimensions (n, height, width, channels), got shape " + shape_str(images));
  }
  const auto n = images.shape(0);
  const auto c = images.shape(3);
  if (c != 1 && c != 3) fail("images: expected 1 or 3 channels, got " + std::to_string(c));
  check_array(images, "images", dt<uint8_t>(), {n, g.y.size, g.x.size, c}, false);
  if (out.ndim() != 5) {
    fail(std::string("out: expected 5 dimensions ") + out_layout + ", got shape " + shape_str(out));
  }
  const auto oc = out.shape(out_axis);
  if (oc != 1 && oc != 3) fail("out: expected 1 or 3 channels, got " + std::to_string(oc));
  if (c == 3 && oc == 1) fail("out: a 3-channel image cannot feed 1 output channel; convert the image to gray");
  return {n, c, oc};
}

TileCall check_tile(const py::array& images, const Grid& g, const py::array& out, const std::vector<float>& scale,
                    const std::vector<float>& bias, bool swap_rb) {
  const auto [n, c, oc] = check_tile_shapes(images, g, out, 2, "(locations, n, channels, tile_h, tile_w)");
  const bool half = out.dtype().equal(dt_half());
  if (!half && !out.dtype().equal(dt<float>())) fail("out: expected dtype float32 or float16, got " + dtype_str(out));
  check_array(out, "out", out.dtype(), {grid_locations(g), n, oc, g.y.tile, g.x.tile}, true);
  check_disjoint(images, "images", out, "out");
  if (scale.size() != static_cast<size_t>(oc) || bias.size() != static_cast<size_t>(oc)) {
    fail("scale and bias: expected " + std::to_string(oc) + " values each (one per output channel), got " +
         std::to_string(scale.size()) + " and " + std::to_string(bias.size()));
  }
  TileCall call{};
  call.n = static_cast<int>(n);
  call.p.in_channels = static_cast<int>(c);
  call.p.out_channels = static_cast<int>(oc);
  call.p.swap_rb = swap_rb && c == 3 ? 1 : 0;
  for (int i = 0; i < 3; ++i) {
    call.p.scale[i] = scale[static_cast<size_t>(i < oc ? i : 0)];
    call.p.bias[i] = bias[static_cast<size_t>(i < oc ? i : 0)];
  }
  call.p.out_type = half ? kFloat16 : kFloat32;
  return call;
}

struct UntileCall {
  UntileParams p;
  int n;
};

UntileCall check_untile(const py::array& maps, const Grid& g, const py::array& out, int weights,
                        const py::object& loc_threshold, const py::object& loc_scale, py::array* threshold_arr,
                        py::array* scale_arr) {
  if (maps.ndim() != 4) fail("maps: expected 4 dimensions (locations, n, map_h, map_w), got shape " + shape_str(maps));
  const auto n = maps.shape(1), mh = maps.shape(2), mw = maps.shape(3);
  if (mh < 1 || mw < 1) fail("maps: map height and width must be at least 1, got shape " + shape_str(maps));
  check_array(maps, "maps", dt<float>(), {grid_locations(g), n, mh, mw}, false);
  check_array(out, "out", dt<float>(), {n, g.y.canvas, g.x.canvas}, true);
  check_disjoint(maps, "maps", out, "out");
  if (weights != kBlendUniform && weights != kBlendFeather) {
    fail("weights: expected 0 (uniform) or 1 (feather), got " + std::to_string(weights));
  }
  UntileCall call{};
  call.n = static_cast<int>(n);
  call.p.map_h = static_cast<int>(mh);
  call.p.map_w = static_cast<int>(mw);
  call.p.weights = weights;
  if (loc_threshold.is_none() != loc_scale.is_none()) fail("loc_threshold and loc_scale: give both or neither");
  if (!loc_threshold.is_none()) {
    *threshold_arr = py::array::ensure(loc_threshold);
    *scale_arr = py::array::ensure(loc_scale);
    if (!*threshold_arr || !*scale_arr) fail("loc_threshold and loc_scale: expected numpy arrays");
    check_array(*threshold_arr, "loc_threshold", dt<float>(), {grid_locations(g)}, false);
    check_array(*scale_arr, "loc_scale", dt<float>(), {grid_locations(g)}, false);
    call.p.loc_threshold = static_cast<const float*>(threshold_arr->data());
    call.p.loc_scale = static_cast<const float*>(scale_arr->data());
  }
  return call;
}

int check_seam(const py::array& maps, const Grid& g) {
  if (maps.ndim() != 3) fail("maps: expected 3 dimensions (n, canvas_h, canvas_w), got shape " + shape_str(maps));
  check_array(maps, "maps", dt<float>(), {maps.shape(0), g.y.canvas, g.x.canvas}, true);
  return static_cast<int>(maps.shape(0));
}

std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// ---- the thumbnail branch's specs (tilead._kernels.FuseSpec, ThumbnailSpec) ------------------------------

FuseParams make_fuse(float tiled_threshold, float tiled_scale, float thumb_threshold, float thumb_scale, bool weighted,
                     float weight) {
  for (const float v : {tiled_threshold, tiled_scale, thumb_threshold, thumb_scale, weight}) {
    if (!finite_value(v)) fail("fuse: expected finite thresholds, scales and weight, got " + num(v));
  }
  if (!(tiled_scale > 0.0f) || !(thumb_scale > 0.0f)) {
    fail("fuse: expected positive scales (1 / (max - min)), got " + num(tiled_scale) + " and " + num(thumb_scale));
  }
  if (weighted ? !(weight >= 0.0f && weight <= 1.0f) : weight != 0.0f) {
    fail("fuse: expected a weight in [0, 1] for the weighted sum and 0 for max, got " + num(weight));
  }
  FuseParams p;
  p.tiled_threshold = tiled_threshold;
  p.tiled_scale = tiled_scale;
  p.thumb_threshold = thumb_threshold;
  p.thumb_scale = thumb_scale;
  p.weighted = weighted ? 1 : 0;
  p.weight = weight;
  return p;
}

bool same_fuse(const FuseParams& a, const FuseParams& b) {
  return a.tiled_threshold == b.tiled_threshold && a.tiled_scale == b.tiled_scale &&
         a.thumb_threshold == b.thumb_threshold && a.thumb_scale == b.thumb_scale && a.weighted == b.weighted &&
         a.weight == b.weight;
}

std::string fuse_repr(const FuseParams& p) {
  return "FuseSpec(tiled_threshold=" + num(p.tiled_threshold) + ", tiled_scale=" + num(p.tiled_scale) +
         ", thumb_threshold=" + num(p.thumb_threshold) + ", thumb_scale=" + num(p.thumb_scale) +
         ", weighted=" + (p.weighted ? "True" : "False") + ", weight=" + num(p.weight) + ")";
}

device::ThumbnailSpec make_thumbnail_spec(const Grid& g, int map_h, int map_w, const FuseParams& fuse) {
  if (grid_locations(g) != 1 || g.y.tile != g.y.size || g.x.tile != g.x.size) {
    fail("thumbnail grid: expected one tile the size of the resized image, got a " + std::to_string(g.y.count) + " x " +
         std::to_string(g.x.count) + " grid of " + std::to_string(g.y.tile) + " x " + std::to_string(g.x.tile) +
         " tiles on " + std::to_string(g.y.size) + " x " + std::to_string(g.x.size));
  }
  if (map_h < 1 || map_w < 1 || map_h > g.y.size || map_w > g.x.size) {
    fail("thumbnail map: expected 1 to the thumbnail size on each side, got " + std::to_string(map_h) + " x " +
         std::to_string(map_w));
  }
  device::ThumbnailSpec t;
  t.grid = g;
  t.map_h = map_h;
  t.map_w = map_w;
  t.fuse = fuse;
  return t;
}

void bind_thumbnail_specs(py::module_& m) {
  py::class_<FuseParams>(m, "FuseSpec",
                         "The thumbnail fusion as the kernels take it: each branch's threshold and scale "
                         "(1 / (max - min)), then max, or weight * tiled + (1 - weight) * thumbnail.")
      .def(py::init(&make_fuse), py::arg("tiled_threshold"), py::arg("tiled_scale"), py::arg("thumb_threshold"),
           py::arg("thumb_scale"), py::arg("weighted"), py::arg("weight"))
      .def_readonly("tiled_threshold", &FuseParams::tiled_threshold)
      .def_readonly("tiled_scale", &FuseParams::tiled_scale)
      .def_readonly("thumb_threshold", &FuseParams::thumb_threshold)
      .def_readonly("thumb_scale", &FuseParams::thumb_scale)
      .def_property_readonly("weighted", [](const FuseParams& p) { return p.weighted != 0; })
      .def_readonly("weight", &FuseParams::weight)
      .def("__eq__", &same_fuse)
      .def("__repr__", &fuse_repr);
  py::class_<device::ThumbnailSpec>(m, "ThumbnailSpec",
                                    "The DevicePipeline's thumbnail branch: the one-tile grid of the resized image, "
                                    "the thumbnail model's map size and the fusion.")
      .def(py::init(&make_thumbnail_spec), py::arg("grid"), py::arg("map_h"), py::arg("map_w"), py::arg("fuse"))
      .def_readonly("grid", &device::ThumbnailSpec::grid)
      .def_readonly("map_h", &device::ThumbnailSpec::map_h)
      .def_readonly("map_w", &device::ThumbnailSpec::map_w)
      .def_readonly("fuse", &device::ThumbnailSpec::fuse);
}

// ---- the post-processing spec objects (tilead._kernels.SeamSpec, NormSpec, PostSpec) ----------------------

SeamParams make_seam(float sigma, float width) {
  if (!seam_sigma_valid(sigma)) {
    fail("seam sigma: expected a number in [0, " + num(kMaxSeamSigma) +
         "] (kernel radius <= " + std::to_string(kMaxGaussianRadius) + "), got " + num(sigma));
  }
  if (!seam_width_valid(width)) fail("seam width: expected a number in [0, 1], got " + num(width));
  return SeamParams{sigma, width};
}

NormParams make_norm(int mode, float pt, float pmin, float pmax, float it, float imin, float imax) {
  if (mode != kNormNone && mode != kNormMinMax) {
    fail("norm mode: expected 0 (none) or 1 (min-max), got " + std::to_string(mode));
  }
  for (const float v : {pt, pmin, pmax, it, imin, imax}) {
    if (!finite_value(v)) fail("norm: expected finite thresholds and ranges, got " + num(v));
  }
  if (mode == kNormMinMax && !(pmax > pmin)) {
    fail("pixel_max must be greater than pixel_min for min-max normalization, got min=" + num(pmin) +
         " max=" + num(pmax));
  }
  if (mode == kNormMinMax && !(imax > imin)) {
    fail("image_max must be greater than image_min for min-max normalization, got min=" + num(imin) +
         " max=" + num(imax));
  }
  return NormParams{mode, pt, pmin, pmax, it, imin, imax};
}

PostSpec make_post(int weights, const std::vector<float>& loc_threshold, const std::vector<float>& loc_scale,
                   const SeamParams& seam, const NormParams& norm) {
  if (weights != kBlendUniform && weights != kBlendFeather) {
    fail("weights: expected 0 (uniform) or 1 (feather), got " + std::to_string(weights));
  }
  if (loc_threshold.size() != loc_scale.size()) {
    fail("loc_threshold and loc_scale: expected one value per location each, got " +
         std::to_string(loc_threshold.size()) + " and " + std::to_string(loc_scale.size()));
  }
  for (size_t i = 0; i < loc_threshold.size(); ++i) {
    if (!finite_value(loc_threshold[i]) || !finite_value(loc_scale[i]) || !(loc_scale[i] > 0.0f)) {
      fail("loc_threshold and loc_scale: expected finite values and a positive scale, location " + std::to_string(i) +
           " has " + num(loc_threshold[i]) + " and " + num(loc_scale[i]));
    }
  }
  PostSpec p;
  p.weights = weights;
  p.loc_threshold = loc_threshold;
  p.loc_scale = loc_scale;
  p.seam = seam;
  p.norm = norm;
  return p;
}

std::string seam_repr(const SeamParams& p) {
  return "SeamSpec(sigma=" + num(p.sigma) + ", width=" + num(p.width) + ")";
}

std::string norm_repr(const NormParams& p) {
  return "NormSpec(mode=" + std::to_string(p.mode) + ", pixel_threshold=" + num(p.pixel_threshold) +
         ", pixel_min=" + num(p.pixel_min) + ", pixel_max=" + num(p.pixel_max) +
         ", image_threshold=" + num(p.image_threshold) + ", image_min=" + num(p.image_min) +
         ", image_max=" + num(p.image_max) + ")";
}

bool same_norm(const NormParams& a, const NormParams& b) {
  return a.mode == b.mode && a.pixel_threshold == b.pixel_threshold && a.pixel_min == b.pixel_min &&
         a.pixel_max == b.pixel_max && a.image_threshold == b.image_threshold && a.image_min == b.image_min &&
         a.image_max == b.image_max;
}

void bind_specs(py::module_& m) {
  py::class_<SeamParams>(m, "SeamSpec",
                         "Seam smoothing as the kernels take it: Gaussian sigma in [0, MAX_SEAM_SIGMA], band "
                         "half-width fraction in [0, 1]; off (the stage is skipped) when either is 0.")
      .def(py::init(&make_seam), py::arg("sigma"), py::arg("width"))
      .def_static(
          "off", []() { return SeamParams{0.0f, 0.0f}; }, "The spec of no seam smoothing.")
      .def_readonly("sigma", &SeamParams::sigma)
      .def_readonly("width", &SeamParams::width)
      .def_property_readonly("enabled", [](const SeamParams& p) { return seam_enabled(p); })
      .def("__eq__", [](const SeamParams& a, const SeamParams& b) { return a.sigma == b.sigma && a.width == b.width; })
      .def("__repr__", &seam_repr)
      .def(py::pickle([](const SeamParams& p) { return py::make_tuple(p.sigma, p.width); },
                      [](const py::tuple& t) { return make_seam(t[0].cast<float>(), t[1].cast<float>()); }));
  py::class_<NormParams>(m, "NormSpec",
                         "Normalization as the kernels take it: mode (NORM_NONE or NORM_MINMAX), raw pixel and "
                         "image thresholds and (min-max) the pixel and image ranges.")
      .def(py::init(&make_norm), py::arg("mode"), py::arg("pixel_threshold"), py::arg("pixel_min"),
           py::arg("pixel_max"), py::arg("image_threshold"), py::arg("image_min"), py::arg("image_max"))
      .def_readonly("mode", &NormParams::mode)
      .def_readonly("pixel_threshold", &NormParams::pixel_threshold)
      .def_readonly("pixel_min", &NormParams::pixel_min)
      .def_readonly("pixel_max", &NormParams::pixel_max)
      .def_readonly("image_threshold", &NormParams::image_threshold)
      .def_readonly("image_min", &NormParams::image_min)
      .def_readonly("image_max", &NormParams::image_max)
      .def("__eq__", &same_norm)
      .def("__repr__", &norm_repr)
      .def(py::pickle(
          [](const NormParams& p) {
            return py::make_tuple(p.mode, p.pixel_threshold, p.pixel_min, p.pixel_max, p.image_threshold, p.image_min,
                                  p.image_max);
          },
          [](const py::tuple& t) {
            return make_norm(t[0].cast<int>(), t[1].cast<float>(), t[2].cast<float>(), t[3].cast<float>(),
                             t[4].cast<float>(), t[5].cast<float>(), t[6].cast<float>());
          }));
  py::class_<PostSpec>(m, "PostSpec",
                       "Every post-processing setting after the models (the PostProcessor's native form): blend "
                       "weights, per-location normalization (stage 'tile'; empty lists for none), seams, "
                       "normalization.")
      .def(py::init(&make_post), py::arg("weights"), py::arg("loc_threshold"), py::arg("loc_scale"), py::arg("seam"),
           py::arg("norm"))
      .def_readonly("weights", &PostSpec::weights)
      .def_readonly("loc_threshold", &PostSpec::loc_threshold)
      .def_readonly("loc_scale", &PostSpec::loc_scale)
      .def_readonly("seam", &PostSpec::seam)
      .def_readonly("norm", &PostSpec::norm)
      .def("__eq__",
           [](const PostSpec& a, const PostSpec& b) {
             return a.weights == b.weights && a.loc_threshold == b.loc_threshold && a.loc_scale == b.loc_scale &&
                    a.seam.sigma == b.seam.sigma && a.seam.width == b.seam.width && same_norm(a.norm, b.norm);
           })
      .def("__repr__", [](const PostSpec& p) {
        return "PostSpec(weights=" + std::to_string(p.weights) +
               ", locations=" + std::to_string(p.loc_threshold.size()) + ", seam=" + seam_repr(p.seam) +
               ", norm=" + norm_repr(p.norm) + ")";
      });
}

int check_resize(const py::array& in, const py::array& out) {
  if (in.ndim() != 3) fail("maps: expected 3 dimensions (n, height, width), got shape " + shape_str(in));
  if (out.ndim() != 3) fail("out: expected 3 dimensions (n, height, width), got shape " + shape_str(out));
  check_array(in, "maps", dt<float>(), {in.shape(0), in.shape(1), in.shape(2)}, false);
  check_array(out, "out", dt<float>(), {in.shape(0), out.shape(1), out.shape(2)}, true);
  if (in.shape(1) < 1 || in.shape(2) < 1 || out.shape(1) < 1 || out.shape(2) < 1) {
    fail("maps and out: heights and widths must be at least 1, got " + shape_str(in) + " and " + shape_str(out));
  }
  check_disjoint(in, "maps", out, "out");
  return static_cast<int>(in.shape(0));
}

int check_area(const py::array& in, const py::array& out) {
  if (in.ndim() != 4) fail("images: expected 4 dimensions (n, height, width, channels), got shape " + shape_str(in));
  if (out.ndim() != 4) fail("out: expected 4 dimensions (n, height, width, channels), got shape " + shape_str(out));
  check_array(in, "images", dt<uint8_t>(), {in.shape(0), in.shape(1), in.shape(2), in.shape(3)}, false);
  check_array(out, "out", dt<uint8_t>(), {in.shape(0), out.shape(1), out.shape(2), in.shape(3)}, true);
  if (in.shape(3) < 1 || out.shape(1) < 1 || out.shape(2) < 1) {
    fail("images and out: channels, heights and widths must be at least 1, got " + shape_str(in) + " and " +
         shape_str(out));
  }
  if (out.shape(1) > in.shape(1) || out.shape(2) > in.shape(2)) {
    fail("out: the area resize only shrinks; expected a height <= " + std::to_string(in.shape(1)) +
         " and a width <= " + std::to_string(in.shape(2)) + ", got shape " + shape_str(out));
  }
  check_disjoint(in, "images", out, "out");
  return static_cast<int>(in.shape(0));
}

void check_normalize(const py::array& in, const py::array& out, const py::object& mask, const py::array& raw_scores,
                     const py::array& scores, py::array* mask_arr) {
  if (in.ndim() != 3) fail("maps: expected 3 dimensions (n, height, width), got shape " + shape_str(in));
  const std::vector<py::ssize_t> shape{in.shape(0), in.shape(1), in.shape(2)};
  check_array(in, "maps", dt<float>(), shape, false);
  check_array(out, "out", dt<float>(), shape, true);
  if (out.data() != in.data()) check_disjoint(in, "maps", out, "out");
  if (!mask.is_none()) {
    *mask_arr = py::array::ensure(mask);
    if (!*mask_arr) fail("mask: expected a numpy array or None");
    check_array(*mask_arr, "mask", dt<uint8_t>(), shape, true);
  }
  check_array(raw_scores, "raw_scores", dt<float>(), {in.shape(0)}, true);
  check_array(scores, "scores", dt<float>(), {in.shape(0)}, true);
}

template <typename T>
T* ptr(const py::array& a) {
  return static_cast<T*>(const_cast<void*>(a.data()));
}

// Binds one family (cpu or cuda) of entry points with identical Python signatures.
template <bool Cuda>
void bind_family(py::module_& m) {
  m.def(
      "tile_images",
      [](const py::array& images, const Grid& g, py::array& out, const std::vector<float>& scale,
         const std::vector<float>& bias, bool swap_rb) {
        const TileCall c = check_tile(images, g, out, scale, bias, swap_rb);
        py::gil_scoped_release nogil;
        if (Cuda) {
          staged::tile_images(ptr<uint8_t>(images), c.n, g, c.p, out.mutable_data());
        } else {
          cpu::tile_images(ptr<uint8_t>(images), c.n, g, c.p, out.mutable_data());
        }
      },
      py::arg("images"), py::arg("grid"), py::arg("out"), py::arg("scale"), py::arg("bias"), py::arg("swap_rb") = false,
      "Tile uint8 images (n, h, w, c) into out (L, n, C, tile_h, tile_w), value = pixel * scale + bias.");
  m.def(
      "untile_maps",
      [](const py::array& maps, const Grid& g, py::array& out, int weights, const py::object& loc_threshold,
         const py::object& loc_scale) {
        py::array ta, sa;
        const UntileCall c = check_untile(maps, g, out, weights, loc_threshold, loc_scale, &ta, &sa);
        py::gil_scoped_release nogil;
        if (Cuda) {
          staged::untile_maps(ptr<float>(maps), c.n, g, c.p, ptr<float>(out));
        } else {
          cpu::untile_maps(ptr<float>(maps), c.n, g, c.p, ptr<float>(out));
        }
      },
      py::arg("maps"), py::arg("grid"), py::arg("out"), py::arg("weights") = 0, py::arg("loc_threshold") = py::none(),
      py::arg("loc_scale") = py::none(), "Untile maps (L, n, map_h, map_w) into out (n, canvas_h, canvas_w).");
  m.def(
      "smooth_seams",
      [](py::array& maps, const Grid& g, const SeamParams& p) {
        const int n = check_seam(maps, g);
        py::gil_scoped_release nogil;
        if (Cuda) {
          staged::smooth_seams(ptr<float>(maps), n, g, p);
        } else {
          cpu::smooth_seams(ptr<float>(maps), n, g, p, nullptr);
        }
      },
      py::arg("maps"), py::arg("grid"), py::arg("seam"),
      "Smooth seam bands of maps (n, canvas_h, canvas_w) in place (nothing when the SeamSpec is off).");
  m.def(
      "resize_maps",
      [](const py::array& in, py::array& out) {
        const int n = check_resize(in, out);
        const int ih = static_cast<int>(in.shape(1)), iw = static_cast<int>(in.shape(2));
        const int oh = static_cast<int>(out.shape(1)), ow = static_cast<int>(out.shape(2));
        py::gil_scoped_release nogil;
        if (Cuda) {
          staged::resize_maps(ptr<float>(in), n, ih, iw, ptr<float>(out), oh, ow);
        } else {
          cpu::resize_maps(ptr<float>(in), n, ih, iw, ptr<float>(out), oh, ow);
        }
      },
      py::arg("maps"), py::arg("out"), "Bilinear resize (align_corners=False) of maps (n, h, w) into out (n, H, W).");
  m.def(
      "resize_area",
      [](const py::array& images, py::array& out) {
        const int n = check_area(images, out);
        const int ih = static_cast<int>(images.shape(1)), iw = static_cast<int>(images.shape(2));
        const int c = static_cast<int>(images.shape(3));
        const int oh = static_cast<int>(out.shape(1)), ow = static_cast<int>(out.shape(2));
        py::gil_scoped_release nogil;
        if (Cuda) {
          staged::resize_area(ptr<uint8_t>(images), n, ih, iw, c, ptr<uint8_t>(out), oh, ow);
        } else {
          cpu::resize_area(ptr<uint8_t>(images), n, ih, iw, c, ptr<uint8_t>(out), oh, ow);
        }
      },
      py::arg("images"), py::arg("out"),
      "Area downscale (OpenCV's INTER_AREA) of uint8 images (n, h, w, c) into out (n, H, W, c), H <= h, W <= w.");
  m.def(
      "fuse_thumbnail",
      [](const py::array& thumbnail, py::array& maps, const FuseParams& p) {
        if (thumbnail.ndim() != 3 || maps.ndim() != 3) {
          fail("thumbnail and maps: expected (n, h, w) and (n, H, W), got " + shape_str(thumbnail) + " and " +
               shape_str(maps));
        }
        check_array(thumbnail, "thumbnail", dt<float>(), {thumbnail.shape(0), thumbnail.shape(1), thumbnail.shape(2)},
                    false);
        check_array(maps, "maps", dt<float>(), {thumbnail.shape(0), maps.shape(1), maps.shape(2)}, true);
        if (thumbnail.shape(1) < 1 || thumbnail.shape(2) < 1 || maps.shape(1) < 1 || maps.shape(2) < 1) {
          fail("thumbnail and maps: heights and widths must be at least 1, got " + shape_str(thumbnail) + " and " +
               shape_str(maps));
        }
        check_disjoint(thumbnail, "thumbnail", maps, "maps");
        const int n = static_cast<int>(maps.shape(0));
        const int th = static_cast<int>(thumbnail.shape(1)), tw = static_cast<int>(thumbnail.shape(2));
        const int h = static_cast<int>(maps.shape(1)), w = static_cast<int>(maps.shape(2));
        py::gil_scoped_release nogil;
        if (Cuda) {
          staged::fuse_thumbnail(ptr<float>(thumbnail), n, th, tw, ptr<float>(maps), h, w, p);
        } else {
          cpu::fuse_thumbnail(ptr<float>(thumbnail), n, th, tw, ptr<float>(maps), h, w, p);
        }
      },
      py::arg("thumbnail"), py::arg("maps"), py::arg("fuse"),
      "Fuse raw thumbnail maps (n, h, w), upsampled bilinearly, into merged tiled maps (n, H, W) in place.");
  m.def(
      "normalize_maps",
      [](const py::array& in, py::array& out, const py::object& mask, py::array& raw_scores, py::array& scores,
         const NormParams& p) {
        py::array mask_arr;
        check_normalize(in, out, mask, raw_scores, scores, &mask_arr);
        uint8_t* mp = mask.is_none() ? nullptr : static_cast<uint8_t*>(mask_arr.mutable_data());
        const int n = static_cast<int>(in.shape(0));
        const int64_t hw = static_cast<int64_t>(in.shape(1)) * in.shape(2);
        py::gil_scoped_release nogil;
        if (Cuda) {
          staged::normalize_maps(ptr<float>(in), ptr<float>(out), mp, ptr<float>(raw_scores), ptr<float>(scores), n, hw,
                                 p);
        } else {
          cpu::normalize_maps(ptr<float>(in), ptr<float>(out), mp, ptr<float>(raw_scores), ptr<float>(scores), n, hw,
                              p);
        }
      },
      py::arg("maps"), py::arg("out"), py::arg("mask"), py::arg("raw_scores"), py::arg("scores"), py::arg("norm"),
      "Normalize maps (n, h, w) into out, threshold into mask, and reduce per-image scores.");
}

// The TensorRT backend's device-resident pipeline (CUDA builds; elsewhere the constructor raises).
// The DevicePipeline's upload boundary: a uint8 (n, H, W, C) C-contiguous batch whose H, W match the
// grid's image, C the pipeline's input channels and n the range 1..max_batch (else the copy reads past it).
void check_pipeline_images(const Grid& g, int in_channels, int max_batch, const py::array& images) {
  if (images.ndim() != 4) fail("images: expected (n, height, width, channels) uint8, got " + shape_str(images));
  const auto n = images.shape(0);
  if (n < 1 || n > max_batch) {
    fail("images: batch of " + std::to_string(n) + " images, expected 1 to " + std::to_string(max_batch) +
         " (max_batch)");
  }
  check_array(images, "images", dt<uint8_t>(), {n, g.y.size, g.x.size, in_channels}, false);
}

// A batch's host outputs, maps (n, H, W) float32, masks (n, H, W) uint8, raw scores and scores (n,) float32,
// allocated here and filled by `fill(maps, masks, raw, scores)` with the GIL released.
template <typename Fill>
py::tuple batch_outputs(const Grid& g, int n, Fill fill) {
  py::array_t<float> maps({n, g.y.size, g.x.size});
  py::array_t<uint8_t> mask({n, g.y.size, g.x.size});
  py::array_t<float> raw(n), scores(n);
  float* mp = maps.mutable_data();
  uint8_t* kp = mask.mutable_data();
  float* rp = raw.mutable_data();
  float* sp = scores.mutable_data();
  {
    py::gil_scoped_release nogil;
    fill(mp, kp, rp, sp);
  }
  return py::make_tuple(maps, mask, raw, scores);
}

void bind_device_pipeline(py::module_& cuda) {
  using device::DevicePipeline;
  py::class_<DevicePipeline>(cuda, "DevicePipeline",
                             "Device buffers, a pinned staging buffer and a stream for batches of up to max_batch "
                             "images: upload + tile, engines, untile + seams + normalize, one download.")
      .def(py::init([](const Grid& g, int max_batch, int in_channels, int out_channels, const std::vector<float>& scale,
                       const std::vector<float>& bias, int map_h, int map_w, const PostSpec& post, int device_index,
                       bool location_scores, const py::object& thumbnail) {
             if (max_batch < 1) fail("max_batch: expected >= 1, got " + std::to_string(max_batch));
             if ((in_channels != 1 && in_channels != 3) || (out_channels != 1 && out_channels != 3)) {
               fail("in_channels and out_channels: expected 1 or 3");
             }
             if (scale.size() != static_cast<size_t>(out_channels) || bias.size() != scale.size()) {
               fail("scale and bias: expected one value per output channel");
             }
             if (map_h < 1 || map_w < 1) fail("map_h and map_w: expected positive sizes");
             if (!post.loc_threshold.empty() && post.loc_threshold.size() != static_cast<size_t>(grid_locations(g))) {
               fail("post: expected per-location normalization for " + std::to_string(grid_locations(g)) +
                    " locations (or none), got " + std::to_string(post.loc_threshold.size()));
             }
             device::PipelineSpec spec;
             spec.grid = g;
             spec.tile.in_channels = in_channels;
             spec.tile.out_channels = out_channels;
             spec.tile.swap_rb = 0;  // per call: tile(n, swap_rb)
             for (int i = 0; i < 3; ++i) {
               spec.tile.scale[i] = scale[static_cast<size_t>(i < out_channels ? i : 0)];
               spec.tile.bias[i] = bias[static_cast<size_t>(i < out_channels ? i : 0)];
             }
             spec.tile.out_type = kFloat32;
             spec.map_h = map_h;
             spec.map_w = map_w;
             spec.post = post;
             spec.max_batch = max_batch;
             spec.device = device_index;
             spec.location_scores = location_scores;
             if (!thumbnail.is_none()) spec.thumbnail = thumbnail.cast<device::ThumbnailSpec>();
             return std::make_unique<DevicePipeline>(spec);
           }),
           py::arg("grid"), py::arg("max_batch"), py::arg("in_channels"), py::arg("out_channels"), py::arg("scale"),
           py::arg("bias"), py::arg("map_h"), py::arg("map_w"), py::arg("post"), py::arg("device") = 0,
           py::arg("location_scores") = false, py::arg("thumbnail") = py::none())
      .def_property_readonly(
          "post", [](const DevicePipeline& self) { return self.spec().post; },
          "The PostSpec the pipeline was built with.")
      .def_property_readonly("stream", &DevicePipeline::stream, "cudaStream_t of every stage, as an integer.")
      .def_property_readonly("device_bytes", &DevicePipeline::device_bytes)
      .def("tiles_address", &DevicePipeline::tiles_address, py::arg("location"), py::arg("n"),
           "Device address of a location's (n, C, tile_h, tile_w) float32 tiles: the engine's input.")
      .def("maps_address", &DevicePipeline::maps_address, py::arg("location"), py::arg("n"),
           "Device address of a location's (n, 1, map_h, map_w) float32 map: the engine's output.")
      .def("scores_address", &DevicePipeline::scores_address, py::arg("location"), py::arg("n"),
           "Device address of a location's (n,) float32 per-tile scores: the engine's second output "
           "(location_scores pipelines only).")
      .def("context_memory", &DevicePipeline::context_memory, py::arg("bytes"),
           "Address of one device buffer of at least `bytes` shared by every engine's execution context "
           "(TensorRT USER_MANAGED); grows when asked for more, dropping captured graphs.")
      .def("use_device", &DevicePipeline::use_device, "Make the pipeline's device current on the calling thread.")
      .def("tiles_stride", &DevicePipeline::tiles_stride, py::arg("n"),
           "Bytes from one location's tile block to the next for a batch of n (a multiple of 256).")
      .def("maps_stride", &DevicePipeline::maps_stride, py::arg("n"),
           "Bytes from one location's map block to the next for a batch of n (a multiple of 256).")
      .def(
          "upload",
          [](DevicePipeline& self, const py::array& images) {
            const device::PipelineSpec& sp = self.spec();
            check_pipeline_images(sp.grid, sp.tile.in_channels, sp.max_batch, images);
            const int n = static_cast<int>(images.shape(0));
            py::gil_scoped_release nogil;
            self.upload(ptr<uint8_t>(images), n);
          },
          py::arg("images"), "Enqueue the copy of a uint8 batch (n, H, W, C) to the device (via pinned memory).")
      .def(
          "stage_images",
          [](DevicePipeline& self, const py::array& images) {
            const device::PipelineSpec& sp = self.spec();
            check_pipeline_images(sp.grid, sp.tile.in_channels, sp.max_batch, images);
            const int n = static_cast<int>(images.shape(0));
            py::gil_scoped_release nogil;
            self.stage_images(ptr<uint8_t>(images), n);
          },
          py::arg("images"), "First half of upload: wait for the stream, copy the batch into pinned memory.")
      .def("upload_staged", &DevicePipeline::upload_staged, py::arg("n"), py::call_guard<py::gil_scoped_release>(),
           "Second half of upload: enqueue the host-to-device copy of the staged batch.")
      .def(
          "upload_location_maps",
          [](DevicePipeline& self, const py::array& maps) {
            const device::PipelineSpec& sp = self.spec();
            if (maps.ndim() != 4) fail("maps: expected (locations, n, map_h, map_w) float32, got " + shape_str(maps));
            const auto n = maps.shape(1);
            if (n < 1 || n > sp.max_batch) fail("maps: batch out of range for this pipeline");
            check_array(maps, "maps", dt<float>(), {grid_locations(sp.grid), n, sp.map_h, sp.map_w}, false);
            py::gil_scoped_release nogil;
            self.upload_location_maps(ptr<float>(maps), static_cast<int>(n));
          },
          py::arg("maps"), "Copy per-location maps (L, n, map_h, map_w) into the engines' output blocks (self-check).")
      .def("tile", &DevicePipeline::tile, py::arg("n"), py::arg("swap_rb"), py::call_guard<py::gil_scoped_release>(),
           "Enqueue the tile kernel into every location's block.")
      .def("untile", &DevicePipeline::untile, py::arg("n"), py::call_guard<py::gil_scoped_release>())
      .def("smooth_seams", &DevicePipeline::smooth_seams, py::arg("n"), py::call_guard<py::gil_scoped_release>())
      .def("crop", &DevicePipeline::crop, py::arg("n"), py::call_guard<py::gil_scoped_release>())
      .def("normalize", &DevicePipeline::normalize, py::arg("n"), py::call_guard<py::gil_scoped_release>())
      .def("thumbnail_input_address", &DevicePipeline::thumbnail_input_address, py::arg("n"),
           "Device address of the thumbnail engine's (n, C, size, size) float32 input (thumbnail pipelines only).")
      .def("thumbnail_map_address", &DevicePipeline::thumbnail_map_address, py::arg("n"),
           "Device address of the thumbnail engine's (n, 1, map_h, map_w) float32 output (thumbnail pipelines only).")
      .def("thumbnail_input", &DevicePipeline::thumbnail_input, py::arg("n"), py::arg("swap_rb"),
           py::call_guard<py::gil_scoped_release>(),
           "Enqueue the area resize of the uploaded images and the tile kernel into the thumbnail engine's input.")
      .def("fuse", &DevicePipeline::fuse, py::arg("n"), py::call_guard<py::gil_scoped_release>(),
           "Enqueue the fusion of the upsampled thumbnail maps into the image-size maps (after crop).")
      .def(
          "upload_thumbnail_maps",
          [](DevicePipeline& self, const py::array& maps) {
            const device::PipelineSpec& sp = self.spec();
            if (maps.ndim() != 3) fail("maps: expected (n, map_h, map_w) float32, got " + shape_str(maps));
            const auto n = maps.shape(0);
            if (n < 1 || n > sp.max_batch) fail("maps: batch out of range for this pipeline");
            check_array(maps, "maps", dt<float>(), {n, sp.thumbnail.map_h, sp.thumbnail.map_w}, false);
            py::gil_scoped_release nogil;
            self.upload_thumbnail_maps(ptr<float>(maps), static_cast<int>(n));
          },
          py::arg("maps"), "Copy thumbnail maps (n, map_h, map_w) into the thumbnail engine's output (self-check).")
      .def(
          "download_thumbnail_maps",
          [](DevicePipeline& self, int n) {
            const device::PipelineSpec& sp = self.spec();
            if (n < 1 || n > sp.max_batch) fail("n: batch out of range for this pipeline");
            py::array_t<float> maps({n, sp.thumbnail.map_h, sp.thumbnail.map_w});
            float* mp = maps.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.download_thumbnail_maps(n, mp);
            }
            return maps;
          },
          py::arg("n"), "Copy the thumbnail engine's raw maps (n, map_h, map_w) back; waits for the stream.")
      .def(
          "download_location_maps",
          [](DevicePipeline& self, int n) {
            const device::PipelineSpec& sp = self.spec();
            py::array_t<float> maps({grid_locations(sp.grid), n, sp.map_h, sp.map_w});
            float* mp = maps.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.download_location_maps(n, mp);
            }
            return maps;
          },
          py::arg("n"), "Copy every location's raw map (L, n, map_h, map_w) back; waits for the stream.")
      .def(
          "download",
          [](DevicePipeline& self, int n) {
            return batch_outputs(self.spec().grid, n, [&](float* mp, uint8_t* kp, float* rp, float* sp) {
              self.download(n, mp, kp, rp, sp);
            });
          },
          py::arg("n"),
          "Copy maps (n, H, W) float32, masks (n, H, W) uint8, raw scores and scores (n,) back; waits for the stream.")
      .def("enqueue_download", &DevicePipeline::enqueue_download, py::arg("n"),
           py::call_guard<py::gil_scoped_release>(), "First half of download: enqueue the copies into pinned memory.")
      .def(
          "fetch",
          [](DevicePipeline& self, int n) {
            return batch_outputs(self.spec().grid, n,
                                 [&](float* mp, uint8_t* kp, float* rp, float* sp) { self.fetch(n, mp, kp, rp, sp); });
          },
          py::arg("n"), "Second half of download: wait for the stream, return (maps, masks, raw scores, scores).")
      .def(
          "fetch_location_scores",
          [](DevicePipeline& self, int n) {
            py::array_t<float> out({grid_locations(self.spec().grid), n});
            self.fetch_location_scores(n, out.mutable_data());
            return out;
          },
          py::arg("n"), "After fetch/download: the per-tile scores (L, n) float32 the engines wrote.")
      .def(
          "download_location_scores",
          [](DevicePipeline& self, int n) {
            py::array_t<float> out({grid_locations(self.spec().grid), n});
            float* op = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.download_location_scores(n, op);
            }
            return out;
          },
          py::arg("n"), "Copy every location's per-tile scores (L, n) back; waits for the stream.")
      .def("begin_capture", &DevicePipeline::begin_capture, "Start capturing the stream into a CUDA graph.")
      .def("end_capture", &DevicePipeline::end_capture, py::arg("key"), py::call_guard<py::gil_scoped_release>(),
           "End the capture and keep the instantiated graph under key (RuntimeError on a capture error).")
      .def("abort_capture", &DevicePipeline::abort_capture, "End a capture without keeping it (no-op when none).")
      .def("has_graph", &DevicePipeline::has_graph, py::arg("key"))
      .def_property_readonly("graph_count", &DevicePipeline::graph_count)
      .def("launch", &DevicePipeline::launch, py::arg("key"), py::call_guard<py::gil_scoped_release>(),
           "Replay the graph kept under key on the stream (returns at once).")
      .def(
          "synchronize",
          [](DevicePipeline& self) {
            py::gil_scoped_release nogil;
            self.synchronize();
          },
          "Wait for everything enqueued on the stream.");
}

// A mahalanobis call: its arrays checked (lanes: the lane layout, else the per-position one), then the kernel.
void run_mahalanobis(const py::array& features, const py::array& mean, const py::array& packed, const py::array& out,
                     const std::string& path, bool lanes) {
  if (features.ndim() != 3) {
    fail("features: expected 3 dimensions (n, d, positions), got shape " + shape_str(features));
  }
  const py::ssize_t n = features.shape(0), d = features.shape(1), positions = features.shape(2);
  const py::ssize_t width = cpu::kMahalanobisLanes, blocks = (positions + width - 1) / width, tri = d * (d + 1) / 2;
  const std::string mean_name = lanes ? "mean_lanes" : "mean", packed_name = lanes ? "packed_lanes" : "packed";
  check_array(features, "features", py::dtype::of<float>(), {n, d, positions}, false);
  if (lanes) {
    check_array(mean, mean_name.c_str(), py::dtype::of<float>(), {blocks, d, width}, false);
    check_array(packed, packed_name.c_str(), py::dtype("float16"), {blocks, tri, width}, false);
  } else {
    check_array(mean, mean_name.c_str(), py::dtype::of<float>(), {positions, d}, false);
    check_array(packed, packed_name.c_str(), py::dtype("float16"), {positions, tri}, false);
  }
  check_array(out, "out", py::dtype::of<float>(), {n, positions}, true);
  check_disjoint(features, "features", out, "out");
  check_disjoint(mean, mean_name.c_str(), out, "out");
  check_disjoint(packed, packed_name.c_str(), out, "out");
  cpu::MahalanobisPath which;
  try {
    which = cpu::mahalanobis_path(path);
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  const auto* f = static_cast<const float*>(features.data());
  const auto* m = static_cast<const float*>(mean.data());
  const auto* t = static_cast<const uint16_t*>(packed.data());
  auto* o = static_cast<float*>(const_cast<void*>(out.data()));
  py::gil_scoped_release release;
  if (lanes) {
    cpu::mahalanobis_lanes(f, n, d, positions, m, t, o, which);
  } else {
    cpu::mahalanobis(f, n, d, positions, m, t, o, which);
  }
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "tilead tiling kernels: CPU twins (module level) and CUDA twins (submodule cuda).";
  m.attr("__version__") = TILEAD_VERSION;
  {  // The edge policies, from the one list (geometry.h, TILEAD_EDGE_POLICIES): EDGE_POLICIES holds the
     // names indexed by code, EDGE_<NAME> each code.
    py::tuple names(static_cast<size_t>(kEdgePolicyCount));
    for (int i = 0; i < kEdgePolicyCount; ++i) {
      std::string name = kEdgePolicyNames[i];
      names[static_cast<size_t>(i)] = py::str(name);
      for (char& ch : name) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      m.attr(("EDGE_" + name).c_str()) = i;
    }
    m.attr("EDGE_POLICIES") = names;
  }
  m.attr("CANVAS_IS_IMAGE") = static_cast<int>(kCanvasIsImage);
  m.attr("CANVAS_PADDED") = static_cast<int>(kCanvasPadded);
  m.attr("CANVAS_RESIZED") = static_cast<int>(kCanvasResized);
  m.attr("BLEND_UNIFORM") = static_cast<int>(kBlendUniform);
  m.attr("BLEND_FEATHER") = static_cast<int>(kBlendFeather);
  m.attr("NORM_NONE") = static_cast<int>(kNormNone);
  m.attr("NORM_MINMAX") = static_cast<int>(kNormMinMax);
  m.attr("MAX_GAUSSIAN_RADIUS") = kMaxGaussianRadius;
  m.attr("MAX_SEAM_SIGMA") = kMaxSeamSigma;
  m.def(
      "gaussian_taps",
      [](float sigma) {
        if (!(sigma > 0.0f) || !seam_sigma_valid(sigma)) {
          fail("sigma: expected a number in (0, " + num(kMaxSeamSigma) + "], got " + num(sigma));
        }
        return gaussian_taps(sigma);
      },
      py::arg("sigma"),
      "The seam kernels' normalized Gaussian taps for sigma: 2 * int(4 * sigma + 0.5) + 1 float32 values.");
  bind_specs(m);

  py::class_<Grid>(m, "Grid", "Validated tile grid; the geometry every kernel uses.")
      .def(py::init(&make_grid), py::arg("image_h"), py::arg("image_w"), py::arg("tile_h"), py::arg("tile_w"),
           py::arg("stride_h"), py::arg("stride_w"), py::arg("edge"))
      .def_property_readonly("image_h", [](const Grid& g) { return g.y.size; })
      .def_property_readonly("image_w", [](const Grid& g) { return g.x.size; })
      .def_property_readonly("tile_h", [](const Grid& g) { return g.y.tile; })
      .def_property_readonly("tile_w", [](const Grid& g) { return g.x.tile; })
      .def_property_readonly("rows", [](const Grid& g) { return g.y.count; })
      .def_property_readonly("cols", [](const Grid& g) { return g.x.count; })
      .def_property_readonly(
          "edge", [](const Grid& g) { return static_cast<int>(g.y.edge); },
          "Edge policy code: its index in EDGE_POLICIES.")
      .def_property_readonly(
          "canvas_map", [](const Grid& g) { return canvas_map(g); },
          "How the canvas relates to the image: CANVAS_IS_IMAGE, CANVAS_PADDED or CANVAS_RESIZED.")
      .def_property_readonly("canvas_h", [](const Grid& g) { return g.y.canvas; })
      .def_property_readonly("canvas_w", [](const Grid& g) { return g.x.canvas; })
      .def_property_readonly("origins_y", [](const Grid& g) { return origins(g.y); })
      .def_property_readonly("origins_x", [](const Grid& g) { return origins(g.x); })
      .def(
          "band_rows",
          [](const Grid& g, float width) {
            std::vector<bool> b(static_cast<size_t>(g.y.canvas));
            const int half = band_half_width(g.y.tile, width);
            for (int i = 0; i < g.y.canvas; ++i) b[static_cast<size_t>(i)] = axis_in_band(g.y, i, half);
            return b;
          },
          py::arg("width"), "Per canvas row: inside a horizontal seam band.")
      .def(
          "band_cols",
          [](const Grid& g, float width) {
            std::vector<bool> b(static_cast<size_t>(g.x.canvas));
            const int half = band_half_width(g.x.tile, width);
            for (int i = 0; i < g.x.canvas; ++i) b[static_cast<size_t>(i)] = axis_in_band(g.x, i, half);
            return b;
          },
          py::arg("width"), "Per canvas column: inside a vertical seam band.");

  m.def("set_num_threads", &cpu::set_num_threads, py::arg("n"),
        "Threads used by the CPU kernels; n <= 0 restores the default (CPUs this process may use).");
  m.def("get_num_threads", &cpu::get_num_threads,
        "Threads the CPU kernels use when called from this thread (its budget, else set_num_threads's).");
  m.def("set_thread_budget", &cpu::set_thread_budget, py::arg("n"),
        "Threads for the CPU kernels called from the calling thread only; n <= 0 clears it (set_num_threads's).");
  m.def("get_thread_budget", &cpu::get_thread_budget, "The calling thread's budget (0: none).");
  m.def(
      "cpu_simd", []() { return std::string(cpu::row_converters().rgb_f32 != nullptr ? "avx2+f16c" : "portable"); },
      "Code path of the CPU tile kernel on this machine: 'avx2+f16c' or 'portable'.");
  m.def(
      "tile_images_u8",
      [](const py::object& images, const Grid& g, py::array& out, bool swap_rb) {
        // One (n, h, w, c) array, or a list of (h, w, c) arrays: a batch's images tiled where they are.
        std::vector<py::array> parts;
        py::ssize_t n = 0, c = 0, oc = 0;
        if (py::isinstance<py::array>(images)) {
          const auto batch = images.cast<py::array>();
          const TileShapes t = check_tile_shapes(batch, g, out, 4, "(locations, n, tile_h, tile_w, channels)");
          n = t.n;
          c = t.c;
          oc = t.oc;
          parts.push_back(batch);
        } else {
          const auto seq = images.cast<py::sequence>();
          n = static_cast<py::ssize_t>(seq.size());
          if (n == 0) fail("images: expected at least one image, got an empty list");
          for (py::ssize_t k = 0; k < n; ++k) {
            const auto one = seq[static_cast<size_t>(k)].cast<py::array>();
            const std::string name = "images[" + std::to_string(k) + "]";
            if (one.ndim() != 3)
              fail(name + ": expected 3 dimensions (height, width, channels), got " + shape_str(one));
            if (k == 0) {  // the first image's channels, checked against out's as for a 4-D batch
              const auto lead = one.attr("__getitem__")(py::none()).cast<py::array>();
              const TileShapes t = check_tile_shapes(lead, g, out, 4, "(locations, n, tile_h, tile_w, channels)");
              c = t.c;
              oc = t.oc;
            }
            check_array(one, name.c_str(), dt<uint8_t>(), {g.y.size, g.x.size, c}, false);
            check_disjoint(one, name.c_str(), out, "out");
            parts.push_back(one);
          }
        }
        check_array(out, "out", dt<uint8_t>(), {grid_locations(g), n, g.y.tile, g.x.tile, oc}, true);
        std::vector<const uint8_t*> pointers;
        if (parts.size() == 1 && parts[0].ndim() == 4) {
          check_disjoint(parts[0], "images", out, "out");
          const int64_t image_bytes = static_cast<int64_t>(g.y.size) * g.x.size * c;
          for (py::ssize_t k = 0; k < n; ++k) pointers.push_back(ptr<uint8_t>(parts[0]) + k * image_bytes);
        } else {
          for (const auto& one : parts) pointers.push_back(ptr<uint8_t>(one));
        }
        if (edge_resamples(g.y.edge) || edge_resamples(g.x.edge)) {
          fail("grid: uint8 tiles need a direct edge policy (shift or pad); resize resamples between uint8 levels");
        }
        const TileU8Params p{static_cast<int>(c), static_cast<int>(oc), swap_rb && c == 3 ? 1 : 0};
        py::gil_scoped_release nogil;
        cpu::tile_images_u8(pointers.data(), static_cast<int>(n), g, p, static_cast<uint8_t*>(out.mutable_data()));
      },
      py::arg("images"), py::arg("grid"), py::arg("out"), py::arg("swap_rb") = false,
      "Tile uint8 images (n, h, w, c), or a list of n (h, w, c) arrays (tiled where they are, not stacked), into "
      "uint8 out (L, n, tile_h, tile_w, C), the pixels as they are (CPU only; for models that normalize their input "
      "themselves). Edge policies shift and pad (0 off the image).");
  m.def(
      "mahalanobis",
      [](const py::array& features, const py::array& mean_lanes, const py::array& packed_lanes, const py::array& out,
         const std::string& path) { run_mahalanobis(features, mean_lanes, packed_lanes, out, path, true); },
      py::arg("features"), py::arg("mean_lanes"), py::arg("packed_lanes"), py::arg("out"), py::arg("path") = "auto",
      "Squared Mahalanobis distances of a PaDiM head (#21): out[k, p] = (x - mean[p])^T A_p (x - mean[p]) with "
      "x = features[k, :, p], positions in vector lanes. features float32 (n, d, P); with B = ceil(P / 16): "
      "mean_lanes float32 (B, d, 16), packed_lanes float16 (B, d (d + 1) / 2, 16) (position b * 16 + l at "
      "[b, :, l]; per position row i of A_p's upper triangle: A_ii, then 2 A_ij for j > i); out float32 (n, P); "
      "one thread, GIL released; every path gives the same bits. path: 'auto' (the best this CPU runs), "
      "'scalar', 'avx2' (AVX2+FMA+F16C) or 'avx512' (AVX-512F).");
  m.def(
      "mahalanobis_rows",
      [](const py::array& features, const py::array& mean, const py::array& packed, const py::array& out,
         const std::string& path) { run_mahalanobis(features, mean, packed, out, path, false); },
      py::arg("features"), py::arg("mean"), py::arg("packed"), py::arg("out"), py::arg("path") = "auto",
      "mahalanobis on the head files' per-position layout (the previous kernel, kept to measure against): "
      "mean float32 (P, d), packed float16 (P, d (d + 1) / 2), the rest as for mahalanobis.");
  m.def("mahalanobis_paths", &cpu::mahalanobis_paths,
        "The mahalanobis kernel's code paths this CPU runs, best last ('scalar' always).");
  bind_family<false>(m);
  m.def(
      "postprocess_maps",
      [](const py::array& maps, const Grid& g, py::array& out, const py::object& mask, py::array& raw_scores,
         py::array& scores, int weights, const py::object& loc_threshold, const py::object& loc_scale,
         const SeamParams& seam, const NormParams& norm) {
        py::array ta, sa, mask_arr;
        const UntileCall c = check_untile(maps, g, out, weights, loc_threshold, loc_scale, &ta, &sa);
        check_normalize(out, out, mask, raw_scores, scores, &mask_arr);
        uint8_t* mp = mask.is_none() ? nullptr : static_cast<uint8_t*>(mask_arr.mutable_data());
        if (mp != nullptr) check_disjoint(mask_arr, "mask", out, "out");
        check_disjoint(raw_scores, "raw_scores", scores, "scores");
        py::gil_scoped_release nogil;
        cpu::postprocess_maps(ptr<float>(maps), c.n, g, c.p, seam, norm, ptr<float>(out), mp, ptr<float>(raw_scores),
                              ptr<float>(scores));
      },
      py::arg("maps"), py::arg("grid"), py::arg("out"), py::arg("mask"), py::arg("raw_scores"), py::arg("scores"),
      py::arg("weights"), py::arg("loc_threshold"), py::arg("loc_scale"), py::arg("seam"), py::arg("norm"),
      "CPU only: untile_maps, smooth_seams and normalize_maps in one pass, maps (L, n, map_h, map_w) -> out and "
      "mask (n, canvas_h, canvas_w), raw_scores and scores (n,); the same values as the three kernels in turn.");
  m.attr("TENSOR_ALIGN_BYTES") = static_cast<int>(kTensorAlignBytes);
  m.def(
      "aligned_block_floats",
      [](int64_t floats) {
        if (floats < 0) fail("floats: expected >= 0, got " + std::to_string(floats));
        return aligned_block_floats(floats);
      },
      py::arg("floats"),
      "Floats from one location's block to the next in the DevicePipeline: floats rounded up to 256 bytes.");
  m.def(
      "check_pipeline_images",
      [](const Grid& g, int in_channels, int max_batch, const py::array& images) {
        check_pipeline_images(g, in_channels, max_batch, images);
      },
      py::arg("grid"), py::arg("in_channels"), py::arg("max_batch"), py::arg("images"),
      "The DevicePipeline.upload check: ValueError unless images is uint8 (n, image_h, image_w, in_channels), "
      "C-contiguous, 1 <= n <= max_batch.");

  py::module_ cuda = m.def_submodule("cuda", "CUDA twins, host-staged: same signatures as the CPU twins.");
  cuda.def("is_built", &staged::built_with_cuda, "Whether the module was compiled with the CUDA kernels.");
  cuda.def("architectures", &staged::cuda_architectures, "CUDA architectures compiled in (CMake syntax).");
  cuda.def(
      "device_count",
      []() {
        std::string err;
        const int n = staged::device_count(&err);
        return py::make_tuple(n, err);
      },
      "(count, error): CUDA devices visible, and the runtime's error text when it reported one.");
  cuda.def("device_name", &staged::device_name, py::arg("index") = 0);
  cuda.def(
      "memory_info",
      [](int index) {
        const auto info = staged::memory_info(index);
        return py::make_tuple(info.first, info.second);
      },
      py::arg("index") = 0, "(free, total) bytes of device memory on CUDA device `index` (cudaMemGetInfo).");
  bind_family<true>(cuda);
  bind_thumbnail_specs(m);
  bind_device_pipeline(cuda);
}
