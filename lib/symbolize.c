/* Symbolisation for reports and warnings.  dladdr covers exported symbols and is cheap; code in
 * executables (static symbols, no -rdynamic) needs the ELF .symtab, which libunwind's
 * get_proc_name reads, at a cost that only report writers (LUM_SYM_DEEP) pay.  That is the one
 * use of libunwind left (sampling reads the call frame information itself, cfi.c): it is
 * loaded by the first deep symbolisation, which runs outside the allocator, so a process that
 * never writes a report never maps it nor the liblzma it pulls in. */
#define _GNU_SOURCE 1
#define UNW_LOCAL_ONLY
#include <dlfcn.h>
#include <libunwind.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include "obs_internal.h"

#define LUM_STR_(x) #x
#define LUM_STR(x) LUM_STR_(x) /* the symbol a libunwind macro stands for, e.g. _ULx86_64_step */
static __typeof__(unw_get_accessors) *get_accessors;
static unw_addr_space_t *local_addr_space;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;

static void *unw_sym(void *lib, const char *name)
{
    void *p = dlsym(RTLD_DEFAULT, name); /* a program linked with libunwind has it already */
    return p ? p : lib ? dlsym(lib, name) : NULL;
}

static void unwind_load(void)
{
    void *lib = NULL;
    if (!dlsym(RTLD_DEFAULT, LUM_STR(unw_get_accessors))) {
        lib = dlopen("libunwind.so.8", RTLD_NOW | RTLD_LOCAL);
        if (!lib)
            lib = dlopen("libunwind.so", RTLD_NOW | RTLD_LOCAL);
    }
    local_addr_space = (unw_addr_space_t *)unw_sym(lib, LUM_STR(unw_local_addr_space));
    if (local_addr_space)
        get_accessors = (__typeof__(get_accessors))unw_sym(lib, LUM_STR(unw_get_accessors));
}

/* The name of the function holding addr from the object's symbol tables (libunwind reads the
 * ELF .symtab). */
static bool proc_name(uintptr_t addr, char *name, size_t len, uint64_t *off)
{
    pthread_once(&load_once, unwind_load);
    if (!get_accessors)
        return false;
    unw_word_t o = 0;
    /* libunwind's reader goes through the loader's list (dl_iterate_phdr) */
    pthread_rwlock_rdlock(&lum_unwind_fork_lock);
    unw_accessors_t *acc = get_accessors(*local_addr_space);
    bool ok = acc && acc->get_proc_name &&
              acc->get_proc_name(*local_addr_space, addr, name, len, &o, NULL) == 0 && name[0];
    pthread_rwlock_unlock(&lum_unwind_fork_lock);
    if (ok)
        *off = o;
    return ok;
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

void lum_symbolize(uintptr_t addr, char *buf, size_t len, unsigned flags)
{
    Dl_info di;
    memset(&di, 0, sizeof di);
    bool found = dladdr((void *)addr, &di) != 0;
    const char *mod = found && di.dli_fname && di.dli_fname[0] ? base_name(di.dli_fname) : NULL;
    char modsuf[160] = "";
    if ((flags & LUM_SYM_MODULE) && mod)
        snprintf(modsuf, sizeof modsuf, " (%s)", mod);
    if (found && di.dli_sname) {
        uintptr_t off = addr - (uintptr_t)di.dli_saddr;
        if ((flags & LUM_SYM_OFFSET) && off)
            snprintf(buf, len, "%s+0x%lx%s", di.dli_sname, (unsigned long)off, modsuf);
        else
            snprintf(buf, len, "%s%s", di.dli_sname, modsuf);
        return;
    }
    if (flags & LUM_SYM_DEEP) {
        char name[256];
        uint64_t off = 0;
        if (proc_name(addr, name, sizeof name, &off)) {
            if ((flags & LUM_SYM_OFFSET) && off)
                snprintf(buf, len, "%s+0x%lx%s", name, (unsigned long)off, modsuf);
            else
                snprintf(buf, len, "%s%s", name, modsuf);
            return;
        }
    }
    if (mod)
        snprintf(buf, len, "%s+0x%lx", mod, (unsigned long)(addr - (uintptr_t)di.dli_fbase));
    else
        snprintf(buf, len, "0x%lx", (unsigned long)addr);
}
