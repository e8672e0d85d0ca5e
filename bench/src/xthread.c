/* xthread: producer/consumer with cross-thread frees (xmalloc-test style).  P producer
 * threads allocate batches of mixed small objects and hand them through a bounded
 * single-producer/single-consumer queue to their consumer thread, which frees them.  Every
 * free is remote: the allocator's cross-thread free path and its reclaim are what is timed.
 * usage: xthread [objects_per_producer=4M] [pairs=2] [batch=64] */
#include "bench_common.h"
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
/* Batches in flight per pair.  Small, so that peak RSS measures what the allocator keeps, not
 * how far the scheduler let a producer run ahead: at 256 (~7 MiB of blocks per pair) the same
 * allocator's peak came out anywhere from 3 to 19 MiB (ten runs each: mimalloc 3.7-19.2,
 * lumalloc 3.4-18.8), and one median or the other decided the RSS geomean.  At 16 (~0.5 MiB a
 * pair) each allocator's runs lie within 1 MiB (glibc 3.0-3.4, mimalloc 3.6-4.2, lumalloc
 * 2.9-3.9), and on a quiet machine the ratio of wall times is about the same (lumalloc/mimalloc
 * 0.57 against 0.54); with other jobs running, every allocator waits on its consumer more. */
#define QCAP 16
struct queue {
  _Alignas(64) _Atomic unsigned long head;
  _Alignas(64) _Atomic unsigned long tail;
  _Alignas(64) void **slots[QCAP];
};
struct pair { struct queue q; long objects; int batch; unsigned long long check; int id; };

static void *producer(void *arg) {
  struct pair *p = arg;
  uint64_t s = 777 + (uint64_t)p->id;
  for (long done = 0; done < p->objects;) {
    void **b = malloc(sizeof(void *) * (size_t)p->batch);
    for (int j = 0; j < p->batch; j++, done++) {
      size_t sz = size_mixed(&s, 2048);
      b[j] = malloc(sz);
      touch(b[j], sz, (unsigned char)j);
    }
    unsigned long t = atomic_load_explicit(&p->q.tail, memory_order_relaxed);
    while (t - atomic_load_explicit(&p->q.head, memory_order_acquire) >= QCAP) sched_yield();
    p->q.slots[t % QCAP] = b;
    atomic_store_explicit(&p->q.tail, t + 1, memory_order_release);
  }
  unsigned long t = atomic_load_explicit(&p->q.tail, memory_order_relaxed);
  while (t - atomic_load_explicit(&p->q.head, memory_order_acquire) >= QCAP) sched_yield();
  p->q.slots[t % QCAP] = NULL; /* end marker */
  atomic_store_explicit(&p->q.tail, t + 1, memory_order_release);
  return NULL;
}
static void *consumer(void *arg) {
  struct pair *p = arg;
  for (;;) {
    unsigned long h = atomic_load_explicit(&p->q.head, memory_order_relaxed);
    while (atomic_load_explicit(&p->q.tail, memory_order_acquire) == h) sched_yield();
    void **b = p->q.slots[h % QCAP];
    atomic_store_explicit(&p->q.head, h + 1, memory_order_release);
    if (!b) break;
    for (int j = 0; j < p->batch; j++) {
      p->check += ((unsigned char *)b[j])[0];
      free(b[j]);
    }
    free(b);
  }
  return NULL;
}
int main(int argc, char **argv) {
  long objects = arg_long(argc, argv, 1, 4000000L);
  int pairs = (int)arg_long(argc, argv, 2, 2);
  int batch = (int)arg_long(argc, argv, 3, 64);
  objects -= objects % batch;
  struct pair *ps = aligned_alloc(64, sizeof(struct pair) * (size_t)pairs);
  memset(ps, 0, sizeof(struct pair) * (size_t)pairs);
  pthread_t *th = malloc(sizeof(pthread_t) * 2 * (size_t)pairs);
  bench_gate();
  double t0 = bench_start();
  for (int i = 0; i < pairs; i++) {
    ps[i].objects = objects; ps[i].batch = batch; ps[i].id = i;
    pthread_create(&th[2 * i], NULL, consumer, &ps[i]);
    pthread_create(&th[2 * i + 1], NULL, producer, &ps[i]);
  }
  unsigned long long check = 0;
  for (int i = 0; i < 2 * pairs; i++) pthread_join(th[i], NULL);
  for (int i = 0; i < pairs; i++) check += ps[i].check;
  bench_report(t0, check);
  free(th);
  free(ps);
  return 0;
}
