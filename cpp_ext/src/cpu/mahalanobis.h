// Squared Mahalanobis distances of PaDiM heads (#21): per position p and image k,
// out[k, p] = d^T A_p d with d = x[k, :, p] - mean[p], A_p given as its packed
// upper triangle in fp16 (row i: A_ii, then 2 A_ij for j > i); fp32 row sums, float64 totals.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tilead {
namespace cpu {

enum class MahalanobisPath { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Paths this CPU can run, best last ("scalar" always first).
std::vector<std::string> mahalanobis_paths();

// The path a name selects: "auto" (the best supported), "scalar", "avx2" or "avx512".
// Throws std::invalid_argument for an unknown name or a path this CPU cannot run.
MahalanobisPath mahalanobis_path(const std::string& name);

const char* mahalanobis_path_name(MahalanobisPath path);

// features (n, d, positions) f32, mean (positions, d) f32, packed (positions, d (d + 1) / 2) fp16 bits,
// out (n, positions) f32. Single-threaded; the arrays are trusted (bindings check them).
void mahalanobis(const float* features, int64_t n, int64_t d, int64_t positions, const float* mean,
                 const uint16_t* packed, float* out, MahalanobisPath path);

// Positions per lane block of mahalanobis_lanes' layout.
constexpr int64_t kMahalanobisLanes = 16;

// The same distances with positions in vector lanes: blocks of kMahalanobisLanes positions, B =
// ceil(positions / kMahalanobisLanes). mean_lanes (B, d, lanes) f32, packed_lanes (B, d (d + 1) / 2, lanes)
// fp16 bits (element e of position b * lanes + l at [b, e, l]; lanes past the last position are read but
// their results dropped). Per lane: t = sum over j >= i of A_ij x_j in four float32 chains (j - i mod 4),
// summed (t0 + t1) + (t2 + t3); acc += x_i t; every 8 rows acc joins a float64 total. No horizontal sums;
// every path computes the same per lane. Single-threaded; the arrays are trusted (bindings check them).
void mahalanobis_lanes(const float* features, int64_t n, int64_t d, int64_t positions, const float* mean_lanes,
                       const uint16_t* packed_lanes, float* out, MahalanobisPath path);

}  // namespace cpu
}  // namespace tilead
