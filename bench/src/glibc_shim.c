/* glibc_shim: LD_PRELOAD this to force glibc's own allocator into a program that is linked
 * against another one (Debian's redis-server links libjemalloc).  Every entry point
 * forwards to glibc's __libc_* functions. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);
void *malloc(size_t n) { return __libc_malloc(n); }
void *calloc(size_t c, size_t n) { return __libc_calloc(c, n); }
void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }
void free(void *p) { __libc_free(p); }
void cfree(void *p) { __libc_free(p); }
void *memalign(size_t a, size_t n) { return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { return __libc_memalign(a, n); }
void *valloc(size_t n) { return __libc_valloc(n); }
void *pvalloc(size_t n) { return __libc_pvalloc(n); }
int posix_memalign(void **out, size_t a, size_t n) {
  if (a < sizeof(void *) || (a & (a - 1))) return EINVAL;
  void *p = __libc_memalign(a, n);
  if (!p && n) return ENOMEM;
  *out = p;
  return 0;
}
size_t malloc_usable_size(void *p) {
  static size_t (*real)(void *);
  if (!real) {
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    real = (size_t (*)(void *))dlsym(libc, "malloc_usable_size");
  }
  return real(p);
}
