/* serve.c: see serve.h. */
#include "serve.h"
#include "cli.h"
#include "daemon.h"
#include "server.h"
#include "wan.h"
#include "workq.h"
#include "log.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

bool serve_option(struct serve *s, int c, const char *arg)
{
  switch (c) {
  case 'l':
    if (s->ntcp >= SERVE_MAX_LISTEN)
      fatal("too many --listen addresses (at most %d)", SERVE_MAX_LISTEN);
    s->tcp[s->ntcp++] = arg;
    return true;
  case 'u':
    if (s->nunix >= SERVE_MAX_LISTEN)
      fatal("too many --unix sockets (at most %d)", SERVE_MAX_LISTEN);
    s->unixp[s->nunix++] = arg;
    return true;
  case SERVE_OPT_PORT_FILE: s->portfile = arg; return true;
  case 'p': s->pidfile = arg; return true;
  case 'd': s->daemonize = true; return true;
  case SERVE_OPT_THREADS: s->threads = cli_uint("--threads", arg, 1, 256); return true;
  case 'v': log_set_level(LOG_LVL_DEBUG); return true;
  case 'q': log_set_level(LOG_LVL_ERROR); return true;
  }
  return false;
}

void serve_begin(struct serve *s, const char *default_listen)
{
  if (s->ntcp == 0 && s->nunix == 0 && default_listen)
    s->tcp[s->ntcp++] = default_listen;
  /* Fork before any thread exists; the parent exits when we are ready. */
  if (s->daemonize) daemon_start();
  signal(SIGPIPE, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  s->wq = workq_new(s->threads, "io");
  if (!s->wq) fatal("cannot start I/O threads: %s", strerror(errno));
  s->base = xnbd_event_base_new();
  if (!s->base) fatal("cannot create the event loop");
}

int serve_run(struct serve *s, struct xnbd_server *srv)
{
  for (unsigned i = 0; i < s->ntcp; i++)
    if (xnbd_server_listen_tcp(srv, s->tcp[i]) < 0) return 1;
  for (unsigned i = 0; i < s->nunix; i++)
    if (xnbd_server_listen_unix(srv, s->unixp[i]) < 0) return 1;
  /* Signals first: once the pidfile exists, SIGTERM must be graceful. */
  s->sigs = cli_signals_install(s->base, srv);
  if (s->portfile && xnbd_server_tcp_port(srv) >= 0 &&
      cli_write_number(s->portfile, xnbd_server_tcp_port(srv)) < 0)
    return 1;
  if (s->pidfile && cli_write_number(s->pidfile, (long) getpid()) < 0)
    return 1;
  if (s->daemonize) daemon_ready();
  event_base_dispatch(s->base);
  return 0;
}

void serve_end(struct serve *s)
{
  wan_wait_idle(3000);      /* WAN pumps end once their NBD side closed */
  workq_free(s->wq);
  cli_signals_free(s->sigs);
  event_base_free(s->base);
  if (s->pidfile) unlink(s->pidfile);
  log_info("stopped");
}
