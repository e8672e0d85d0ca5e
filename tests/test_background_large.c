/* A process that has mapped little but one large block: freed, the block waits in the cache
 * of freed mappings, which only the background thread's decay empties while nothing new is
 * mapped.  The thread started only at 64 MiB mapped, so the block stayed resident for good
 * (python3 that had read a 25 MB file: 56 MiB, glibc 8); it now starts at 16 MiB of large
 * blocks, and the block goes back within the decay time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "lumalloc.h"
#include "lumalloc_stats.h"

static void *(*volatile p_malloc)(size_t) = malloc;

static void one_freed_large_block_decays(void **state)
{
    (void)state;
    static struct lum_stats a, b;
    char *p = p_malloc(24 << 20);
    assert_non_null(p);
    memset(p, 1, 24 << 20);
    free(p);
    lum_stats_snapshot(&a);
    assert_true(lum_background_running() & 1);
    /* decay 1 s, and the thread looks at half of it: 2.5 s with slack for a busy machine */
    for (int i = 0; i < 50; i++) {
        usleep(100 * 1000);
        lum_stats_snapshot(&b);
        if (a.resident - b.resident >= (20 << 20)) break;
    }
    printf("# resident %llu KiB after the free, %llu KiB later\n", (unsigned long long)a.resident / 1024,
           (unsigned long long)b.resident / 1024);
    assert_true(a.resident - b.resident >= (20 << 20));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(one_freed_large_block_decays),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
