/* source.c: the source transport (see source.h).  Connections are a small
 * state machine each (down -> connecting -> up -> down); requests wait in
 * two queues (urgent, normal) until a connection takes them. */
#include "source.h"
#include "minwin.h"
#include "log.h"
#include "util.h"
#include "identity.h"
#include "nbd-proto.h"   /* XNBD_META_COPIER */
#include "target.h"
#include "wan.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <libnbd.h>

#define MAX_CONNS 16
#define COMING_NS UINT64_C(2000000000)  /* how long background requests wait
                                         * for a connection still opening */
#define BACKOFF_MIN_MS 250
#define BACKOFF_MAX_MS 10000
#define MAX_ATTEMPTS 8          /* a request whose connection died this often fails */
#define MAX_SERVER_ERRORS 3     /* a request the source answered with an error */
#define LOG_EVERY_NS 10000000000u
#define RTT_BUCKET_NS 10000000000u
#define PROBE_EVERY_NS 250000000u
#define MISS_PROBE_MAX 8192u           /* a miss this small counts as a probe */

enum conn_state { CONN_DOWN, CONN_CONNECTING, CONN_UP };

struct sconn {
  struct nbd_handle *h;
  enum conn_state st;
  unsigned gen;                 /* bumped when closed: stale callbacks see it */
  unsigned inflight;
  uint64_t progress_ns;         /* last reply (or first request after idle) */
  bool proven;                  /* completed a request since it connected */
  bool go_sent;                 /* companion export asked for (option mode) */
  uint64_t connecting_at;       /* when its handshake began */
  struct source_req *submitted;
};

struct source {
  struct source_config cfg;
  char *target, *export_name;
  struct wan_tls *wan_tls;
  struct wan_counters *wire;    /* this source's WAN transport bytes */
  struct wan_early *early;      /* cfg.early_read, asked by the first connection */
  bool early_sent;
  uint64_t size;
  bool zeros_cheap;
  char id[SOURCE_ID_MAX + 1];   /* identity at start-up */

  pthread_mutex_t lock;         /* protects the queues, target switch, stats */
  struct source_req *urgent_head, *urgent_tail, *normal_head, *normal_tail;
  char *new_target;
  char last_error[512];
  uint64_t reconnects, dead_stalled, protocol_errors;

  /* Source thread only. */
  struct sconn c[MAX_CONNS];
  unsigned n;
  struct source_req *done;      /* completed by libnbd callbacks */
  unsigned backoff_ms;          /* shared: a bad source is not hammered n times */
  uint64_t retry_at;
  uint64_t last_log_ns;
  unsigned log_suppressed;
  bool probe_inflight;
  uint64_t probe_at, probe_sent;
  char probe_buf[512];
  struct minwin rtt_min;        /* smallest round trip, over 20-30 s */

  atomic_uint up;
  atomic_bool probing, quit, cheap;   /* cheap: zeros_cheap, for source_brief */
  atomic_uint_fast64_t rtt_ns;        /* the windowed minimum */
  atomic_uint_fast64_t rtt_last_ns;   /* the latest sample */
  pthread_t thread;
  bool started;
  int wake_fd;
};

static void set_error(struct source *s, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));

/* A round trip sample: the windowed minimum and the latest. */
static void rtt_sample(struct source *s, uint64_t now, uint64_t rtt)
{
  atomic_store(&s->rtt_ns, minwin_add(&s->rtt_min, now, RTT_BUCKET_NS, rtt));
  atomic_store(&s->rtt_last_ns, rtt);
}
static void set_error(struct source *s, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  pthread_mutex_lock(&s->lock);
  vsnprintf(s->last_error, sizeof s->last_error, fmt, ap);
  pthread_mutex_unlock(&s->lock);
  va_end(ap);
}

/* Connection trouble is logged at most every LOG_EVERY_NS, with a count
 * of what was left out (a bad source must not fill the log). */
static void trouble(struct source *s, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
static void trouble(struct source *s, const char *fmt, ...)
{
  char msg[600];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  set_error(s, "%s", msg);
  uint64_t now = now_ns();
  if (s->last_log_ns && now - s->last_log_ns < LOG_EVERY_NS) {
    s->log_suppressed++;
    log_debug("%s", msg);
    return;
  }
  if (s->log_suppressed)
    log_warn("%s (%u similar messages in the last %u s not shown)", msg,
             s->log_suppressed, (unsigned) (LOG_EVERY_NS / 1000000000u));
  else
    log_warn("%s", msg);
  s->last_log_ns = now;
  s->log_suppressed = 0;
}

void source_wake(struct source *s)
{
  uint64_t one = 1;
  if (s->wake_fd >= 0 && write(s->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
    log_debug("waking the source thread failed: %s", strerror(errno));
}

int source_wake_fd_dup(struct source *s)
{
  if (s->wake_fd < 0) { errno = EBADF; return -1; }
  return fcntl(s->wake_fd, F_DUPFD_CLOEXEC, 0);
}

/* ---------- connecting ---------- */

#define EXPORT_NAME_MAX 4200

/* The export name to ask for: the target's, or its companion's. */
static const char *export_name(struct source *s, const char *name, char buf[EXPORT_NAME_MAX])
{
  snprintf(buf, EXPORT_NAME_MAX, "%s%s", name ? name : "",
           s->cfg.export_suffix ? s->cfg.export_suffix : "");
  return buf;
}

static int set_export(struct source *s, struct nbd_handle *h, const char *name)
{
  char buf[EXPORT_NAME_MAX];
  return nbd_set_export_name(h, export_name(s, name, buf));
}

/* Option mode (companion export over an NBD URI): once negotiating, ask
 * for the companion, once (*sent).  Back in negotiation after that means
 * the server refused it.  Returns -1 then, or if it could not be sent. */
static int go_when_negotiating(struct source *s, struct nbd_handle *h, bool *sent)
{
  if (!s->cfg.export_suffix || !nbd_aio_is_negotiating(h)) return 0;
  if (*sent) {
    errno = ENOENT;
    return -1;
  }
  *sent = true;
  char *name = nbd_get_export_name(h);
  int rc = set_export(s, h, name);
  free(name);
  if (rc == 0) rc = nbd_aio_opt_go(h, (nbd_completion_callback) { 0 }) < 0 ? -1 : 0;
  return rc;
}

/* A handle for connection i (0: the one clients' misses use). */
static struct nbd_handle *make_handle(struct source *s, unsigned i, const char *target,
                                      char *err, size_t errlen)
{
  struct target t;
  struct nbd_handle *h;
  if (target_parse(target, s->export_name, &t, err, errlen) < 0) return NULL;
  h = nbd_create();
  if (!h) {
    snprintf(err, errlen, "libnbd: %s", nbd_get_error());
    target_free(&t);
    return NULL;
  }
  nbd_set_handle_name(h, "source");
  /* A companion export (digests) is only read: without structured replies
   * and block status its handshake is one option (GO), two round trips
   * less on the path to the first digest, which the seeded copy waits on. */
  if (s->cfg.export_suffix) nbd_set_request_structured_replies(h, false);
  else {
    nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
    /* "A copier": an xnbd-server keeps our reads out of its read map
     * (read-map.h); other servers ignore a context they do not know.
     * After base:allocation: the WAN pump sends them in this order. */
    nbd_add_meta_context(h, XNBD_META_COPIER);
  }
  nbd_set_full_info(h, true);
  switch (t.kind) {
  case TARGET_XNBD: {
    /* Our WAN transport: NBD inside zstd (inside TLS for xnbds://). */
    int level = s->cfg.compress_level;
    unsigned flags = (level >= 0 ? WAN_F_ZSTD : 0) | (t.tls ? WAN_F_TLS : 0);
    /* Bulk connections (the background copy's, a companion export's) are
     * paced at the source by the path's queue (pace.h); connection 0 of
     * several is kept for clients' misses, and is not. */
    if (i > 0 || s->cfg.export_suffix) flags |= WAN_F_PACED;
    /* The options libnbd will ask (see set_export, and the meta context
     * above), sent ahead by the WAN pump. */
    char name[EXPORT_NAME_MAX];
    struct wan_nego_cfg nc = {
      .export_name = export_name(s, t.export_name, name), .structured = !s->cfg.export_suffix,
      .base_alloc = !s->cfg.export_suffix,
      .early = s->early_sent ? NULL : s->early,   /* the first connection only */
    };
    s->early_sent = true;
    int fd = wan_connect(t.host, t.port, flags, level > 0 ? level : WAN_DEFAULT_LEVEL,
                         s->wan_tls, s->cfg.timeout_s, s->wire, &nc, err, errlen);
    if (fd < 0) goto out_close;
    if (set_export(s, h, t.export_name) < 0 || nbd_aio_connect_socket(h, fd) < 0)
      goto fail;
    break;
  }
  case TARGET_NBD_URI:
    if (s->cfg.tls_psk && nbd_set_tls_psk_file(h, s->cfg.tls_psk) < 0) goto fail;
    if (s->cfg.tls_certificates &&
        nbd_set_tls_certificates(h, s->cfg.tls_certificates) < 0) goto fail;
    if (s->cfg.tls_username && nbd_set_tls_username(h, s->cfg.tls_username) < 0)
      goto fail;
    if (!s->cfg.tls_verify) nbd_set_tls_verify_peer(h, false);
    /* The URI names the export: a companion's name is set in option mode
     * (see go_when_negotiating). */
    if (s->cfg.export_suffix && nbd_set_opt_mode(h, true) < 0) goto fail;
    if (nbd_aio_connect_uri(h, target) < 0) goto fail;
    break;
  case TARGET_HOST_PORT:
    if (set_export(s, h, t.export_name) < 0 ||
        nbd_aio_connect_tcp(h, t.host, t.port) < 0)
      goto fail;
    break;
  }
  target_free(&t);
  return h;
fail:
  snprintf(err, errlen, "cannot connect to source %s: %s", target, nbd_get_error());
out_close:
  nbd_close(h);
  target_free(&t);
  return NULL;
}

/* Hands poll's events for h to libnbd.  A hang-up or error goes to the
 * direction libnbd waits in: a connect that the peer refuses or closes
 * waits for writing, and libnbd ignores a read notification then (the
 * connection would never fail, and the loop would spin). */
static int notify(struct nbd_handle *h, short revents)
{
  unsigned dir = nbd_aio_get_direction(h);
  bool gone = revents & (POLLHUP | POLLERR);
  if ((revents & POLLIN) || (gone && (dir & LIBNBD_AIO_DIRECTION_READ)))
    return nbd_aio_notify_read(h);
  if (revents & POLLOUT || gone)
    return nbd_aio_notify_write(h);
  return 0;
}

static bool handshaking(struct nbd_handle *h)
{
  return nbd_aio_is_connecting(h) || nbd_aio_is_negotiating(h);
}

/* Drives h's connection with poll until ready or the deadline; the other
 * connections' handshakes (s->c[1..], started with it) are driven along
 * with it, so that they are up when it is: background requests then need
 * not share connection 0 with the first client misses.  Their failures
 * are left to drive_connections. */
static int wait_connected(struct source *s, struct nbd_handle *h, uint64_t deadline)
{
  bool go_sent = false;
  while (handshaking(h)) {
    if (go_when_negotiating(s, h, &go_sent) < 0) return -1;
    struct pollfd p[MAX_CONNS + 1];
    struct nbd_handle *hs[MAX_CONNS];
    unsigned np = 0;
    for (unsigned i = 0; i < s->n; i++) {
      struct nbd_handle *x = i ? s->c[i].h : h;
      if (!x || (i && (s->c[i].st != CONN_CONNECTING || !handshaking(x)))) continue;
      if (i && go_when_negotiating(s, x, &s->c[i].go_sent) < 0) continue;
      unsigned dir = nbd_aio_get_direction(x);
      p[np] = (struct pollfd) { .fd = nbd_aio_get_fd(x) };
      if (dir & LIBNBD_AIO_DIRECTION_READ) p[np].events |= POLLIN;
      if (dir & LIBNBD_AIO_DIRECTION_WRITE) p[np].events |= POLLOUT;
      hs[np++] = x;
    }
    uint64_t now = now_ns();
    if (now >= deadline) { errno = ETIMEDOUT; return -1; }
    unsigned nfd = np;
    if (s->cfg.cancellable) p[nfd++] = (struct pollfd) { .fd = s->cfg.cancel_fd, .events = POLLIN };
    int r = poll(p, nfd, MIN((deadline - now) / 1000000 + 1, 1000u));
    if (r < 0 && errno != EINTR) return -1;
    if (r > 0 && nfd > np && p[np].revents) { errno = ECANCELED; return -1; }
    for (unsigned k = 0; r > 0 && k < np; k++) {
      if (!p[k].revents) continue;
      if (notify(hs[k], p[k].revents) < 0 && hs[k] == h) return -1;
    }
  }
  return nbd_aio_is_ready(h) ? 0 : -1;
}

/* Whether zero blocks cost next to nothing on the wire: our WAN transport
 * with zstd.  (Plain NBD servers may send zeros as data.) */
static bool zeros_are_cheap(struct source *s, const char *target)
{
  struct target t;
  char err[256];
  if (target_parse(target, NULL, &t, err, sizeof err) < 0) return false;
  bool cheap = s->cfg.compress_level >= 0 && t.kind == TARGET_XNBD;
  target_free(&t);
  return cheap;
}

static void source_free(struct source *s)
{
  for (unsigned i = 0; i < MAX_CONNS; i++)
    if (s->c[i].h) nbd_close(s->c[i].h);
  wan_tls_free(s->wan_tls);
  wan_counters_put(s->wire);
  wan_early_put(s->early);
  if (s->wake_fd >= 0) close(s->wake_fd);
  free(s->target);
  free(s->export_name);
  free(s->new_target);
  pthread_mutex_destroy(&s->lock);
  free(s);
}

struct source *source_open(const struct source_config *cfg, struct source_info *info,
                           char *err, size_t errlen)
{
  struct source *s = calloc(1, sizeof *s);
  if (!s) { snprintf(err, errlen, "out of memory"); return NULL; }
  s->cfg = *cfg;
  s->wake_fd = -1;
  pthread_mutex_init(&s->lock, NULL);
  s->wire = wan_counters_new();
  s->target = strdup(cfg->target);
  s->export_name = strdup(cfg->export_name ? cfg->export_name : "");
  s->n = MIN(MAX(cfg->connections, 1u), (unsigned) MAX_CONNS);
  if (!s->cfg.timeout_s) s->cfg.timeout_s = 60;
  if (!s->target || !s->export_name || !s->wire) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  s->cfg.target = s->target;
  s->cfg.export_name = s->export_name;
  struct target t;
  if (target_parse(s->target, s->export_name, &t, err, errlen) < 0) goto fail;
  bool wan_tls = t.kind == TARGET_XNBD && t.tls;
  target_free(&t);
  if (wan_tls) {
    struct wan_tls_config tc = {
      .cert_dir = cfg->tls_certificates, .psk_file = cfg->tls_psk,
      .psk_username = cfg->tls_username, .verify_peer = cfg->tls_verify,
    };
    s->wan_tls = wan_tls_new(false, &tc, err, errlen);
    if (!s->wan_tls) goto fail;
  }
  s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (s->wake_fd < 0) {
    snprintf(err, errlen, "eventfd: %s", strerror(errno));
    goto fail;
  }

  if (cfg->early_read && cfg->export_suffix) s->early = wan_early_new(0, cfg->early_read);
  struct nbd_handle *h = make_handle(s, 0, s->target, err, errlen);
  uint64_t deadline = now_ns() + (uint64_t) s->cfg.timeout_s * 1000000000u;
  if (!h) goto fail;
  /* The other connections start now too (wait_connected drives them). */
  for (unsigned i = 1; i < s->n; i++) {
    char e2[256];
    s->c[i].h = make_handle(s, i, s->target, e2, sizeof e2);
    if (s->c[i].h) s->c[i].st = CONN_CONNECTING, s->c[i].connecting_at = now_ns();
  }
  if (wait_connected(s, h, deadline) < 0) {
    snprintf(err, errlen, "cannot connect to source %s: %s (is the source "
             "server running and reachable? the proxy needs it at start-up "
             "unless its bitmap is complete)", s->target,
             errno == ETIMEDOUT ? "timed out (--source-timeout)" :
             errno == ECANCELED ? "given up (no longer needed)" : nbd_get_error());
    nbd_close(h);
    goto fail;
  }
  int64_t sz = nbd_get_size(h);
  if (sz < 0) {
    snprintf(err, errlen, "source %s: cannot get the export size: %s", s->target,
             nbd_get_error());
    nbd_close(h);
    goto fail;
  }
  memset(info, 0, sizeof *info);
  s->size = info->size = sz;
  /* I5: the image id the source publishes, or digests of sampled blocks. */
  if (s->cfg.export_suffix)
    info->id[0] = '\0';          /* a companion: the main export has the identity */
  else if (source_identity(h, info->size, s->cfg.timeout_s, info->id, sizeof info->id,
                           err, errlen) < 0) {
    char why[512];
    snprintf(why, sizeof why, "%s", err);
    snprintf(err, errlen, "source %s: cannot learn its identity: %s", s->target, why);
    nbd_close(h);
    goto fail;
  }
  snprintf(s->id, sizeof s->id, "%s", info->id);
  int64_t m = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  info->max_request = m > 0 ? (uint32_t) MIN(m, (int64_t) (32 << 20)) : 0;
  info->has_status = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  s->zeros_cheap = info->zeros_cheap = zeros_are_cheap(s, s->target);
  atomic_store(&s->cheap, s->zeros_cheap);
  /* Kept as connection 0: a WAN connection costs several round trips. */
  s->c[0].h = h;
  s->c[0].st = CONN_CONNECTING;   /* drive_connections checks and adopts it */
  /* The first round trip: from the WAN handshake, taken before any bulk
   * data could queue on the path. */
  uint64_t hs = wan_handshake_rtt_ns();
  if (hs) rtt_sample(s, now_ns(), hs);
  return s;
fail:
  source_free(s);
  return NULL;
}

/* ---------- requests ---------- */

static void enqueue_locked(struct source *s, struct source_req *r, bool front)
{
  struct source_req **head = r->urgent ? &s->urgent_head : &s->normal_head;
  struct source_req **tail = r->urgent ? &s->urgent_tail : &s->normal_tail;
  r->conn = -1;
  if (front) {                  /* re-issued: ahead of new requests */
    r->next = *head;
    *head = r;
    if (!*tail) *tail = r;
  } else {
    r->next = NULL;
    if (*tail) (*tail)->next = r;
    else *head = r;
    *tail = r;
  }
}

void source_submit(struct source *s, struct source_req *r)
{
  r->attempts = 0;
  pthread_mutex_lock(&s->lock);
  enqueue_locked(s, r, false);
  pthread_mutex_unlock(&s->lock);
  source_wake(s);
}

static void conn_unlink(struct sconn *c, struct source_req *r)
{
  if (r->cprev) r->cprev->cnext = r->cnext;
  else c->submitted = r->cnext;
  if (r->cnext) r->cnext->cprev = r->cprev;
  r->cnext = r->cprev = NULL;
  c->inflight--;
}

/* libnbd completion (source thread): queued for process_done, which runs
 * the caller's callback outside libnbd. */
static int req_cb(void *user_data, int *error)
{
  struct source_req *r = user_data;
  struct source *s = r->src;
  if (r->conn < 0 || s->c[r->conn].gen != r->gen) return 1;  /* requeued */
  struct sconn *c = &s->c[r->conn];
  conn_unlink(c, r);
  c->progress_ns = now_ns();
  r->replied_ns = c->progress_ns;
  if (!*error && !r->err) c->proven = true;
  if (r->probe_ns && !*error && !r->err) rtt_sample(s, c->progress_ns, c->progress_ns - r->probe_ns);
  if (!r->err) r->err = *error;
  r->conn = -2;                   /* completed, waiting in s->done */
  r->next = s->done;
  s->done = r;
  return 1;
}

static int status_cb(void *user_data, const char *ctx, uint64_t off,
                     uint32_t *entries, size_t n, int *error)
{
  struct source_req *r = user_data;
  struct source *s = r->src;
  char why[256];
  if (strcmp(ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
  if (r->conn < 0 || s->c[r->conn].gen != r->gen || r->err) return 0;
  struct extent_run *runs = malloc((n / 2 + 1) * sizeof *runs);
  if (!runs) { r->err = ENOMEM; return 0; }
  int k = extents_clip(r->off, r->len, s->size, off, entries, n, runs, why, sizeof why);
  if (k < 0) {
    r->err = EPROTO;
    pthread_mutex_lock(&s->lock);
    s->protocol_errors++;
    pthread_mutex_unlock(&s->lock);
    trouble(s, "source %s: bad block status reply for %" PRIu64 "+%" PRIu64
            ": %s; copying that range without skipping zeros", s->target,
            r->off, r->len, why);
  } else
    for (int i = 0; i < k; i++) r->extent(r, &runs[i]);
  free(runs);
  return 0;
}

/* Hands r to connection i.  Returns false if it could not be sent. */
static bool send_req(struct source *s, struct source_req *r, unsigned i)
{
  struct sconn *c = &s->c[i];
  int64_t rc;
  r->src = s;
  r->err = 0;
  r->conn = i;
  r->gen = c->gen;
  r->attempts++;
  r->sent_ns = now_ns();
  /* A small miss alone on the reserved connection sees what a probe
   * would (a round trip and the queue on the path): the copy's window
   * needs those samples most while misses keep the probes away. */
  r->probe_ns = i == 0 && !c->inflight && !s->probe_inflight && r->len <= MISS_PROBE_MAX
    ? now_ns() : 0;
  if (!c->inflight) c->progress_ns = now_ns();
  r->next = NULL;
  r->cprev = NULL;
  r->cnext = c->submitted;
  if (c->submitted) c->submitted->cprev = r;
  c->submitted = r;
  c->inflight++;
  nbd_completion_callback done = { .callback = req_cb, .user_data = r };
  if (r->kind == SOURCE_READ)
    rc = nbd_aio_pread(c->h, r->buf, r->len, r->off, done, 0);
  else
    rc = nbd_aio_block_status(c->h, r->len, r->off,
                              (nbd_extent_callback) { .callback = status_cb, .user_data = r },
                              done, 0);
  if (rc < 0) {
    log_warn("request %" PRIu64 "+%" PRIu64 " could not be sent to the source: %s",
             r->off, r->len, nbd_get_error());
    conn_unlink(c, r);
    r->conn = -1;
    r->attempts--;
    return false;
  }
  return true;
}

static void finish(struct source *s, struct source_req *r, int err)
{
  r->conn = -1;
  r->done(r, err);
}

/* A request whose connection died: again, on another connection, unless it
 * has been through too many (a reply that kills every connection it is
 * sent on must not be retried forever: D8). */
static void reissue(struct source *s, struct source_req *r)
{
  if (r->attempts >= MAX_ATTEMPTS) {
    set_error(s, "giving up on %" PRIu64 "+%" PRIu64 " after %u attempts: "
              "every connection it was sent on died", r->off, r->len, r->attempts);
    log_error("%s", s->last_error);
    finish(s, r, EIO);
    return;
  }
  pthread_mutex_lock(&s->lock);
  enqueue_locked(s, r, true);
  pthread_mutex_unlock(&s->lock);
}

static void conn_close(struct source *s, unsigned i)
{
  struct sconn *c = &s->c[i];
  struct source_req *r, *next, *list;
  if (!c->h) return;
  c->gen++;
  list = c->submitted;
  c->submitted = NULL;
  c->inflight = 0;
  if (i == 0) s->probe_inflight = false;
  nbd_close(c->h);                /* stale callbacks see the new generation */
  c->h = NULL;
  if (c->st == CONN_UP) atomic_fetch_sub(&s->up, 1);
  c->st = CONN_DOWN;
  /* Backoff is shared by the connections: it grows on every failure and
   * starts over only once a connection has delivered a reply. */
  if (c->proven)
    s->backoff_ms = 0;
  else
    s->backoff_ms = MIN(MAX(s->backoff_ms * 2, BACKOFF_MIN_MS), BACKOFF_MAX_MS);
  c->proven = false;
  s->retry_at = now_ns() + (uint64_t) s->backoff_ms * 1000000u;
  for (r = list; r; r = next) {
    next = r->cnext;
    r->cnext = r->cprev = NULL;
    reissue(s, r);
  }
}

static void process_done(struct source *s)
{
  while (s->done) {
    struct source_req *r = s->done;
    s->done = r->next;
    int err = r->err;
    if (!err || err == EPROTO || r->kind == SOURCE_STATUS) {
      /* A bad status reply is not asked again: the caller copies the
       * range as data (D6).  Other status failures likewise. */
      finish(s, r, err);
      continue;
    }
    if (err == ENOTCONN || err == ESHUTDOWN) {   /* its connection went */
      reissue(s, r);
      continue;
    }
    log_warn("read of %" PRIu64 "+%" PRIu64 " from the source failed: %s "
             "(attempt %u)", r->off, r->len, strerror(err), r->attempts);
    if (r->attempts >= MAX_SERVER_ERRORS) {
      set_error(s, "source refused to read %" PRIu64 "+%" PRIu64 ": %s",
                r->off, r->len, strerror(err));
      finish(s, r, EIO);
    } else {
      pthread_mutex_lock(&s->lock);
      enqueue_locked(s, r, true);
      pthread_mutex_unlock(&s->lock);
    }
  }
}

/* ---------- connections ---------- */

static void drive_connections(struct source *s, uint64_t now)
{
  uint64_t stall_ns = (uint64_t) MAX(s->cfg.timeout_s / 3, 2u) * 1000000000u;
  for (unsigned i = 0; i < s->n; i++) {
    struct sconn *c = &s->c[i];
    char err[512];
    if (c->st == CONN_DOWN && now >= s->retry_at) {
      c->h = make_handle(s, i, s->target, err, sizeof err);
      if (!c->h) {
        trouble(s, "%s", err);
        s->backoff_ms = MIN(MAX(s->backoff_ms * 2, BACKOFF_MIN_MS), BACKOFF_MAX_MS);
        s->retry_at = now + (uint64_t) s->backoff_ms * 1000000u;
        continue;
      }
      c->st = CONN_CONNECTING;
      c->connecting_at = now;
      c->go_sent = false;
      pthread_mutex_lock(&s->lock);
      s->reconnects++;
      pthread_mutex_unlock(&s->lock);
    }
    if (c->st == CONN_CONNECTING && go_when_negotiating(s, c->h, &c->go_sent) < 0) {
      trouble(s, "source %s refused the export%s: %s", s->target,
              s->cfg.export_suffix ? s->cfg.export_suffix : "", nbd_get_error());
      conn_close(s, i);
      continue;
    }
    if (c->st == CONN_CONNECTING) {
      if (nbd_aio_is_ready(c->h)) {
        int64_t sz = nbd_get_size(c->h);
        if (sz != (int64_t) s->size) {
          trouble(s, "source %s has size %" PRId64 " but this cache and bitmap "
                  "are for size %" PRIu64 ": not using it (point --target/"
                  "reconnect at the right export)", s->target, sz, s->size);
          conn_close(s, i);
          continue;
        }
        char id[SOURCE_ID_MAX + 1], why[512];
        if (!s->cfg.export_suffix &&
            source_identity_quick(c->h, s->size, id, sizeof id) == 1 &&
            !source_identity_match(s->id, id, why, sizeof why)) {
          /* I5 on reconnect: a source server restarted on an edited image
           * (or another image of the same size) is not used. */
          trouble(s, "source %s is not the source this proxy started with: %s; "
                  "not using it (restore the source image, or point reconnect "
                  "at the right one)", s->target, why);
          conn_close(s, i);
          continue;
        }
        c->st = CONN_UP;
        c->progress_ns = now;
        atomic_fetch_add(&s->up, 1);
      } else if (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h)) {
        trouble(s, "connecting to source %s failed: %s", s->target, nbd_get_error());
        conn_close(s, i);
      } else if (now - c->connecting_at > (uint64_t) s->cfg.timeout_s * 1000000000u) {
        /* A server that never answers (one that serves one client at a
         * time leaves the connection in its listen queue). */
        trouble(s, "connecting to source %s: no handshake in %u s (the server may "
                "take fewer connections than --connections)", s->target, s->cfg.timeout_s);
        conn_close(s, i);
      }
    }
    if (c->st == CONN_UP && (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h))) {
      const char *why = nbd_get_error();
      trouble(s, "connection to source %s lost: %s", s->target,
              why ? why : "closed by the server");
      conn_close(s, i);
    } else if (c->st == CONN_UP && c->inflight && now - c->progress_ns > stall_ns) {
      /* D5: a source that stops answering (or stops mid-reply) with the
       * socket still open.  Its requests go to a fresh connection. */
      trouble(s, "source %s: connection %u made no progress for %" PRIu64
              " s with %u requests out: declaring it dead and reconnecting",
              s->target, i, (now - c->progress_ns) / 1000000000u, c->inflight);
      pthread_mutex_lock(&s->lock);
      s->dead_stalled++;
      pthread_mutex_unlock(&s->lock);
      conn_close(s, i);
    }
  }
}

/* Connection for a request: urgent ones on connection 0 (kept free of
 * background traffic when there are several), others on the least busy
 * of the rest. */
static int pick_conn(struct source *s, bool urgent)
{
  int best = -1;
  unsigned first = (!urgent && s->n > 1) ? 1 : 0;
  if (urgent && s->c[0].st == CONN_UP) return 0;
  for (unsigned i = first; i < s->n; i++) {
    if (s->c[i].st != CONN_UP) continue;
    if (best < 0 || s->c[i].inflight < s->c[best].inflight) best = i;
  }
  /* Background requests take connection 0 only when no other connection
   * is on its way (began its handshake less than COMING_NS ago): a
   * client's miss must not queue behind them there. */
  bool coming = false;
  uint64_t now = urgent || best >= 0 ? 0 : now_ns();
  for (unsigned i = 1; i < s->n && now; i++)
    coming = coming || (s->c[i].st == CONN_CONNECTING && now - s->c[i].connecting_at < COMING_NS);
  if (best < 0 && s->c[0].st == CONN_UP && !coming) best = 0;
  return best;
}

static void submit_queued(struct source *s)
{
  for (int pass = 0; pass < 2; pass++) {
    pthread_mutex_lock(&s->lock);
    struct source_req *list = pass ? s->normal_head : s->urgent_head;
    if (pass) s->normal_head = s->normal_tail = NULL;
    else s->urgent_head = s->urgent_tail = NULL;
    pthread_mutex_unlock(&s->lock);
    struct source_req *r, *next, *keep = NULL, **kt = &keep;
    for (r = list; r; r = next) {
      next = r->next;
      int i = pick_conn(s, r->urgent);
      if (i >= 0 && send_req(s, r, i)) continue;
      r->next = NULL;             /* no connection: keep its place */
      *kt = r;
      kt = &r->next;
    }
    if (keep) {
      pthread_mutex_lock(&s->lock);
      struct source_req **head = pass ? &s->normal_head : &s->urgent_head;
      struct source_req **tail = pass ? &s->normal_tail : &s->urgent_tail;
      *kt = *head;
      if (!*head) *tail = (struct source_req *) ((char *) kt - offsetof(struct source_req, next));
      *head = keep;
      pthread_mutex_unlock(&s->lock);
    }
  }
}

/* ---------- round trip ---------- */

static int probe_extent_cb(void *user_data, const char *ctx, uint64_t off,
                           uint32_t *entries, size_t n, int *error)
{
  return 0;
}

static int probe_cb(void *user_data, int *error)
{
  struct source *s = user_data;
  if (s->probe_inflight && !*error) {
    uint64_t now = now_ns();
    rtt_sample(s, now, now - s->probe_sent);
  }
  s->probe_inflight = false;
  return 1;
}

/* A tiny request on the urgent connection when it is idle, every
 * PROBE_EVERY_NS while the copy runs: its time is one round trip plus the
 * queue on the path that a client's miss would wait behind (nothing is
 * queued ahead of it on that connection). */
static void maybe_probe(struct source *s, uint64_t now)
{
  struct sconn *c = &s->c[0];
  /* Every other round trip (at most PROBE_EVERY_NS apart): the copy's
   * start-up must see a queue within a round trip or two of making it. */
  uint64_t every = MIN((uint64_t) PROBE_EVERY_NS, MAX(2 * atomic_load(&s->rtt_ns), (uint64_t) 10000000u));
  if (!atomic_load(&s->probing) || s->probe_inflight || c->st != CONN_UP ||
      c->inflight || now - s->probe_at < every)
    return;
  s->probe_at = s->probe_sent = now;
  s->probe_inflight = true;
  nbd_completion_callback done = { .callback = probe_cb, .user_data = s };
  int64_t r = nbd_can_meta_context(c->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1
    ? nbd_aio_block_status(c->h, MIN((uint64_t) 4096, s->size), 0,
        (nbd_extent_callback) { .callback = probe_extent_cb }, done, 0)
    : nbd_aio_pread(c->h, s->probe_buf, MIN((uint64_t) sizeof s->probe_buf, s->size),
                    0, done, 0);
  if (r < 0) s->probe_inflight = false;
}

void source_set_probing(struct source *s, bool on) { atomic_store(&s->probing, on); }

/* ---------- the loop ---------- */

static void switch_target(struct source *s)
{
  pthread_mutex_lock(&s->lock);
  char *nt = s->new_target;
  s->new_target = NULL;
  pthread_mutex_unlock(&s->lock);
  if (!nt) return;
  for (unsigned i = 0; i < s->n; i++) {
    s->c[i].proven = true;        /* a new address starts without backoff */
    conn_close(s, i);
  }
  s->retry_at = 0;
  bool cheap = zeros_are_cheap(s, nt);
  pthread_mutex_lock(&s->lock);
  free(s->target);
  s->target = nt;
  s->zeros_cheap = cheap;
  atomic_store(&s->cheap, cheap);
  pthread_mutex_unlock(&s->lock);
}

static void *source_main(void *arg)
{
  struct source *s = arg;
  while (!atomic_load(&s->quit)) {
    struct pollfd p[MAX_CONNS + 1];
    int idx[MAX_CONNS + 1], np = 0;
    uint64_t now = now_ns();

    switch_target(s);
    drive_connections(s, now);
    if (atomic_load(&s->up)) {
      submit_queued(s);
      maybe_probe(s, now);
    }
    if (s->cfg.tick) {
      s->cfg.tick(s->cfg.opaque, now);
      if (atomic_load(&s->up)) submit_queued(s);
    }
    if (atomic_load(&s->quit)) break;

    p[np].fd = s->wake_fd; p[np].events = POLLIN; idx[np++] = -1;
    for (unsigned i = 0; i < s->n; i++) {
      struct sconn *c = &s->c[i];
      if (c->st == CONN_DOWN) continue;
      unsigned dir = nbd_aio_get_direction(c->h);
      p[np].fd = nbd_aio_get_fd(c->h);
      p[np].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                     ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
      if (p[np].fd < 0) continue;
      idx[np++] = i;
    }
    if (poll(p, np, 100) < 0 && errno != EINTR) {
      log_error("source: poll failed: %s", strerror(errno));
      continue;
    }
    for (int k = 0; k < np; k++) {
      if (!p[k].revents) continue;
      if (idx[k] < 0) {
        uint64_t v;
        if (read(s->wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
          log_debug("source wake read: %s", strerror(errno));
        continue;
      }
      struct sconn *c = &s->c[idx[k]];
      if (!c->h) continue;
      notify(c->h, p[k].revents);
    }
    process_done(s);
  }

  /* Stopping: nothing may touch the source any more (I7). */
  for (unsigned i = 0; i < s->n; i++) {
    struct source_req *list = s->c[i].submitted;
    s->c[i].submitted = NULL;
    s->c[i].proven = true;
    conn_close(s, i);             /* (nothing left to reissue) */
    for (struct source_req *r = list, *next; r; r = next) {
      next = r->cnext;
      r->cnext = r->cprev = NULL;
      finish(s, r, ESHUTDOWN);
    }
  }
  process_done(s);
  pthread_mutex_lock(&s->lock);
  struct source_req *lists[2] = { s->urgent_head, s->normal_head };
  s->urgent_head = s->urgent_tail = s->normal_head = s->normal_tail = NULL;
  pthread_mutex_unlock(&s->lock);
  for (int l = 0; l < 2; l++)
    for (struct source_req *r = lists[l], *next; r; r = next) {
      next = r->next;
      finish(s, r, ESHUTDOWN);
    }
  return NULL;
}

int source_start(struct source *s, char *err, size_t errlen)
{
  if (s->started) return 0;
  if (pthread_create(&s->thread, NULL, source_main, s) != 0) {
    snprintf(err, errlen, "cannot start the source thread");
    return -1;
  }
  s->started = true;
  return 0;
}

void source_stop(struct source *s)
{
  if (!s) return;
  atomic_store(&s->quit, true);
  source_wake(s);
  if (s->started && pthread_equal(pthread_self(), s->thread))
    return;                       /* from a callback: the loop ends after it */
  if (s->started) {
    pthread_join(s->thread, NULL);
    s->started = false;
  }
}

void *source_early_take(struct source *s, uint64_t *len, struct wan_early_info *info)
{
  void *b = wan_early_take(s->early, info);
  *len = b ? s->early->len : 0;
  return b;
}

void source_close(struct source *s)
{
  if (!s) return;
  source_stop(s);
  source_free(s);
}

int source_retarget(struct source *s, const char *target, char *err, size_t errlen)
{
  char *t = strdup(target);
  if (!t) { snprintf(err, errlen, "out of memory"); return -1; }
  pthread_mutex_lock(&s->lock);
  free(s->new_target);
  s->new_target = t;
  pthread_mutex_unlock(&s->lock);
  source_wake(s);
  return 0;
}

void source_brief(struct source *s, struct source_brief *b)
{
  b->up = atomic_load(&s->up);
  b->rtt_ns = atomic_load(&s->rtt_ns);
  b->rtt_last_ns = atomic_load(&s->rtt_last_ns);
  b->zeros_cheap = atomic_load(&s->cheap);
  b->wire_rx = atomic_load(&s->wire->rx_wire);
  b->wire_rx_raw = atomic_load(&s->wire->rx_raw);
}

void source_get_stats(struct source *s, struct source_stats *st)
{
  memset(st, 0, sizeof *st);
  st->connections = s->n;
  st->connections_up = atomic_load(&s->up);
  st->rtt_ns = atomic_load(&s->rtt_ns);
  st->wire_tx_raw = atomic_load(&s->wire->tx_raw);
  st->wire_tx = atomic_load(&s->wire->tx_wire);
  st->wire_rx = atomic_load(&s->wire->rx_wire);
  st->wire_rx_raw = atomic_load(&s->wire->rx_raw);
  pthread_mutex_lock(&s->lock);
  st->reconnects = s->reconnects;
  st->dead_stalled = s->dead_stalled;
  st->protocol_errors = s->protocol_errors;
  st->zeros_cheap = s->zeros_cheap;
  snprintf(st->target, sizeof st->target, "%s", s->new_target ? s->new_target : s->target);
  snprintf(st->last_error, sizeof st->last_error, "%s", s->last_error);
  pthread_mutex_unlock(&s->lock);
}
