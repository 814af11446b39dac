/* fetcher.c: the source side of the engine, on its own thread: libnbd
 * connections (reconnected with backoff), submission of fetch jobs
 * (on-demand first, on connection 0 when there are several), and the
 * background copy (block status to skip zeros, a window of bytes in
 * flight, a token-bucket rate cap).  All libnbd calls happen here. */
#include "engine-int.h"
#include "log.h"
#include "util.h"
#include "wan.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <unistd.h>

#include <libnbd.h>

#define MAX_CONNS 16
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define STATUS_CHUNK (UINT64_C(16) << 20)  /* block status asked per query */
#define STATUS_QUERIES 16                    /* block status queries in flight */

enum sc_state { SC_DOWN, SC_CONNECTING, SC_UP };

struct sconn {
  struct nbd_handle *h;
  enum sc_state st;
  unsigned gen;
  uint64_t retry_at;
  unsigned backoff_ms;
  unsigned inflight;
  struct fetch_job *submitted;
};

struct fetcher {
  struct sconn c[MAX_CONNS];
  unsigned n;
  char *target;
  atomic_uint up;
  atomic_bool quit;
  struct fetch_job *done;          /* completed by libnbd callbacks */
  /* Block status, asked per STATUS_CHUNK with several queries in flight:
   * status_known[c] is how far chunk c is known (absolute offset). */
  uint64_t *status_known;
  bool *status_asking;
  unsigned char *status_conn;      /* connection a chunk's query is on */
  uint64_t nchunks;
  unsigned status_outstanding;
  int64_t tokens;
  uint64_t tokens_at;
  uint64_t rate_at, rate_bytes;
  uint64_t last_expire;
  unsigned rr;
  bool status_checked;
  /* Round-trip probes (tiny requests on the on-demand connection) and the
   * window sizing they feed. */
  uint64_t probe_at, probe_sent;
  bool probe_inflight;
  uint64_t rtt_min, rtt_epoch;     /* min over the current 10 s epoch */
  uint64_t win_at, win_bytes;
  uint64_t rates[40];              /* delivery rate samples (max filter) */
  unsigned nrate;
  uint64_t startup_best;           /* window start-up: best rate so far */
  unsigned startup_flat;           /* samples since it grew by a quarter */
  bool startup_over;
  char probe_buf[512];           /* source's base:allocation support known */
};

unsigned fetcher_connections_up(struct engine *e)
{
  return e->f ? atomic_load(&e->f->up) : 0;
}

void fetcher_wake(struct engine *e)
{
  uint64_t one = 1;
  if (e->wake_fd >= 0 && write(e->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
    log_debug("waking the fetcher failed: %s", strerror(errno));
}

/* ---------- connecting ---------- */

static bool is_uri(const char *t) { return strstr(t, "://") != NULL; }

static struct nbd_handle *make_handle(struct engine *e, const char *target,
                                      char *err, size_t errlen)
{
  struct nbd_handle *h = nbd_create();
  if (!h) {
    snprintf(err, errlen, "libnbd: %s", nbd_get_error());
    return NULL;
  }
  nbd_set_handle_name(h, "source");
  nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  nbd_set_full_info(h, true);
  CLEANUP_FREE char *whost = NULL;
  CLEANUP_FREE char *wport = NULL;
  CLEANUP_FREE char *wexp = NULL;
  bool wtls;
  if (wan_parse_uri(target, &whost, &wport, &wexp, &wtls) == 0) {
    /* Our WAN transport: NBD inside zstd (inside TLS for xnbds://). */
    int level = e->cfg.compress_level;
    unsigned flags = (level >= 0 ? WAN_F_ZSTD : 0) | (wtls ? WAN_F_TLS : 0);
    int fd = wan_connect(whost, wport, flags, level > 0 ? level : WAN_DEFAULT_LEVEL,
                         e->wan_tls, e->cfg.source_timeout_s, err, errlen);
    if (fd < 0) { nbd_close(h); return NULL; }
    if (nbd_set_export_name(h, wexp) < 0 || nbd_aio_connect_socket(h, fd) < 0)
      goto fail;
  } else if (is_uri(target)) {
    if (e->cfg.tls_psk && nbd_set_tls_psk_file(h, e->cfg.tls_psk) < 0) goto fail;
    if (e->cfg.tls_certificates &&
        nbd_set_tls_certificates(h, e->cfg.tls_certificates) < 0) goto fail;
    if (e->cfg.tls_username && nbd_set_tls_username(h, e->cfg.tls_username) < 0)
      goto fail;
    if (!e->cfg.tls_verify) nbd_set_tls_verify_peer(h, false);
    if (nbd_aio_connect_uri(h, target) < 0) goto fail;
  } else {
    CLEANUP_FREE char *host = NULL;
    CLEANUP_FREE char *port = NULL;
    const char *why;
    if (parse_host_port(target, "10809", &host, &port, &why) < 0 || !host ||
        strcmp(port, "0") == 0) {
      if (host && port && strcmp(port, "0") == 0) why = "port 0 is not a port to connect to";
      snprintf(err, errlen, "bad --target '%s': %s (expected HOST:PORT or an "
               "NBD URI such as nbd://HOST:PORT/EXPORT)", target,
               host ? why : "missing host");
      nbd_close(h);
      return NULL;
    }
    if (nbd_set_export_name(h, e->target_export) < 0 ||
        nbd_aio_connect_tcp(h, host, port) < 0)
      goto fail;
  }
  return h;
fail:
  snprintf(err, errlen, "cannot connect to source %s: %s", target, nbd_get_error());
  nbd_close(h);
  return NULL;
}

/* Drives one handle's connection with poll until ready or the deadline. */
static int wait_connected(struct nbd_handle *h, uint64_t deadline)
{
  while (nbd_aio_is_connecting(h)) {
    struct pollfd p = { .fd = nbd_aio_get_fd(h) };
    unsigned dir = nbd_aio_get_direction(h);
    uint64_t now = now_ns();
    if (now >= deadline) { errno = ETIMEDOUT; return -1; }
    if (dir & LIBNBD_AIO_DIRECTION_READ) p.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) p.events |= POLLOUT;
    int r = poll(&p, 1, MIN((deadline - now) / 1000000 + 1, 1000u));
    if (r < 0 && errno != EINTR) return -1;
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) { if (nbd_aio_notify_read(h) < 0) return -1; }
    else if (p.revents & POLLOUT) { if (nbd_aio_notify_write(h) < 0) return -1; }
  }
  return nbd_aio_is_ready(h) ? 0 : -1;
}

static void identity(struct nbd_handle *h, uint64_t size, char *id, size_t idlen)
{
  char *name = nbd_get_canonical_export_name(h);
  if (!name) name = nbd_get_export_name(h);
  snprintf(id, idlen, "export=%s size=%" PRIu64, name ? name : "", size);
  free(name);
}

void fetcher_close_handle(void *h) { nbd_close(h); }

int source_probe(struct engine *e, const char *target, uint64_t *size,
                 char *id, size_t idlen, uint32_t *max_req,
                 char *err, size_t errlen)
{
  struct nbd_handle *h = make_handle(e, target, err, errlen);
  uint64_t deadline = now_ns() + (uint64_t) e->cfg.source_timeout_s * 1000000000u;
  int64_t sz;
  if (!h) return -1;
  if (wait_connected(h, deadline) < 0) {
    snprintf(err, errlen, "cannot connect to source %s: %s (is the source "
             "server running and reachable? the proxy needs it at start-up "
             "unless its bitmap is complete)", target,
             errno == ETIMEDOUT ? "timed out (--source-timeout)" : nbd_get_error());
    nbd_close(h);
    return -1;
  }
  sz = nbd_get_size(h);
  if (sz < 0) {
    snprintf(err, errlen, "source %s: cannot get the export size: %s", target, nbd_get_error());
    nbd_close(h);
    return -1;
  }
  *size = sz;
  identity(h, *size, id, idlen);
  int64_t m = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  *max_req = m > 0 ? (uint32_t) MIN(m, (int64_t) (32 << 20)) : 0;
  /* Kept: the fetcher starts with it instead of connecting again (a WAN
   * connection costs several round trips). */
  e->probe_handle = h;
  return 0;
}

/* ---------- submitting ---------- */

static void requeue(struct engine *e, struct fetch_job *j)
{
  j->submitted = false;
  j->conn = -1;
  pthread_mutex_lock(&e->lock);
  j->next = e->retry_head;
  e->retry_head = j;
  pthread_mutex_unlock(&e->lock);
}

static void conn_unlink(struct sconn *c, struct fetch_job *j)
{
  if (j->cprev) j->cprev->cnext = j->cnext;
  else c->submitted = j->cnext;
  if (j->cnext) j->cnext->cprev = j->cprev;
  j->cnext = j->cprev = NULL;
  c->inflight--;
}

static int job_cb(void *user_data, int *error)
{
  struct fetch_job *j = user_data;
  struct fetcher *f = j->e->f;
  struct sconn *c;
  if (j->conn < 0) return 1;
  c = &f->c[j->conn];
  if (c->gen != j->gen) return 1;      /* requeued when its connection closed */
  conn_unlink(c, j);
  j->err = *error;
  j->next = f->done;
  f->done = j;
  return 1;
}

static void rtt_sample(struct engine *e, struct fetcher *f, uint64_t rtt)
{
  uint64_t now = now_ns();
  if (!f->rtt_min || rtt < f->rtt_min || now - f->rtt_epoch > 10000000000u) {
    if (now - f->rtt_epoch > 10000000000u) f->rtt_epoch = now;
    f->rtt_min = rtt;
    pthread_mutex_lock(&e->lock);
    e->rtt_ns = rtt;
    pthread_mutex_unlock(&e->lock);
  }
}

static int probe_extent_cb(void *user_data, const char *ctx, uint64_t off,
                           uint32_t *entries, size_t n, int *error)
{
  return 0;
}

static int probe_cb(void *user_data, int *error)
{
  struct engine *e = user_data;
  struct fetcher *f = e->f;
  if (f->probe_inflight && !*error)
    rtt_sample(e, f, now_ns() - f->probe_sent);
  f->probe_inflight = false;
  return 1;
}

/* A 512-byte read on the on-demand connection when it is idle: its time
 * is one round trip (plus nothing queued ahead of it on that connection). */
static void maybe_probe(struct engine *e, struct fetcher *f, uint64_t now)
{
  struct sconn *c = &f->c[0];
  bool status;
  if (f->probe_inflight || c->st != SC_UP || c->inflight || now - f->probe_at < 1000000000u)
    return;
  pthread_mutex_lock(&e->lock);
  bool wanted = e->bg_running && !e->bg_paused && e->bg_window_auto;
  status = e->source_has_status;
  pthread_mutex_unlock(&e->lock);
  if (!wanted) return;              /* only the window sizing needs it */
  f->probe_at = f->probe_sent = now;
  f->probe_inflight = true;
  nbd_completion_callback done = { .callback = probe_cb, .user_data = e };
  int64_t r = status
    ? nbd_aio_block_status(c->h, MIN((uint64_t) e->bs, e->size), 0,
        (nbd_extent_callback) { .callback = probe_extent_cb }, done, 0)
    : nbd_aio_pread(c->h, f->probe_buf, MIN((uint64_t) sizeof f->probe_buf, e->size),
                    0, done, 0);
  if (r < 0) f->probe_inflight = false;
}

/* Window sizing, every quarter second.  The bottleneck bandwidth is the
 * best delivery rate seen over the last ~10 s (a max filter), the path's
 * delay the smallest round trip.  While the copy delivers at (close to)
 * its best rate, the window grows by a quarter to find out whether the
 * link can carry more; it never exceeds 2 x bandwidth x RTT.  A window
 * sized from the *current* rate instead would limit itself: when the
 * window is what limits the rate, rate x RTT is smaller than the window. */
#define RATE_SAMPLES 40
static void size_window(struct engine *e, struct fetcher *f, uint64_t now)
{
  if (now - f->win_at < 250000000u) return;
  pthread_mutex_lock(&e->lock);
  /* Bytes as the window counts them: bridged zeros included. */
  uint64_t bytes = e->bytes_fetched + e->bytes_bridged, dt = now - f->win_at;
  uint64_t rate = f->win_at ? (bytes - f->win_bytes) * 1000000000u / dt : 0;
  f->win_at = now;
  f->win_bytes = bytes;
  f->rates[f->nrate++ % RATE_SAMPLES] = rate;
  uint64_t maxrate = 0;
  for (unsigned i = 0; i < RATE_SAMPLES; i++) maxrate = MAX(maxrate, f->rates[i]);
  if (e->bg_window_auto && f->rtt_min && rate && e->bg_running && !e->bg_paused) {
    uint64_t w = e->bg_window;
    uint64_t cap = 2 * (maxrate * f->rtt_min / 1000000000u);
    /* Start-up doubles the window each time the rate grew by a quarter
     * since the last sample, as TCP's slow start does, so that a fast
     * long link is filled within a few round trips -- but only while the
     * window is at most 4 x bandwidth x RTT (beyond that the link, not the
     * window, limits the rate: a thin link never sees a doubling).  It
     * ends for good after three samples without such growth; from then on
     * the window grows by a quarter, capped at 2 x bandwidth x RTT. */
    bool grew = f->startup_best && rate > f->startup_best * 5 / 4;
    if (!f->startup_best || grew) {
      f->startup_best = rate;
      f->startup_flat = 0;
    } else if (f->startup_flat < 3 && ++f->startup_flat == 3)
      f->startup_over = true;
    bool doubling = grew && !f->startup_over && w <= 2 * cap;   /* <= 4 x BDP */
    if (rate >= maxrate * 85 / 100 && e->bg_inflight_bytes >= w * 3 / 4)
      w = doubling ? w * 2 : f->startup_over ? w * 5 / 4 : w;   /* at its best and using it */
    if (f->startup_over)           /* no cap from a ramp-up rate */
      w = MIN(w, cap);
    /* At least 2 MiB: a few jobs in flight even on a thin link; the
     * queue behind the pipe stays short there too (a read joining a
     * background job waits for it). */
    e->bg_window = MIN(MAX(w, (uint64_t) 2 << 20), (uint64_t) 256 << 20);
  }
  pthread_mutex_unlock(&e->lock);
}

static void conn_close(struct engine *e, struct fetcher *f, unsigned i, bool retry_soon)
{
  struct sconn *c = &f->c[i];
  struct fetch_job *j, *next;
  if (!c->h) return;
  c->gen++;
  for (j = c->submitted; j; j = next) {   /* fetched again elsewhere */
    next = j->cnext;
    requeue(e, j);
  }
  c->submitted = NULL;
  c->inflight = 0;
  if (i == 0) f->probe_inflight = false;
  /* Status queries on this connection are asked again on another. */
  for (uint64_t k = 0; k < f->nchunks; k++)
    if (f->status_asking[k] && f->status_conn[k] == i) {
      f->status_asking[k] = false;
      f->status_outstanding--;
    }

  nbd_close(c->h);
  c->h = NULL;
  if (c->st == SC_UP) atomic_fetch_sub(&f->up, 1);
  c->st = SC_DOWN;
  c->backoff_ms = retry_soon ? BACKOFF_MIN_MS
                : MIN(MAX(c->backoff_ms * 2, BACKOFF_MIN_MS), BACKOFF_MAX_MS);
  c->retry_at = now_ns() + (uint64_t) c->backoff_ms * 1000000u;
}

static bool submit(struct engine *e, struct fetcher *f, struct fetch_job *j, unsigned i)
{
  struct sconn *c = &f->c[i];
  if (!j->buf && !(j->buf = malloc(j->len))) return false;
  j->e = e;
  j->conn = i;
  j->gen = c->gen;
  j->submitted = true;
  j->attempts++;
  j->submit_ns = now_ns();
  j->cprev = NULL;
  j->cnext = c->submitted;
  if (c->submitted) c->submitted->cprev = j;
  c->submitted = j;
  c->inflight++;
  if (nbd_aio_pread(c->h, j->buf, j->len, j->off,
                    (nbd_completion_callback) { .callback = job_cb, .user_data = j },
                    0) < 0) {
    log_warn("fetch of %" PRIu64 "+%" PRIu64 " could not be sent: %s", j->off,
             j->len, nbd_get_error());
    conn_unlink(c, j);
    j->conn = -1;
    return false;
  }
  return true;
}

static int pick_conn(struct fetcher *f, bool ondemand)
{
  int best = -1;
  unsigned first = (!ondemand && f->n > 1) ? 1 : 0;
  if (ondemand && f->c[0].st == SC_UP) return 0;
  for (unsigned k = 0; k < f->n - first; k++) {
    unsigned i = first + (f->rr + k) % (f->n - first);
    if (f->c[i].st != SC_UP) continue;
    if (best < 0 || f->c[i].inflight < f->c[best].inflight) best = i;
  }
  if (best < 0 && f->c[0].st == SC_UP) best = 0;   /* only the reserved one is up */
  f->rr++;
  return best;
}

static void submit_queued(struct engine *e, struct fetcher *f)
{
  struct fetch_job *od, *rt, *j, *next;
  pthread_mutex_lock(&e->lock);
  od = e->od_head;
  rt = e->retry_head;
  e->od_head = e->od_tail = e->retry_head = NULL;
  pthread_mutex_unlock(&e->lock);
  /* On-demand first (their order kept), then retries. */
  for (int pass = 0; pass < 2; pass++)
    for (j = pass ? rt : od; j; j = next) {
      next = j->next;
      int i = pick_conn(f, j->ondemand || j->waiters);
      if (i < 0 || !submit(e, f, j, i)) requeue(e, j);
    }
}

/* ---------- background copy ---------- */

struct status_query {
  struct engine *e;
  uint64_t chunk;
  unsigned conn, gen;
};

static bool status_query_live(struct status_query *q)
{
  return q->e->f->c[q->conn].gen == q->gen;   /* else its connection closed */
}

/* Under e->lock: the contiguous known prefix, for bg_fill. */
static void status_advance_locked(struct engine *e, struct fetcher *f)
{
  uint64_t c = e->bs_known_until / STATUS_CHUNK;
  while (c < f->nchunks && f->status_known[c] >= MIN((c + 1) * STATUS_CHUNK, e->size))
    c++;
  e->bs_known_until = c < f->nchunks ? f->status_known[c] : e->size;
}

static int status_extent_cb(void *user_data, const char *ctx, uint64_t off,
                            uint32_t *entries, size_t n, int *error)
{
  struct status_query *q = user_data;
  struct engine *e = q->e;
  if (strcmp(ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || !status_query_live(q)) return 0;
  for (size_t i = 0; i + 1 < n; i += 2) {
    uint64_t len = entries[i], end = off + len;
    if (entries[i + 1] & LIBNBD_STATE_ZERO) {
      uint64_t first = (off + e->bs - 1) / e->bs;
      uint64_t last = end >= e->size ? e->nblocks : end / e->bs;   /* exclusive */
      if (last > first) engine_mark_zero(e, first, last - first);
    }
    off = end;
  }
  struct fetcher *f = e->f;
  pthread_mutex_lock(&e->lock);
  uint64_t cend = MIN((q->chunk + 1) * STATUS_CHUNK, e->size);
  /* The zero runs are marked: the rest of what the reply covers is data. */
  f->status_known[q->chunk] = MAX(f->status_known[q->chunk], MIN(off, cend));
  status_advance_locked(e, f);
  pthread_mutex_unlock(&e->lock);
  return 0;
}

static int status_done_cb(void *user_data, int *error)
{
  struct status_query *q = user_data;
  struct engine *e = q->e;
  struct fetcher *f = e->f;
  if (!status_query_live(q)) return 1;
  f->status_asking[q->chunk] = false;
  f->status_outstanding--;
  if (*error && *error != ENOTCONN && *error != ESHUTDOWN) {
    log_warn("block status from the source failed (%s); copying that range "
             "without skipping zeros", strerror(*error));
    pthread_mutex_lock(&e->lock);
    f->status_known[q->chunk] = MIN((q->chunk + 1) * STATUS_CHUNK, e->size);
    status_advance_locked(e, f);
    pthread_mutex_unlock(&e->lock);
  }
  return 1;
}

static void status_query_free(void *user_data) { free(user_data); }

/* Keeps up to STATUS_QUERIES block-status queries in flight for the chunks
 * ahead of the background copy, so that learning where the zeros are is
 * not one round trip per reply (servers may answer part of a range). */
static void maybe_query_status(struct engine *e, struct fetcher *f, int i)
{
  pthread_mutex_lock(&e->lock);
  bool want = e->source_has_status && e->bg_running && !e->bg_paused &&
              e->bs_known_until < e->size;
  uint64_t first = e->bs_known_until / STATUS_CHUNK;
  uint64_t horizon = e->bg_cursor * e->bs + STATUS_QUERIES * STATUS_CHUNK;
  pthread_mutex_unlock(&e->lock);
  if (!want) return;
  for (uint64_t c = first; c < f->nchunks && f->status_outstanding < STATUS_QUERIES &&
                           c * STATUS_CHUNK < MAX(horizon, e->bs_known_until + STATUS_CHUNK); c++) {
    uint64_t cend = MIN((c + 1) * STATUS_CHUNK, e->size);
    uint64_t from = f->status_known[c];
    if (f->status_asking[c] || from >= cend) continue;
    struct status_query *q = malloc(sizeof *q);
    if (!q) return;
    *q = (struct status_query) { e, c, (unsigned) i, f->c[i].gen };
    f->status_asking[c] = true;
    f->status_conn[c] = i;
    f->status_outstanding++;
    if (nbd_aio_block_status(f->c[i].h, cend - from, from,
          (nbd_extent_callback) { .callback = status_extent_cb, .user_data = q },
          (nbd_completion_callback) { .callback = status_done_cb, .user_data = q,
                                      .free = status_query_free },
          0) < 0) {
      f->status_asking[c] = false;
      f->status_outstanding--;
      log_warn("cannot ask the source for block status: %s", nbd_get_error());
      pthread_mutex_lock(&e->lock);
      e->source_has_status = false;
      e->bs_known_until = e->size;
      pthread_mutex_unlock(&e->lock);
      return;
    }
  }
}

/* Under e->lock.  Shuffled images alternate short runs of data and zero
 * blocks; a job per run means a request (and its per-request costs at
 * both ends) every few KiB.  When zeros cost next to nothing on the wire
 * (zstd), a background job reads on across a gap of at most BRIDGE_MAX
 * blocks that block status found zero, provided missing blocks follow
 * before lim.  Returns where the run may continue (b if it may not).
 * The bridged blocks stay present and untouched: engine_job_finished
 * writes only blocks still missing (I1, I3). */
#define BRIDGE_MAX 32
static uint64_t bridge_gap(struct engine *e, uint64_t b, uint64_t lim)
{
  uint64_t g = b;
  if (!e->zero_known || !e->bridge_zeros) return b;
  while (g < lim && g - b < BRIDGE_MAX && bitmap_test(e->bm, g) &&
         (e->zero_known[g / 64] >> (g % 64) & 1))
    g++;
  if (g == b || g >= lim || g - b >= BRIDGE_MAX || bitmap_test(e->bm, g) ||
      inflight_get(e, g))
    return b;
  return g;
}

static void bg_fill(struct engine *e, struct fetcher *f, uint64_t now)
{
  struct fetch_job *list = NULL, **tail = &list, *j, *next;
  /* Several jobs per window, so replies stream back to back. */
  uint64_t job_bytes = MIN((uint64_t) e->cfg.max_fetch, MAX(e->bg_window / 16, (uint64_t) 256 << 10));
  uint64_t per_job = MAX(1, job_bytes / e->bs);
  int ci = pick_conn(f, false);
  bool wrapped = false;
  if (ci < 0) return;
  maybe_query_status(e, f, ci);

  pthread_mutex_lock(&e->lock);
  if (!e->bg_running || e->bg_paused ||
      (e->state != ENGINE_PROXYING && e->state != ENGINE_SOURCE_LOST)) {
    pthread_mutex_unlock(&e->lock);
    return;
  }
  if (e->bg_rate) {
    int64_t cap = MAX((int64_t) e->cfg.max_fetch, (int64_t) (e->bg_rate / 10));
    f->tokens += (int64_t) ((now - f->tokens_at) / 1000 * e->bg_rate / 1000000);
    if (f->tokens > cap) f->tokens = cap;
  }
  f->tokens_at = now;
  for (int iter = 0; iter < 4096; iter++) {
    uint64_t b;
    if (e->bg_inflight_bytes >= e->bg_window) break;
    if (e->bg_rate && f->tokens <= 0) break;
    b = bitmap_next_clear(e->bm, e->bg_cursor);
    while (b < e->nblocks && inflight_get(e, b))
      b = bitmap_next_clear(e->bm, b + 1);
    if (b >= e->nblocks) {
      if (wrapped || e->bg_cursor == 0) break;
      e->bg_cursor = 0;            /* blocks left behind (failed, in flight) */
      wrapped = true;
      continue;
    }
    if (e->source_has_status && b * e->bs >= e->bs_known_until) break;
    uint64_t s = b;
    uint64_t lim = e->source_has_status ? (e->bs_known_until + e->bs - 1) / e->bs : e->nblocks;
    lim = MIN(lim, s + per_job);      /* lim <= nblocks */
    for (;;) {
      while (b < lim && !bitmap_test(e->bm, b) && !inflight_get(e, b))
        b++;
      uint64_t g = bridge_gap(e, b, lim);
      if (g == b) break;
      b = g;                      /* read across the zeros: one request, not two */
    }
    j = job_new_locked(e, s, b - s, false);
    if (!j) break;
    e->bg_inflight_bytes += j->len;
    if (e->bg_rate) f->tokens -= j->len;
    e->bg_cursor = b;
    *tail = j;                     /* ascending offsets: the source reads ahead */
    tail = &j->next;
  }
  *tail = NULL;
  pthread_mutex_unlock(&e->lock);
  for (j = list; j; j = next) {
    next = j->next;
    int i = pick_conn(f, false);
    if (i < 0 || !submit(e, f, j, i)) requeue(e, j);
  }
}

/* Whether zero blocks cost next to nothing on the wire to target: our
 * WAN transport with zstd.  (Plain NBD servers may send zeros as data.) */
static bool zeros_are_cheap(struct engine *e, const char *target)
{
  CLEANUP_FREE char *host = NULL;
  CLEANUP_FREE char *port = NULL;
  CLEANUP_FREE char *exp = NULL;
  bool tls;
  return e->cfg.compress_level >= 0 &&
         wan_parse_uri(target, &host, &port, &exp, &tls) == 0;
}

/* ---------- the loop ---------- */

static void process_done(struct engine *e, struct fetcher *f)
{
  while (f->done) {
    struct fetch_job *j = f->done;
    f->done = j->next;
    if (!j->err) {
      engine_job_finished(e, j);
      continue;
    }
    pthread_mutex_lock(&e->lock);
    e->fetch_errors++;
    pthread_mutex_unlock(&e->lock);
    log_warn("fetch of %" PRIu64 "+%" PRIu64 " from the source failed: %s "
             "(attempt %u; retrying)", j->off, j->len, strerror(j->err), j->attempts);
    if (j->attempts >= 10 && j->err != ENOTCONN && j->err != ESHUTDOWN) {
      engine_set_error(e, "source refused to read %" PRIu64 "+%" PRIu64 ": %s",
                       j->off, j->len, strerror(j->err));
      engine_job_failed_final(e, j, EIO);
    } else
      requeue(e, j);
  }
}

static void update_state(struct engine *e, struct fetcher *f)
{
  unsigned up = atomic_load(&f->up);
  pthread_mutex_lock(&e->lock);
  if (up && (e->state == ENGINE_CONNECTING || e->state == ENGINE_SOURCE_LOST)) {
    log_info("source %s connected (%u connection%s)", f->target, up, up > 1 ? "s" : "");
    e->state = ENGINE_PROXYING;
  } else if (!up && e->state == ENGINE_PROXYING) {
    log_warn("lost the source %s; reconnecting (client reads of missing blocks "
             "wait up to %u s)", f->target, e->cfg.source_timeout_s);
    e->state = ENGINE_SOURCE_LOST;
  }
  pthread_mutex_unlock(&e->lock);
}

static void drive_connections(struct engine *e, struct fetcher *f, uint64_t now)
{
  for (unsigned i = 0; i < f->n; i++) {
    struct sconn *c = &f->c[i];
    char err[512];
    if (c->st == SC_DOWN && now >= c->retry_at) {
      c->h = make_handle(e, f->target, err, sizeof err);
      if (!c->h) {
        engine_set_error(e, "%s", err);
        c->backoff_ms = MIN(MAX(c->backoff_ms * 2, BACKOFF_MIN_MS), BACKOFF_MAX_MS);
        c->retry_at = now + (uint64_t) c->backoff_ms * 1000000u;
        continue;
      }
      c->st = SC_CONNECTING;
    }
    if (c->st == SC_CONNECTING) {
      if (nbd_aio_is_ready(c->h)) {
        int64_t sz = nbd_get_size(c->h);
        if (sz != (int64_t) e->size) {
          engine_set_error(e, "source %s has size %" PRId64 " but this cache and "
                           "bitmap are for size %" PRIu64 ": not using it (point "
                           "--target/reconnect at the right export)",
                           f->target, sz, e->size);
          log_error("%s", e->last_error);
          c->backoff_ms = BACKOFF_MAX_MS / 2;
          conn_close(e, f, i, false);
          continue;
        }
        c->st = SC_UP;
        c->backoff_ms = 0;
        atomic_fetch_add(&f->up, 1);
        if (!f->status_checked) {
          f->status_checked = true;
          bool st = nbd_can_meta_context(c->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
          pthread_mutex_lock(&e->lock);
          e->source_has_status = st;
          if (!st) e->bs_known_until = e->size;
          pthread_mutex_unlock(&e->lock);
        }
      } else if (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h)) {
        engine_set_error(e, "connecting to source %s failed: %s", f->target,
                         nbd_get_error());
        conn_close(e, f, i, false);
      }
    }
    if (c->st == SC_UP && (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h))) {
      engine_set_error(e, "connection to source %s lost: %s", f->target, nbd_get_error());
      conn_close(e, f, i, false);
    }
  }
}

static void *fetcher_main(void *arg)
{
  struct engine *e = arg;
  struct fetcher *f = e->f;

  while (!atomic_load(&f->quit) && !atomic_load(&e->stopping)) {
    struct pollfd p[MAX_CONNS + 1];
    int idx[MAX_CONNS + 1], np = 0, timeout = 100;
    uint64_t now = now_ns();

    /* Switch address on request (same source, checked by size). */
    pthread_mutex_lock(&e->lock);
    char *nt = e->new_target;
    e->new_target = NULL;
    pthread_mutex_unlock(&e->lock);
    if (nt) {
      for (unsigned i = 0; i < f->n; i++) conn_close(e, f, i, true);
      for (unsigned i = 0; i < f->n; i++) f->c[i].retry_at = 0;
      free(f->target);
      f->target = nt;
      bool cheap = zeros_are_cheap(e, nt);
      pthread_mutex_lock(&e->lock);
      e->bridge_zeros = cheap;
      free(e->target);
      e->target = strdup(nt);
      pthread_mutex_unlock(&e->lock);
    }
    drive_connections(e, f, now);
    update_state(e, f);
    if (atomic_load(&f->up)) {
      submit_queued(e, f);
      bg_fill(e, f, now);
      maybe_probe(e, f, now);
      size_window(e, f, now);
    }
    if (now - f->last_expire > 100000000u) {
      engine_expire_waiters(e, now);
      f->last_expire = now;
    }
    if (now - f->rate_at >= 1000000000u) {
      pthread_mutex_lock(&e->lock);
      uint64_t b = e->bytes_fetched;
      e->fetch_rate = (b - f->rate_bytes) * 1000000000u / (now - f->rate_at);
      pthread_mutex_unlock(&e->lock);
      f->rate_bytes = b;
      f->rate_at = now;
    }

    p[np].fd = e->wake_fd; p[np].events = POLLIN; idx[np++] = -1;
    for (unsigned i = 0; i < f->n; i++) {
      struct sconn *c = &f->c[i];
      if (c->st == SC_DOWN) continue;
      unsigned dir = nbd_aio_get_direction(c->h);
      p[np].fd = nbd_aio_get_fd(c->h);
      p[np].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                     ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
      if (p[np].fd < 0) continue;
      idx[np++] = i;
    }
    if (poll(p, np, timeout) < 0 && errno != EINTR) {
      log_error("fetcher: poll failed: %s", strerror(errno));
      continue;
    }
    for (int k = 0; k < np; k++) {
      if (!p[k].revents) continue;
      if (idx[k] < 0) {
        uint64_t v;
        if (read(e->wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
          log_debug("fetcher wake read: %s", strerror(errno));
        continue;
      }
      struct sconn *c = &f->c[idx[k]];
      if (!c->h) continue;
      if (p[k].revents & (POLLIN | POLLHUP | POLLERR)) nbd_aio_notify_read(c->h);
      else if (p[k].revents & POLLOUT) nbd_aio_notify_write(c->h);
    }
    process_done(e, f);
  }

  /* Stopping (detach or close): nothing may touch the source any more. */
  for (unsigned i = 0; i < f->n; i++) conn_close(e, f, i, true);
  process_done(e, f);
  pthread_mutex_lock(&e->lock);
  struct fetch_job *lists[2] = { e->od_head, e->retry_head };
  e->od_head = e->od_tail = e->retry_head = NULL;
  pthread_mutex_unlock(&e->lock);
  for (int l = 0; l < 2; l++)
    for (struct fetch_job *j = lists[l], *next; j; j = next) {
      next = j->next;
      engine_job_failed_final(e, j, EIO);
    }
  return NULL;
}

int fetcher_start(struct engine *e, char *err, size_t errlen)
{
  struct fetcher *f = calloc(1, sizeof *f);
  if (!f) { snprintf(err, errlen, "out of memory"); return -1; }
  f->n = MIN(MAX(e->cfg.connections, 1u), (unsigned) MAX_CONNS);
  f->nchunks = (e->size + STATUS_CHUNK - 1) / STATUS_CHUNK;
  f->status_known = calloc(f->nchunks + 1, sizeof *f->status_known);
  f->status_asking = calloc(f->nchunks + 1, sizeof *f->status_asking);
  f->status_conn = calloc(f->nchunks + 1, sizeof *f->status_conn);
  if (!f->status_known || !f->status_asking || !f->status_conn) {
    snprintf(err, errlen, "out of memory");
    free(f->status_known); free(f->status_asking); free(f->status_conn); free(f);
    return -1;
  }
  for (uint64_t c = 0; c < f->nchunks; c++) f->status_known[c] = c * STATUS_CHUNK;
  /* Bridging zero gaps (bg_fill) only where zeros cross compressed. */
  e->bridge_zeros = zeros_are_cheap(e, e->target);
  if (e->bridge_zeros && !e->zero_known)
    e->zero_known = calloc(e->nblocks / 64 + 1, sizeof *e->zero_known);
  if (e->probe_handle) {          /* connected at start-up: use it */
    f->c[0].h = e->probe_handle;
    f->c[0].st = SC_CONNECTING;   /* drive_connections checks and adopts it */
    e->probe_handle = NULL;
  }
  f->target = strdup(e->target);
  f->rate_at = f->tokens_at = now_ns();
  /* The first round trip: from the WAN handshake, taken before any bulk
   * data could queue on the path (a probe in the first second may wait
   * behind the background copy's start on connection 0). */
  if ((f->rtt_min = wan_handshake_rtt_ns())) {
    f->rtt_epoch = f->rate_at;
    e->rtt_ns = f->rtt_min;
  }
  e->f = f;
  if (pthread_create(&e->fetcher, NULL, fetcher_main, e) != 0) {
    snprintf(err, errlen, "cannot start the fetcher thread");
    free(f->target);
    free(f->status_known);
    free(f->status_asking);
    free(f->status_conn);
    free(f);
    e->f = NULL;
    return -1;
  }
  e->fetcher_started = true;
  return 0;
}

void fetcher_stop(struct engine *e)
{
  struct fetcher *f = e->f;
  if (!f) return;
  atomic_store(&f->quit, true);
  fetcher_wake(e);
  if (pthread_equal(pthread_self(), e->fetcher))
    return;                     /* detach from the fetcher itself: it exits */
  if (e->fetcher_started) {
    pthread_join(e->fetcher, NULL);
    e->fetcher_started = false;
    free(f->target);
    free(f->status_known);
    free(f->status_asking);
    free(f->status_conn);
    free(f);
    e->f = NULL;
  }
}
