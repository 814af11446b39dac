/* daemon.h: becoming a daemon without losing start-up errors.
 * daemon_start() forks at once (before any thread exists); the parent
 * waits until the child calls daemon_ready() and exits 0, or exits 1 if the
 * child dies first (its error message went to the terminal's stderr). */
#ifndef XNBD_DAEMON_H
#define XNBD_DAEMON_H

void daemon_start(void);
/* In the child, once serving: detach from the terminal, log to syslog. */
void daemon_ready(void);

#endif
