// Minimal fork-safe parallel_for for the CPU twins.
//
// Threads are started per call and joined before returning: no global pool, so
// nothing breaks after fork() (data-loader workers) and nothing outlives the
// module. A call is split into at most get_num_threads() contiguous chunks of
// at least `grain` items; small calls run on the calling thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "tilead/kernels.h"

namespace tilead {
namespace cpu {

template <typename Fn>
void parallel_for(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  const int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  const int64_t chunks = std::min<int64_t>(get_num_threads(), max_chunks);
  if (chunks <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(chunks));
  workers.reserve(static_cast<size_t>(chunks - 1));
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = c * per;
    const int64_t e = std::min(n, b + per);
    if (b >= e) break;
    workers.emplace_back([&fn, &errors, b, e, c] {
      try {
        fn(b, e);
      } catch (...) {
        errors[static_cast<size_t>(c)] = std::current_exception();
      }
    });
  }
  try {
    fn(int64_t{0}, std::min(n, per));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace cpu
}  // namespace tilead
