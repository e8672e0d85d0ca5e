/* measure: run a command and report its wall time and peak RSS.
 *   measure [-t SECONDS] RESULT_FILE cmd [args...]
 * Writes "wall=<s>\nmaxrss_kib=<KiB>\nru_maxrss_kib=<KiB>\npolled_rss_kib=<KiB>\n
 * status=<exit code or -signal>\ntimeout=<0|1>\n" to RESULT_FILE and exits with the command's
 * status.  With -t, the command is killed (SIGKILL) after SECONDS and timeout=1 is reported,
 * with the peak RSS it had reached.
 * Why not wait4 from the harness directly: Linux carries a process's RSS high-water mark
 * across fork and exec, so a child forked from a 20 MB Python would report >= 20 MB.  This
 * launcher is tiny, so its children start from ~1 MB.
 * Why poll: from Linux 6.2 a process's RSS is kept in per-CPU counters, and the high-water mark
 * behind ru_maxrss comes from their approximate reading: each of the three RSS counters can be
 * off by a batch (32 pages here) per CPU, either way.  On a 1.5 MiB program that is more than
 * the differences between allocators (churn under glibc: exact peak 1148 KiB, ru_maxrss
 * 1524).  From 6.16, /proc/PID/statm sums the per-CPU parts, so the launcher reads it every
 * POLL_US and keeps the highest: maxrss_kib, the figure the bench reports, is that polled peak.
 * A spike shorter than POLL_US is seen only by ru_maxrss, so where ru_maxrss exceeds the polled
 * peak by more than the counters' error can explain, ru_maxrss is reported instead.  A pread of
 * statm costs ~2 us: ~0.4% of one CPU.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#define POLL_US 500
static volatile pid_t child;

/* resident KiB of pid by /proc/PID/statm, or 0 once it has gone */
static long statm_rss_kib(int fd) {
  char buf[128];
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return 0;
  buf[n] = 0;
  long size, resident;
  if (sscanf(buf, "%ld %ld", &size, &resident) != 2) return 0;
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}
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
  /* SIGCHLD ends the wait between readings at once, so that neither the exit stop nor the
   * reaping waits out a poll interval (the wall time would grow by it) */
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, NULL);
  int go[2];
  if (pipe2(go, O_CLOEXEC) < 0) { perror("pipe"); return 2; }
  pid_t pid = fork();
  if (pid < 0) { perror("fork"); return 2; }
  if (pid == 0) {
    char c;
    sigprocmask(SIG_UNBLOCK, &chld, NULL);
    close(go[1]);
    if (read(go[0], &c, 1) != 1) _exit(127); /* the launcher has seized us (or gave up) */
    execvp(argv[a + 1], argv + a + 1);
    perror(argv[a + 1]);
    _exit(127);
  }
  close(go[0]);
  /* Traced for one event only: the stop as it exits, before its memory is torn down, when the
   * last reading is taken.  Exit is where many programs peak (printing results faults in
   * stdio's code: ~350 KiB of libc in `churn`), and a reading every POLL_US would miss it. */
  ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACEEXIT | PTRACE_O_EXITKILL);
  if (write(go[1], "g", 1) != 1) { perror("write"); return 2; }
  close(go[1]);
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
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/statm", (int)pid);
  int statm = open(path, O_RDONLY | O_CLOEXEC);
  long polled = 0;
  int status;
  struct rusage ru;
  for (;;) {
    pid_t r = wait4(pid, &status, statm >= 0 ? WNOHANG : 0, &ru);
    if (r < 0) continue; /* EINTR from the alarm */
    if (r == pid && WIFSTOPPED(status)) {
      int sig = WSTOPSIG(status), event = status >> 16;
      if (event == PTRACE_EVENT_EXIT) {
        long kib = statm_rss_kib(statm);
        if (kib > polled) polled = kib;
      }
      if (event) sig = 0; /* an event or group stop, not a signal to pass on */
      ptrace(PTRACE_CONT, pid, 0, sig);
      continue;
    }
    if (r == pid) break;
    long kib = statm_rss_kib(statm);
    if (kib > polled) polled = kib;
    struct timespec ts = {0, POLL_US * 1000L};
    sigtimedwait(&chld, NULL, &ts);
  }
  if (statm >= 0) close(statm);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  long cpus = sysconf(_SC_NPROCESSORS_CONF), batch = cpus * 2 > 32 ? cpus * 2 : 32;
  long counter_error_kib = 3 * cpus * batch * (sysconf(_SC_PAGESIZE) / 1024);
  long peak = ru.ru_maxrss > polled + counter_error_kib || polled == 0 ? ru.ru_maxrss : polled;
  FILE *f = fopen(argv[a], "w");
  if (f) {
    fprintf(f, "wall=%.6f\nmaxrss_kib=%ld\nru_maxrss_kib=%ld\npolled_rss_kib=%ld\nstatus=%d\ntimeout=%d\n",
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9,
            peak, ru.ru_maxrss, polled, code, (int)timed_out);
    fclose(f);
  }
  return code >= 0 ? code : 128 - code;
}
