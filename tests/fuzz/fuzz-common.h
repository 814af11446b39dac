/* fuzz-common.h: helpers shared by the libFuzzer harnesses (tests/fuzz/).
 *
 * Logging: the code under test logs at debug level, so every message's
 * formatting (which often quotes the input) runs, but into /dev/null:
 * `stderr` is swapped for a /dev/null stream.  libFuzzer keeps the stream
 * it saved at start-up and the sanitizers write to file descriptor 2, so
 * their reports still show.  FUZZ_LOG=1 in the environment keeps the
 * messages on the real stderr (for reproducing a crash). */
#ifndef XNBD_FUZZ_COMMON_H
#define XNBD_FUZZ_COMMON_H

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#include <event2/event.h>

#include "log.h"
#include "util.h"

static inline void fuzz_quiet_logs(const char *prog)
{
  log_init(prog, LOG_LVL_DEBUG);
  /* Peers that hang up must give EPIPE, as in the daemons. */
  signal(SIGPIPE, SIG_IGN);
  if (getenv("FUZZ_LOG"))
    return;
  FILE *devnull = fopen("/dev/null", "w");
  if (devnull)
    stderr = devnull;
}

/* A broken expectation of the harness (not of the code under test's
 * input handling): report and abort, so libFuzzer saves the input. */
#define FUZZ_CHECK(cond, ...) do {                                        \
    if (!(cond)) {                                                        \
      dprintf(2, "fuzz check failed: %s: ", #cond);                      \
      dprintf(2, __VA_ARGS__);                                           \
      dprintf(2, "\n");                                                  \
      abort();                                                           \
    }                                                                     \
  } while (0)

/* The peer of a server under test, driven by the harness's event loop:
 * writes the input, half-closes, and reads and discards what the server
 * sends until it closes.  It writes at most FUZZ_CHUNK bytes a turn, so
 * the server also meets messages split across reads.  It reads only once its writing is done or
 * would block, so a server that answers faster than its client reads
 * meets backpressure (and cannot deadlock the run: a blocked writer
 * reads). */
#define FUZZ_CHUNK 4096

struct fuzz_client {
  struct event_base *base;
  int fd;
  const uint8_t *data;
  size_t len, off;
  bool writing, eof;
  bool hangup;                   /* close the socket once written, unread */
  uint64_t received;
  struct event *ev;
};

static inline void fuzz_client_cb(evutil_socket_t fd, short what, void *arg)
{
  struct fuzz_client *c = arg;
  static uint8_t sink[64 * 1024];
  bool blocked = false;

  if ((what & EV_WRITE) && c->writing) {
    ssize_t n = c->off < c->len
                ? send(fd, c->data + c->off, MIN(c->len - c->off, FUZZ_CHUNK),
                       MSG_NOSIGNAL) : 0;
    if (n > 0)
      c->off += n;
    else if (n < 0 && (errno == EAGAIN || errno == EINTR))
      blocked = true;
    else if (n < 0)
      c->off = c->len;             /* the server hung up: stop writing */
    if (c->off == c->len && c->hangup) {
      /* Leave without reading the replies. */
      event_del(c->ev);
      close(fd);
      c->fd = -1;
      c->writing = false;
      c->eof = true;
      return;
    }
    if (c->off == c->len) {
      shutdown(fd, SHUT_WR);
      c->writing = false;
      event_del(c->ev);
      event_assign(c->ev, c->base, fd, EV_READ | EV_PERSIST, fuzz_client_cb, c);
      event_add(c->ev, NULL);
    }
  }
  if ((what & EV_READ) && (!c->writing || blocked || !(what & EV_WRITE))) {
    for (;;) {
      ssize_t n = recv(fd, sink, sizeof sink, 0);
      if (n > 0) { c->received += n; continue; }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
      c->eof = true;               /* EOF or reset: the server closed */
      event_del(c->ev);
      break;
    }
  }
}

/* Starts the client on fd (non-blocking).  When done, the caller frees
 * c->ev and closes c->fd unless it is -1 (hangup closed it). */
static inline void fuzz_client_start(struct fuzz_client *c, struct event_base *base,
                                     int fd, const uint8_t *data, size_t len)
{
  *c = (struct fuzz_client) { .base = base, .fd = fd, .data = data,
                              .len = len, .writing = true };
  evutil_make_socket_nonblocking(fd);
  c->ev = event_new(base, fd, EV_READ | EV_WRITE | EV_PERSIST, fuzz_client_cb, c);
  FUZZ_CHECK(c->ev, "event_new failed");
  event_add(c->ev, NULL);
}

#endif
