/* A library whose constructor, run by dlopen under the loader's lock, says it is running and
 * waits for a byte: test_loader_lock's allocating thread sends it only once its malloc returns. */
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void wait_for_go(void)
{
    const char *ready = getenv("LUM_TEST_CTOR_READY"), *go = getenv("LUM_TEST_CTOR_GO");
    char c = 1;
    if (!ready || !go || write(atoi(ready), &c, 1) != 1)
        return;
    while (read(atoi(go), &c, 1) < 0) {}
}
