#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <gelf.h>
#include <libelf.h>
#include <string.h>
#include <unistd.h>

#include "tc.h"

struct elf_handle {
    int fd;
    Elf *elf;
};

static int elf_open(const char *path, struct elf_handle *h)
{
    elf_version(EV_CURRENT);
    h->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (h->fd < 0)
        return -1;
    h->elf = elf_begin(h->fd, ELF_C_READ_MMAP, NULL);
    if (!h->elf || elf_kind(h->elf) != ELF_K_ELF) {
        if (h->elf)
            elf_end(h->elf);
        close(h->fd);
        return -1;
    }
    return 0;
}

static void elf_close(struct elf_handle *h)
{
    elf_end(h->elf);
    close(h->fd);
}

/* The next section after scn (NULL: the first) of the given type, its header in *sh; NULL
 * when there is none.  A table's entry size is checked by its reader: a damaged or crafted
 * file can give 0, which it divides by. */
static Elf_Scn *next_section(Elf *elf, Elf_Scn *scn, Elf64_Word type, GElf_Shdr *sh)
{
    while ((scn = elf_nextscn(elf, scn)))
        if (gelf_getshdr(scn, sh) && sh->sh_type == type)
            return scn;
    return NULL;
}

static int find_in_symtab(Elf *elf, Elf64_Word type, const char *name, uint64_t *value)
{
    Elf_Scn *scn = NULL;
    GElf_Shdr sh;
    while ((scn = next_section(elf, scn, type, &sh))) {
        if (!sh.sh_entsize)
            continue;
        Elf_Data *d = elf_getdata(scn, NULL);
        if (!d)
            continue;
        size_t n = sh.sh_size / sh.sh_entsize;
        for (size_t i = 0; i < n; i++) {
            GElf_Sym s;
            if (!gelf_getsym(d, (int)i, &s) || s.st_shndx == SHN_UNDEF)
                continue;
            const char *nm = elf_strptr(elf, sh.sh_link, s.st_name);
            if (nm && strcmp(nm, name) == 0) {
                *value = s.st_value;
                return 0;
            }
        }
    }
    return -1;
}

int tc_elf_symbol(const char *path, const char *name, uint64_t *value)
{
    struct elf_handle h;
    if (elf_open(path, &h))
        return -1;
    int r = find_in_symtab(h.elf, SHT_DYNSYM, name, value);
    if (r)
        r = find_in_symtab(h.elf, SHT_SYMTAB, name, value);
    elf_close(&h);
    return r;
}

bool tc_elf_has_symtab(const char *path)
{
    struct elf_handle h;
    if (elf_open(path, &h))
        return false;
    GElf_Shdr sh;
    bool found = next_section(h.elf, NULL, SHT_SYMTAB, &sh) != NULL;
    elf_close(&h);
    return found;
}

bool tc_elf_has_lumalloc_probes(const char *path)
{
    struct elf_handle h;
    if (elf_open(path, &h))
        return false;
    size_t shstrndx;
    bool found = false;
    if (elf_getshdrstrndx(h.elf, &shstrndx) == 0) {
        Elf_Scn *scn = NULL;
        GElf_Shdr sh;
        while (!found && (scn = next_section(h.elf, scn, SHT_NOTE, &sh))) {
            const char *sn = elf_strptr(h.elf, shstrndx, sh.sh_name);
            if (!sn || strcmp(sn, ".note.stapsdt"))
                continue;
            Elf_Data *d = elf_getdata(scn, NULL);
            size_t off = 0, name_off, desc_off;
            GElf_Nhdr nh;
            while (d && (off = gelf_getnote(d, off, &nh, &name_off, &desc_off)) > 0) {
                /* desc: pc, base, semaphore (3 addresses), then "provider\0name\0args\0". */
                if (nh.n_type != 3 || nh.n_descsz < 3 * 8 + 1)
                    continue;
                /* the provider must end inside the note: a file's bytes are not to be trusted */
                const char *prov = (const char *)d->d_buf + desc_off + 3 * 8;
                size_t room = nh.n_descsz - 3 * 8;
                if (desc_off + nh.n_descsz <= d->d_size && strnlen(prov, room) < room &&
                    strcmp(prov, "lumalloc") == 0) {
                    found = true;
                    break;
                }
            }
        }
    }
    elf_close(&h);
    return found;
}

bool tc_elf_is_dyn(const char *path)
{
    struct elf_handle h;
    if (elf_open(path, &h))
        return false;
    GElf_Ehdr eh;
    bool dyn = gelf_getehdr(h.elf, &eh) && eh.e_type == ET_DYN;
    elf_close(&h);
    return dyn;
}

int tc_elf_load_bias(const char *path, const struct tc_map *file, const struct tc_map *maps, size_t n, uint64_t *bias)
{
    struct elf_handle h;
    if (elf_open(path, &h))
        return -1;
    GElf_Ehdr eh;
    int r = -1;
    if (!gelf_getehdr(h.elf, &eh))
        goto out;
    if (eh.e_type == ET_EXEC) {
        *bias = 0;
        r = 0;
        goto out;
    }
    size_t phnum;
    if (elf_getphdrnum(h.elf, &phnum))
        goto out;
    /* A mapping of this file at file offset `off` maps the PT_LOAD segment containing that
     * offset; its vaddr for that offset plus the bias is the mapping's start. */
    for (size_t i = 0; i < n && r; i++) {
        if (maps[i].inode != file->inode || maps[i].dev != file->dev)
            continue;
        for (size_t k = 0; k < phnum; k++) {
            GElf_Phdr ph;
            if (!gelf_getphdr(h.elf, (int)k, &ph) || ph.p_type != PT_LOAD)
                continue;
            uint64_t pg_off = ph.p_offset & ~(uint64_t)0xfff;
            if (maps[i].offset >= pg_off && maps[i].offset < ph.p_offset + ph.p_filesz) {
                uint64_t vaddr = (ph.p_vaddr & ~(uint64_t)0xfff) + (maps[i].offset - pg_off);
                *bias = maps[i].start - vaddr;
                r = 0;
                break;
            }
        }
    }
out:
    elf_close(&h);
    return r;
}

bool tc_elf_needs(const char *path, const char *substr, char *out, size_t outlen)
{
    struct elf_handle h;
    if (elf_open(path, &h))
        return false;
    bool found = false;
    Elf_Scn *scn = NULL;
    GElf_Shdr sh;
    while (!found && (scn = next_section(h.elf, scn, SHT_DYNAMIC, &sh))) {
        if (!sh.sh_entsize)
            continue; /* an entry size of 0 (a damaged or crafted file) divided by zero */
        Elf_Data *d = elf_getdata(scn, NULL);
        for (size_t i = 0; d && i < sh.sh_size / sh.sh_entsize; i++) {
            GElf_Dyn dyn;
            if (!gelf_getdyn(d, (int)i, &dyn) || dyn.d_tag != DT_NEEDED)
                continue;
            const char *nm = elf_strptr(h.elf, sh.sh_link, dyn.d_un.d_val);
            if (nm && strstr(nm, substr)) {
                snprintf(out, outlen, "%s", nm);
                found = true;
                break;
            }
        }
    }
    elf_close(&h);
    return found;
}

void tc_resolve_probed_binary(const char *path, char *real)
{
    if (!realpath(path, real))
        tc_die("no such file: %s", path);
    if (!tc_elf_has_lumalloc_probes(real))
        tc_die("%s has no lumalloc USDT probes (.note.stapsdt)", real);
}
