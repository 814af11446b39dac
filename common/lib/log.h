/* log.h: one logging interface for every program and the engine.
 * Messages go to stderr (default) or syslog (after log_to_syslog()).
 * Each message should say what failed, on what, and why. */
#ifndef XNBD_LOG_H
#define XNBD_LOG_H

#include <stdbool.h>

enum log_level { LOG_LVL_ERROR = 0, LOG_LVL_WARN, LOG_LVL_INFO, LOG_LVL_DEBUG };

void log_init(const char *progname, enum log_level level);
void log_to_syslog(void);
void log_set_level(enum log_level level);
bool log_enabled(enum log_level level);

/* Another host's logger (nbdkit_error / nbdkit_debug): every message goes
 * to hook instead of stderr/syslog.  NULL restores the default. */
typedef void (*log_hook_fn)(enum log_level level, const char *msg);
void log_set_hook(log_hook_fn hook);

void log_msg(enum log_level level, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
/* For start-up failures and broken invariants only: logs and exits(1). */
void fatal(const char *fmt, ...)
  __attribute__((format(printf, 1, 2), noreturn));

#define log_error(...) log_msg(LOG_LVL_ERROR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) do { if (log_enabled(LOG_LVL_DEBUG)) \
                             log_msg(LOG_LVL_DEBUG, __VA_ARGS__); } while (0)

#endif
