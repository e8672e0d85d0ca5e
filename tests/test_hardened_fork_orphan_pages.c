/* test_fork_orphan_pages.c against the hardened library, whose free-list checks abort a child
 * that walks a list it finds torn on a page caught between hands. */
#define LUM_HARDENED 1 /* internal.h: the page structs as the hardened library lays them out */
#include "test_fork_orphan_pages.c"
