/* calloc where MADV_DONTNEED answers success and keeps the bytes: qemu-user (amd64 containers on
 * arm64 hosts) has done so, and jemalloc probes for it the same way (opt_trust_madvise).
 * lumalloc tries it once on a page of its own at its first purge (lib/segment.c,
 * dontneed_zeroes); from then on calloc takes no purged memory for zero and clears its blocks
 * whole.  This test's madvise stands in for such a host: the test links the static library, so
 * the library's calls reach it.  With the probe taken out (dontneed_zeroes answering true),
 * calloc read back the 0xa5 bytes of the blocks before it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "test_support.h"
#include "lumalloc_options.h"
#include "calloc_after_purge.h"
#include "internal.h"

static volatile int dontneed_calls;

int madvise(void *addr, size_t len, int advice)
{
    if (advice == MADV_DONTNEED) {
        dontneed_calls++;
        return 0;
    }
    return (int)syscall(SYS_madvise, addr, len, advice);
}

static void purges_reached_this_madvise(void **state)
{
    (void)state;
    /* else the test proves nothing: the library's purges went some other way */
    assert_true(dontneed_calls > 0);
    /* and what made calloc clear was the probe's answer (nothing else distrusts here: no
     * fork, no MADV_FREE, no failed madvise) */
    assert_true(__atomic_load_n(&lum_zero_distrust, __ATOMIC_RELAXED) & LUM_DISTRUST_KEPT);
}

static int dontneed_purging_unsampled(void **state)
{
    (void)state;
    /* no sample moves a block to a sampled page (cleared whole there); purging the default way */
    if (lum_options_set("sample_interval", "0") != 0) return -1;
    if (lum_options_set("purge", "dontneed") != 0) return -1;
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(calloc_clears_what_a_purge_kept),
        cmocka_unit_test(purges_reached_this_madvise),
    };
    return cmocka_run_group_tests(tests, dontneed_purging_unsampled, NULL);
}
