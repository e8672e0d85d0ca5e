/* realloc_grow: grow one buffer to a target size in fixed realloc steps, writing each new
 * step (an append-only log or a growing file read into memory).  An allocator that grows
 * large blocks in place or by mremap does this in O(n); one that copies does O(n^2) bytes.
 * usage: realloc_grow [target=1g] [step=1m] */
#include "bench_common.h"
int main(int argc, char **argv) {
  size_t target = (size_t)arg_long(argc, argv, 1, 1L << 30);
  size_t step = (size_t)arg_long(argc, argv, 2, 1L << 20);
  char *p = NULL;
  unsigned long long check = 0;
  bench_gate();
  double t0 = bench_start();
  for (size_t n = step; n <= target; n += step) {
    p = realloc(p, n);
    if (!p) { printf("error=realloc failed at %zu\n", n); return 1; }
    memset(p + n - step, (int)(n >> 20), step);
    check += (unsigned char)p[n / 2];
  }
  free(p);
  bench_report(t0, check);
  return 0;
}
