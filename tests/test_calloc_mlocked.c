/* calloc in a process that locked its memory (mlockall: latency-sensitive services do): every
 * MADV_DONTNEED then fails (EINVAL on a locked mapping), so memory lumalloc gives back keeps
 * its bytes.  calloc must not take such memory for zero: its blocks are cleared whole, as where
 * purging is MADV_FREE.  Before: the slices' records were trimmed as if the purge had worked,
 * and a calloc carved on them cleared only the free list's link (0xa5 bytes read back). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "test_support.h"
#include "lumalloc_options.h"
#include "calloc_after_purge.h"

static int lock_everything(void **state)
{
    (void)state;
    /* no sample moves a block to a sampled page (cleared whole there) */
    if (lum_options_set("sample_interval", "0") != 0) return -1;
    struct rlimit r = {RLIM_INFINITY, RLIM_INFINITY};
    setrlimit(RLIMIT_MEMLOCK, &r); /* root may raise it; others keep theirs */
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0) {
        const char *ci = getenv("CI");
        print_message("%s: mlockall: %s\n", ci && !strcmp(ci, "true") ? "fail" : "skip", strerror(errno));
        /* 77: ctest's SKIP_RETURN_CODE for this test (tests/CMakeLists.txt); CI runs as root */
        exit(ci && !strcmp(ci, "true") ? 1 : 77);
    }
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(calloc_clears_what_a_purge_kept),
    };
    return cmocka_run_group_tests(tests, lock_everything, NULL);
}
