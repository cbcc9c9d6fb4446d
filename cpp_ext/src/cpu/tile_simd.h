// x86-64 AVX2 row converters for the tile kernel's hot path (direct sampling),
// chosen at run time when the CPU supports them; other CPUs (and the
// remainder of each row) use the portable loops in tile.cpp, which compilers
// vectorize on ARM (ld3 de-interleaving loads). The AVX2 code multiplies and
// adds separately (no FMA), so both paths give bit-identical results.
#pragma once

#include <cstdint>

namespace tilead {
namespace cpu {

struct RowConverters {
  // Convert `count` pixels (count % 16 == 0) of an interleaved 3-channel row:
  // channel c of the output reads channel order[c] of the input.
  void (*rgb_f32)(const uint8_t* src, int count, const int order[3], const float* scale, const float* bias, float* d0,
                  float* d1, float* d2);
  void (*rgb_f16)(const uint8_t* src, int count, const int order[3], const float* scale, const float* bias,
                  uint16_t* d0, uint16_t* d1, uint16_t* d2);
  // Convert `count` gray pixels (count % 16 == 0) into `outc` (1 or 3) planes.
  void (*gray_f32)(const uint8_t* src, int count, int outc, const float* scale, const float* bias, float* const* d);
  void (*gray_f16)(const uint8_t* src, int count, int outc, const float* scale, const float* bias, uint16_t* const* d);
};

// Converters for this CPU, or all-null when only the portable path applies.
const RowConverters& row_converters();

}  // namespace cpu
}  // namespace tilead
