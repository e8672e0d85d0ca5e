/* The option table: parsing of every type, the bad-value path of every option (reported once,
 * default kept), run-time setting, and both printed forms. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "options.h"
#include "lumalloc_options.h"

/* Runs lum_options_init with fd 2 redirected to a file; returns what was written (static). */
static const char *init_capturing_stderr(void)
{
    static char out[8192];
    char path[] = "/tmp/lum_opt_stderrXXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    lum_options_init();
    dup2(saved, 2);
    close(saved);
    off_t n = lseek(fd, 0, SEEK_CUR);
    lseek(fd, 0, SEEK_SET);
    ssize_t r = read(fd, out, sizeof out - 1 < (size_t)n ? sizeof out - 1 : (size_t)n);
    out[r > 0 ? r : 0] = 0;
    close(fd);
    return out;
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void test_sizes_and_words(void **state)
{
    (void)state;
    char buf[64];
    static const struct { const char *in; const char *out; } sizes[] = {
        {"512k", "512k"}, {"512K", "512k"}, {"4m", "4m"}, {"4M", "4m"}, {"1g", "1g"},
        {"2KiB", "2k"}, {"3kb", "3k"}, {"4096", "4k"}, {"1000", "1000"}, {"0", "off"},
        {"off", "off"}, {"1t", "1t"},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        assert_int_equal(lum_options_set("sample_interval", sizes[i].in), 0);
        assert_int_equal(lum_options_get("sample_interval", buf, sizeof buf), 0);
        assert_string_equal(buf, sizes[i].out);
    }
    assert_int_equal(lum_options_set("LUMALLOC_SAMPLE_INTERVAL", "64k"), 0);
    assert_int_equal(lum_opt.sample_interval, 64 * 1024);
    /* Overflow and junk are refused and change nothing. */
    assert_int_equal(lum_options_set("sample_interval", "99999999999999999999"), -EINVAL);
    assert_int_equal(lum_options_set("sample_interval", "16777216t"), -EINVAL);
    assert_int_equal(lum_options_set("sample_interval", "12q"), -EINVAL);
    assert_int_equal(lum_options_set("sample_interval", ""), -EINVAL);
    assert_int_equal(lum_options_set("sample_interval", "-1"), -EINVAL);
    assert_int_equal(lum_opt.sample_interval, 64 * 1024);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);

    static const char *const yes[] = {"on", "ON", "1", "yes", "true", "enable", "enabled"};
    static const char *const no[] = {"off", "0", "no", "False", "disable", "disabled"};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) {
        assert_int_equal(lum_options_set("verbose", yes[i]), 0);
        assert_true(lum_opt.verbose);
    }
    for (size_t i = 0; i < sizeof no / sizeof *no; i++) {
        assert_int_equal(lum_options_set("verbose", no[i]), 0);
        assert_false(lum_opt.verbose);
    }
    assert_int_equal(lum_options_set("verbose", "maybe"), -EINVAL);

    assert_int_equal(lum_options_set("diag", "all"), 0);
    assert_int_equal(lum_opt.diag, LUM_DIAG_ALL);
    assert_int_equal(lum_options_set("diag", "NONE"), 0);
    assert_int_equal(lum_opt.diag, LUM_DIAG_NONE);
    assert_int_equal(lum_options_set("diag", "critical"), 0);
    assert_int_equal(lum_options_set("prof_format", "folded-alloc"), 0);
    assert_int_equal(lum_opt.prof_format, LUM_FMT_FOLDED_ALLOC);
    assert_int_equal(lum_options_set("prof_format", "auto"), 0);

    assert_int_equal(lum_options_set("prof_signal", "USR2"), 0);
    assert_int_equal(lum_opt.prof_signal, SIGUSR2);
    assert_int_equal(lum_options_set("prof_signal", "SIGUSR1"), 0);
    assert_int_equal(lum_opt.prof_signal, SIGUSR1);
    assert_int_equal(lum_options_set("prof_signal", "12"), 0);
    assert_int_equal(lum_opt.prof_signal, 12);
    assert_int_equal(lum_options_set("prof_signal", "RTMIN+2"), 0);
    assert_int_equal(lum_opt.prof_signal, SIGRTMIN + 2);
    assert_int_equal(lum_options_set("prof_signal", "9"), -EINVAL); /* SIGKILL */
    assert_int_equal(lum_options_set("prof_signal", "SEGV"), -EINVAL);
    /* glibc's own (32, 33: sigaction refuses them, the option was accepted and did nothing) */
    assert_int_equal(lum_options_set("prof_signal", "32"), -EINVAL);
    assert_int_equal(lum_options_set("prof_signal", "33"), -EINVAL);
    assert_int_equal(lum_options_set("prof_signal", "65"), -EINVAL);
    assert_int_equal(lum_options_set("prof_signal", "off"), 0);
    assert_int_equal(lum_opt.prof_signal, 0);
    /* words compare without regard to ASCII case, whole (options.c's own compare, not libc's) */
    assert_int_equal(lum_options_set("prof_signal", "sigusr1"), 0);
    assert_int_equal(lum_opt.prof_signal, SIGUSR1);
    assert_int_equal(lum_options_set("prof_signal", "rtMin+1"), 0);
    assert_int_equal(lum_opt.prof_signal, SIGRTMIN + 1);
    assert_int_equal(lum_options_set("prof_signal", "SI"), -EINVAL);
    assert_int_equal(lum_options_set("prof_signal", "usr"), -EINVAL);
    assert_int_equal(lum_options_set("prof_signal", "usr1x"), -EINVAL);
    assert_int_equal(lum_options_set("prof_signal", "Disabled"), 0);
    assert_int_equal(lum_opt.prof_signal, 0);
    assert_int_equal(lum_options_set("sample_interval", "OFFx"), -EINVAL);
    assert_int_equal(lum_options_set("sample_interval", "NoNe"), 0);
    assert_int_equal(lum_opt.sample_interval, 0);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
    assert_int_equal(lum_options_set("prof_format", "PPROF"), 0);
    assert_int_equal(lum_opt.prof_format, LUM_FMT_PPROF);
    assert_int_equal(lum_options_set("prof_format", "pprofx"), -EINVAL);
    assert_int_equal(lum_options_set("prof_format", "auto"), 0);

    assert_int_equal(lum_options_set("prof_depth", "1000"), 0);
    assert_int_equal(lum_opt.prof_depth, 64); /* clamped to LUM_MAX_FRAMES */
    assert_int_equal(lum_options_set("prof_depth", "2000"), -EINVAL);
    assert_int_equal(lum_options_set("prof_depth", "32"), 0);

    assert_int_equal(lum_options_set("prof_dump", "/tmp/x.folded"), 0);
    assert_string_equal(lum_opt.prof_dump, "/tmp/x.folded");
    assert_int_equal(lum_options_set("prof_dump", ""), 0);
    assert_null(lum_opt.prof_dump);

    assert_int_equal(lum_options_set("no_such_option", "1"), -ENOENT);
    assert_int_equal(lum_options_get("no_such_option", buf, sizeof buf), -ENOENT);
}

struct bad_case {
    const char *env;
    const char *bad;
    const char *name;
    const char *default_text; /* lum_options_get after the bad value */
};

static void test_bad_value_reported_once_default_kept(void **state)
{
    (void)state;
    static char longpath[5000];
    memset(longpath, 'a', sizeof longpath - 1);
    const struct bad_case cases[] = {
        {"LUMALLOC_SAMPLE_INTERVAL", "lots", "sample_interval", "512k"},
        {"LUMALLOC_PROF", "maybe", "prof", "on"},
        {"LUMALLOC_PROF_DEPTH", "deep", "prof_depth", "32"},
        {"LUMALLOC_PROF_DUMP", longpath, "prof_dump", ""},
        {"LUMALLOC_PROF_FORMAT", "svg", "prof_format", "auto"},
        {"LUMALLOC_PROF_SIGNAL", "SIGNOPE", "prof_signal", "off"},
        {"LUMALLOC_LARGE_THRESHOLD", "big", "large_threshold", "256k"},
        {"LUMALLOC_LARGE_WARN", "1x", "large_warn", "off"},
        {"LUMALLOC_LARGE_CACHE", "k", "large_cache", "128m"},
        {"LUMALLOC_FAIL_NTH", "third", "fail_nth", "off"},
        {"LUMALLOC_DIAG", "some", "diag", "critical"},
        {"LUMALLOC_ABORT_ON_FAILURE", "2", "abort_on_failure", "off"},
        {"LUMALLOC_DECAY_MS", "1s", "decay_ms", "1000"},
        {"LUMALLOC_PURGE", "discard", "purge", "dontneed"},
        {"LUMALLOC_BACKGROUND_PURGE", "y", "background_purge", "off"},
        {"LUMALLOC_PSI", "sometimes", "psi", "on"},
        {"LUMALLOC_THP", "always", "thp", "off"},
        {"LUMALLOC_HARDEN", "+", "harden", "off"},
        {"LUMALLOC_VERBOSE", "loud", "verbose", "off"},
        {"LUMALLOC_UNWIND_FILES", "maybe", "unwind_files", "on"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const struct bad_case *c = &cases[i];
        setenv(c->env, c->bad, 1);
        const char *err = init_capturing_stderr();
        /* One line naming the variable and the option, with the accepted forms. */
        assert_int_equal(count_lines(err), 1);
        assert_non_null(strstr(err, c->env));
        assert_non_null(strstr(err, c->name));
        assert_non_null(strstr(err, "expected"));
        assert_non_null(strstr(err, "keeping the default"));
        char val[128];
        assert_int_equal(lum_options_get(c->name, val, sizeof val), 0);
        assert_string_equal(val, c->default_text);
        /* Reported once: a second read of the same bad value is silent. */
        err = init_capturing_stderr();
        assert_string_equal(err, "");
        assert_int_equal(lum_options_get(c->name, val, sizeof val), 0);
        assert_string_equal(val, c->default_text);
        unsetenv(c->env);
    }
    /* Accepted forms are spelled out per type. */
    setenv("LUMALLOC_SAMPLE_INTERVAL", "lots", 1);
    unsetenv("LUMALLOC_SAMPLE_INTERVAL");
}

static void test_env_good_values(void **state)
{
    (void)state;
    setenv("LUMALLOC_SAMPLE_INTERVAL", "1m", 1);
    setenv("LUMALLOC_LARGE_WARN", "8m", 1);
    setenv("LUMALLOC_DIAG", "all", 1);
    setenv("LUMALLOC_PROF_DUMP", "/tmp/prof.pb", 1);
    const char *err = init_capturing_stderr();
    assert_string_equal(err, "");
    assert_int_equal(lum_opt.sample_interval, 1 << 20);
    assert_int_equal(lum_opt.large_warn, 8 << 20);
    assert_int_equal(lum_opt.diag, LUM_DIAG_ALL);
    assert_string_equal(lum_opt.prof_dump, "/tmp/prof.pb");
    /* The path is a copy: changing the environment later does not change the option. */
    setenv("LUMALLOC_PROF_DUMP", "/tmp/other", 1);
    assert_string_equal(lum_opt.prof_dump, "/tmp/prof.pb");
    unsetenv("LUMALLOC_SAMPLE_INTERVAL");
    unsetenv("LUMALLOC_LARGE_WARN");
    unsetenv("LUMALLOC_DIAG");
    unsetenv("LUMALLOC_PROF_DUMP");
    lum_options_set("sample_interval", "512k");
    lum_options_set("large_warn", "off");
    lum_options_set("diag", "critical");
    lum_options_set("prof_dump", "");
}

static char *print_to_string(void (*fn)(FILE *))
{
    /* static: open_memstream keeps the addresses until fclose, which -Wdangling-pointer
     * cannot see through. */
    static char *s;
    static size_t n;
    s = NULL;
    n = 0;
    FILE *f = open_memstream(&s, &n);
    assert_non_null(f);
    fn(f);
    fclose(f);
    return s;
}

static void test_print_text_and_json(void **state)
{
    (void)state;
    static const char *const envs[] = {
        "LUMALLOC_SAMPLE_INTERVAL", "LUMALLOC_PROF", "LUMALLOC_PROF_DEPTH", "LUMALLOC_PROF_DUMP",
        "LUMALLOC_PROF_FORMAT", "LUMALLOC_PROF_SIGNAL", "LUMALLOC_LARGE_THRESHOLD",
        "LUMALLOC_LARGE_WARN", "LUMALLOC_LARGE_CACHE", "LUMALLOC_FAIL_NTH", "LUMALLOC_DIAG",
        "LUMALLOC_ABORT_ON_FAILURE", "LUMALLOC_DECAY_MS", "LUMALLOC_PURGE",
        "LUMALLOC_BACKGROUND_PURGE", "LUMALLOC_PSI", "LUMALLOC_THP", "LUMALLOC_HARDEN",
        "LUMALLOC_VERBOSE",
    };
    assert_int_equal(lum_options_set("sample_interval", "256k"), 0);
    char *text = print_to_string(lum_options_print);
    for (size_t i = 0; i < sizeof envs / sizeof *envs; i++)
        assert_non_null(strstr(text, envs[i]));
    /* Current value and default on the sample_interval line. */
    char *line = strstr(text, "sample_interval ");
    assert_non_null(line);
    char *eol = strchr(line, '\n');
    *eol = 0;
    assert_non_null(strstr(line, "256k"));
    assert_non_null(strstr(line, "512k"));
    free(text);

    char *json = print_to_string(lum_options_print_json);
    assert_true(json[0] == '{');
    assert_non_null(strstr(json, "\"name\":\"sample_interval\",\"env\":\"LUMALLOC_SAMPLE_INTERVAL\","
                                 "\"value\":262144,\"text\":\"256k\",\"default\":\"512k\""));
    assert_non_null(strstr(json, "\"name\":\"prof\",\"env\":\"LUMALLOC_PROF\",\"value\":true"));
    assert_non_null(strstr(json, "\"name\":\"diag\",\"env\":\"LUMALLOC_DIAG\",\"value\":\"critical\""));
    for (size_t i = 0; i < sizeof envs / sizeof *envs; i++)
        assert_non_null(strstr(json, envs[i]));
    /* Balanced braces and brackets: a cheap structural check. */
    int braces = 0, brackets = 0;
    bool in_str = false;
    for (char *c = json; *c; c++) {
        if (*c == '"' && c[-1] != '\\')
            in_str = !in_str;
        if (in_str)
            continue;
        braces += (*c == '{') - (*c == '}');
        brackets += (*c == '[') - (*c == ']');
        assert_true(braces >= 0 && brackets >= 0);
    }
    assert_int_equal(braces, 0);
    assert_int_equal(brackets, 0);
    free(json);
    assert_int_equal(lum_options_set("sample_interval", "512k"), 0);
}

static void test_verbose_prints_table_at_init(void **state)
{
    (void)state;
    setenv("LUMALLOC_VERBOSE", "on", 1);
    const char *err = init_capturing_stderr();
    assert_non_null(strstr(err, "LUMALLOC_SAMPLE_INTERVAL"));
    assert_non_null(strstr(err, "description"));
    /* Printed once per process, however many times the environment is read. */
    err = init_capturing_stderr();
    assert_string_equal(err, "");
    unsetenv("LUMALLOC_VERBOSE");
    lum_options_set("verbose", "off");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes_and_words),
        cmocka_unit_test(test_bad_value_reported_once_default_kept),
        cmocka_unit_test(test_env_good_values),
        cmocka_unit_test(test_print_text_and_json),
        cmocka_unit_test(test_verbose_prints_table_at_init),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
