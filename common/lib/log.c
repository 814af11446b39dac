#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static const char *prog = "xnbd";
static enum log_level cur_level = LOG_LVL_INFO;
static bool use_syslog;
static _Atomic(log_hook_fn) hook;

void log_set_hook(log_hook_fn fn) { hook = fn; }

void log_init(const char *progname, enum log_level level)
{
  const char *slash = strrchr(progname, '/');
  prog = slash ? slash + 1 : progname;
  cur_level = level;
}

void log_to_syslog(void)
{
  openlog(prog, LOG_PID, LOG_DAEMON);
  use_syslog = true;
}

void log_set_level(enum log_level level) { cur_level = level; }
bool log_enabled(enum log_level level) { return level <= cur_level; }

static void vlog(enum log_level level, const char *fmt, va_list ap)
{
  static const char *names[] = { "error", "warning", "info", "debug" };
  static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
  int saved = errno;
  char msg[2048];

  vsnprintf(msg, sizeof msg, fmt, ap);
  log_hook_fn h = hook;
  if (h)
    h(level, msg);
  else if (use_syslog)
    syslog(prio[level], "%s", msg);
  else {
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    /* One fprintf per line so concurrent threads do not interleave. */
    fprintf(stderr, "%02d:%02d:%02d.%03ld %s[%d]: %s: %s\n",
            tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
            prog, (int) getpid(), names[level], msg);
  }
  errno = saved;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
  va_list ap;
  if (!log_enabled(level))
    return;
  va_start(ap, fmt);
  vlog(level, fmt, ap);
  va_end(ap);
}

void fatal(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vlog(LOG_LVL_ERROR, fmt, ap);
  va_end(ap);
  exit(1);
}
