/* pipeline.c: the block pipeline.  Every run of missing blocks -- a
 * client's miss, the background copy, a standby pass-through, a run the
 * source said is zero -- is a job made by job_make_locked() and resolved
 * in one order by job_start(): known zero -> present locally (the
 * deduplication step; none yet) -> fetched from the source.  Whichever way
 * it resolves, it ends in land(), on the I/O work queue, which writes the
 * blocks still missing, marks them present, wakes the waiting requests and
 * checks for completion. */
#include "engine-int.h"
#include "digest.h"
#include "workq.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <search.h>
#include <inttypes.h>

/* ---------- in-flight table: block -> job ---------- */

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

/* Zero jobs can be huge (a 1 TiB hole): they are kept as ranges in a
 * search tree (they never overlap: made of missing blocks no other job
 * holds) instead of a table entry per block. */
static int zero_cmp(const void *a, const void *b)
{
  const struct job *x = a, *y = b;
  if (x->first + x->count <= y->first) return -1;
  if (y->first + y->count <= x->first) return 1;
  return 0;
}

struct job *inflight_get(struct engine *e, uint64_t block)
{
  struct inflight_tab *t = &e->inflight;
  if (t->nbuckets)
    for (struct hnode *n = t->b[hslot(t, block)]; n; n = n->next)
      if (n->block == block) return n->job;
  if (e->zero_tree) {
    struct job key = { .first = block, .count = 1 };
    void *const *z = tfind(&key, &e->zero_tree, zero_cmp);
    if (z) return *z;
  }
  return NULL;
}

/* The node comes from the job's own array (j->nodes): no allocation per
 * block. */
static int inflight_put(struct engine *e, uint64_t block, struct hnode *n)
{
  struct inflight_tab *t = &e->inflight;
  if (t->n >= t->nbuckets) inflight_grow(t);
  if (!t->nbuckets) return -1;
  n->block = block;
  size_t s = hslot(t, block);
  n->next = t->b[s];
  t->b[s] = n;
  t->n++;
  return 0;
}

/* Removes block's entry if job j holds it. */
static void inflight_del(struct engine *e, uint64_t block, const struct job *j)
{
  struct inflight_tab *t = &e->inflight;
  if (!t->nbuckets) return;
  for (struct hnode **pp = &t->b[hslot(t, block)]; *pp; pp = &(*pp)->next)
    if ((*pp)->block == block) {
      if ((*pp)->job != j) return;
      *pp = (*pp)->next;
      t->n--;
      return;
    }
}

void inflight_free_all(struct engine *e)
{
  /* The nodes belong to jobs, all landed (freed) by now. */
  free(e->inflight.b);
  e->inflight.b = NULL;
  e->inflight.nbuckets = e->inflight.n = 0;
}

/* ---------- where the cache already reads as zero ---------- */

bool cache_may_hold_data(const struct engine *e, uint64_t b)
{
  return !e->cache_data ||
         (atomic_load_explicit(&e->cache_data[b / 64], memory_order_relaxed) >> (b % 64) & 1);
}

/* Before data is written to blocks [first, first + count). */
void cache_data_mark(struct engine *e, uint64_t first, uint64_t count)
{
  if (!e->cache_data) return;
  for (uint64_t b = first; b < first + count; ) {
    unsigned n = (unsigned) MIN(64 - b % 64, first + count - b);
    uint64_t m = (n == 64 ? ~UINT64_C(0) : ((UINT64_C(1) << n) - 1)) << (b % 64);
    atomic_fetch_or_explicit(&e->cache_data[b / 64], m, memory_order_relaxed);
    b += n;
  }
}

/* Under lock: a run the source says is zero, of missing blocks no job
 * holds and whose place in the cache holds no data: present as they are
 * (no job, no write).  Returns the bytes made present.  A client write
 * racing with this marks its data first (cache_data_mark) and sets the
 * bits itself, so it is never lost. */
uint64_t land_zero_in_holes_locked(struct engine *e, uint64_t first, uint64_t count)
{
  uint64_t off = first * e->bs, end = MIN((first + count) * e->bs, e->size);
  bitmap_set_range(e->bm, first, count);
  if (e->copy.zero_known)
    for (uint64_t b = first; b < first + count; b++)
      e->copy.zero_known[b / 64] |= UINT64_C(1) << (b % 64);
  e->bytes_zero_skipped += end - off;
  return end - off;
}

/* ---------- store stripes (I1) ---------- */

static uint64_t stripe_mask(uint64_t first, uint64_t count)
{
  uint64_t m = 0;
  uint64_t r0 = first >> STRIPE_SHIFT, r1 = (first + count - 1) >> STRIPE_SHIFT;
  if (r1 - r0 >= STRIPES) return ~UINT64_C(0);
  for (uint64_t r = r0; r <= r1; r++) m |= UINT64_C(1) << (r % STRIPES);
  return m;
}

void stripes_lock(struct engine *e, uint64_t first, uint64_t count)
{
  uint64_t m = stripe_mask(first, count);
  for (unsigned i = 0; i < STRIPES; i++)       /* ascending: no deadlock */
    if (m >> i & 1) pthread_mutex_lock(&e->stripe[i]);
}

void stripes_unlock(struct engine *e, uint64_t first, uint64_t count)
{
  uint64_t m = stripe_mask(first, count);
  for (unsigned i = 0; i < STRIPES; i++)
    if (m >> i & 1) pthread_mutex_unlock(&e->stripe[i]);
}

/* ---------- making jobs (the one producer) ---------- */

struct job *job_make_locked(struct engine *e, enum job_kind kind,
                            uint64_t first, uint64_t count)
{
  struct job *j = calloc(1, sizeof *j);
  if (!j) return NULL;
  e->jobs_live++;
  j->e = e;
  j->kind = kind;
  j->state = JOB_NEW;
  j->first = first;
  j->count = count;
  j->off = first * e->bs;
  j->len = MIN(count * e->bs, e->size - j->off);
  if (kind == JOB_PASSTHROUGH) return j;    /* not kept: not in the table */
  if (kind == JOB_ZERO) {                   /* made of missing blocks only */
    if (!tsearch(j, &e->zero_tree, zero_cmp)) {
      free(j);
      e->jobs_live--;
      return NULL;
    }
    j->owned = count;
    e->blocks_inflight += count;
    return j;
  }
  /* Present blocks inside the range (zeros a background job reads across)
   * are not this job's. */
  j->nodes = malloc(count * sizeof *j->nodes);
  bool ok = j->nodes != NULL;
  for (uint64_t b = first; ok && b < first + count; b++) {
    if (bitmap_test(e->bm, b)) continue;
    j->nodes[j->owned].job = j;
    ok = inflight_put(e, b, &j->nodes[j->owned]) == 0;
    if (ok) j->owned++;
  }
  if (!ok) {
    for (uint64_t c = first; c < first + count; c++) inflight_del(e, c, j);
    free(j->nodes);
    free(j);
    e->jobs_live--;
    return NULL;
  }
  e->blocks_inflight += j->owned;
  return j;
}

/* ---------- present locally (deduplication) ---------- */

/* Under lock: the source's digest of block b, if known. */
const uint8_t *digest_of(struct engine *e, uint64_t b)
{
  const uint8_t *d = e->copy.dig ? e->copy.dig[b / DIG_CHUNK_BLOCKS] : NULL;
  return d ? d + (b % DIG_CHUNK_BLOCKS) * DIGEST_LEN : NULL;
}

/* Under lock: whether the source's digest of block b is that of a block
 * of zeros (a block the source holds as data that is all zeros: an ext4
 * journal, a guest's zeroed pages).  Such a block needs neither the WAN
 * nor a seed: it becomes present as a zero job. */
bool digest_says_zero(struct engine *e, uint64_t b)
{
  if (!e->ix && !e->old_data) return false;
  const uint8_t *d = digest_of(e, b);
  return d && memcmp(d, digest_zero(), DIGEST_LEN) == 0;
}

/* Under lock: a JOB_ZERO job for the run of missing, not in-flight blocks
 * from b (whose digest says zero) to at most lim whose digests say zero. */
struct job *digest_zero_job_locked(struct engine *e, uint64_t b, uint64_t lim)
{
  uint64_t s = b;
  while (b < lim && !bitmap_test(e->bm, b) && !inflight_get(e, b) && digest_says_zero(e, b))
    b++;
  return job_make_locked(e, JOB_ZERO, s, MAX(b - s, 1));
}

/* Under lock: whether block b is resolved at the destination (a seed holds
 * it, or its digest says zero): a fetch run stops before it. */
bool local_hit(struct engine *e, uint64_t b)
{
  struct index_loc loc;
  return digest_says_zero(e, b) || seed_hit(e, b, &loc);
}

/* Under lock: a seed block for missing block b (a candidate: verified
 * when used). */
bool seed_hit(struct engine *e, uint64_t b, struct index_loc *loc)
{
  if (!e->ix && !e->old_data) return false;
  const uint8_t *d = digest_of(e, b);
  if (!d || memcmp(d, digest_zero(), DIGEST_LEN) == 0) return false;
  if (e->old_data && (e->old_data[b / 64] >> (b % 64) & 1)) {
    /* An older copy in the cache itself, at the same offset. */
    *loc = (struct index_loc) { CACHE_SEED, b };
    return true;
  }
  return e->ix && index_lookup(e->ix, d, loc, 1) == 1;
}

/* Under lock: a JOB_LOCAL job for the run of seed hits from b (b hits). */
struct job *local_job_locked(struct engine *e, uint64_t b)
{
  struct index_loc locs[LOCAL_JOB_BLOCKS];
  uint64_t n = 0;
  while (n < LOCAL_JOB_BLOCKS && b + n < e->nblocks && !bitmap_test(e->bm, b + n) &&
         !inflight_get(e, b + n) && seed_hit(e, b + n, &locs[n]))
    n++;
  struct job *j = job_make_locked(e, JOB_LOCAL, b, n);
  if (!j) return NULL;
  j->locs = malloc(n * sizeof *j->locs);
  j->digests = malloc(n * DIGEST_LEN);
  if (j->locs && j->digests) {
    memcpy(j->locs, locs, n * sizeof *locs);
    for (uint64_t i = 0; i < n; i++)
      memcpy(j->digests + i * DIGEST_LEN, digest_of(e, b + i), DIGEST_LEN);
    e->copy.local_inflight += j->len;
  } else {
    j->kind = JOB_BACKGROUND;     /* no memory for the lists: fetch it */
    e->copy.inflight_bytes += j->len;
  }
  return j;
}

/* ---------- waiting requests ---------- */

int job_add_waiter_locked(struct job *j, struct pend *p)
{
  struct waiter *w = malloc(sizeof *w);
  if (!w) return -1;
  w->p = p;
  w->next = j->waiters;
  j->waiters = w;
  p->pending++;
  return 0;
}

void pend_waiting_locked(struct engine *e, struct pend *p)
{
  p->deadline_ns = now_ns() + (uint64_t) e->cfg.source_timeout_s * 1000000000u;
  if (e->nwaiting == e->waiting_cap) {
    size_t cap = e->waiting_cap ? e->waiting_cap * 2 : 64;
    struct pend **w = realloc(e->waiting, cap * sizeof *w);
    if (!w) return;           /* then it cannot expire early; it still completes */
    e->waiting = w;
    e->waiting_cap = cap;
  }
  e->waiting[e->nwaiting++] = p;
}

static void waiting_del_locked(struct engine *e, struct pend *p)
{
  for (size_t i = 0; i < e->nwaiting; i++)
    if (e->waiting[i] == p) {
      e->waiting[i] = e->waiting[--e->nwaiting];
      return;
    }
}

/* Under lock: one job ended for each of its waiters; returns the pends to
 * resume, linked through their waiter nodes. */
static struct waiter *release_waiters_locked(struct engine *e, struct job *j, int err)
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
    struct engine *e = p->e;
    struct xreq *r = p->r;
    int err = p->err;
    bool done = err || p->passthrough;
    void (*resume)(struct engine *, struct xreq *) = p->resume;
    free(p);
    if (done) xreq_complete(r, err);
    else resume(e, r);
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

/* ---------- landing (on the I/O work queue) ---------- */

static bool block_is_zero(struct engine *e, struct job *j, uint64_t b)
{
  uint64_t off = b * e->bs;
  return is_zero((const char *) j->buf + (off - j->off),
                 MIN((uint64_t) e->bs, e->size - off));
}

/* Writes the job's blocks that are still missing (a client write may have
 * made some present meanwhile: those stay as they are, I1), then marks
 * them present.  Zero runs become holes, so the cache stays sparse.
 * Returns 0 or an errno. */
static int store_blocks(struct engine *e, struct job *j, uint64_t *stored)
{
  int err = 0;
  *stored = 0;
  stripes_lock(e, j->first, j->count);
  for (uint64_t b = j->first; b < j->first + j->count && !err; ) {
    if (bitmap_test(e->bm, b)) { b++; continue; }
    uint64_t s = b;
    bool zero = j->kind == JOB_ZERO || block_is_zero(e, j, b);
    while (b < j->first + j->count && !bitmap_test(e->bm, b) &&
           (j->kind == JOB_ZERO || block_is_zero(e, j, b) == zero))
      b++;
    uint64_t off = s * e->bs, end = MIN(b * e->bs, e->size);
    int rc = 0;
    if (!zero) {
      cache_data_mark(e, s, b - s);
      rc = cache_write(e->cache, (const char *) j->buf + (off - j->off), end - off, off);
    } else {
      uint64_t h = s;               /* already zero where it holds no data */
      while (h < b && !cache_may_hold_data(e, h)) h++;
      if (h < b) rc = cache_zero(e->cache, off, end - off, false);
    }
    if (rc < 0) err = errno;
    else {
      bitmap_set_range(e->bm, s, b - s);
      *stored += end - off;
    }
  }
  stripes_unlock(e, j->first, j->count);
  return err;
}

/* Under lock, a background job landed: the bytes that landed between its
 * making and now, over that time, and how long it was on the path, for
 * the window's start-up (window.h). */
static void job_sample_locked(struct engine *e, struct job *j)
{
  uint64_t now = now_ns(), landed = e->bytes_fetched + e->bytes_bridged;
  uint64_t from = MIN(j->sent_ns, j->sent_landed_ns);   /* jobs land in bunches */
  e->copy.landed_ns = now;
  /* Made by the copy (not a seed job that fell back), sent once: its
   * time on the path is from its sending to its reply (the landing after
   * it waits for this machine's CPU and disk, not for the path). */
  if (!j->sent_ns || j->sr.attempts != 1 || j->sr.replied_ns <= j->sr.sent_ns) return;
  if (now <= from || landed <= j->sent_delivered) return;
  win_job_sample(&e->copy.win, landed - j->sent_delivered, now - from,
                 j->sr.replied_ns - j->sr.sent_ns);
}

static void land(struct xwork *w)
{
  struct job *j = (struct job *) ((char *) w - offsetof(struct job, work));
  struct engine *e = j->e;
  int err = j->err, local_err = 0;
  enum job_kind kind = j->kind;
  uint64_t stored = 0;

  if (!err && j->kind == JOB_PASSTHROUGH) {
    /* Standby: hand the bytes to the waiting read, keep nothing. */
    pthread_mutex_lock(&e->lock);
    for (struct waiter *wt = j->waiters; wt; wt = wt->next)
      if (!wt->p->expired)
        memcpy((char *) wt->p->r->buf + (j->off - wt->p->r->offset), j->buf, j->len);
    pthread_mutex_unlock(&e->lock);
  } else if (!err) {
    local_err = store_blocks(e, j, &stored);
    if (local_err)
      engine_local_failure(e, j->kind == JOB_ZERO ? "making blocks zero in"
                           : "writing fetched blocks to", j->off, local_err);
  }

  pthread_mutex_lock(&e->lock);
  if (j->kind == JOB_ZERO) {
    tdelete(j, &e->zero_tree, zero_cmp);
    e->blocks_inflight -= j->owned;
  } else if (j->kind != JOB_PASSTHROUGH) {
    for (uint64_t b = j->first; b < j->first + j->count; b++)
      inflight_del(e, b, j);
    e->blocks_inflight -= j->owned;
  }
  if (j->kind == JOB_BACKGROUND) e->copy.inflight_bytes -= j->len;
  if (j->kind == JOB_LOCAL) {
    e->copy.local_inflight -= j->len;
    if (j->fell_back) e->copy.inflight_bytes -= j->len;
  }
  if (err && err != ESHUTDOWN) e->fetch_errors++;
  if (!err) {
    /* Bridged blocks are never the (short) last block. */
    uint64_t bridged = (j->count - j->owned) * e->bs;
    switch (j->kind) {
    case JOB_ZERO:
      e->bytes_zero_skipped += stored;
      if (e->copy.zero_known)
        for (uint64_t b = j->first; b < j->first + j->count; b++)
          e->copy.zero_known[b / 64] |= UINT64_C(1) << (b % 64);
      break;
    case JOB_PASSTHROUGH:
      e->bytes_fetched += j->len;
      e->fetches_ondemand++;
      break;
    case JOB_LOCAL:
      if (!j->fell_back) {
        e->bytes_seeded += stored;
        break;
      }
      e->bytes_fetched += j->len;
      e->fetches_background++;
      break;
    default:
      e->bytes_fetched += j->len - bridged;
      e->bytes_bridged += bridged;
      if (j->kind == JOB_ONDEMAND) e->fetches_ondemand++;
      else e->fetches_background++;
      if (j->prepage) e->fetches_prepaged++;
      if (j->recent) e->fetches_recent++;
      if (j->kind == JOB_BACKGROUND) job_sample_locked(e, j);
    }
  }
  struct waiter *ready = release_waiters_locked(e, j, err ? EIO : local_err);
  pthread_mutex_unlock(&e->lock);

  free(j->buf);
  free(j->nodes);
  free(j->locs);
  free(j->digests);
  free(j);
  resume_list(ready);
  if (!err && !local_err) engine_check_complete(e);
  /* A background or seed job freed room in its window: the copy policy
   * (on the source thread) can make the next one now, not at its next
   * timeout. */
  if (e->src && (kind == JOB_BACKGROUND || kind == JOB_LOCAL || kind == JOB_ZERO))
    source_wake(e->src);
  pthread_mutex_lock(&e->lock);
  if (--e->jobs_live == 0) pthread_cond_broadcast(&e->jobs_cond);
  pthread_mutex_unlock(&e->lock);
}

/* Queues j's work (j->work.fn set): a job a client waits on goes ahead
 * of everything (landings are 4 MiB cache writes each, seed checks hash
 * 1 MiB: the miss's latency must not include them); else in the main
 * queue, or the low lane for work that only takes CPU. */
static void submit_job(struct engine *e, struct job *j, bool low)
{
  j->state = JOB_LANDING;
  pthread_mutex_lock(&e->lock);
  bool urgent = j->waiters != NULL;
  pthread_mutex_unlock(&e->lock);
  if (urgent) workq_submit_first(e->cfg.wq, &j->work);
  else if (low) workq_submit_low(e->cfg.wq, &j->work);
  else workq_submit(e->cfg.wq, &j->work);
}

static void to_land(struct engine *e, struct job *j)
{
  j->work.fn = land;
  submit_job(e, j, false);
}

static void fetched(struct source_req *r, int err)
{
  struct job *j = r->opaque;
  j->err = err;
  to_land(j->e, j);
}

/* ---------- resolving ---------- */

static void fetch(struct engine *e, struct job *j);

/* Present locally (on the I/O work queue): every block of a JOB_LOCAL job
 * is read from its seed and must hash to the source's digest (I4: the
 * index is a hint, seeds change).  If one does not, the whole job comes
 * from the source instead.  Blocks that follow each other in one seed (or
 * in the cache, for an older copy) are read in one go, and re-hashed two
 * at a time (digest_blocks): on a machine shared with the link's work,
 * this is most of the copy's CPU. */
static void resolve_local(struct xwork *w)
{
  struct job *j = (struct job *) ((char *) w - offsetof(struct job, work));
  struct engine *e = j->e;
  uint8_t got[LOCAL_JOB_BLOCKS * DIGEST_LEN];
  uint64_t bad = j->count;            /* the first block that failed */
  bool read_error = false;
  for (uint64_t i = 0, k; i < j->count; i = k) {
    const struct index_loc *l = &j->locs[i];
    for (k = i + 1; k < j->count && j->locs[k].seed == l->seed &&
                    j->locs[k].block == l->block + (k - i); k++)
      ;
    char *at = (char *) j->buf + i * DIGEST_BLOCK;
    int r = l->seed == CACHE_SEED
        ? (cache_read(e->cache, at, (k - i) * DIGEST_BLOCK, l->block * DIGEST_BLOCK) < 0 ? -1 : 0)
        : index_read(e->ix, l->seed, l->block, k - i, at);
    if (r < 0) { bad = i; read_error = true; break; }
  }
  /* Re-hashed in pieces of LOCAL_JOB_BLOCKS (a job holds no more). */
  for (uint64_t i = 0; !read_error && bad == j->count && i < j->count; i += LOCAL_JOB_BLOCKS) {
    uint64_t n = MIN(LOCAL_JOB_BLOCKS, j->count - i);
    digest_blocks((const char *) j->buf + i * DIGEST_BLOCK, n, got);
    for (uint64_t m = 0; m < n; m++)
      if (memcmp(got + m * DIGEST_LEN, j->digests + (i + m) * DIGEST_LEN, DIGEST_LEN) != 0) {
        bad = i + m;
        break;
      }
  }
  if (bad == j->count) {
    j->err = 0;
    land(w);
    return;
  }
  log_debug("block %" PRIu64 ": its seed no longer holds the source's data%s; "
            "fetching it", j->first + bad, read_error ? " (read error)" : "");
  j->fell_back = true;
  /* From now on it is WAN traffic: it counts against the window and
   * the rate cap like any background fetch. */
  pthread_mutex_lock(&e->lock);
  e->copy.inflight_bytes += j->len;
  if (!j->waiters) e->copy.debt += j->len;
  e->fetches_seed_stale++;
  pthread_mutex_unlock(&e->lock);
  fetch(e, j);
}

static void fetch(struct engine *e, struct job *j)
{
  if (!e->src) {
    j->err = EIO;
    to_land(e, j);
    return;
  }
  j->state = JOB_FETCHING;
  j->sr = (struct source_req) {
    .kind = SOURCE_READ,
    .urgent = j->kind == JOB_ONDEMAND || j->kind == JOB_PASSTHROUGH ||
              (j->kind == JOB_LOCAL && j->waiters),
    .off = j->off, .len = j->len, .buf = j->buf, .done = fetched, .opaque = j,
  };
  source_submit(e->src, &j->sr);
}

/* Resolves j in the one order: known zero -> present locally -> source. */
void job_start(struct engine *e, struct job *j)
{
  if (j->kind == JOB_ZERO) { to_land(e, j); return; }
  j->buf = malloc(j->len);
  if (!j->buf) {
    j->err = ENOMEM;
    to_land(e, j);
    return;
  }
  if (j->kind == JOB_LOCAL) {
    /* The copy's seed jobs only take CPU: behind the landings of fetched
     * data (the link's window waits on those). */
    j->work.fn = resolve_local;
    submit_job(e, j, true);
    return;
  }
  fetch(e, j);
}

/* FLUSH / FUA: the bits of every block that became present are persisted
 * (the bitmap's data-sync hook syncs the cache first), then the cache is
 * synced by this thread itself.  The second sync is not redundant: a sync
 * another thread started earlier may still be running, and its completion
 * is not ours to wait for (I2). */
int engine_flush(struct engine *e)
{
  if (bitmap_persist(e->bm) < 0) return -1;
  return cache_sync(e->cache);
}
