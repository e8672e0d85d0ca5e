/* lumalloc options: one table (name, default, LUMALLOC_* variable, description), read from the
 * environment at start-up.  Sizes take k/m/g/t suffixes (LUMALLOC_SAMPLE_INTERVAL=512k), switches
 * take on/off, yes/no, true/false, 1/0.  A bad value is reported once on stderr with the option's
 * name and accepted forms, and the default is kept. */
#ifndef LUMALLOC_OPTIONS_H
#define LUMALLOC_OPTIONS_H

#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One line per option: name, variable, current value, default, description. */
void lum_options_print(FILE *f);

/* The same as one JSON object: {"options":[{"name","env","value","text","default",
 * "description"}...]}; "value" is a number for sizes/counts/signals, a boolean for switches,
 * a string otherwise; "text" is the value as it would be written in the variable. */
void lum_options_print_json(FILE *f);

/* Sets an option at run time, by name ("sample_interval") or variable
 * ("LUMALLOC_SAMPLE_INTERVAL").  Returns 0, -ENOENT for an unknown name, -EINVAL for a bad value
 * (nothing changed).  large_threshold and large_warn take effect at once, in every thread;
 * fail_nth arms (0 or off: disarms) as lum_fail_nth does, counting from now.
 * Options the allocator reads only at start-up (thp, psi, prof_signal) take effect for new work
 * only, or not at all. */
int lum_options_set(const char *name, const char *value);

/* Current value of an option in its text form.  0 or -ENOENT. */
int lum_options_get(const char *name, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
