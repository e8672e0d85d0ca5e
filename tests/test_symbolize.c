/* The names reports give code addresses (lum_symbolize): an address in a function that is not
 * exported, in a stripped object, is not named after the exported one before it (dladdr's
 * answer, however far the address is past that symbol's end); it is the object and offset. */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "obs_internal.h"

static void local_code_is_not_named_after_an_export(void **state)
{
    (void)state;
    void *h = dlopen(SYM_PLUG_PATH, RTLD_NOW | RTLD_LOCAL);
    assert_non_null(h);
    void *(*local_address)(void) = (void *(*)(void))dlsym(h, "sym_plug_local_address");
    uintptr_t exported = (uintptr_t)dlsym(h, "sym_plug_exported");
    assert_non_null(local_address);
    uintptr_t local = (uintptr_t)local_address();
    char name[256];
    lum_symbolize(exported + 2, name, sizeof name, LUM_SYM_OFFSET | LUM_SYM_MODULE | LUM_SYM_DEEP);
    printf("# exported+2: %s\n", name);
    assert_non_null(strstr(name, "sym_plug_exported"));
    lum_symbolize(local + 2, name, sizeof name, LUM_SYM_OFFSET | LUM_SYM_MODULE | LUM_SYM_DEEP);
    printf("# local+2: %s\n", name);
    assert_null(strstr(name, "sym_plug_"));
    assert_non_null(strstr(name, "libsym_plug.so+0x"));
    dlclose(h);
}

/* Inside malloc (LUM_SYM_INSIDE) the names come from the loader's index and the object's
 * .dynsym, not from dladdr (which waits for the loader's lock): the same names. */
static void inside_names_as_dladdr(void **state)
{
    (void)state;
    void *h = dlopen(SYM_PLUG_PATH, RTLD_NOW | RTLD_LOCAL);
    assert_non_null(h);
    void *(*local_address)(void) = (void *(*)(void))dlsym(h, "sym_plug_local_address");
    assert_non_null(local_address);
    const uintptr_t addrs[] = {
        (uintptr_t)dlsym(h, "sym_plug_exported") + 2, (uintptr_t)local_address() + 2,
        (uintptr_t)dlsym(RTLD_DEFAULT, "fprintf") + 3, (uintptr_t)dlsym(RTLD_DEFAULT, "qsort"),
        (uintptr_t)dlsym(RTLD_DEFAULT, "pthread_create") + 1,
    };
    for (size_t i = 0; i < sizeof addrs / sizeof addrs[0]; i++) {
        char by_dladdr[256], inside[256];
        lum_symbolize(addrs[i], by_dladdr, sizeof by_dladdr, LUM_SYM_OFFSET | LUM_SYM_MODULE);
        lum_symbolize(addrs[i], inside, sizeof inside, LUM_SYM_OFFSET | LUM_SYM_MODULE | LUM_SYM_INSIDE);
        printf("# %s | %s\n", by_dladdr, inside);
        assert_string_equal(inside, by_dladdr);
    }
    dlclose(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(local_code_is_not_named_after_an_export),
        cmocka_unit_test(inside_names_as_dladdr),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
