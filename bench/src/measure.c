/* measure: run a command and report its wall time and peak RSS.
 *   measure RESULT_FILE cmd [args...]
 * Writes "wall=<s>\nmaxrss_kib=<KiB>\nstatus=<exit code or -signal>\n" to RESULT_FILE and
 * exits with the command's status.  Why not wait4 from the harness directly: Linux carries a
 * process's RSS high-water mark across fork and exec, so a child forked from a 20 MB Python
 * would report >= 20 MB.  This launcher is tiny, so its children start from ~1 MB. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: measure RESULT_FILE cmd [args...]\n"); return 2; }
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pid_t pid = fork();
  if (pid < 0) { perror("fork"); return 2; }
  if (pid == 0) {
    execvp(argv[2], argv + 2);
    perror(argv[2]);
    _exit(127);
  }
  signal(SIGINT, SIG_IGN); /* the child decides; we only report */
  int status;
  struct rusage ru;
  while (wait4(pid, &status, 0, &ru) < 0) {}
  clock_gettime(CLOCK_MONOTONIC, &t1);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  FILE *f = fopen(argv[1], "w");
  if (f) {
    fprintf(f, "wall=%.6f\nmaxrss_kib=%ld\nstatus=%d\n",
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9, ru.ru_maxrss, code);
    fclose(f);
  }
  return code >= 0 ? code : 128 - code;
}
