/* buffers: a ring of I/O buffers, 16-256 KiB, each written whole when it is taken (a server's
 * receive and compression buffers, a pipeline's queue of chunks).  Pages of such blocks hold a
 * handful of them, so every swing in how many are live empties a page or needs one: an
 * allocator that gives memory back at once and faults it in again shows it here.
 * usage: buffers [ops=200k] [live=256] */
#include "bench_common.h"
static size_t buffer_size(uint64_t *s, size_t unused) {
  static const size_t sizes[] = {16384, 24576, 32768, 65536, 100000, 131072, 200000, 262144};
  (void)unused;
  return sizes[rng_below(s, sizeof sizes / sizeof sizes[0])];
}
int main(int argc, char **argv) {
  ring_run(arg_long(argc, argv, 1, 200000L), arg_long(argc, argv, 2, 256), 4242, buffer_size, 0, 1);
  return 0;
}
