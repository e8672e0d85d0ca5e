/* Symbolisation for reports and warnings.  dladdr covers exported symbols and is cheap; code in
 * executables (static symbols, no -rdynamic) needs the ELF .symtab, which elfsym.c reads from
 * the object's file, at a cost that only report writers (LUM_SYM_DEEP) pay. */
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <string.h>
#include "obs_internal.h"

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

void lum_symbolize(uintptr_t addr, char *buf, size_t len, unsigned flags)
{
    Dl_info di;
    const ElfW(Sym) *sym = NULL;
    memset(&di, 0, sizeof di);
    bool found = dladdr1((void *)addr, &di, (void **)&sym, RTLD_DL_SYMENT) != 0;
    const char *mod = found && di.dli_fname && di.dli_fname[0] ? base_name(di.dli_fname) : NULL;
    char modsuf[160] = "";
    if ((flags & LUM_SYM_MODULE) && mod)
        snprintf(modsuf, sizeof modsuf, " (%s)", mod);
    /* dladdr answers with the nearest exported symbol below addr, however far: code of a local
     * one (start_thread in a stripped libc) came out as pthread_condattr_setpshared+0x514.  An
     * address past the symbol's size is not its. */
    if (found && di.dli_sname && sym && sym->st_size && addr - (uintptr_t)di.dli_saddr >= sym->st_size)
        di.dli_sname = NULL;
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
        if (lum_elf_proc_name(addr, name, sizeof name, &off)) {
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
