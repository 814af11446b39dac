#include "cli.h"
#include "server.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include <event2/event.h>

unsigned cli_uint(const char *opt, const char *s, unsigned min, unsigned max)
{
  char *end;
  unsigned long v;
  errno = 0;
  v = strtoul(s, &end, 10);
  if (errno || *end || !*s || *s == '-' || v < min || v > max)
    fatal("%s: '%s' is not a number from %u to %u", opt, s, min, max);
  return v;
}

uint64_t cli_size(const char *opt, const char *s)
{
  uint64_t v;
  const char *why;
  if (parse_size(s, &v, &why) < 0) fatal("%s '%s': %s", opt, s, why);
  return v;
}

int cli_write_number(const char *path, long v)
{
  FILE *f = fopen(path, "w");
  if (!f || fprintf(f, "%ld\n", v) < 0 || fclose(f) != 0) {
    log_error("cannot write '%s': %s", path, strerror(errno));
    return -1;
  }
  return 0;
}

struct cli_signals {
  struct event_base *base;
  struct xnbd_server *srv;
  struct event *ev[2];
};

static void shutdown_done(void *arg)
{
  struct cli_signals *s = arg;
  event_base_loopexit(s->base, NULL);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
  struct cli_signals *s = arg;
  log_info("signal %d: shutting down (finishing requests in flight)", (int) sig);
  xnbd_server_shutdown(s->srv, shutdown_done, s);
}

struct cli_signals *cli_signals_install(struct event_base *base,
                                        struct xnbd_server *srv)
{
  struct cli_signals *s = calloc(1, sizeof *s);
  if (!s) fatal("out of memory");
  s->base = base;
  s->srv = srv;
  s->ev[0] = evsignal_new(base, SIGTERM, on_signal, s);
  s->ev[1] = evsignal_new(base, SIGINT, on_signal, s);
  if (!s->ev[0] || !s->ev[1] || evsignal_add(s->ev[0], NULL) < 0 ||
      evsignal_add(s->ev[1], NULL) < 0)
    fatal("cannot install signal handlers");
  return s;
}

void cli_signals_free(struct cli_signals *s)
{
  if (!s) return;
  event_free(s->ev[0]);
  event_free(s->ev[1]);
  free(s);
}
