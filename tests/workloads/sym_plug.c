/* A shared object, stripped, with an exported function followed by a local one: dladdr names
 * an address in the local one after the exported one (see test_symbolize.c). */
int sym_plug_exported(int x);
void *sym_plug_local_address(void);

__attribute__((noinline)) int sym_plug_exported(int x)
{
    return x * 3 + 1;
}

static __attribute__((noinline, used)) int local_after_exported(int x)
{
    volatile int acc = 0;
    for (int i = 0; i < x; i++) acc += i * 7;
    return acc;
}

void *sym_plug_local_address(void)
{
    return (void *)local_after_exported;
}
