/* copy.c: the background copy's policy, run on the source thread's tick:
 * block status asked ahead of the copy (zero runs become JOB_ZERO jobs),
 * background jobs made in ascending order within a window of bytes in
 * flight (sized from the measured rate and round trip) and a token-bucket
 * rate cap, zero gaps bridged where zeros are cheap on the wire; the
 * regions the source's VM read last first (its read map). */
#include "engine-int.h"
#include "digest.h"
#include "read-map.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>

/* Block status is asked up to 1 GiB ahead of the copy: zero runs land as
 * the answers come (most in holes: no job, no write), so a copy that ends
 * in a long hole does not spend its last round trips learning of it. */
#define STATUS_CHUNK (UINT64_C(64) << 20)  /* block status asked per query */
#define STATUS_QUERIES 16                    /* block status queries in flight */
#define BRIDGE_MAX 32

#define DIG_QUERIES 8                         /* digest queries in flight */
#define RECENT_DIG_CHUNKS 16                  /* digest chunks asked for the read map */
#define LOCAL_INFLIGHT (UINT64_C(64) << 20)   /* bytes being copied from seeds */

struct status_query {
  struct source_req sr;
  struct engine *e;
  uint64_t chunk;
  uint64_t reached;             /* end of the last run the reply gave */
};

struct digest_query {
  struct source_req sr;
  struct engine *e;
  uint64_t chunk;
  uint8_t *buf;
};

static void adopt_prefetch_locked(struct engine *e);

int copy_init(struct engine *e)
{
  struct copy *c = &e->copy;
  c->nchunks = (e->size + STATUS_CHUNK - 1) / STATUS_CHUNK;
  c->status_known = calloc(c->nchunks + 1, sizeof *c->status_known);
  c->status_asking = calloc(c->nchunks + 1, sizeof *c->status_asking);
  if (!c->status_known || !c->status_asking) return -1;
  for (uint64_t k = 0; k < c->nchunks; k++) c->status_known[k] = k * STATUS_CHUNK;
  c->status_until = e->has_status ? 0 : e->size;
  /* Bridging zero gaps only where zeros cross compressed. */
  c->zero_known = calloc(e->nblocks / 64 + 1, sizeof *c->zero_known);
  if (!c->zero_known) return -1;
  c->rate_at = c->tokens_at = now_ns();
  c->recent_dig = UINT64_MAX;
  c->trace = getenv("XNBD_TRACE_COPY") != NULL;
  uint64_t nd = 0;
  uint8_t **dig = NULL;
  bool *asking = NULL, *done = NULL;
  if (e->dsrc || e->dfile || e->dig_pending) {
    nd = (e->nblocks + DIG_CHUNK_BLOCKS - 1) / DIG_CHUNK_BLOCKS;
    dig = calloc(nd + 1, sizeof *dig);
    asking = calloc(nd + 1, sizeof *asking);
    done = calloc(nd + 1, sizeof *done);
    if (!dig || !asking || !done) {
      free(dig);
      free(asking);
      free(done);
      return -1;
    }
  }
  /* Published together under the lock: the digest prefetch may land on
   * the source thread right now, and tells "before copy_init" by c->dig. */
  pthread_mutex_lock(&e->lock);
  c->ndchunks = nd;
  c->dig_asking = asking;
  c->dig_done = done;
  c->dig = dig;
  adopt_prefetch_locked(e);
  pthread_mutex_unlock(&e->lock);
  return 0;
}

void copy_free(struct engine *e)
{
  for (uint64_t k = 0; e->copy.dig && k < e->copy.ndchunks; k++) free(e->copy.dig[k]);
  free(e->copy.dig);
  free(e->copy.dig_asking);
  free(e->copy.dig_done);
  free(e->copy.status_known);
  free(e->copy.status_asking);
  free(e->copy.zero_known);
  free(e->copy.map_buf);
  free(e->copy.recent);
  if (e->copy.pre_q) {            /* a prefetch answered, never adopted */
    free(e->copy.pre_q->buf);
    free(e->copy.pre_q);
  }
}

/* ---------- block status ---------- */

/* Under lock: the contiguous known prefix. */
static void status_advance_locked(struct engine *e)
{
  struct copy *c = &e->copy;
  uint64_t k = c->status_until / STATUS_CHUNK;
  while (k < c->nchunks && c->status_known[k] >= MIN((k + 1) * STATUS_CHUNK, e->size))
    k++;
  c->status_until = k < c->nchunks ? c->status_known[k] : e->size;
}

/* Under lock: how far the copy may make jobs, in bytes: as far as block
 * status is known, and, with digests, as far as they are in -- a digest
 * tells a zero block as block status would (digest_says_zero), so the
 * first blocks need not wait for the first status reply, which is asked
 * only once the copy starts, after the digests came with the digest
 * export's handshake. */
static uint64_t known_until_locked(struct engine *e)
{
  struct copy *c = &e->copy;
  if (copy_digests_on(e))     /* (a chunk that failed: status) */
    return MAX(c->status_until, MIN(c->dig_good_until * e->bs, e->size));
  return c->status_until;
}

/* Under lock: lim (a block), but not past the run of digests in from
 * block b (the copy's prefix, or chunks asked for the read map's regions
 * beyond it): a job from b must not run into blocks a seed may hold. */
static uint64_t dig_cap_locked(struct engine *e, uint64_t b, uint64_t lim)
{
  struct copy *c = &e->copy;
  if (!copy_digests_on(e)) return lim;
  if (b < c->dig_until) return MIN(lim, c->dig_until);
  uint64_t k = b / DIG_CHUNK_BLOCKS;      /* (past the prefix: a few chunks) */
  while (k < c->ndchunks && c->dig_done[k]) k++;
  return MIN(lim, MIN(k * DIG_CHUNK_BLOCKS, e->nblocks));
}

/* One checked run of a reply (source.c clipped it to the request). */
static void status_extent(struct source_req *r, const struct extent_run *run)
{
  struct status_query *q = r->opaque;
  struct engine *e = q->e;
  uint64_t end = run->off + run->len;
  q->reached = end;
  if (!run->zero) return;
  uint64_t first = (run->off + e->bs - 1) / e->bs;
  uint64_t last = end >= e->size ? e->nblocks : end / e->bs;   /* exclusive */
  struct job *zl[64];
  uint64_t b = first, landed = 0;
  while (b < last) {
    unsigned nz = 0;
    pthread_mutex_lock(&e->lock);
    while (b < last && nz < ARRAY_SIZE(zl)) {
      if (bitmap_test(e->bm, b) || inflight_get(e, b)) { b++; continue; }
      uint64_t s = b;
      bool data = cache_may_hold_data(e, b);
      while (b < last && !bitmap_test(e->bm, b) && !inflight_get(e, b) &&
             cache_may_hold_data(e, b) == data)
        b++;
      if (!data) {                /* the cache reads as zero there already */
        landed += land_zero_in_holes_locked(e, s, b - s);
        continue;
      }
      struct job *j = job_make_locked(e, JOB_ZERO, s, b - s);
      if (j) zl[nz++] = j;
    }
    pthread_mutex_unlock(&e->lock);
    for (unsigned i = 0; i < nz; i++) job_start(e, zl[i]);
  }
  if (landed) engine_check_complete(e);
}

static void status_done(struct source_req *r, int err)
{
  struct status_query *q = r->opaque;
  struct engine *e = q->e;
  struct copy *c = &e->copy;
  pthread_mutex_lock(&e->lock);
  c->status_asking[q->chunk] = false;
  c->status_outstanding--;
  uint64_t cend = MIN((q->chunk + 1) * STATUS_CHUNK, e->size);
  if (err || q->reached <= c->status_known[q->chunk]) {
    /* Failed, refused as broken (EPROTO: D1/D6), or no progress: that
     * range is copied as data, never asked again. */
    if (err && err != ESHUTDOWN)
      snprintf(e->last_error, sizeof e->last_error, "block status for %"
               PRIu64 "+%" PRIu64 " failed (%s): copying it without skipping zeros",
               r->off, r->len, strerror(err));
    if (err != ESHUTDOWN) c->status_known[q->chunk] = cend;
  } else
    c->status_known[q->chunk] = MIN(q->reached, cend);
  status_advance_locked(e);
  pthread_mutex_unlock(&e->lock);
  free(q);
}

/* Keeps up to STATUS_QUERIES queries in flight for the chunks ahead of the
 * copy, so learning where the zeros are is not one round trip per reply. */
static void query_status(struct engine *e)
{
  struct copy *c = &e->copy;
  struct status_query *qs[STATUS_QUERIES];
  unsigned nq = 0;
  pthread_mutex_lock(&e->lock);
  if (e->has_status && c->running && !c->paused && c->status_until < e->size) {
    uint64_t horizon = c->cursor * e->bs + STATUS_QUERIES * STATUS_CHUNK;
    horizon = MAX(horizon, c->status_until + STATUS_CHUNK);
    for (uint64_t k = c->status_until / STATUS_CHUNK;
         k < c->nchunks && c->status_outstanding < STATUS_QUERIES && k * STATUS_CHUNK < horizon;
         k++) {
      uint64_t cend = MIN((k + 1) * STATUS_CHUNK, e->size), from = c->status_known[k];
      if (c->status_asking[k] || from >= cend) continue;
      struct status_query *q = calloc(1, sizeof *q);
      if (!q) break;
      q->e = e;
      q->chunk = k;
      q->reached = from;
      q->sr = (struct source_req) {
        .kind = SOURCE_STATUS, .off = from, .len = cend - from,
        .extent = status_extent, .done = status_done, .opaque = q,
      };
      c->status_asking[k] = true;
      c->status_outstanding++;
      qs[nq++] = q;
    }
  }
  pthread_mutex_unlock(&e->lock);
  for (unsigned i = 0; i < nq; i++) source_submit(e->src, &qs[i]->sr);
}

/* ---------- digests (deduplication) ---------- */

/* Under lock: the contiguous prefix of chunks whose digests are in. */
static void dig_advance_locked(struct engine *e)
{
  struct copy *c = &e->copy;
  uint64_t k = c->dig_until / DIG_CHUNK_BLOCKS;
  while (k < c->ndchunks && c->dig_done[k]) k++;
  c->dig_until = MIN(k * DIG_CHUNK_BLOCKS, e->nblocks);
  uint64_t g = c->dig_good_until / DIG_CHUNK_BLOCKS;
  while (g < k && c->dig[g]) g++;     /* chunks whose digests came (not failed) */
  c->dig_good_until = MIN(g * DIG_CHUNK_BLOCKS, e->nblocks);
}

/* Under lock: a digest query's answer goes into the copy; frees q. */
static void land_digests_locked(struct engine *e, struct digest_query *q, int err)
{
  struct copy *c = &e->copy;
  if (err) {                      /* no dedup there: fetched as usual */
    snprintf(e->last_error, sizeof e->last_error, "digests of blocks %" PRIu64
             "+%u from the source failed (%s): copying them without "
             "deduplication", q->chunk * DIG_CHUNK_BLOCKS, DIG_CHUNK_BLOCKS,
             strerror(err));
    free(q->buf);
  } else {
    c->dig[q->chunk] = q->buf;
    e->bytes_digests += q->sr.len;
  }
  c->dig_done[q->chunk] = true;
  dig_advance_locked(e);
  free(q);
}

static void digests_done(struct source_req *r, int err)
{
  struct digest_query *q = r->opaque;
  struct engine *e = q->e;
  struct copy *c = &e->copy;
  bool landed = false;
  pthread_mutex_lock(&e->lock);
  if (!err && r->attempts == 1 && r->replied_ns > r->sent_ns) {
    /* A chunk of digests times the path as a background job does (its
     * own bytes over the time from its sending): the first one, asked
     * before the copy starts, gives start-up a rate before any data. */
    win_job_sample(&c->win, r->len, now_ns() - r->sent_ns, r->replied_ns - r->sent_ns);
  }
  if (err == ESHUTDOWN) {
    if (c->dig) {
      c->dig_asking[q->chunk] = false;
      c->dig_outstanding--;
    } else
      c->pre_inflight = false;
    free(q->buf);
    free(q);
  } else if (!c->dig) {           /* the prefetch, before copy_init: kept */
    c->pre_inflight = false;
    c->pre_q = q;
    c->pre_err = err;
  } else {
    c->dig_asking[q->chunk] = false;
    c->dig_outstanding--;
    land_digests_locked(e, q, err);
    landed = true;
  }
  pthread_mutex_unlock(&e->lock);
  /* The copy may be waiting for exactly these digests: its policy runs on
   * the data source's thread, which nothing else may wake for a while. */
  if (landed) source_wake(e->src);
}

/* When the digest export is joined (dig_attach; its source started), for
 * a copy that starts at block 0 and may read digests at once (not
 * standby): the first chunk's digests, read along with the handshake over
 * xnbd:// (source_config.early_read: in already, as GO's answer waits for
 * them), else asked now, one round trip before the copy could (it waits
 * for the data connection) -- if the copy does not exist yet.  Joined at
 * engine_open, the answer is kept until copy_init adopts it; joined later
 * on the tick (the copy exists and waited for these), digests read with
 * the handshake land at once, and a plain source's are asked by the copy. */
void copy_digest_prefetch(struct engine *e, struct source *dsrc, uint64_t export_size)
{
  struct copy *c = &e->copy;
  uint64_t nb = MIN((uint64_t) DIG_CHUNK_BLOCKS, export_size / DIGEST_LEN);
  if (!nb) return;
  struct digest_query *q = calloc(1, sizeof *q);
  uint64_t elen = 0;
  struct wan_early_info ei;
  uint8_t *early = source_early_take(dsrc, &elen, &ei);
  if (early && elen != nb * DIGEST_LEN) {       /* a short export: asked again */
    free(early);
    early = NULL;
  }
  uint8_t *buf = early ? early : malloc(nb * DIGEST_LEN);
  if (!q || !buf) { free(q); free(buf); return; }
  *q = (struct digest_query) { .e = e, .chunk = 0, .buf = buf };
  q->sr = (struct source_req) {
    .kind = SOURCE_READ, .off = 0, .len = nb * DIGEST_LEN, .buf = buf,
    .done = digests_done, .opaque = q,
  };
  bool landed = false;
  pthread_mutex_lock(&e->lock);
  if (early && (!c->dig || (!c->dig_done[0] && !c->dig_asking[0]))) {
    /* Asked with the handshake, and in: the answer.  A job's rate sample,
     * as digests_done takes one (its bytes over the time since it left;
     * its time on the path: the reply's, the source's hashing left out).
     * Its reply crossed as one burst once hashed: its bytes over the time
     * they took are the path's rate (win_burst), in image bytes as the
     * window counts them -- but counting at most 4 image bytes per link
     * byte (WIN_RATIO_MAX, as the link factor): the digests of zero
     * blocks compress far better than any data.  And its bytes grow the
     * window as if the copy had asked them (win_credit; only before the
     * copy started). */
    win_job_sample(&c->win, q->sr.len, now_ns() - ei.sent_ns, ei.done_ns - ei.first_ns);
    win_burst(&c->win, MIN(q->sr.len, (uint64_t) (WIN_RATIO_MAX * (double) ei.wire)),
              ei.done_ns - ei.first_ns);
    win_credit(&c->win, q->sr.len);
    log_debug("digests of blocks 0+%" PRIu64 " came with the digest export's "
              "handshake (%.1f ms after it left; %" PRIu64 " link bytes in %.1f ms)", nb,
              (double) (ei.done_ns - ei.sent_ns) / 1e6, ei.wire,
              (double) (ei.done_ns - ei.first_ns) / 1e6);
    if (!c->dig) {        /* kept until copy_init adopts it */
      c->pre_q = q;
      c->pre_err = 0;
    } else {              /* the copy waited for it */
      land_digests_locked(e, q, 0);
      landed = true;
    }
    q = NULL;
  } else if (!early && !c->dig) {
    c->pre_inflight = true;
  } else {                /* the copy asks them itself */
    free(q->buf);
    free(q);
    q = NULL;
  }
  pthread_mutex_unlock(&e->lock);
  if (q) source_submit(dsrc, &q->sr);
  if (landed) source_wake(e->src);
}

/* Under lock, in copy_init: the prefetch's answer (or the prefetch still
 * in flight) becomes chunk 0's query.  Dropped when the digest export was
 * refused after all (no dsrc, or a size that does not match). */
static void adopt_prefetch_locked(struct engine *e)
{
  struct copy *c = &e->copy;
  struct digest_query *q = c->pre_q;
  c->pre_q = NULL;
  bool fits = c->dig && e->dsrc &&
              (!q || q->sr.len == MIN((uint64_t) DIG_CHUNK_BLOCKS, e->nblocks) * DIGEST_LEN);
  if (q && fits) land_digests_locked(e, q, c->pre_err);
  else if (q) { free(q->buf); free(q); }
  else if (c->pre_inflight && fits) {
    c->dig_asking[0] = true;
    c->dig_outstanding++;
  }
}

/* Chunk k's digests from the --digests file (locally). */
static void read_digest_chunk(struct engine *e, uint64_t k)
{
  struct copy *c = &e->copy;
  uint64_t nb = MIN((uint64_t) DIG_CHUNK_BLOCKS, e->nblocks - k * DIG_CHUNK_BLOCKS);
  uint8_t *buf = malloc(nb * DIGEST_LEN);
  int rc = buf ? digest_file_read(e->dfile, k * DIG_CHUNK_BLOCKS, nb, buf) : -1;
  pthread_mutex_lock(&e->lock);
  if (rc < 0) {
    snprintf(e->last_error, sizeof e->last_error, "reading digests of blocks %"
             PRIu64 "+%" PRIu64 " from --digests failed (%s): copying them "
             "without deduplication", k * DIG_CHUNK_BLOCKS, nb, strerror(errno));
    free(buf);
  } else
    c->dig[k] = buf;
  c->dig_done[k] = true;
  dig_advance_locked(e);
  pthread_mutex_unlock(&e->lock);
}

/* Digests from an xnbd-digest file: read ahead of the copy, and for the
 * read map's next region. */
static void read_digest_file(struct engine *e)
{
  struct copy *c = &e->copy;
  pthread_mutex_lock(&e->lock);
  uint64_t cur = c->cursor / DIG_CHUNK_BLOCKS;
  for (uint64_t k = 0; k < cur && k < c->ndchunks; k++)
    if (c->dig[k]) { free(c->dig[k]); c->dig[k] = NULL; }
  bool run = c->running && !c->paused && !e->standby && !c->dig_off;
  uint64_t from = MIN(cur, c->dig_until / DIG_CHUNK_BLOCKS);   /* as query_digests */
  uint64_t rk = c->recent_dig;
  pthread_mutex_unlock(&e->lock);
  for (uint64_t k = from; run && k < c->ndchunks && k < cur + 2 * DIG_QUERIES; k++)
    if (!c->dig_done[k]) read_digest_chunk(e, k);
  if (run && rk < c->ndchunks && !c->dig_done[rk]) {
    read_digest_chunk(e, rk);
    pthread_mutex_lock(&e->lock);
    c->recent_chunks++;
    pthread_mutex_unlock(&e->lock);
  }
}

/* Digests are asked only while the copy runs, which is never in standby:
 * a digest read while the VM still ran (and wrote) at the source is never
 * used.  Buffers behind the copy are dropped. */
/* Under lock: a query for chunk k's digests, marked asked; NULL if out of
 * memory. */
static struct digest_query *dig_query_locked(struct engine *e, uint64_t k)
{
  struct copy *c = &e->copy;
  uint64_t nb = MIN((uint64_t) DIG_CHUNK_BLOCKS, e->nblocks - k * DIG_CHUNK_BLOCKS);
  struct digest_query *q = calloc(1, sizeof *q);
  uint8_t *buf = malloc(nb * DIGEST_LEN);
  if (!q || !buf) { free(q); free(buf); return NULL; }
  *q = (struct digest_query) { .e = e, .chunk = k, .buf = buf };
  q->sr = (struct source_req) {
    .kind = SOURCE_READ, .off = k * DIG_CHUNK_BLOCKS * DIGEST_LEN,
    .len = nb * DIGEST_LEN, .buf = buf, .done = digests_done, .opaque = q,
  };
  c->dig_asking[k] = true;
  c->dig_outstanding++;
  return q;
}

static void query_digests(struct engine *e)
{
  struct copy *c = &e->copy;
  struct digest_query *qs[DIG_QUERIES + 1], *q;
  unsigned nq = 0;
  if (e->dfile) { read_digest_file(e); return; }
  if (!e->dsrc || c->dig_off) return;
  pthread_mutex_lock(&e->lock);
  uint64_t cur = c->cursor / DIG_CHUNK_BLOCKS;
  for (uint64_t k = 0; k < cur && k < c->ndchunks; k++)
    if (c->dig[k]) { free(c->dig[k]); c->dig[k] = NULL; }
  if (c->running && !c->paused && !e->standby) {
    /* From the first chunk not in yet: the copy waits there (dig_until),
     * even when the cursor is past it. */
    for (uint64_t k = MIN(cur, c->dig_until / DIG_CHUNK_BLOCKS);
         k < c->ndchunks && k < cur + 2 * DIG_QUERIES &&
                           c->dig_outstanding < DIG_QUERIES; k++) {
      if (c->dig_done[k] || c->dig_asking[k]) continue;
      if (!(q = dig_query_locked(e, k))) break;
      qs[nq++] = q;
    }
    /* The chunk the read map's next region waits on (recent_locked). */
    uint64_t k = c->recent_dig;
    if (k < c->ndchunks && !c->dig_done[k] && !c->dig_asking[k] &&
        (q = dig_query_locked(e, k))) {
      qs[nq++] = q;
      c->recent_chunks++;
    }
  }
  pthread_mutex_unlock(&e->lock);
  for (unsigned i = 0; i < nq; i++) source_submit(e->dsrc, &qs[i]->sr);
}

/* A digest export that stays unreachable must not hold the copy back:
 * after --source-timeout without it, deduplication is given up. */
static void digests_watch(struct engine *e, uint64_t now)
{
  struct copy *c = &e->copy;
  struct source_stats ds;
  if (!e->dsrc || c->dig_off) return;
  source_get_stats(e->dsrc, &ds);
  if (ds.connections_up) { c->dig_down_at = 0; return; }
  if (!c->dig_down_at) { c->dig_down_at = now; return; }
  if (now - c->dig_down_at < (uint64_t) e->cfg.source_timeout_s * 1000000000u) return;
  pthread_mutex_lock(&e->lock);
  c->dig_off = true;
  snprintf(e->last_error, sizeof e->last_error, "the source's digest export "
           "has been unreachable for %u s (%.200s): copying without deduplication",
           e->cfg.source_timeout_s, ds.last_error);
  pthread_mutex_unlock(&e->lock);
  log_warn("%s", e->last_error);
}

/* ---------- the source's read map ---------- */

#define MAP_PIECE (UINT64_C(1) << 20)   /* bytes of the map per request */

struct map_query {
  struct source_req sr;
  struct engine *e;
};

/* A piece of the map is in (or failed). */
static void map_piece(struct engine *e, int err)
{
  struct copy *c = &e->copy;
  pthread_mutex_lock(&e->lock);
  if (err && !c->map_err) c->map_err = err;
  if (--c->map_pending == 0) c->map_state = MAP_IN;
  pthread_mutex_unlock(&e->lock);
  source_wake(e->src);
}

static void map_done(struct source_req *r, int err)
{
  struct map_query *q = r->opaque;
  struct engine *e = q->e;
  free(q);
  map_piece(e, err);
}

/* Under lock: the regions of the map, most recent first, become the copy's
 * first work (after pre-paging).  Takes regions. */
static void use_map_locked(struct engine *e, uint64_t *regions, uint64_t n, unsigned shift)
{
  struct copy *c = &e->copy;
  c->recent = regions;
  c->nrecent = n;
  c->recent_pos = 0;
  c->recent_next = 0;
  c->recent_shift = shift;
}

/* On the tick: joins the read map's opener once it is done (never waits),
 * reads the map once the copy runs -- in --standby only after 'activate',
 * when the VM at the source has stopped reading -- and orders the copy by
 * it.  A source without a map, or a map that fails a check, leaves the
 * copy in ascending order (logged). */
static void read_map_tick(struct engine *e)
{
  struct copy *c = &e->copy;
  char why[512];
  if (e->map_opener && companion_finished(e->map_opener)) {
    struct source *s = companion_join(e, e->map_opener, read_map_export_size(e->size),
                                      why, sizeof why);
    e->map_opener = NULL;
    if (s && source_start(s, why, sizeof why) < 0) {
      source_close(s);
      s = NULL;
    }
    if (!s)
      log_info("the source has no read map (%s): the copy goes in ascending order", why);
    pthread_mutex_lock(&e->lock);
    e->msrc = s;
    pthread_mutex_unlock(&e->lock);
  }
  if (!e->msrc) return;
  pthread_mutex_lock(&e->lock);
  int state = c->map_state;
  bool ask = state == MAP_NONE && c->running && !c->paused && !e->standby;
  if (ask) {
    c->map_len = read_map_export_size(e->size);
    c->map_buf = malloc(c->map_len);
    if (c->map_buf) {
      c->map_state = MAP_ASKED;
      c->map_pending = (unsigned) ((c->map_len + MAP_PIECE - 1) / MAP_PIECE);
    } else
      c->map_state = MAP_USED;
  }
  pthread_mutex_unlock(&e->lock);
  if (ask && c->map_buf) {
    for (uint64_t off = 0; off < c->map_len; off += MAP_PIECE) {
      struct map_query *q = calloc(1, sizeof *q);
      if (!q) { map_piece(e, ENOMEM); continue; }
      q->e = e;
      q->sr = (struct source_req) {
        .kind = SOURCE_READ, .off = off, .len = MIN(MAP_PIECE, c->map_len - off),
        .buf = c->map_buf + off, .done = map_done, .opaque = q,
      };
      source_submit(e->msrc, &q->sr);
    }
    return;
  }
  if (state != MAP_IN) return;
  uint64_t *regions = NULL, n = 0;
  unsigned shift = 0;
  int rc = -1;
  if (c->map_err)
    snprintf(why, sizeof why, "reading it failed: %s", strerror(c->map_err));
  else
    rc = read_map_order(c->map_buf, c->map_len, e->size, &regions, &n, &shift,
                        why, sizeof why);
  pthread_mutex_lock(&e->lock);
  c->map_state = MAP_USED;
  free(c->map_buf);
  c->map_buf = NULL;
  if (rc == 0) use_map_locked(e, regions, n, shift);
  pthread_mutex_unlock(&e->lock);
  if (rc < 0)
    log_warn("the source's read map %s: %s; the copy goes in ascending order",
             READ_MAP_SUFFIX, why);
  else
    log_info("the source's read map: %" PRIu64 " region%s of %u KiB read by its "
             "clients, copied first, most recent first", n, n == 1 ? "" : "s",
             1u << (shift - 10));
}

/* ---------- background jobs ---------- */

/* Under lock.  Shuffled images alternate short runs of data and zero
 * blocks; a job per run means a request every few KiB.  When zeros cost
 * next to nothing on the wire (zstd), a background job reads on across a
 * gap of at most BRIDGE_MAX blocks that block status found zero, provided
 * missing blocks follow before lim.  Returns where the run may continue (b
 * if it may not).  The bridged blocks stay present and untouched: landing
 * writes only blocks still missing (I1, I3). */
static uint64_t bridge_gap(struct engine *e, uint64_t b, uint64_t lim, bool cheap)
{
  uint64_t g = b;
  uint64_t *zk = e->copy.zero_known;
  if (!cheap) return b;
  while (g < lim && g - b < BRIDGE_MAX && bitmap_test(e->bm, g) &&
         (zk[g / 64] >> (g % 64) & 1))
    g++;
  if (g == b || g >= lim || g - b >= BRIDGE_MAX || bitmap_test(e->bm, g) ||
      inflight_get(e, g))
    return b;
  return g;
}

/* Under lock: a miss just fetched blocks up to (not including) block:
 * the copy takes the PREPAGE_BYTES after it next (pre-paging: a guest that
 * touched a page touches its neighbours soon). */
void copy_hint_locked(struct engine *e, uint64_t block)
{
  struct copy *c = &e->copy;
  if (block >= e->nblocks) return;
  if (c->nhint == PREPAGE_HINTS) {          /* forget the oldest */
    memmove(&c->hint[0], &c->hint[1], (PREPAGE_HINTS - 1) * sizeof c->hint[0]);
    c->nhint--;
  }
  c->hint[c->nhint].next = block;
  c->hint[c->nhint].end = MIN(e->nblocks, block + MAX(1, PREPAGE_BYTES / e->bs));
  c->nhint++;
}

/* Under lock: the job for missing, not in-flight block b, ending before
 * lim: from seeds when its digest says a seed holds it, else a fetch of
 * the run from b (reading across known zeros where cheap).  Charged to
 * the window and the rate.  NULL when no more can be made now. */
static struct job *job_from_locked(struct engine *e, uint64_t b, uint64_t lim, bool cheap)
{
  struct copy *c = &e->copy;
  struct index_loc loc;
  if (digest_says_zero(e, b)) return digest_zero_job_locked(e, b, lim);
  if (seed_hit(e, b, &loc)) {
    if (c->local_inflight >= LOCAL_INFLIGHT) return NULL;
    return local_job_locked(e, b);
  }
  uint64_t s = b;
  for (;;) {
    while (b < lim && !bitmap_test(e->bm, b) && !inflight_get(e, b) &&
           (b == s || !local_hit(e, b)))
      b++;
    uint64_t g = bridge_gap(e, b, lim, cheap);
    if (g == b) break;
    b = g;                        /* read across the zeros: one request, not two */
  }
  if (b == s) return NULL;        /* lim at b: nothing to fetch from here (yet) */
  struct job *j = job_make_locked(e, JOB_BACKGROUND, s, b - s);
  if (!j) return NULL;
  j->sent_ns = now_ns();
  j->sent_delivered = e->bytes_fetched + e->bytes_bridged;
  j->sent_landed_ns = c->landed_ns ? c->landed_ns : j->sent_ns;
  c->inflight_bytes += j->len;
  if (c->rate) c->tokens -= j->len;
  return j;
}

/* Under lock: whether the window and the rate let another job start. */
static bool room_locked(struct copy *c)
{
  return c->inflight_bytes < c->window && (!c->rate || c->tokens > 0);
}

/* Under lock: jobs for the blocks after recent misses, newest first.
 * Where deduplication waits for digests not yet in, the hint is dropped
 * (those blocks may be in a seed). */
static unsigned prepage_locked(struct engine *e, uint64_t per_job, bool cheap,
                               struct job **list, unsigned n, unsigned max)
{
  struct copy *c = &e->copy;
  while (c->nhint && n < max && room_locked(c)) {
    uint64_t *next = &c->hint[c->nhint - 1].next, end = c->hint[c->nhint - 1].end;
    uint64_t b = bitmap_next_clear(e->bm, *next);
    for (struct job *ij; b < end && (ij = inflight_get(e, b)); )
      b = bitmap_next_clear(e->bm, ij->first + ij->count);
    if (b >= end || (copy_digests_on(e) && b >= c->dig_until)) {
      c->nhint--;
      continue;
    }
    struct job *j = job_from_locked(e, b, dig_cap_locked(e, b, MIN(end, b + per_job)), cheap);
    if (!j) break;
    j->prepage = true;
    *next = j->first + j->count;
    list[n++] = j;
  }
  return n;
}

/* Under lock: jobs for the regions the source's clients read last, most
 * recent first.  Where deduplication needs digests not in yet, the copy
 * asks them (query_digests, c->recent_dig) and goes on with the sweep
 * meanwhile. */
static unsigned recent_locked(struct engine *e, uint64_t per_job, bool cheap,
                              struct job **list, unsigned n, unsigned max)
{
  struct copy *c = &e->copy;
  c->recent_dig = UINT64_MAX;
  while (c->recent_pos < c->nrecent && n < max && room_locked(c)) {
    /* The blocks the region touches (a block may be larger than it). */
    uint64_t r = c->recent[c->recent_pos], sh = c->recent_shift;
    uint64_t start = (r << sh) / e->bs;
    uint64_t end = MIN(e->nblocks, (((r + 1) << sh) + e->bs - 1) / e->bs);
    uint64_t b = bitmap_next_clear(e->bm, MAX(start, c->recent_next));
    for (struct job *ij; b < end && (ij = inflight_get(e, b)); )
      b = bitmap_next_clear(e->bm, ij->first + ij->count);
    if (b >= end) {
      c->recent_pos++;
      c->recent_next = 0;
      continue;
    }
    uint64_t k = b / DIG_CHUNK_BLOCKS;
    if (copy_digests_on(e) && !c->dig_done[k]) {
      /* Digests ahead of the sweep are kept until it passes them: at
       * most RECENT_DIG_CHUNKS chunks (8 MiB) are asked for the map's
       * regions; a region beyond that is left to the sweep. */
      if (c->dig_asking[k] || c->recent_chunks < RECENT_DIG_CHUNKS) {
        c->recent_dig = k;
        break;
      }
      c->recent_pos++;
      c->recent_next = 0;
      continue;
    }
    struct job *j = job_from_locked(e, b, dig_cap_locked(e, b, MIN(end, b + per_job)), cheap);
    if (!j) break;
    j->recent = j->kind == JOB_BACKGROUND;
    c->recent_next = j->first + j->count;
    list[n++] = j;
  }
  return n;
}

/* Under lock: when seed jobs are at their limit at the cursor, the link
 * need not wait for them: fetches of the blocks after them that no seed
 * holds, from where the last such pass stopped (c->ahead; each block is
 * looked at once).  The seeded blocks passed stay for the cursor. */
static unsigned fill_ahead_locked(struct engine *e, uint64_t per_job, bool cheap,
                                  struct job **list, unsigned n, unsigned max)
{
  struct copy *c = &e->copy;
  uint64_t a = MAX(c->ahead, c->cursor);
  struct index_loc loc;
  while (n < max && room_locked(c)) {
    a = bitmap_next_clear(e->bm, a);
    for (struct job *ij; a < e->nblocks && (ij = inflight_get(e, a)); )
      a = bitmap_next_clear(e->bm, ij->first + ij->count);
    if (a >= e->nblocks || a * e->bs >= known_until_locked(e) ||
        (!c->dig_off && a >= c->dig_until))
      break;
    if (seed_hit(e, a, &loc)) { a++; continue; }
    uint64_t lim = dig_cap_locked(e, a, MIN((known_until_locked(e) + e->bs - 1) / e->bs, a + per_job));
    struct job *j = job_from_locked(e, a, lim, cheap);
    if (!j) break;
    a = j->first + j->count;
    list[n++] = j;
  }
  c->ahead = a;
  return n;
}

/* XNBD_TRACE_COPY=1: the copy's state on stderr at most every 5 ms (a
 * diagnostic for link-trace.sh; off unless asked). */
static void trace_locked(struct engine *e, uint64_t now, unsigned started)
{
  struct copy *c = &e->copy;
  if (!c->trace) return;
  if (!c->trace_t0) c->trace_t0 = now;
  if (now - c->trace_at < 5000000 && !started) return;
  c->trace_at = now;
  fprintf(stderr, "copytrace t=%.1f cur=%" PRIu64 " ahead=%" PRIu64 " dig=%" PRIu64 "/%" PRIu64
          " digq=%u infl=%" PRIu64 " win=%" PRIu64 " local=%" PRIu64 " fetched=%" PRIu64
          " seeded=%" PRIu64 " started=%u\n",
          (now - c->trace_t0) / 1e6, c->cursor, c->ahead, c->dig_good_until, c->dig_until,
          c->dig_outstanding, c->inflight_bytes, c->window, c->local_inflight,
          e->bytes_fetched, e->bytes_seeded, started);
}

static void fill(struct engine *e, uint64_t now, bool cheap)
{
  struct copy *c = &e->copy;
  struct job *list[512];
  unsigned n = 0;
  bool wrapped = false;

  pthread_mutex_lock(&e->lock);
  if (!c->running || c->paused || e->standby ||
      (e->state != ENGINE_PROXYING && e->state != ENGINE_SOURCE_LOST)) {
    pthread_mutex_unlock(&e->lock);
    return;
  }
  /* Several jobs per window, so replies stream back to back. */
  /* At least 256 KiB (fewer, larger requests), but not a thin link's
   * whole window in one burst: */
  uint64_t job_bytes = MIN((uint64_t) e->cfg.max_fetch, MAX(c->window / 16, (uint64_t) 256 << 10));
  /* ... and at most a quarter of it: a client's miss for a block of a
   * background read waits for all of it (I3) and what was asked before
   * it; the window being about twice the path's product, that read
   * crosses in half a round trip. */
  job_bytes = MIN(job_bytes, MAX(c->window / 4, (uint64_t) 64 << 10));
  uint64_t per_job = MAX(1, job_bytes / e->bs);
  if (c->rate) {
    int64_t cap = MAX((int64_t) e->cfg.max_fetch, (int64_t) (c->rate / 10));
    c->tokens += (int64_t) ((now - c->tokens_at) / 1000 * c->rate / 1000000);
    if (c->tokens > cap) c->tokens = cap;
    c->tokens -= (int64_t) c->debt;   /* seed jobs that fell back to the source */
  }
  c->debt = 0;
  c->tokens_at = now;
  n = prepage_locked(e, per_job, cheap, list, n, ARRAY_SIZE(list));
  n = recent_locked(e, per_job, cheap, list, n, ARRAY_SIZE(list));
  while (n < ARRAY_SIZE(list) && room_locked(c)) {
    uint64_t b = bitmap_next_clear(e->bm, c->cursor);
    for (struct job *ij; b < e->nblocks && (ij = inflight_get(e, b)); )
      b = bitmap_next_clear(e->bm, ij->first + ij->count);   /* past that job */
    if (b >= e->nblocks) {
      if (wrapped || c->cursor == 0) break;
      c->cursor = 0;              /* blocks left behind (failed, in flight) */
      wrapped = true;
      continue;
    }
    /* Everything before b is present or in flight: the cursor moves on
     * even when nothing is made (a run of zeros landed without a job), so
     * block status and digests are asked ahead of where the copy is. */
    c->cursor = b;
    if (b * e->bs >= known_until_locked(e)) break;
    if (copy_digests_on(e) && b >= c->dig_until) break;   /* digests first */
    uint64_t lim = dig_cap_locked(e, b, MIN((known_until_locked(e) + e->bs - 1) / e->bs, b + per_job));
    struct index_loc loc;
    if (c->local_inflight >= LOCAL_INFLIGHT && !digest_says_zero(e, b) &&
        seed_hit(e, b, &loc)) {
      n = fill_ahead_locked(e, per_job, cheap, list, n, ARRAY_SIZE(list));
      break;
    }
    struct job *j = job_from_locked(e, b, lim, cheap);
    if (!j) break;
    c->cursor = j->first + j->count;
    list[n++] = j;                /* ascending offsets: the source reads ahead */
  }
  trace_locked(e, now, n);
  pthread_mutex_unlock(&e->lock);
  for (unsigned i = 0; i < n; i++) job_start(e, list[i]);
}

/* ---------- window ---------- */

/* The window follows what the path delivers (window.h); a fixed
 * --bg-window stays as it is.  The queue on the path is measured either
 * way, for the status.  Digests cross the same path ahead of the data:
 * they count as delivered, so the start-up knows the path's rate, and has
 * grown by them, by the time the first fetches go out (they land in
 * lumps of 512 KiB: counted as such, window.h).
 *
 * After start-up the controller counts bytes on the link, not bytes of
 * the image (win_ratio, window.h): a run of data that compresses better
 * than the data before it gets a wider window for the same bytes on the
 * link. */
static void size_window(struct engine *e, uint64_t now, const struct source_brief *sb)
{
  struct copy *c = &e->copy;
  pthread_mutex_lock(&e->lock);
  double ratio = win_ratio(&c->ratio, c->win.startup_over, sb->wire_rx, sb->wire_rx_raw,
                           win_queue_seen(&c->win, sb->rtt_ns));
  uint64_t delivered = e->bytes_fetched + e->bytes_bridged + e->bytes_digests;
  c->win.lumps = e->bytes_digests;
  if (delivered > c->delivered_raw)
    c->delivered_link += (double) (delivered - c->delivered_raw) / ratio;
  c->delivered_raw = delivered;
  uint64_t w = win_update(&c->win, now, (uint64_t) c->delivered_link,
                          (uint64_t) ((double) c->inflight_bytes / ratio),
                          sb->rtt_ns, sb->rtt_last_ns, c->running && !c->paused);
  if (c->window_auto && c->running && !c->paused)
    c->window = MIN((uint64_t) ((double) w * ratio), (uint64_t) WIN_MAX);
  pthread_mutex_unlock(&e->lock);
}

/* ---------- the tick ---------- */

void copy_tick(void *opaque, uint64_t now)
{
  struct engine *e = opaque;
  struct copy *c = &e->copy;
  struct source_brief sb;
  source_brief(e->src, &sb);
  unsigned up = sb.up;
  bool cheap = sb.zeros_cheap;

  pthread_mutex_lock(&e->lock);
  bool now_up = up && (e->state == ENGINE_CONNECTING || e->state == ENGINE_SOURCE_LOST);
  bool now_lost = !up && e->state == ENGINE_PROXYING;
  if (now_up) engine_set_state_locked(e, ENGINE_PROXYING);
  if (now_lost) engine_set_state_locked(e, ENGINE_SOURCE_LOST);
  pthread_mutex_unlock(&e->lock);
  if (now_up || now_lost) {           /* rare: the names are worth a copy */
    struct source_stats ss;
    source_get_stats(e->src, &ss);
    if (now_up)
      log_info("source %s connected (%u connection%s)", ss.target, up, up > 1 ? "s" : "");
    else
      log_warn("lost the source %s; reconnecting (client reads of missing blocks "
               "wait up to %u s)", ss.target, e->cfg.source_timeout_s);
  }
  pthread_mutex_lock(&e->lock);
  bool probing = c->running && !c->paused && c->window_auto;
  pthread_mutex_unlock(&e->lock);
  source_set_probing(e->src, probing);

  engine_digests_tick(e);
  if (up) {
    read_map_tick(e);
    query_status(e);
    digests_watch(e, now);
    query_digests(e);
    size_window(e, now, &sb);     /* first: the first window before the first fill */
    fill(e, now, cheap);
  }
  if (now - c->last_expire > 100000000u) {
    engine_expire_waiters(e, now);
    c->last_expire = now;
  }
  if (now - c->rate_at >= 1000000000u) {
    pthread_mutex_lock(&e->lock);
    uint64_t b = e->bytes_fetched;
    e->fetch_rate = (b - c->rate_bytes) * 1000000000u / (now - c->rate_at);
    pthread_mutex_unlock(&e->lock);
    c->rate_bytes = b;
    c->rate_at = now;
  }
}
