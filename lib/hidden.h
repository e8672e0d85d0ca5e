/* LUM_HIDDEN on the declaration of a variable the library shares between its files.  The
 * library is built with -fvisibility=hidden, so the definitions are hidden already, but a file
 * that only sees the declaration must assume the variable may live in another module and
 * reads its address from the GOT first (relaxed by the linker to a lea, still an instruction).
 * Declared hidden, it is addressed straight off %rip: `mov lum_opt+40(%rip)` instead of a lea
 * and a load.  lumalloc_registry, the one exported variable, stays without. */
#ifndef LUM_HIDDEN_H
#define LUM_HIDDEN_H
#define LUM_HIDDEN __attribute__((visibility("hidden")))
#endif
