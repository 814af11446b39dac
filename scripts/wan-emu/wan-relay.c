/* wan-relay: a user-space TCP delay line, for WAN emulation on kernels
 * without sch_netem (scripts/wan-emu/README describes the whole emulator).
 *
 *   wan-relay --listen ADDR:PORT --connect ADDR:PORT --delay MS
 *             [--jitter MS] [--loss PCT] [--rate RATE] [--queue-limit SIZE]
 *             [--seed N] [--rt-priority N] [--pidfile FILE] [-v|-q]
 *
 * For every accepted connection it connects to the target and forwards
 * both directions.  Each chunk read from one side is stamped with a
 * release time and written to the other side no earlier than that:
 *
 *   release = arrival + delay + U(-jitter, +jitter)
 *             [+ loss penalty, with the probability below]
 *   release = max(release, release of the previous chunk)   (TCP order)
 *
 * arrival is when the chunk was read, or with --rate when its last byte
 * would have left an emulated wire of that rate (token bucket, burst of
 * 4 ms of the rate, at least 32 KiB).
 *
 * Loss model: TCP hides a lost segment behind a retransmission, so loss
 * shows up as delay, not as missing bytes.  A chunk of L bytes is counted
 * as ceil(L / 1448) segments; with probability 1 - (1 - PCT/100)^segments
 * one of them is "lost" and the chunk (and, by the order rule, everything
 * behind it) is held one extra round trip, 2 * delay + 1 ms: the time a
 * fast retransmit takes.  Not modelled: the sender's congestion window
 * shrinking after a loss, and retransmission timeouts.
 *
 * EOF is a chunk too: a FIN (or a reset) read from one side is passed on
 * with the same delay, after the data before it.  Errors close both
 * sides.  Backpressure: a side is not read once its direction holds
 * --queue-limit bytes (default: max(4 MiB, 2 * rate * delay) with --rate,
 * else 64 MiB), until that falls below three quarters of the limit.
 *
 * One thread, one epoll set; a timerfd is armed at the earliest release
 * time.  On a busy machine a normal-priority process wakes up to tens of
 * milliseconds late, which would show as extra delay; --rt-priority runs
 * the relay under SCHED_FIFO, as netem's timers run in the kernel.  Every connection is a small state machine (CONNECTING, OPEN,
 * CLOSED) and is freed only between event batches, so an event of the
 * same batch never touches freed memory. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

#define MSS 1448                       /* payload of one emulated segment */
#define MAX_CHUNK (256 * 1024)         /* largest read */
#define MAX_IOV 64                     /* chunks per writev */
#define READS_PER_EVENT 8              /* reads per readable event */
#define DEFAULT_QUEUE_LIMIT (64u << 20)
#define MIN_QUEUE_LIMIT (4u << 20)

enum chunk_kind { CHUNK_DATA, CHUNK_FIN, CHUNK_RST };

struct chunk {
  struct chunk *next;
  uint64_t release;                    /* CLOCK_MONOTONIC ns */
  enum chunk_kind kind;
  size_t len, off;                     /* off: bytes already written */
  char data[];
};

/* One direction of a connection: read from side i, written to side 1-i. */
struct dir {
  struct chunk *head, *tail;           /* owned; freed by dir_free */
  size_t queued;                       /* data bytes not yet written */
  uint64_t last_release;               /* of the newest chunk queued */
  uint64_t wire_free;                  /* --rate: when the wire is idle */
  uint64_t bytes, losses;
  bool eof;                            /* FIN or error read: read no more */
  bool paused;                         /* queue full: not read until it is
                                          below 3/4 of the limit */
  bool blocked;                        /* write hit EAGAIN: wait for EPOLLOUT */
  bool shut;                           /* FIN passed on, or the side it
                                          writes to failed: nothing more */
  int err;                             /* errno behind a queued CHUNK_RST */
};

enum relay_conn_state { CONN_CONNECTING, CONN_OPEN, CONN_CLOSED };
static const char *const state_names[] = { "connecting", "open", "closed" };

struct relay_conn;
struct side {
  struct relay_conn *conn;
  int idx;                             /* 0: accepted client, 1: upstream */
  int fd;
  uint32_t events;                     /* registered; 0 = not in the epoll set */
  bool hup;                            /* hung up or failed: watched only
                                          while there is still data to read */
};

struct relay_conn {
  struct relay_conn *next;
  unsigned id;
  enum relay_conn_state state;
  struct side side[2];
  struct dir dir[2];                   /* dir[i]: side i -> side 1-i */
  uint64_t opened;
  char peer[INET6_ADDRSTRLEN + 8];
};

static struct {
  uint64_t delay, jitter, loss_penalty; /* ns */
  double loss;                          /* probability per segment */
  uint64_t rate, burst_ns;              /* bytes/s (0: unlimited) */
  size_t queue_limit, chunk_size;
  uint64_t rng;
  struct addrinfo *target;
  const char *target_name;
  int epfd, lfd, tfd, sfd;
  bool listen_paused;
  uint64_t timer_armed;                 /* 0: disarmed */
  struct relay_conn *conns;
  unsigned next_id;
} R;

/* epoll tags for the fds that are not connection sides. */
static char tag_listen, tag_timer, tag_signal;
static char readbuf[MAX_CHUNK];

/* ------------------------------------------------------------- helpers */

static uint64_t rng_next(void)         /* splitmix64 */
{
  uint64_t z = (R.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static double rng_unit(void)           /* uniform in [0, 1) */
{
  return (rng_next() >> 11) * (1.0 / 9007199254740992.0);
}

/* Parses "20", "20ms", "1.5ms", "500us", "0.2s" into ns. */
static int parse_ms(const char *s, uint64_t *ns)
{
  char *end;
  double v, mul = 1e6;
  errno = 0;
  v = strtod(s, &end);
  if (errno || end == s || v < 0 || v != v)
    return -1;
  if (*end == '\0' || strcmp(end, "ms") == 0) mul = 1e6;
  else if (strcmp(end, "us") == 0) mul = 1e3;
  else if (strcmp(end, "s") == 0) mul = 1e9;
  else return -1;
  if (v * mul > 3600e9)
    return -1;
  *ns = (uint64_t) (v * mul + 0.5);
  return 0;
}

static int parse_pct(const char *s, double *frac)
{
  char *end;
  double v;
  errno = 0;
  v = strtod(s, &end);
  if (errno || end == s || (*end && strcmp(end, "%") != 0) || !(v >= 0 && v <= 100))
    return -1;
  *frac = v / 100;
  return 0;
}

static int set_nodelay(int fd)
{
  int one = 1;
  return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static const char *addr_str(const struct sockaddr *sa, char *buf, size_t len)
{
  char host[INET6_ADDRSTRLEN] = "?", port[8] = "?";
  getnameinfo(sa, sa->sa_family == AF_INET6 ? sizeof (struct sockaddr_in6)
                                            : sizeof (struct sockaddr_in),
              host, sizeof host, port, sizeof port, NI_NUMERICHOST | NI_NUMERICSERV);
  snprintf(buf, len, sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
  return buf;
}

/* ------------------------------------------------------------- queues */

static void dir_free(struct dir *d)
{
  struct chunk *c, *next;
  for (c = d->head; c; c = next) {
    next = c->next;
    free(c);
  }
  d->head = d->tail = NULL;
  d->queued = 0;
}

/* Probability that at least one of the chunk's segments is lost. */
static double chunk_loss_prob(size_t len)
{
  size_t segs = (len + MSS - 1) / MSS;
  double keep = 1, q = 1 - R.loss;
  for (; segs; segs >>= 1, q *= q)     /* keep = (1 - loss)^segs */
    if (segs & 1)
      keep *= q;
  return 1 - keep;
}

static uint64_t release_time(struct dir *d, enum chunk_kind kind, size_t len, bool *lost)
{
  uint64_t now = now_ns(), arrival = now, rel;

  if (R.rate) {
    uint64_t start = MAX(d->wire_free, now > R.burst_ns ? now - R.burst_ns : 0);
    d->wire_free = start + len * 1000000000ull / R.rate;
    arrival = MAX(d->wire_free, now);
  }
  rel = arrival + R.delay;
  if (R.jitter) {
    int64_t j = (int64_t) (rng_unit() * (2 * R.jitter + 1)) - (int64_t) R.jitter;
    rel = j < 0 && (uint64_t) -j > rel - arrival ? arrival : rel + j;
  }
  *lost = false;
  if (kind == CHUNK_DATA && R.loss > 0 && rng_unit() < chunk_loss_prob(len)) {
    rel += R.loss_penalty;
    *lost = true;
  }
  return MAX(rel, d->last_release);
}

/* Queues a chunk on d; returns -1 if out of memory. */
static int enqueue(struct relay_conn *c, int i, enum chunk_kind kind, const void *data, size_t len)
{
  struct dir *d = &c->dir[i];
  struct chunk *ch = malloc(sizeof *ch + len);
  bool lost;

  if (!ch)
    return -1;
  ch->next = NULL;
  ch->kind = kind;
  ch->len = len;
  ch->off = 0;
  if (len)
    memcpy(ch->data, data, len);
  ch->release = d->last_release = release_time(d, kind, len, &lost);
  if (lost) {
    d->losses++;
    log_debug("connection %u: %s chunk of %zu bytes lost, held %.1f ms more",
              c->id, i ? "downstream" : "upstream", len, R.loss_penalty / 1e6);
  }
  if (d->tail)
    d->tail->next = ch;
  else
    d->head = ch;
  d->tail = ch;
  d->queued += len;
  return 0;
}

/* ------------------------------------------------------------- connections */

static void relay_conn_close(struct relay_conn *c, bool reset, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

static void relay_conn_close(struct relay_conn *c, bool reset, const char *fmt, ...)
{
  char why[256], up[32], down[32];
  va_list ap;

  if (c->state == CONN_CLOSED)
    return;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  log_info("connection %u from %s closed (%s, was %s): %s up, %s down, "
           "%" PRIu64 "/%" PRIu64 " chunks held for loss, %.1f s",
           c->id, c->peer, why, state_names[c->state],
           human_size(c->dir[0].bytes, up, sizeof up),
           human_size(c->dir[1].bytes, down, sizeof down),
           c->dir[0].losses, c->dir[1].losses, (now_ns() - c->opened) / 1e9);
  for (int i = 0; i < 2; i++) {
    if (c->side[i].fd < 0)
      continue;
    if (reset) {
      struct linger lg = { .l_onoff = 1, .l_linger = 0 };
      setsockopt(c->side[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->side[i].fd);              /* also leaves the epoll set */
    c->side[i].fd = -1;
    c->side[i].events = 0;
    dir_free(&c->dir[i]);
  }
  c->state = CONN_CLOSED;
  if (R.listen_paused) {               /* a descriptor is free again */
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &tag_listen };
    if (epoll_ctl(R.epfd, EPOLL_CTL_ADD, R.lfd, &ev) == 0)
      R.listen_paused = false;
  }
}

static void relay_conn_opened(struct relay_conn *c)
{
  c->state = CONN_OPEN;
  log_info("connection %u from %s to %s open", c->id, c->peer, R.target_name);
}

/* Registers the events each side needs now: EPOLLIN while its direction
 * may read, EPOLLOUT while the other direction is blocked writing to it
 * (or, upstream, while the connect is in progress). */
static void relay_conn_update_events(struct relay_conn *c)
{
  if (c->state == CONN_CLOSED)
    return;
  for (int i = 0; i < 2; i++) {
    struct side *s = &c->side[i];
    struct dir *in = &c->dir[i], *out = &c->dir[1 - i];
    uint32_t ev = 0;
    struct epoll_event e;

    if (in->queued >= R.queue_limit && !in->paused) {
      in->paused = true;
      log_debug("connection %u: %s side paused, %zu bytes queued",
                c->id, i ? "upstream" : "client", in->queued);
    } else if (in->paused && in->queued < R.queue_limit / 4 * 3)
      in->paused = false;
    if (c->state == CONN_CONNECTING && i == 1)
      ev = EPOLLOUT;
    else {
      if (!in->eof && !in->paused && c->state == CONN_OPEN)
        ev |= EPOLLIN;
      if (out->blocked)
        ev |= EPOLLOUT;
    }
    /* A hung-up socket reports EPOLLHUP for ever: watch it only while
     * there is still something to read from it. */
    if (s->hup && !(ev & EPOLLIN))
      ev = 0;
    if (ev == s->events)
      continue;
    e.events = ev;
    e.data.ptr = s;
    if (epoll_ctl(R.epfd, !s->events ? EPOLL_CTL_ADD : ev ? EPOLL_CTL_MOD : EPOLL_CTL_DEL,
                  s->fd, &e) < 0) {
      relay_conn_close(c, true, "epoll_ctl: %s", strerror(errno));
      return;
    }
    s->events = ev;
  }
}

/* Side x failed with err (reset, write error): it can take no more data,
 * so what was queued for it is dropped; what it sent before the failure is
 * still delivered, then a reset, both with the usual delay. */
static void side_failed(struct relay_conn *c, int x, int err)
{
  struct dir *from = &c->dir[x], *to = &c->dir[1 - x];

  log_debug("connection %u: %s side failed: %s", c->id, x ? "upstream" : "client",
            strerror(err));
  dir_free(to);
  to->eof = to->shut = true;
  to->blocked = false;
  c->side[x].hup = true;               /* watch it no more */
  if (!from->eof) {
    from->eof = true;
    from->err = err;
    if (enqueue(c, x, CHUNK_RST, NULL, 0) < 0)
      relay_conn_close(c, true, "out of memory");
  }
}

/* Reads what side i has into dir[i]. */
static void relay_conn_read(struct relay_conn *c, int i)
{
  struct dir *d = &c->dir[i];
  const char *name = i ? "upstream" : "client";

  for (int n = 0; n < READS_PER_EVENT && !d->eof && d->queued < R.queue_limit; n++) {
    ssize_t r = read(c->side[i].fd, readbuf, R.chunk_size);
    if (r > 0) {
      if (enqueue(c, i, CHUNK_DATA, readbuf, r) < 0) {
        relay_conn_close(c, true, "out of memory queueing %zd bytes", r);
        return;
      }
      if ((size_t) r < R.chunk_size)
        break;                         /* drained for now */
      continue;
    }
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
      break;
    if (r < 0) {
      side_failed(c, i, errno);
      return;
    }
    log_debug("connection %u: EOF from %s side", c->id, name);
    d->eof = true;
    if (enqueue(c, i, CHUNK_FIN, NULL, 0) < 0)
      relay_conn_close(c, true, "out of memory");
    return;
  }
}

/* Writes every released chunk of dir[i] to side 1-i. */
static void relay_conn_flush(struct relay_conn *c, int i)
{
  struct dir *d = &c->dir[i];
  int to = c->side[1 - i].fd;
  const char *name = i ? "client" : "upstream";
  uint64_t now;

  if (c->state != CONN_OPEN || d->blocked || !d->head)
    return;
  now = now_ns();
  for (int round = 0; round < 64 && d->head && d->head->release <= now; round++) {
    struct iovec iov[MAX_IOV];
    struct chunk *ch;
    int cnt = 0;
    ssize_t w;

    if (d->head->kind == CHUNK_FIN) {
      ch = d->head;
      d->head = ch->next;
      if (!d->head)
        d->tail = NULL;
      free(ch);
      if (shutdown(to, SHUT_WR) < 0 && errno != ENOTCONN) {
        relay_conn_close(c, true, "shutdown of %s side: %s", name, strerror(errno));
        return;
      }
      d->shut = true;
      log_debug("connection %u: EOF passed on to %s side", c->id, name);
      continue;
    }
    if (d->head->kind == CHUNK_RST) {
      relay_conn_close(c, true, "%s side: %s", i ? "upstream" : "client", strerror(d->err));
      return;
    }
    for (ch = d->head; ch && cnt < MAX_IOV && ch->kind == CHUNK_DATA && ch->release <= now;
         ch = ch->next) {
      iov[cnt].iov_base = ch->data + ch->off;
      iov[cnt].iov_len = ch->len - ch->off;
      cnt++;
    }
    w = writev(to, iov, cnt);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        d->blocked = true;
        return;
      }
      side_failed(c, 1 - i, errno);
      return;
    }
    d->queued -= w;
    d->bytes += w;
    while (w > 0) {
      size_t left = d->head->len - d->head->off;
      if ((size_t) w < left) {
        d->head->off += w;
        d->blocked = true;             /* short write: the socket is full */
        return;
      }
      w -= left;
      ch = d->head;
      d->head = ch->next;
      if (!d->head)
        d->tail = NULL;
      free(ch);
    }
  }
}

static void relay_conn_event(struct side *s, uint32_t ev)
{
  struct relay_conn *c = s->conn;
  int err = 0;
  socklen_t len = sizeof err;

  if (c->state == CONN_CLOSED)
    return;
  if (c->state == CONN_CONNECTING) {
    if (s->idx != 1)
      return;
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      relay_conn_close(c, false, "connect to %s: %s", R.target_name, strerror(err));
      return;
    }
    relay_conn_opened(c);
    return;
  }
  if (ev & EPOLLERR) {
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    side_failed(c, s->idx, err ? err : EIO);
    return;
  }
  if (ev & EPOLLHUP)
    s->hup = true;
  if (ev & EPOLLOUT)
    c->dir[1 - s->idx].blocked = false; /* flushed in the sweep */
  if (ev & (EPOLLIN | EPOLLHUP))
    relay_conn_read(c, s->idx);
}

static void do_accept(void)
{
  for (int n = 0; n < 64; n++) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    struct relay_conn *c;
    int cfd, ufd;

    cfd = accept4(R.lfd, (struct sockaddr *) &ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        log_warn("accept: %s; not accepting until a connection closes", strerror(errno));
        if (epoll_ctl(R.epfd, EPOLL_CTL_DEL, R.lfd, NULL) == 0)
          R.listen_paused = true;
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                 errno != ECONNABORTED)
        log_warn("accept: %s", strerror(errno));
      return;
    }
    c = calloc(1, sizeof *c);
    if (!c) {
      log_warn("out of memory accepting a connection");
      close(cfd);
      return;
    }
    c->id = ++R.next_id;
    c->opened = now_ns();
    addr_str((struct sockaddr *) &ss, c->peer, sizeof c->peer);
    for (int i = 0; i < 2; i++) {
      c->side[i].conn = c;
      c->side[i].idx = i;
    }
    c->side[0].fd = cfd;
    c->side[1].fd = -1;
    c->state = CONN_CONNECTING;
    c->next = R.conns;
    R.conns = c;
    set_nodelay(cfd);

    ufd = socket(R.target->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (ufd < 0) {
      relay_conn_close(c, false, "socket: %s", strerror(errno));
      continue;
    }
    c->side[1].fd = ufd;
    set_nodelay(ufd);
    if (connect(ufd, R.target->ai_addr, R.target->ai_addrlen) == 0)
      relay_conn_opened(c);
    else if (errno != EINPROGRESS) {
      relay_conn_close(c, false, "connect to %s: %s", R.target_name, strerror(errno));
      continue;
    }
    relay_conn_update_events(c);
  }
}

/* Flushes released chunks, closes finished connections, frees closed
 * ones and arms the timer at the earliest pending release. */
static void sweep(void)
{
  struct relay_conn **pp = &R.conns, *c;
  uint64_t earliest = UINT64_MAX;

  while ((c = *pp) != NULL) {
    if (c->state == CONN_OPEN) {
      relay_conn_flush(c, 0);
      relay_conn_flush(c, 1);
      if (c->state == CONN_OPEN && c->dir[0].shut && c->dir[1].shut)
        relay_conn_close(c, false, "both sides finished");
    }
    if (c->state == CONN_CLOSED) {
      *pp = c->next;
      free(c);
      continue;
    }
    relay_conn_update_events(c);
    if (c->state == CONN_OPEN)
      for (int i = 0; i < 2; i++)
        if (c->dir[i].head && !c->dir[i].blocked)
          earliest = MIN(earliest, c->dir[i].head->release);
    pp = &c->next;
  }

  if (earliest == UINT64_MAX)
    earliest = 0;
  if (earliest != R.timer_armed) {
    struct itimerspec its = { 0 };
    if (earliest) {
      its.it_value.tv_sec = earliest / 1000000000u;
      its.it_value.tv_nsec = earliest % 1000000000u;
    }
    if (timerfd_settime(R.tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
      fatal("timerfd_settime: %s", strerror(errno));
    R.timer_armed = earliest;
  }
}

/* ------------------------------------------------------------- start-up */

static int open_listener(const char *spec)
{
  char *host = NULL, *port = NULL, name[INET6_ADDRSTRLEN + 8];
  const char *why;
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
  struct addrinfo *res;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  int fd, one = 1, rc;

  if (parse_host_port(spec, NULL, &host, &port, &why) < 0)
    fatal("--listen %s: %s", spec, why);
  rc = getaddrinfo(host, port, &hints, &res);
  if (rc)
    fatal("--listen %s: %s", spec, gai_strerror(rc));
  fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    fatal("--listen %s: socket: %s", spec, strerror(errno));
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 128) < 0)
    fatal("--listen %s: %s", spec, strerror(errno));
  freeaddrinfo(res);
  free(host);
  free(port);
  getsockname(fd, (struct sockaddr *) &ss, &sl);
  log_info("listening on %s, forwarding to %s", addr_str((struct sockaddr *) &ss, name, sizeof name),
           R.target_name);
  return fd;
}

static void resolve_target(const char *spec)
{
  char *host = NULL, *port = NULL;
  const char *why;
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV };
  int rc;

  if (parse_host_port(spec, NULL, &host, &port, &why) < 0)
    fatal("--connect %s: %s", spec, why);
  if (!host || !port || strcmp(port, "0") == 0)
    fatal("--connect %s: need HOST:PORT with a non-zero port", spec);
  rc = getaddrinfo(host, port, &hints, &R.target);
  if (rc)
    fatal("--connect %s: %s", spec, gai_strerror(rc));
  R.target_name = spec;
  free(host);
  free(port);
}

static void usage(FILE *f)
{
  fprintf(f,
"usage: wan-relay --listen ADDR:PORT --connect HOST:PORT --delay MS [options]\n"
"\n"
"Forwards each accepted TCP connection to HOST:PORT, holding the bytes of\n"
"each direction for MS (one way) before passing them on, in order.\n"
"\n"
"  -l, --listen ADDR:PORT    where to accept connections\n"
"  -c, --connect HOST:PORT   where to forward them\n"
"  -d, --delay MS            one-way delay per direction (\"20\", \"20ms\", \"500us\")\n"
"  -j, --jitter MS           add uniform [-MS, +MS] to each chunk's delay\n"
"                            (never reordering: a chunk waits for the previous one)\n"
"  -L, --loss PCT            segment loss probability in percent; a chunk with a\n"
"                            lost segment is held one more round trip (2*delay+1ms)\n"
"  -r, --rate RATE           also limit each direction to RATE (\"100mbit\", \"12M\")\n"
"  -Q, --queue-limit SIZE    stop reading a side while SIZE bytes wait in its\n"
"                            direction (default max(4M, 2*rate*delay), or 64M)\n"
"  -s, --seed N              random seed for jitter and loss (default: time)\n"
"  -R, --rt-priority N       run under SCHED_FIFO priority N (1-99) so busy\n"
"                            CPUs do not add delay; 0 (default) = normal\n"
"  -p, --pidfile FILE        write the PID to FILE once listening\n"
"  -v, --verbose             debug logging\n"
"  -q, --quiet               log errors only\n"
"  -h, --help                this help\n"
"  -V, --version             show the version\n");
}

static void on_signal_fd(bool *quit)
{
  struct signalfd_siginfo si;
  if (read(R.sfd, &si, sizeof si) == sizeof si) {
    log_info("signal %u received, closing %s", si.ssi_signo,
             R.conns ? "every connection" : "down");
    *quit = true;
  }
}

int main(int argc, char **argv)
{
  static const struct option longopts[] = {
    { "listen", required_argument, 0, 'l' },
    { "connect", required_argument, 0, 'c' },
    { "delay", required_argument, 0, 'd' },
    { "jitter", required_argument, 0, 'j' },
    { "loss", required_argument, 0, 'L' },
    { "rate", required_argument, 0, 'r' },
    { "queue-limit", required_argument, 0, 'Q' },
    { "seed", required_argument, 0, 's' },
    { "rt-priority", required_argument, 0, 'R' },
    { "pidfile", required_argument, 0, 'p' },
    { "verbose", no_argument, 0, 'v' },
    { "quiet", no_argument, 0, 'q' },
    { "help", no_argument, 0, 'h' },
    { "version", no_argument, 0, 'V' },
    { 0, 0, 0, 0 }
  };
  const char *listen_spec = NULL, *connect_spec = NULL, *pidfile = NULL, *why;
  bool have_delay = false, have_seed = false, quit = false;
  uint64_t qlimit = 0;
  long rt_prio = 0;
  struct epoll_event ev;
  sigset_t mask;
  int c;

  log_init(argv[0], LOG_LVL_INFO);
  while ((c = getopt_long(argc, argv, "l:c:d:j:L:r:Q:s:R:p:vqhV", longopts, NULL)) != -1) {
    switch (c) {
    case 'l': listen_spec = optarg; break;
    case 'c': connect_spec = optarg; break;
    case 'd':
      if (parse_ms(optarg, &R.delay) < 0)
        fatal("--delay %s: expected milliseconds, e.g. 20 or 20ms", optarg);
      have_delay = true;
      break;
    case 'j':
      if (parse_ms(optarg, &R.jitter) < 0)
        fatal("--jitter %s: expected milliseconds, e.g. 5 or 5ms", optarg);
      break;
    case 'L':
      if (parse_pct(optarg, &R.loss) < 0)
        fatal("--loss %s: expected a percentage from 0 to 100", optarg);
      break;
    case 'r':
      if (parse_rate(optarg, &R.rate, &why) < 0)
        fatal("--rate %s: %s", optarg, why);
      break;
    case 'Q':
      if (parse_size(optarg, &qlimit, &why) < 0 || qlimit == 0)
        fatal("--queue-limit %s: %s", optarg, qlimit ? why : "must be positive");
      break;
    case 's': {
      char *end;
      errno = 0;
      R.rng = strtoull(optarg, &end, 0);
      if (errno || *end || end == optarg)
        fatal("--seed %s: expected a number", optarg);
      have_seed = true;
      break;
    }
    case 'R': {
      char *end;
      errno = 0;
      rt_prio = strtol(optarg, &end, 10);
      if (errno || *end || end == optarg || rt_prio < 0 || rt_prio > 99)
        fatal("--rt-priority %s: expected 0 to 99", optarg);
      break;
    }
    case 'p': pidfile = optarg; break;
    case 'v': log_set_level(LOG_LVL_DEBUG); break;
    case 'q': log_set_level(LOG_LVL_ERROR); break;
    case 'h': usage(stdout); return 0;
    case 'V': printf("wan-relay %s\n", XNBD_VERSION); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (optind != argc || !listen_spec || !connect_spec || !have_delay) {
    usage(stderr);
    return 2;
  }
  if (!have_seed)
    R.rng = now_ns() ^ ((uint64_t) getpid() << 32);
  R.loss_penalty = 2 * R.delay + 1000000;
  if (R.rate) {
    uint64_t burst = MAX(R.rate / 250, 32768u);
    R.burst_ns = burst * 1000000000ull / R.rate;
    /* About 1 ms of the rate per chunk, so the emulated wire releases
     * data smoothly rather than in 256 KiB lumps. */
    R.chunk_size = MIN(MAX(R.rate / 1000, 16384u), (uint64_t) MAX_CHUNK);
  } else
    R.chunk_size = MAX_CHUNK;
  if (qlimit)
    R.queue_limit = qlimit;
  else if (R.rate)
    R.queue_limit = MAX((uint64_t) MIN_QUEUE_LIMIT,
                        2 * R.rate * R.delay / 1000000000u);
  else
    R.queue_limit = DEFAULT_QUEUE_LIMIT;

  if (rt_prio) {
    struct sched_param sp = { .sched_priority = (int) rt_prio };
    if (sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &sp) < 0)
      log_warn("--rt-priority %ld: %s; running at normal priority, delays may "
               "grow on a busy machine", rt_prio, strerror(errno));
  }
  signal(SIGPIPE, SIG_IGN);
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGHUP);
  if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0 ||
      (R.sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0)
    fatal("signalfd: %s", strerror(errno));
  R.epfd = epoll_create1(EPOLL_CLOEXEC);
  R.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (R.epfd < 0 || R.tfd < 0)
    fatal("epoll/timerfd: %s", strerror(errno));

  resolve_target(connect_spec);
  R.lfd = open_listener(listen_spec);
  log_info("delay %.3f ms, jitter %.3f ms, loss %.3f%%, rate %s, queue limit %zu bytes",
           R.delay / 1e6, R.jitter / 1e6, R.loss * 100,
           R.rate ? "limited" : "unlimited", R.queue_limit);

  ev.events = EPOLLIN;
  ev.data.ptr = &tag_listen;
  epoll_ctl(R.epfd, EPOLL_CTL_ADD, R.lfd, &ev);
  ev.data.ptr = &tag_timer;
  epoll_ctl(R.epfd, EPOLL_CTL_ADD, R.tfd, &ev);
  ev.data.ptr = &tag_signal;
  if (epoll_ctl(R.epfd, EPOLL_CTL_ADD, R.sfd, &ev) < 0)
    fatal("epoll_ctl: %s", strerror(errno));

  if (pidfile) {
    FILE *f = fopen(pidfile, "w");
    if (!f || fprintf(f, "%ld\n", (long) getpid()) < 0 || fclose(f) != 0)
      fatal("cannot write pidfile '%s': %s", pidfile, strerror(errno));
  }

  while (!quit) {
    struct epoll_event evs[64];
    int n = epoll_wait(R.epfd, evs, ARRAY_SIZE(evs), -1);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      fatal("epoll_wait: %s", strerror(errno));
    }
    for (int k = 0; k < n; k++) {
      void *p = evs[k].data.ptr;
      if (p == &tag_listen)
        do_accept();
      else if (p == &tag_timer) {
        uint64_t expirations;
        if (read(R.tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
          fatal("timerfd read: %s", strerror(errno));
        R.timer_armed = 0;             /* a one-shot timer is spent */
      } else if (p == &tag_signal)
        on_signal_fd(&quit);
      else
        relay_conn_event(p, evs[k].events);
    }
    sweep();
  }

  for (struct relay_conn *cn = R.conns; cn; cn = cn->next)
    relay_conn_close(cn, false, "relay shutting down");
  sweep();
  if (pidfile)
    unlink(pidfile);
  close(R.lfd);
  freeaddrinfo(R.target);
  return 0;
}
