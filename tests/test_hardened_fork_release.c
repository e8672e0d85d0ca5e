/* test_fork_release.c against the hardened library, whose free-list checks abort a child
 * that walks a list into memory already given back. */
#include "test_fork_release.c"
