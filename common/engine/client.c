/* client.c: client requests -- the engine as a backend (backend.h).
 * Present blocks are served by the cache image's file backend; a request
 * touching missing blocks waits for jobs (pipeline.c) and runs again when
 * they have landed. */
#include "engine-int.h"
#include "file-backend.h"
#include "nbd-proto.h"
#include "workq.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>

static void dispatch(struct engine *e, struct xreq *r);

static bool range_present(struct engine *e, uint64_t b0, uint64_t b1)
{
  for (uint64_t b = b0; b <= b1; b++)
    if (!bitmap_test(e->bm, b)) return false;
  return true;
}

/* Under lock: makes p wait for blocks [b0, b1] that are not present: joins
 * jobs in flight, makes on-demand jobs (coalesced, at most max_fetch each)
 * for the rest, appended to *made.  Returns -1 on allocation failure. */
static int wait_for_blocks_locked(struct engine *e, struct pend *p, uint64_t b0,
                                  uint64_t b1, struct job **made, unsigned *nmade,
                                  unsigned maxmade)
{
  uint64_t per_job = MAX(1, e->cfg.max_fetch / e->bs);
  struct job *last = NULL;
  for (uint64_t b = b0; b <= b1; ) {
    struct job *j;
    if (bitmap_test(e->bm, b)) { b++; continue; }
    j = inflight_get(e, b);
    struct index_loc loc;
    if (!j && digest_says_zero(e, b)) {
      /* Its digest says zero: no round trip, no seed. */
      if (*nmade == maxmade) return -1;
      j = digest_zero_job_locked(e, b, b1 + 1);
      if (!j) return -1;
      made[(*nmade)++] = j;
      b = j->first + j->count;
    } else if (!j && seed_hit(e, b, &loc)) {
      /* Its digest is known and a seed has it: no round trip. */
      if (*nmade == maxmade) return -1;
      j = local_job_locked(e, b);
      if (!j) return -1;
      made[(*nmade)++] = j;
      b = MIN(j->first + j->count, b1 + 1);
    } else if (!j) {
      uint64_t s = b;
      if (*nmade == maxmade) return -1;
      while (b <= b1 && b - s < per_job && !bitmap_test(e->bm, b) && !inflight_get(e, b) &&
             (b == s || !local_hit(e, b)))
        b++;
      j = job_make_locked(e, JOB_ONDEMAND, s, b - s);
      if (!j) return -1;
      made[(*nmade)++] = j;
      log_debug("miss: blocks %" PRIu64 "+%" PRIu64 " fetched on demand", s, b - s);
      copy_hint_locked(e, b);       /* the copy takes what follows next */
    } else {
      b = MIN(j->first + j->count, b1 + 1);
      if (j->kind == JOB_BACKGROUND) {
        e->fetches_joined++;
        log_debug("miss: blocks %" PRIu64 "+%" PRIu64 " wait for a background fetch",
                  j->first, j->count);
      } else if (j->kind == JOB_LOCAL)
        workq_promote(e->cfg.wq, &j->work);   /* out of the low lane, if there */
    }
    if (j != last) {
      if (job_add_waiter_locked(j, p) < 0) return -1;
      last = j;
    }
  }
  return 0;
}

/* Standby read: exactly the request's bytes, in pieces of at most
 * max_fetch, handed to the request and not kept. */
static int passthrough_locked(struct engine *e, struct pend *p, struct xreq *r,
                              struct job **made, unsigned *nmade, unsigned maxmade)
{
  p->passthrough = true;
  for (uint64_t off = r->offset; off < r->offset + r->length; ) {
    uint64_t len = MIN((uint64_t) e->cfg.max_fetch, r->offset + r->length - off);
    if (*nmade == maxmade) return -1;
    struct job *j = job_make_locked(e, JOB_PASSTHROUGH, off / e->bs,
                                    (off + len - 1) / e->bs - off / e->bs + 1);
    if (!j) return -1;
    j->off = off;
    j->len = len;
    made[(*nmade)++] = j;
    if (job_add_waiter_locked(j, p) < 0) return -1;
    off += len;
  }
  return 0;
}

/* Either all of [b0,b1] is present (returns 0), or r now waits and will be
 * dispatched again (returns 1), or an error (-1, errno). */
static int need_blocks(struct engine *e, struct xreq *r, uint64_t b0, uint64_t b1)
{
  int rc;

  if (range_present(e, b0, b1)) return 0;
  /* At most a job per block (missing runs between present blocks), or per
   * max_fetch piece of a standby read. */
  unsigned maxmade = (unsigned) MAX(b1 - b0 + 1, r->length / e->cfg.max_fetch + 2);
  struct job **made = malloc(maxmade * sizeof *made);
  struct pend *p = calloc(1, sizeof *p);
  unsigned nmade = 0;
  if (!p || !made) { free(p); free(made); errno = ENOMEM; return -1; }
  p->e = e;
  p->r = r;
  p->resume = dispatch;
  pthread_mutex_lock(&e->lock);
  if (e->state == ENGINE_DETACHED || !e->src) {
    pthread_mutex_unlock(&e->lock);
    free(p);
    free(made);
    errno = EIO;        /* forced detach left blocks missing (I7) */
    return -1;
  }
  if (e->standby && r->type == XREQ_READ)
    rc = passthrough_locked(e, p, r, made, &nmade, maxmade);
  else
    rc = wait_for_blocks_locked(e, p, b0, b1, made, &nmade, maxmade);
  if (rc < 0) p->err = ENOMEM;      /* jobs already joined resume p; it fails then */
  bool waits = p->pending > 0;
  if (waits) pend_waiting_locked(e, p);
  pthread_mutex_unlock(&e->lock);
  for (unsigned i = 0; i < nmade; i++) job_start(e, made[i]);
  free(made);
  if (!waits) {
    free(p);
    if (rc < 0) { errno = ENOMEM; return -1; }
    return 0;
  }
  return 1;
}

/* Writes / zeroes / trims a range some of whose blocks are not present, on
 * an I/O thread.  Partial blocks at the ends are present already (the
 * caller fetched them first), except for TRIM, which skips them. */
static void slow_write_work(struct xwork *w)
{
  struct xreq *r = (struct xreq *) ((char *) w - offsetof(struct xreq, work));
  struct engine *e = r->be_priv;
  uint64_t off = r->offset, end = r->offset + r->length;
  uint64_t b0 = off / e->bs, b1 = (end - 1) / e->bs;
  int rc = 0;

  stripes_lock(e, b0, b1 - b0 + 1);
  cache_data_mark(e, b0, b1 - b0 + 1);
  if (r->type == XREQ_WRITE)
    rc = cache_write(e->cache, r->buf, r->length, off);
  else {
    uint64_t zo = off, ze = end;
    if (r->type == XREQ_TRIM) {       /* only whole blocks, or present ones */
      if (off % e->bs && !bitmap_test(e->bm, b0)) zo = (b0 + 1) * e->bs;
      if (end % e->bs && end != e->size && !bitmap_test(e->bm, b1))
        ze = b1 * e->bs;
    }
    if (zo < ze) {
      if (r->type == XREQ_ZERO)
        rc = cache_zero(e->cache, zo, ze - zo, r->flags & XREQ_F_NO_HOLE);
      else
        cache_trim(e->cache, zo, ze - zo);
    }
  }
  int err = rc < 0 ? errno : 0;
  if (!err)
    /* Every block touched is now present: whole ones hold the new data,
     * partial ones were present before. */
    for (uint64_t b = b0; b <= b1; b++) {
      bool whole = (b * e->bs >= off) && (MIN((b + 1) * e->bs, e->size) <= end);
      if (whole) bitmap_set(e->bm, b);
    }
  stripes_unlock(e, b0, b1 - b0 + 1);
  if (!err) {
    pthread_mutex_lock(&e->lock);
    e->bytes_local_written += r->length;
    pthread_mutex_unlock(&e->lock);
  }
  if (!err && (r->flags & XREQ_F_FUA) && engine_flush(e) < 0) err = errno;
  engine_check_complete(e);
  xreq_complete(r, err);
}

/* FUA on the all-present path: write, then make data and bits durable. */
static void fua_write_work(struct xwork *w)
{
  struct xreq *r = (struct xreq *) ((char *) w - offsetof(struct xreq, work));
  struct engine *e = r->be_priv;
  int rc = 0;
  if (r->type == XREQ_WRITE)
    rc = cache_write(e->cache, r->buf, r->length, r->offset);
  else
    cache_trim(e->cache, r->offset, r->length);
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
  xreq_complete(r, engine_flush(r->be_priv) < 0 ? errno : 0);
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

/* Whole missing blocks can be made zero without the source; a fast zero
 * of a range with a partial missing block cannot be fast (it would need a
 * fetch first). */
static bool partial_missing(struct engine *e, struct xreq *r, uint64_t b0, uint64_t b1)
{
  bool head = r->offset % e->bs != 0;
  uint64_t end = r->offset + r->length;
  bool tail = end % e->bs != 0 && end != e->size;
  return (head && !bitmap_test(e->bm, b0)) || (tail && !bitmap_test(e->bm, b1));
}

static void write_like(struct engine *e, struct xreq *r, uint64_t b0, uint64_t b1)
{
  int rc;
  if (e->standby)     /* a write here means the VM runs here now */
    engine_activate(e, "first client write at the destination");
  bool head_partial = r->offset % e->bs != 0;
  uint64_t end = r->offset + r->length;
  bool tail_partial = end % e->bs != 0 && end != e->size;
  if (r->type == XREQ_ZERO && (r->flags & XREQ_F_FAST_ZERO) &&
      partial_missing(e, r, b0, b1)) {
    xreq_complete(r, ENOTSUP);
    return;
  }
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
    to_pool(e, r, r->type == XREQ_ZERO ? slow_write_work : fua_write_work);
    return;
  }
  pthread_mutex_lock(&e->lock);
  e->bytes_local_written += r->length;
  pthread_mutex_unlock(&e->lock);
  struct file_backend *fb = cache_backend(e->cache);
  if (r->type == XREQ_WRITE) file_backend_ops.pwrite(fb, r);
  else if (r->type == XREQ_ZERO) file_backend_ops.zero(fb, r);
  else file_backend_ops.trim(fb, r);
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
    if (rc > 0) return;               /* dispatched again when landed */
    if (r->type == XREQ_CACHE) xreq_complete(r, 0);
    else file_backend_ops.pread(cache_backend(e->cache), r);
    return;
  case XREQ_BLOCK_STATUS:
    if (range_present(e, b0, b1)) file_backend_ops.block_status(cache_backend(e->cache), r);
    else block_status_mixed(e, r, b0, b1);
    return;
  case XREQ_WRITE:
  case XREQ_ZERO:
  case XREQ_TRIM:
    write_like(e, r, b0, b1);
    return;
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
         NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
}
static void eng_block_size(void *h, uint32_t *min, uint32_t *pref, uint32_t *max)
{
  struct engine *e = h;
  *min = 1;
  *max = XNBD_BLOCK_SIZE_MAX;
  *pref = MIN(e->bs, *max);       /* never more than the maximum */
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
