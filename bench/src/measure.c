/* measure: run a command and report its wall time and peak RSS.
 *   measure [-t SECONDS] RESULT_FILE cmd [args...]
 * Writes "wall=<s>\nmaxrss_kib=<KiB>\nstatus=<exit code or -signal>\ntimeout=<0|1>\n" to
 * RESULT_FILE and exits with the command's status.  With -t, the command is killed (SIGKILL)
 * after SECONDS and timeout=1 is reported, with the peak RSS it had reached.
 * Why not wait4 from the harness directly: Linux carries a process's RSS high-water mark
 * across fork and exec, so a child forked from a 20 MB Python would report >= 20 MB.  This
 * launcher is tiny, so its children start from ~1 MB. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static volatile pid_t child;
static volatile sig_atomic_t timed_out;
static void on_alarm(int sig) {
  (void)sig;
  timed_out = 1;
  if (child > 0) kill(child, SIGKILL);
}
int main(int argc, char **argv) {
  double limit = 0;
  int a = 1;
  if (argc > 2 && !strcmp(argv[1], "-t")) { limit = atof(argv[2]); a = 3; }
  if (argc < a + 2) { fprintf(stderr, "usage: measure [-t SECONDS] RESULT_FILE cmd [args...]\n"); return 2; }
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pid_t pid = fork();
  if (pid < 0) { perror("fork"); return 2; }
  if (pid == 0) {
    execvp(argv[a + 1], argv + a + 1);
    perror(argv[a + 1]);
    _exit(127);
  }
  child = pid;
  signal(SIGINT, SIG_IGN); /* the child decides; we only report */
  if (limit > 0) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 0}, {(time_t)limit, (suseconds_t)((limit - (double)(time_t)limit) * 1e6)}};
    setitimer(ITIMER_REAL, &it, NULL);
  }
  int status;
  struct rusage ru;
  while (wait4(pid, &status, 0, &ru) < 0) {}
  clock_gettime(CLOCK_MONOTONIC, &t1);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  FILE *f = fopen(argv[a], "w");
  if (f) {
    fprintf(f, "wall=%.6f\nmaxrss_kib=%ld\nstatus=%d\ntimeout=%d\n",
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9, ru.ru_maxrss, code,
            (int)timed_out);
    fclose(f);
  }
  return code >= 0 ? code : 128 - code;
}
