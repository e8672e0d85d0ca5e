/* Option defaults; the option-table parser replaces lum_options_init. */
#include "options.h"
struct lum_options lum_opt = {
    .sample_interval = 512 * 1024, .prof_depth = 32, .prof = true,
    .large_threshold = 256 * 1024, .large_cache = 64u << 20,
    .diag = LUM_DIAG_CRITICAL, .decay_ms = 1000, .purge_mode = LUM_PURGE_DONTNEED, .psi = true,
};
void lum_options_init(void) {}
