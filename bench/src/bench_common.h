/* Shared helpers for lumalloc's benchmark programs.  The programs use only plain
 * malloc/free/realloc so that any allocator can be LD_PRELOADed under them.
 *
 * Conventions every program follows (bench/run relies on them):
 *   - the work is sized by command-line arguments (see each program's usage line);
 *   - if LUMBENCH_GATE=path is set, the program waits until that file exists before
 *     starting its timed section (lets a tracer attach first);
 *   - it prints "key=value" lines on stdout, at least "elapsed=<seconds>" for the timed
 *     section, "cpu=<seconds>" (process CPU time in it) and "check=<n>" (a checksum so the
 *     compiler keeps the work). */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* xorshift64*: small, fast, per-thread state. */
static inline uint64_t rng_next(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}
static inline uint64_t rng_below(uint64_t *s, uint64_t n) { return rng_next(s) % n; }

/* Size drawn from a skewed "real program" mix: mostly small, a tail of medium blocks. */
static inline size_t size_mixed(uint64_t *s, size_t max) {
  uint64_t r = rng_next(s);
  unsigned pick = (unsigned)(r & 1023);
  size_t sz;
  if (pick < 600) sz = 8 + (r >> 10) % 120;            /* 8..127    : 59% */
  else if (pick < 900) sz = 128 + (r >> 10) % 896;     /* 128..1023 : 29% */
  else if (pick < 1010) sz = 1024 + (r >> 10) % 15360; /* 1K..16K   : 11% */
  else sz = 16384 + (r >> 10) % (256 * 1024);          /* 16K..272K : 1%  */
  return sz > max ? max : sz;
}

static inline long arg_long(int argc, char **argv, int i, long def) {
  if (i < argc && argv[i][0]) {
    char *end;
    long v = strtol(argv[i], &end, 0);
    if (*end == 'k' || *end == 'K') v <<= 10;
    else if (*end == 'm' || *end == 'M') v <<= 20;
    else if (*end == 'g' || *end == 'G') v <<= 30;
    return v;
  }
  return def;
}

static inline void bench_gate(void) {
  const char *g = getenv("LUMBENCH_GATE");
  if (!g || !*g) return;
  printf("gate_wait=1\n");
  fflush(stdout);
  while (access(g, F_OK) != 0) usleep(2000);
}

/* Resident set size of this process in KiB (from /proc/self/statm). */
static inline long rss_kib(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long pages = 0, res = 0;
  if (!f) return -1;
  if (fscanf(f, "%ld %ld", &pages, &res) != 2) res = -1;
  fclose(f);
  return res < 0 ? -1 : res * (sysconf(_SC_PAGESIZE) / 1024);
}

static inline double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static double bench_cpu0;
/* Start of the timed section: returns the wall clock and notes the process CPU clock. */
static inline double bench_start(void) {
  bench_cpu0 = cpu_s();
  return now_s();
}
/* elapsed: wall seconds of the timed section; cpu: CPU seconds of all the process's threads
 * in it (less sensitive to other jobs on a shared machine than wall time). */
static inline void bench_report(double t0, unsigned long long check) {
  printf("elapsed=%.6f\ncpu=%.6f\ncheck=%llu\n", now_s() - t0, cpu_s() - bench_cpu0, check);
  fflush(stdout);
}

/* Touch a block the way a program would (first and last cache line) so the work is real. */
static inline void touch(void *p, size_t n, unsigned char v) {
  unsigned char *c = p;
  c[0] = v;
  if (n > 64) c[n - 1] = v;
}

/* A ring of live blocks, the oldest freed first: each step frees one and allocates another of
 * next_size(&seed, arg) bytes, then writes it whole or, as a program touching a record would,
 * its first and last cache line (touch).  Times the steps and prints the report. */
static inline __attribute__((always_inline)) void ring_run(long ops, long live, uint64_t seed,
                                                           size_t (*next_size)(uint64_t *, size_t),
                                                           size_t arg, int write_whole) {
  void **ring = calloc((size_t)live, sizeof(void *));
  unsigned long long check = 0;
  bench_gate();
  double t0 = bench_start();
  for (long i = 0; i < ops; i++) {
    long k = i % live;
    if (ring[k]) {
      check += ((unsigned char *)ring[k])[0];
      free(ring[k]);
    }
    size_t sz = next_size(&seed, arg);
    ring[k] = malloc(sz);
    if (write_whole) memset(ring[k], (int)i, sz);
    else touch(ring[k], sz, (unsigned char)i);
  }
  for (long k = 0; k < live; k++) free(ring[k]);
  free(ring);
  bench_report(t0, check);
}

#endif
