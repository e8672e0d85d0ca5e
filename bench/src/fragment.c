/* fragment: long-lived mixed lifetimes and fragmentation.  Objects get a lifetime drawn
 * from a heavy-tailed mix (most die within ~100 allocations, some live ~100k, a few forever)
 * and are freed by a timing wheel.  The size mix shifts between phases (small -> medium ->
 * small), so memory freed by one phase must be reusable by the next.  What it measures is
 * mostly peak RSS against the live bytes it reports.
 * usage: fragment [ops=6M] [phases=3] */
#include "bench_common.h"
#define WHEEL (1 << 18) /* max lifetime in steps */
struct node { struct node *next; size_t size; };
int main(int argc, char **argv) {
  long ops = arg_long(argc, argv, 1, 6000000L);
  int phases = (int)arg_long(argc, argv, 2, 3);
  struct node **wheel = calloc(WHEEL, sizeof *wheel);
  uint64_t s = 4242;
  size_t live = 0, peak_live = 0;
  struct node *forever = NULL;
  unsigned long long check = 0;
  bench_gate();
  double t0 = bench_start();
  for (long i = 0; i < ops; i++) {
    int phase = (int)(i * phases / ops);
    size_t sz;
    uint64_t r = rng_next(&s);
    if (phase & 1) sz = 512 + (r >> 20) % 7680;     /* medium phase: 512..8K */
    else sz = 16 + (r >> 20) % (phase ? 200 : 100); /* small phases, shifted */
    unsigned lt = (unsigned)(r & 1023);
    long life;
    if (lt < 800) life = 1 + (long)((r >> 10) % 128);
    else if (lt < 1000) life = 1000 + (long)((r >> 10) % 30000);
    else if (lt < 1022) life = 100000 + (long)((r >> 10) % (WHEEL - 100001));
    else life = -1;
    struct node *n = malloc(sz < sizeof *n ? sizeof *n : sz);
    n->size = sz;
    touch(n, sz, (unsigned char)i);
    live += sz;
    if (live > peak_live) peak_live = live;
    if (life < 0) { n->next = forever; forever = n; }
    else { long slot = (i + life) & (WHEEL - 1); n->next = wheel[slot]; wheel[slot] = n; }
    struct node **due = &wheel[i & (WHEEL - 1)];
    while (*due) {
      struct node *d = *due;
      *due = d->next;
      live -= d->size;
      check += d->size;
      free(d);
    }
  }
  printf("live_end_kib=%zu\npeak_live_kib=%zu\nrss_end_kib=%ld\n", live >> 10, peak_live >> 10, rss_kib());
  bench_report(t0, check);
  return 0;
}
