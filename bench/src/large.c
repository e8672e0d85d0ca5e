/* large: large blocks and realloc growth.  A working set of 32 buffers; each step either
 * frees one and allocates a fresh large block (64 KiB..8 MiB, touched page by page) or grows
 * one by realloc (x1.5 up to 32 MiB, like a vector or a read buffer), then shrinks it back.
 * usage: large [ops=20000] */
#include "bench_common.h"
#define SLOTS 32
int main(int argc, char **argv) {
  long ops = arg_long(argc, argv, 1, 20000);
  void *buf[SLOTS] = {0};
  size_t len[SLOTS] = {0};
  uint64_t s = 99;
  unsigned long long check = 0;
  bench_gate();
  double t0 = bench_start();
  for (long i = 0; i < ops; i++) {
    int k = (int)rng_below(&s, SLOTS);
    if (!buf[k] || (rng_next(&s) & 3) == 0) {
      free(buf[k]);
      len[k] = 65536 + rng_below(&s, 8u << 20);
      buf[k] = malloc(len[k]);
      for (size_t o = 0; o < len[k]; o += 4096) ((char *)buf[k])[o] = (char)o;
    } else {
      size_t n = len[k] + len[k] / 2;
      if (n > (32u << 20)) n = 65536 + rng_below(&s, 1u << 20); /* shrink back */
      buf[k] = realloc(buf[k], n);
      for (size_t o = len[k] < n ? len[k] : n; o < n; o += 4096) ((char *)buf[k])[o] = 1;
      len[k] = n;
    }
    check += ((unsigned char *)buf[k])[0];
  }
  for (int k = 0; k < SLOTS; k++) free(buf[k]);
  bench_report(t0, check);
  return 0;
}
