/* dlopen a plugin, make it fail an allocation, dlclose; again with its old address taken (it
 * loads elsewhere); then again after the file was replaced by another build (argv[2]). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
static void *fail_in(const char *path) {
  void *h = dlopen(path, RTLD_NOW);
  if (!h) { fprintf(stderr, "%s\n", dlerror()); exit(1); }
  void *(*f)(void) = (void *(*)(void))dlsym(h, "plug_fail");
  Dl_info di;
  dladdr((void *)f, &di);
  f();
  /* loaded long enough for a tracer that lags (a loaded machine) to read the mappings */
  usleep(1000000);
  dlclose(h);
  return di.dli_fbase;
}
int main(int argc, char **argv) {
  usleep(200000);
  void *first = fail_in(argv[1]);
  if (mmap(first, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != first) return 2;
  void *second = fail_in(argv[1]);
  munmap(first, 4096);
  if (rename(argv[2], argv[1])) return 3;
  fail_in(argv[1]);
  return first == second ? 4 : 0;
}
