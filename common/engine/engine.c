/* engine.c: block states and client operations of the migration engine
 * (see engine.h).  The source side (connections, fetch jobs, background
 * copy) is in fetcher.c. */
#include "engine-int.h"
#include "nbd-proto.h"
#include "workq.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------- in-flight table ---------- */

static size_t hslot(const struct inflight_tab *t, uint64_t b)
{
  return (b * UINT64_C(0x9E3779B97F4A7C15)) >> 32 & (t->nbuckets - 1);
}

static void inflight_grow(struct inflight_tab *t)
{
  size_t nb = t->nbuckets ? t->nbuckets * 2 : 1024;
  struct hnode **b = calloc(nb, sizeof *b);
  if (!b) return;               /* keep the old table: longer chains */
  struct inflight_tab nt = { b, nb, t->n };
  for (size_t i = 0; i < t->nbuckets; i++)
    for (struct hnode *n = t->b[i], *next; n; n = next) {
      next = n->next;
      size_t s = hslot(&nt, n->block);
      n->next = b[s];
      b[s] = n;
    }
  free(t->b);
  *t = nt;
}

struct fetch_job *inflight_get(struct engine *e, uint64_t block)
{
  struct inflight_tab *t = &e->inflight;
  if (!t->nbuckets) return NULL;
  for (struct hnode *n = t->b[hslot(t, block)]; n; n = n->next)
    if (n->block == block) return n->job;
  return NULL;
}

static int inflight_put(struct engine *e, uint64_t block, struct fetch_job *j)
{
  struct inflight_tab *t = &e->inflight;
  struct hnode *n;
  if (t->n >= t->nbuckets) inflight_grow(t);
  if (!t->nbuckets) return -1;
  n = malloc(sizeof *n);
  if (!n) return -1;
  n->block = block;
  n->job = j;
  size_t s = hslot(t, block);
  n->next = t->b[s];
  t->b[s] = n;
  t->n++;
  return 0;
}

static void inflight_del(struct engine *e, uint64_t block)
{
  struct inflight_tab *t = &e->inflight;
  if (!t->nbuckets) return;
  for (struct hnode **pp = &t->b[hslot(t, block)]; *pp; pp = &(*pp)->next)
    if ((*pp)->block == block) {
      struct hnode *n = *pp;
      *pp = n->next;
      free(n);
      t->n--;
      return;
    }
}

/* ---------- jobs ---------- */

struct fetch_job *job_new_locked(struct engine *e, uint64_t first,
                                 uint64_t count, bool ondemand)
{
  struct fetch_job *j = calloc(1, sizeof *j);
  if (!j) return NULL;
  j->first = first;
  j->count = count;
  j->off = first * e->bs;
  j->len = MIN(count * e->bs, e->size - j->off);
  j->ondemand = ondemand;
  j->conn = -1;
  /* Present blocks inside the range (zeros a background job reads
   * across) are not this job's: they stay out of the in-flight table. */
  for (uint64_t b = first; b < first + count; b++) {
    if (bitmap_test(e->bm, b)) continue;
    if (inflight_put(e, b, j) < 0) {
      for (uint64_t c = first; c < b; c++)
        if (inflight_get(e, c) == j) inflight_del(e, c);
      free(j);
      return NULL;
    }
    j->owned++;
  }
  e->blocks_inflight += j->owned;
  return j;
}

void job_free(struct fetch_job *j)
{
  if (!j) return;
  free(j->buf);
  free(j);
}

static void job_unmark_locked(struct engine *e, struct fetch_job *j)
{
  if (j->passthrough) return;
  for (uint64_t b = j->first; b < j->first + j->count; b++)
    if (inflight_get(e, b) == j) inflight_del(e, b);
  e->blocks_inflight -= j->owned;
}

void engine_set_error(struct engine *e, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  pthread_mutex_lock(&e->lock);
  vsnprintf(e->last_error, sizeof e->last_error, fmt, ap);
  pthread_mutex_unlock(&e->lock);
  va_end(ap);
}

/* ---------- waiting requests ---------- */

static void dispatch(struct engine *e, struct xreq *r);

static void waiting_add_locked(struct engine *e, struct pend *p)
{
  if (e->nwaiting == e->waiting_cap) {
    size_t cap = e->waiting_cap ? e->waiting_cap * 2 : 64;
    struct pend **w = realloc(e->waiting, cap * sizeof *w);
    if (!w) return;           /* then it cannot expire early; it still completes */
    e->waiting = w;
    e->waiting_cap = cap;
  }
  e->waiting[e->nwaiting++] = p;
  e->ondemand_waiting++;
}

static void waiting_del_locked(struct engine *e, struct pend *p)
{
  for (size_t i = 0; i < e->nwaiting; i++)
    if (e->waiting[i] == p) {
      e->waiting[i] = e->waiting[--e->nwaiting];
      e->ondemand_waiting--;
      return;
    }
}

/* A waiting request whose jobs are all done: run it again (now with its
 * blocks present) or fail it.  Called without the lock. */
static void pend_resume(struct pend *p)
{
  struct engine *e = p->e;
  struct xreq *r = p->r;
  int err = p->err;
  bool passthrough = p->passthrough;
  free(p);
  if (err || passthrough) xreq_complete(r, err);
  else dispatch(e, r);
}

/* Under lock: one job finished for each waiter; returns the pends to
 * resume as a linked list through their waiter nodes. */
static struct waiter *release_waiters_locked(struct engine *e, struct fetch_job *j,
                                             int err)
{
  struct waiter *ready = NULL;
  for (struct waiter *w = j->waiters, *next; w; w = next) {
    next = w->next;
    if (err && !w->p->err) w->p->err = err;
    if (--w->p->pending == 0) {
      if (w->p->expired) {        /* answered already */
        free(w->p);
        free(w);
        continue;
      }
      waiting_del_locked(e, w->p);
      w->next = ready;
      ready = w;
    } else
      free(w);
  }
  j->waiters = NULL;
  return ready;
}

static void resume_list(struct waiter *w)
{
  while (w) {
    struct waiter *next = w->next;
    struct pend *p = w->p;
    free(w);
    if (p->pending == 0) pend_resume(p);
    w = next;
  }
}

/* Requests that waited longer than --source-timeout are answered EIO now;
 * their waiter records stay on the jobs and are freed when those end. */
void engine_expire_waiters(struct engine *e, uint64_t now)
{
  struct xreq *fail[64];
  size_t n = 0;
  pthread_mutex_lock(&e->lock);
  for (size_t i = 0; i < e->nwaiting && n < ARRAY_SIZE(fail); ) {
    struct pend *p = e->waiting[i];
    if (p->deadline_ns && now >= p->deadline_ns) {
      p->expired = true;
      fail[n++] = p->r;
      e->waiting[i] = e->waiting[--e->nwaiting];
      e->ondemand_waiting--;
      continue;
    }
    i++;
  }
  pthread_mutex_unlock(&e->lock);
  for (size_t i = 0; i < n; i++) {
    log_warn("request at offset %" PRIu64 " failed: the source did not "
             "deliver within %u s (--source-timeout)", fail[i]->offset,
             e->cfg.source_timeout_s);
    xreq_complete(fail[i], EIO);
  }
}

/* ---------- applying fetched data (I1) ---------- */

static bool block_is_zero(struct engine *e, struct fetch_job *j, uint64_t b)
{
  uint64_t off = b * e->bs;
  return is_zero((const char *) j->buf + (off - j->off),
                 MIN((uint64_t) e->bs, e->size - off));
}

/* Writes job data for every block still missing, then marks them present.
 * Blocks made present meanwhile (a client write) are left alone. */
void engine_job_finished(struct engine *e, struct fetch_job *j)
{
  struct waiter *ready;
  uint64_t zero_bytes = 0;
  int err = 0;

  pthread_mutex_lock(&e->lock);
  if (j->passthrough) {
    /* Standby: hand the bytes to the waiting read, keep nothing. */
    for (struct waiter *w = j->waiters; w; w = w->next)
      if (!w->p->expired)
        memcpy((char *) w->p->r->buf + (j->off - w->p->r->offset), j->buf, j->len);
    e->bytes_fetched += j->len;
    e->fetches_ondemand++;
    ready = release_waiters_locked(e, j, 0);
    pthread_mutex_unlock(&e->lock);
    job_free(j);
    resume_list(ready);
    return;
  }
  for (uint64_t b = j->first; b < j->first + j->count && !err; ) {
    /* A run of missing blocks that are all zero, or all not zero: zero
     * runs become holes (the cache stays sparse), others one pwrite. */
    if (bitmap_test(e->bm, b)) { b++; continue; }
    uint64_t s = b;
    bool zero = block_is_zero(e, j, b);
    while (b < j->first + j->count && !bitmap_test(e->bm, b) &&
           block_is_zero(e, j, b) == zero)
      b++;
    uint64_t off = s * e->bs, end = MIN(b * e->bs, e->size);
    const char *data = (const char *) j->buf + (off - j->off);
    if (zero) {
      if (fallocate(e->cache_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    off, end - off) < 0 &&
          pwrite_all(e->cache_fd, data, end - off, off) < 0)
        err = errno;
      zero_bytes += end - off;
    } else if (pwrite_all(e->cache_fd, data, end - off, off) < 0)
      err = errno;
    if (!err)
      bitmap_set_range(e->bm, s, b - s);
  }
  if (err)
    log_error("writing fetched blocks %" PRIu64 "+%" PRIu64 " to the cache "
              "image failed: %s", j->first, j->count, strerror(err));
  job_unmark_locked(e, j);
  /* Bridged blocks are never the (short) last block. */
  uint64_t bridged = (j->count - j->owned) * e->bs;
  e->bytes_fetched += j->len - bridged;
  e->bytes_bridged += bridged;
  if (j->ondemand) e->fetches_ondemand++;
  else {
    e->fetches_background++;
    e->bg_inflight_bytes -= j->len;
  }
  ready = release_waiters_locked(e, j, err);
  pthread_mutex_unlock(&e->lock);
  (void) zero_bytes;
  job_free(j);
  resume_list(ready);
  engine_check_complete(e);
}

void engine_job_failed_final(struct engine *e, struct fetch_job *j, int err)
{
  struct waiter *ready;
  pthread_mutex_lock(&e->lock);
  job_unmark_locked(e, j);
  if (!j->ondemand) e->bg_inflight_bytes -= j->len;
  ready = release_waiters_locked(e, j, err);
  pthread_mutex_unlock(&e->lock);
  job_free(j);
  resume_list(ready);
}

uint64_t engine_mark_zero(struct engine *e, uint64_t first, uint64_t count)
{
  uint64_t n = 0;
  pthread_mutex_lock(&e->lock);
  for (uint64_t b = first; b < first + count; ) {
    if (bitmap_test(e->bm, b) || inflight_get(e, b)) { b++; continue; }
    uint64_t s = b;
    while (b < first + count && !bitmap_test(e->bm, b) && !inflight_get(e, b)) b++;
    uint64_t off = s * e->bs, end = MIN(b * e->bs, e->size);
    /* The cache may hold older data here: make it read as zero. */
    if (fallocate(e->cache_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  off, end - off) < 0) {
      log_warn("cannot punch a hole in the cache image at %" PRIu64 ": %s; "
               "fetching those blocks instead", off, strerror(errno));
      break;
    }
    bitmap_set_range(e->bm, s, b - s);
    if (e->zero_known)
      for (uint64_t z = s; z < b; z++) e->zero_known[z / 64] |= UINT64_C(1) << (z % 64);
    e->bytes_zero_skipped += end - off;
    n += b - s;
  }
  pthread_mutex_unlock(&e->lock);
  /* The last missing blocks may well be zeros (D4). */
  if (n) engine_check_complete(e);
  return n;
}

void engine_check_complete(struct engine *e)
{
  bool detach = false;
  if (bitmap_count(e->bm) != e->nblocks) return;
  pthread_mutex_lock(&e->lock);
  if (e->state == ENGINE_PROXYING || e->state == ENGINE_SOURCE_LOST ||
      e->state == ENGINE_CONNECTING) {
    e->state = ENGINE_COMPLETE;
    e->bg_running = false;
    log_info("every block is present (%" PRIu64 " blocks): migration complete",
             e->nblocks);
    detach = e->cfg.detach_when_complete;
  }
  pthread_mutex_unlock(&e->lock);
  if (bitmap_mark_complete(e->bm) < 0 && errno != EBUSY)
    log_error("recording completion in bitmap %s failed: %s", e->bitmap_path,
              strerror(errno));
  if (detach) {
    char err[256];
    if (engine_detach(e, false, err, sizeof err) < 0)
      log_error("detach after completion failed: %s", err);
  }
}

/* ---------- client operations ---------- */

static bool range_present(struct engine *e, uint64_t b0, uint64_t b1)
{
  for (uint64_t b = b0; b <= b1; b++)
    if (!bitmap_test(e->bm, b)) return false;
  return true;
}

/* Under lock: makes r wait for blocks [b0, b1] that are not present:
 * joins jobs in flight, creates on-demand jobs (coalesced, at most
 * max_fetch each) for the rest.  Returns the number of jobs waited on,
 * 0 if all present, -1 on allocation failure. */
static int wait_for_blocks_locked(struct engine *e, struct pend *p,
                                  uint64_t b0, uint64_t b1)
{
  uint64_t per_job = MAX(1, e->cfg.max_fetch / e->bs);
  struct fetch_job *last = NULL;
  for (uint64_t b = b0; b <= b1; ) {
    struct fetch_job *j;
    if (bitmap_test(e->bm, b)) { b++; continue; }
    j = inflight_get(e, b);
    if (!j) {
      uint64_t s = b;
      while (b <= b1 && b - s < per_job && !bitmap_test(e->bm, b) &&
             !inflight_get(e, b))
        b++;
      j = job_new_locked(e, s, b - s, true);
      if (!j) return -1;
      if (e->od_tail) e->od_tail->next = j;
      else e->od_head = j;
      e->od_tail = j;
    } else
      b = j->first + j->count;
    if (j != last) {
      struct waiter *w = malloc(sizeof *w);
      if (!w) return -1;
      w->p = p;
      w->next = j->waiters;
      j->waiters = w;
      p->pending++;
      last = j;
    }
  }
  return p->pending;
}

/* Either all of [b0,b1] is present (returns 0), or r now waits (returns
 * 1), or an error (returns -1, errno). */
static int need_blocks(struct engine *e, struct xreq *r, uint64_t b0, uint64_t b1)
{
  struct pend *p;
  int n;

  if (range_present(e, b0, b1)) return 0;
  p = calloc(1, sizeof *p);
  if (!p) { errno = ENOMEM; return -1; }
  p->e = e;
  p->r = r;
  pthread_mutex_lock(&e->lock);
  if (e->state == ENGINE_DETACHED) {
    pthread_mutex_unlock(&e->lock);
    free(p);
    errno = EIO;        /* forced detach left blocks missing (I7) */
    return -1;
  }
  if (e->standby && r->type == XREQ_READ) {
    /* Fetch exactly the request's bytes, in pieces of at most max_fetch. */
    p->passthrough = true;
    n = 0;
    for (uint64_t off = r->offset; off < r->offset + r->length; ) {
      uint64_t len = MIN((uint64_t) e->cfg.max_fetch, r->offset + r->length - off);
      struct fetch_job *j = calloc(1, sizeof *j);
      struct waiter *w = malloc(sizeof *w);
      if (!j || !w) { free(j); free(w); n = -1; break; }
      j->off = off;
      j->len = len;
      j->first = off / e->bs;
      j->count = (off + len - 1) / e->bs - j->first + 1;
      j->ondemand = j->passthrough = true;
      j->conn = -1;
      w->p = p;
      w->next = NULL;
      j->waiters = w;
      p->pending++;
      n++;
      if (e->od_tail) e->od_tail->next = j;
      else e->od_head = j;
      e->od_tail = j;
      off += len;
    }
  } else
    n = wait_for_blocks_locked(e, p, b0, b1);
  if (n > 0) {
    p->deadline_ns = now_ns() + (uint64_t) e->cfg.source_timeout_s * 1000000000u;
    waiting_add_locked(e, p);
  }
  pthread_mutex_unlock(&e->lock);
  if (n == 0) { free(p); return 0; }
  if (n < 0) {
    /* Jobs already joined will resume p; it fails then. */
    p->err = ENOMEM;
    if (p->pending == 0) { free(p); errno = ENOMEM; return -1; }
    return 1;
  }
  fetcher_wake(e);
  return 1;
}

int engine_sync_data_hook(void *opaque)
{
  struct engine *e = opaque;
  atomic_fetch_add(&e->sync_count, 1);
  return file_backend_sync(e->fb);
}

/* FLUSH / FUA: the bits of every block that became present are persisted
 * (the bitmap's data-sync hook syncs the cache first), then the cache is
 * synced by this thread itself.  The second sync is not redundant: a sync
 * another thread started earlier may still be running, and its completion
 * is not ours to wait for (I2). */
int engine_flush(struct engine *e)
{
  if (bitmap_persist(e->bm) < 0) return -1;
  return file_backend_sync(e->fb);
}

/* Writes / zeroes / trims a range some of whose blocks are not present,
 * on an I/O thread.  Partial blocks at the ends are present already (the
 * caller fetched them first), except for TRIM, which skips them. */
static void slow_write_work(struct xwork *w)
{
  struct xreq *r = (struct xreq *) ((char *) w - offsetof(struct xreq, work));
  struct engine *e = r->be_priv;
  uint64_t off = r->offset, end = r->offset + r->length;
  uint64_t b0 = off / e->bs, b1 = (end - 1) / e->bs;
  int rc = 0;

  pthread_mutex_lock(&e->lock);
  if (r->type == XREQ_WRITE)
    rc = pwrite_all(e->cache_fd, r->buf, r->length, off);
  else {
    uint64_t zo = off, ze = end;
    if (r->type == XREQ_TRIM) {       /* only whole blocks, or present ones */
      if (off % e->bs && !bitmap_test(e->bm, b0)) zo = (b0 + 1) * e->bs;
      if (end % e->bs && end != e->size && !bitmap_test(e->bm, b1))
        ze = b1 * e->bs;
    }
    if (zo < ze) {
      int mode = (r->type == XREQ_ZERO && (r->flags & XREQ_F_NO_HOLE))
                 ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE;
      rc = fallocate(e->cache_fd, mode | FALLOC_FL_KEEP_SIZE, zo, ze - zo);
      if (rc < 0 && r->type == XREQ_ZERO) {
        static const char zeros[65536];
        rc = 0;
        for (uint64_t p = zo; p < ze && !rc; p += sizeof zeros)
          rc = pwrite_all(e->cache_fd, zeros, MIN((uint64_t) sizeof zeros, ze - p), p);
      } else if (rc < 0)
        rc = 0;                 /* trim is advisory */
    }
  }
  if (rc == 0) {
    /* Every block touched is now present: whole ones hold the new data,
     * partial ones were present before. */
    for (uint64_t b = b0; b <= b1; b++) {
      bool whole = (b * e->bs >= off) && (MIN((b + 1) * e->bs, e->size) <= end);
      if (whole) bitmap_set(e->bm, b);
    }
    e->bytes_local_written += r->length;
  }
  int err = rc < 0 ? errno : 0;
  pthread_mutex_unlock(&e->lock);
  if (!err && (r->flags & XREQ_F_FUA) && engine_flush(e) < 0) err = errno;
  engine_check_complete(e);
  xreq_complete(r, err);
}

/* FUA on the all-present path: write, then make data and bits durable. */
static void fua_write_work(struct xwork *w)
{
  struct xreq *r = (struct xreq *) ((char *) w - offsetof(struct xreq, work));
  struct engine *e = r->be_priv;
  int rc;
  if (r->type == XREQ_WRITE)
    rc = pwrite_all(e->cache_fd, r->buf, r->length, r->offset);
  else
    rc = fallocate(e->cache_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   r->offset, r->length);
  if (rc < 0 && r->type == XREQ_TRIM) rc = 0;
  int err = rc < 0 ? errno : 0;
  if (!err) {
    pthread_mutex_lock(&e->lock);
    e->bytes_local_written += r->length;
    pthread_mutex_unlock(&e->lock);
    if (engine_flush(e) < 0) err = errno;
  }
  xreq_complete(r, err);
}

static void flush_work(struct xwork *w)
{
  struct xreq *r = (struct xreq *) ((char *) w - offsetof(struct xreq, work));
  struct engine *e = r->be_priv;
  xreq_complete(r, engine_flush(e) < 0 ? errno : 0);
}

static void to_pool(struct engine *e, struct xreq *r, void (*fn)(struct xwork *))
{
  r->be_priv = e;
  r->work.fn = fn;
  workq_submit(e->cfg.wq, &r->work);
}

static void block_status_mixed(struct engine *e, struct xreq *r, uint64_t b0, uint64_t b1)
{
  /* Report the first run: present blocks by the cache's allocation is a
   * detail; a conservative "data" answer is always correct. */
  bool present = bitmap_test(e->bm, b0);
  uint64_t b = b0;
  while (b <= b1 && bitmap_test(e->bm, b) == present) b++;
  uint64_t end = MIN(MIN(b * e->bs, e->size), r->offset + r->length);
  r->extents = malloc(sizeof *r->extents);
  if (!r->extents) { xreq_complete(r, ENOMEM); return; }
  r->extents[0] = (struct xnbd_extent) { end - r->offset, 0 };
  r->n_extents = 1;
  xreq_complete(r, 0);
}

static void dispatch(struct engine *e, struct xreq *r)
{
  uint64_t b0, b1;
  int rc;

  if (r->type == XREQ_FLUSH) { to_pool(e, r, flush_work); return; }
  b0 = r->offset / e->bs;
  b1 = (r->offset + r->length - 1) / e->bs;

  switch (r->type) {
  case XREQ_READ:
  case XREQ_CACHE:
    if (r->type == XREQ_CACHE && e->standby) { xreq_complete(r, 0); return; }
    rc = need_blocks(e, r, b0, b1);
    if (rc < 0) { xreq_complete(r, errno); return; }
    if (rc > 0) return;               /* resumed when fetched */
    if (r->type == XREQ_CACHE) xreq_complete(r, 0);
    else file_backend_ops.pread(e->fb, r);
    return;
  case XREQ_BLOCK_STATUS:
    if (range_present(e, b0, b1)) file_backend_ops.block_status(e->fb, r);
    else block_status_mixed(e, r, b0, b1);
    return;
  case XREQ_WRITE:
  case XREQ_ZERO:
  case XREQ_TRIM: {
    if (e->standby)     /* a write here means the VM runs here now */
      engine_activate(e, "first client write at the destination");
    bool head_partial = r->offset % e->bs != 0;
    uint64_t end = r->offset + r->length;
    bool tail_partial = end % e->bs != 0 && end != e->size;
    if (r->type != XREQ_TRIM) {
      /* Read-modify-write of a partial block: fetch it first (I1). */
      if (head_partial && (rc = need_blocks(e, r, b0, b0)) != 0) {
        if (rc < 0) xreq_complete(r, errno);
        return;
      }
      if (tail_partial && (rc = need_blocks(e, r, b1, b1)) != 0) {
        if (rc < 0) xreq_complete(r, errno);
        return;
      }
    }
    if (!range_present(e, b0, b1)) { to_pool(e, r, slow_write_work); return; }
    if (r->flags & XREQ_F_FUA) {
      if (r->type == XREQ_ZERO) to_pool(e, r, slow_write_work);
      else to_pool(e, r, fua_write_work);
      return;
    }
    pthread_mutex_lock(&e->lock);
    e->bytes_local_written += r->length;
    pthread_mutex_unlock(&e->lock);
    if (r->type == XREQ_WRITE) file_backend_ops.pwrite(e->fb, r);
    else if (r->type == XREQ_ZERO) file_backend_ops.zero(e->fb, r);
    else file_backend_ops.trim(e->fb, r);
    return;
  }
  default:
    xreq_complete(r, ENOTSUP);
  }
}

static void eng_op(void *h, struct xreq *r) { dispatch(h, r); }
static uint64_t eng_size(void *h) { return ((struct engine *) h)->size; }
static uint16_t eng_flags(void *h)
{
  struct engine *e = h;
  uint16_t f = NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;
  if (e->cfg.readonly) return f | NBD_FLAG_READ_ONLY;
  return f | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
         NBD_FLAG_SEND_WRITE_ZEROES;
}
static void eng_block_size(void *h, uint32_t *min, uint32_t *pref, uint32_t *max)
{
  struct engine *e = h;
  *min = 1;
  *pref = e->bs;
  *max = 32 << 20;
}

const struct xnbd_backend_ops engine_backend_ops = {
  .name = "proxy",
  .get_size = eng_size,
  .get_flags = eng_flags,
  .get_block_size = eng_block_size,
  .pread = eng_op,
  .pwrite = eng_op,
  .flush = eng_op,
  .trim = eng_op,
  .zero = eng_op,
  .cache = eng_op,
  .block_status = eng_op,
};
