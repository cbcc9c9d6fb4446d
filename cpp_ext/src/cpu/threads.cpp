#include <atomic>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

#include "tilead/kernels.h"

namespace tilead {
namespace cpu {

namespace {
// CPUs this process may run on (respects taskset / cgroup cpusets on Linux).
int default_threads() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}
std::atomic<int> g_threads{default_threads()};
thread_local int t_budget = 0;  // 0: none; kernels called from this thread use g_threads
}  // namespace

void set_num_threads(int n) { g_threads.store(n <= 0 ? default_threads() : n); }

int get_num_threads() { return t_budget > 0 ? t_budget : g_threads.load(); }

void set_thread_budget(int n) { t_budget = n <= 0 ? 0 : n; }

int get_thread_budget() { return t_budget; }

}  // namespace cpu
}  // namespace tilead
