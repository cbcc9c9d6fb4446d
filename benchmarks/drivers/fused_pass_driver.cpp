// Standalone driver of the CPU fused post-processing pass (untile + seams + normalize), one thread.
//
// For comparing two builds of one kernel file side by side, outside Python and with symbols for
// `perf record` (the extension is stripped). Usage, from the repository root:
//
//   S=cpp_ext; F="-O3 -g -std=c++17 -I$S/include -I$S/src/cpu -pthread"
//   g++ $F -ffp-contract=off -c $S/src/cpu/{untile,normalize,postprocess}.cpp
//   g++ $F -c $S/src/cpu/{seam,threads}.cpp benchmarks/drivers/fused_pass_driver.cpp
//   g++ -pthread *.o -o fused_pass && ./fused_pass 2048 512 64 100   # image side, tile, map side, calls
//
// Build a second binary with the other version of a file's object (for example `git show
// HEAD~1:cpp_ext/src/cpu/seam.cpp` compiled the same way) and run the two alternately. The grid is
// square with stride = tile (edge shift), seams sigma 2 and width 0.1 (the bundles' defaults), one image.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "rows.h"
#include "tilead/kernels.h"
#include "tilead/seam.h"

int main(int argc, char** argv) {
  using namespace tilead;
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s IMAGE_SIDE TILE MAP_SIDE CALLS\n", argv[0]);
    return 2;
  }
  const int side = std::atoi(argv[1]), tile = std::atoi(argv[2]), map = std::atoi(argv[3]), calls = std::atoi(argv[4]);
  if (side < 1 || tile < 1 || tile > side || map < 1 || calls < 1) {
    std::fprintf(stderr, "expected 0 < TILE <= IMAGE_SIDE, MAP_SIDE > 0, CALLS > 0\n");
    return 2;
  }
  const Grid g{make_axis(side, tile, tile, kEdgeShift), make_axis(side, tile, tile, kEdgeShift)};
  std::vector<float> maps(static_cast<size_t>(grid_locations(g)) * map * map);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> value(0.0f, 100.0f);
  for (float& v : maps) v = value(rng);
  const UntileParams up{map, map, 0, nullptr, nullptr};
  const SeamParams sp{2.0f, 0.1f};
  const NormParams np{kNormMinMax, 50.0f, 0.0f, 100.0f, 60.0f, 0.0f, 100.0f};
  std::vector<float> out(static_cast<size_t>(side) * side);
  std::vector<uint8_t> mask(out.size());
  float raw = 0.0f, score = 0.0f;
  cpu::set_num_threads(1);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) {
    cpu::postprocess_maps(maps.data(), 1, g, up, sp, np, out.data(), mask.data(), &raw, &score);
  }
  const auto t1 = std::chrono::steady_clock::now();
  std::printf("ms per call %.3f (canvas %d, raw score %.3f)\n",
              std::chrono::duration<double, std::milli>(t1 - t0).count() / calls, g.x.canvas, raw);
  return 0;
}
