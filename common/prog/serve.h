/* serve.h: the start-up and teardown every serving program shares
 * (xnbd-server, xnbd-proxy): the common options, daemonizing before any
 * thread exists, the I/O threads, the event loop, listeners, signals, pid
 * and port files, and the orderly end.
 *
 *   struct serve sv = SERVE_INIT;
 *   ... getopt: if (serve_option(&sv, c, optarg)) continue; ...
 *   serve_begin(&sv, "127.0.0.1:10809");     fork, threads, loop
 *   srv = xnbd_server_new(sv.base, ...); exports...
 *   rc = serve_run(&sv, srv);                 listen, ready, run until a signal
 *   xnbd_server_free(srv); program's own teardown
 *   serve_end(&sv);                           threads, loop, pidfile */
#ifndef XNBD_SERVE_H
#define XNBD_SERVE_H

#include <stdbool.h>

struct workq;
struct event_base;
struct xnbd_server;
struct cli_signals;

#define SERVE_MAX_LISTEN 16
/* getopt codes of the shared long options without a short form. */
#define SERVE_OPT_PORT_FILE 0x1000
#define SERVE_OPT_THREADS   0x1001
/* The shared long options, for a program's option table. */
#define SERVE_LONGOPTS \
  { "listen", required_argument, 0, 'l' }, \
  { "unix", required_argument, 0, 'u' }, \
  { "port-file", required_argument, 0, SERVE_OPT_PORT_FILE }, \
  { "pidfile", required_argument, 0, 'p' }, \
  { "daemon", no_argument, 0, 'd' }, \
  { "threads", required_argument, 0, SERVE_OPT_THREADS }, \
  { "verbose", no_argument, 0, 'v' }, \
  { "quiet", no_argument, 0, 'q' }

struct serve {
  /* Options (serve_option). */
  const char *tcp[SERVE_MAX_LISTEN], *unixp[SERVE_MAX_LISTEN];
  unsigned ntcp, nunix, threads;
  const char *pidfile, *portfile;
  bool daemonize;
  /* Running (serve_begin). */
  struct workq *wq;
  struct event_base *base;
  struct cli_signals *sigs;
};
#define SERVE_INIT { .threads = 8 }

/* -l/--listen, -u/--unix, --port-file, -p/--pidfile, -d/--daemon,
 * --threads, -v/--verbose, -q/--quiet.  Returns true if c was one of
 * them (bad values exit with a message). */
bool serve_option(struct serve *s, int c, const char *arg);
/* default_listen (may be NULL) when no listener was given; forks if
 * --daemon (before any thread); starts the I/O threads and the event
 * loop.  Exits with a message on failure. */
void serve_begin(struct serve *s, const char *default_listen);
/* Listeners, graceful signals, port and pid files, "ready" to a daemon's
 * parent; then runs until SIGTERM/SIGINT.  Returns 0, or 1 (logged). */
int serve_run(struct serve *s, struct xnbd_server *srv);
/* After the program freed its server and what uses the I/O threads:
 * WAN pumps, I/O threads, signals, loop, pid file; logs "stopped". */
void serve_end(struct serve *s);

#endif
