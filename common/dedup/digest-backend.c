/* digest-backend.c: the digest export as a backend (digest-backend.h). */
#include "digest-backend.h"
#include "digest.h"
#include "digest-sidecar.h"
#include "nbd-proto.h"
#include "workq.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Read-ahead (digest-backend.h): a read of at least AHEAD_MIN_BLOCKS
 * blocks has the next as many (at least AHEAD_BLOCKS: a client that
 * asks fewer at a time still finds its next reads ready) computed once
 * the queue is idle; without a sidecar they wait in the stash for at most
 * AHEAD_MAX_AGE_NS. */
#define AHEAD_MIN_BLOCKS 1024u
#define AHEAD_BLOCKS 16384u
#define AHEAD_MAX_AGE_NS 1000000000u
#define AHEAD_NICE 10

struct digest_backend {
  int fd;
  uint64_t image_size;
  struct workq *wq;
  unsigned ncpu;
  atomic_uint running;        /* digest reads being computed now */
  struct digest_sidecar *sc;  /* NULL: every digest computed when read */
  /* Writes through the guard: begun (and ended) so far, in flight now. */
  atomic_uint_fast64_t wepoch;
  atomic_uint winflight;
  /* Read-ahead: what to compute next, whether that is queued (ahead_work
   * on wq's low lane), and (no sidecar) the stash it left: blocks
   * [st_first, st_first + st_count), computed at st_at from the image as
   * st_img was, with st_wepoch writes begun and none in flight. */
  pthread_mutex_t lock;
  struct xwork ahead_work;
  bool ahead_queued;
  uint64_t ahead_first, ahead_count;
  uint64_t last_end;          /* where the last read ended (a sequence) */
  uint8_t *stash;
  uint64_t st_first, st_count, st_at, st_wepoch;
  struct file_stamp st_img;
};

uint64_t digest_export_size(uint64_t image_size)
{
  return (image_size / DIGEST_BLOCK + (image_size % DIGEST_BLOCK != 0)) * DIGEST_LEN;
}

struct digest_backend *digest_backend_open(int fd, uint64_t image_size,
                                           struct workq *wq)
{
  struct digest_backend *db = calloc(1, sizeof *db);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  if (!db) return NULL;
  db->fd = fd;
  db->image_size = image_size;
  db->wq = wq;
  db->ncpu = n > 0 ? (unsigned) n : 1;
  atomic_init(&db->running, 0);
  atomic_init(&db->wepoch, 0);
  atomic_init(&db->winflight, 0);
  pthread_mutex_init(&db->lock, NULL);
  return db;
}

void digest_backend_use_sidecar(struct digest_backend *db, const char *path,
                                const char *id_hex, uint64_t gen)
{
  db->sc = digest_sidecar_open(path, db->fd, db->image_size, id_hex, gen);
}

void digest_backend_close(struct digest_backend *db)
{
  if (!db) return;
  digest_sidecar_close(db->sc);
  pthread_mutex_destroy(&db->lock);
  free(db->stash);
  free(db);
}

/* Blocks per sidecar look-up: 64 MiB of image, 640 KiB of entries. */
#define SIDECAR_CHUNK 16384u

/* The digests of blocks [first, first + count): those valid in the
 * sidecar from there, the others computed (one span per chunk, from its
 * first to its last missing block) and stored. */
static int digests_via_sidecar(struct digest_backend *db, uint64_t first,
                               uint64_t count, uint8_t *out, unsigned threads, int nice)
{
  static _Thread_local bool have[SIDECAR_CHUNK];
  for (uint64_t done = 0; done < count; ) {
    uint64_t n = count - done < SIDECAR_CHUNK ? count - done : SIDECAR_CHUNK;
    uint64_t b = first + done, lo = 0, hi = n;
    uint8_t *o = out + done * DIGEST_LEN;
    /* Before the look-up (it checks the image's times) and before the
     * image is read for the digests to store. */
    uint64_t epoch = digest_sidecar_epoch(db->sc);
    if (digest_sidecar_lookup(db->sc, b, n, o, have) < n) {
      while (have[lo]) lo++;
      while (have[hi - 1]) hi--;
      if (digest_file_nice(db->fd, db->image_size, b + lo, hi - lo, o + lo * DIGEST_LEN,
                           threads, nice) < 0)
        return -1;
      digest_sidecar_store(db->sc, epoch, b + lo, hi - lo, o + lo * DIGEST_LEN);
    }
    done += n;
  }
  return 0;
}

static uint64_t db_get_size(void *h)
{
  return digest_export_size(((struct digest_backend *) h)->image_size);
}

static uint16_t db_get_flags(void *h)
{
  return NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN;
}

/* Under lock: copies the first of blocks [first, first + count) that the
 * stash holds into out, if it may still be served: no write through the
 * server began since it was computed, none is in flight, it is younger
 * than AHEAD_MAX_AGE_NS, and the image's times are unchanged.  Returns how
 * many blocks it copied. */
static uint64_t from_stash_locked(struct digest_backend *db, uint64_t first, uint64_t count,
                                  uint8_t *out)
{
  struct file_stamp now_st;
  if (!db->stash || first < db->st_first || first >= db->st_first + db->st_count)
    return 0;
  file_stamp_get(db->fd, &now_st);
  if (atomic_load(&db->wepoch) != db->st_wepoch || atomic_load(&db->winflight) ||
      now_ns() - db->st_at > AHEAD_MAX_AGE_NS ||
      memcmp(&now_st, &db->st_img, sizeof now_st) != 0) {
    free(db->stash);
    db->stash = NULL;
    return 0;
  }
  uint64_t n = MIN(count, db->st_first + db->st_count - first);
  memcpy(out, db->stash + (first - db->st_first) * DIGEST_LEN, n * DIGEST_LEN);
  return n;
}

/* Digests of [first, first + count) into out: from the stash (*hit set:
 * as many as it holds from first), the sidecar (whatever it lacks
 * computed and kept) or the image. */
static int get_digests(struct digest_backend *db, uint64_t first, uint64_t count,
                       uint8_t *out, unsigned threads, bool *hit)
{
  *hit = false;
  if (db->sc) return digests_via_sidecar(db, first, count, out, threads, 0);
  pthread_mutex_lock(&db->lock);
  uint64_t n = from_stash_locked(db, first, count, out);
  pthread_mutex_unlock(&db->lock);
  *hit = n > 0;
  if (n == count) return 0;
  return digest_file(db->fd, db->image_size, first + n, count - n, out + n * DIGEST_LEN,
                     threads);
}

/* On the work queue's low lane (nothing else queued): the digests a
 * read-ahead asked for -- into the sidecar, or else into the stash. */
static void ahead_work(struct xwork *w)
{
  struct digest_backend *db = (struct digest_backend *) ((char *) w - offsetof(struct digest_backend, ahead_work));
  pthread_mutex_lock(&db->lock);
  uint64_t first = db->ahead_first, count = db->ahead_count;
  db->ahead_queued = false;
  if (!count) { pthread_mutex_unlock(&db->lock); return; }
  bool have = db->stash && first >= db->st_first &&
              first + count <= db->st_first + db->st_count;
  pthread_mutex_unlock(&db->lock);
  if (have) return;
  uint8_t *buf = malloc(count * DIGEST_LEN);
  if (!buf) return;
  /* Every core, at nice AHEAD_NICE: the reads that feed the link (which
   * the digests read so far keep busy) come first, the rest of the CPU
   * goes here.  (On half the cores at the usual priority, the chunk after
   * a seeded RAM copy's first took 40-60 ms here instead of 37-46.) */
  unsigned threads = db->ncpu;
  int nice = AHEAD_NICE;
  uint64_t t0 = now_ns();
  if (db->sc) {
    if (digests_via_sidecar(db, first, count, buf, threads, nice) < 0)
      log_debug("digest read-ahead of blocks %" PRIu64 "+%" PRIu64 ": %s", first, count,
                strerror(errno));
    free(buf);
    log_debug("digests of blocks %" PRIu64 "+%" PRIu64 " read ahead into the sidecar "
              "in %.1f ms", first, count, (double) (now_ns() - t0) / 1e6);
    return;
  }
  /* What the stash will be checked against: taken before the image is
   * read, so a write or change during the hashing shows as one (a stamp
   * of size 0: fstat failed). */
  struct file_stamp st;
  uint64_t we = atomic_load(&db->wepoch);
  file_stamp_get(db->fd, &st);
  if (atomic_load(&db->winflight) || !st.size ||
      digest_file_nice(db->fd, db->image_size, first, count, buf, threads, nice) < 0) {
    free(buf);
    return;
  }
  pthread_mutex_lock(&db->lock);
  free(db->stash);
  db->stash = buf;
  db->st_first = first;
  db->st_count = count;
  db->st_at = t0;
  db->st_wepoch = we;
  db->st_img = st;
  pthread_mutex_unlock(&db->lock);
  log_debug("digests of blocks %" PRIu64 "+%" PRIu64 " read ahead in %.1f ms", first,
            count, (double) (now_ns() - t0) / 1e6);
}

/* After a read of [first, first + count) that starts the image or goes
 * on from where the last read ended (a proxy's copy reads in order; the
 * chunks it asks for its read map's regions do not): the next as many
 * blocks are read ahead once nothing else is queued (one read-ahead at a
 * time; a later read moves it on). */
static void read_ahead(struct digest_backend *db, uint64_t first, uint64_t count)
{
  uint64_t nblocks = db->image_size / DIGEST_BLOCK + (db->image_size % DIGEST_BLOCK != 0);
  uint64_t next = first + count;
  pthread_mutex_lock(&db->lock);
  bool in_order = first == 0 || first == db->last_end;
  db->last_end = next;
  if (!in_order || count < AHEAD_MIN_BLOCKS || next >= nblocks) {
    /* A read-ahead still queued for blocks this read covered has
     * nothing left to do. */
    if (db->ahead_queued && db->ahead_first < next && first < db->ahead_first + db->ahead_count)
      db->ahead_count = 0;
    pthread_mutex_unlock(&db->lock);
    return;
  }
  db->ahead_first = next;
  db->ahead_count = MIN(MAX(count, (uint64_t) AHEAD_BLOCKS), nblocks - next);
  bool submit = !db->ahead_queued;
  db->ahead_queued = true;
  pthread_mutex_unlock(&db->lock);
  if (submit) {
    db->ahead_work.fn = ahead_work;
    workq_submit_low(db->wq, &db->ahead_work);
  }
}

/* On a work-queue thread: the digests of the blocks the request touches. */
static void db_read_work(struct xwork *w)
{
  struct xreq *r = (struct xreq *) ((char *) w - offsetof(struct xreq, work));
  struct digest_backend *db = r->be_priv;
  uint64_t first = r->offset / DIGEST_LEN;
  uint64_t last = (r->offset + r->length - 1) / DIGEST_LEN;
  uint64_t count = last - first + 1, skip = r->offset % DIGEST_LEN;
  bool direct = skip == 0 && r->length % DIGEST_LEN == 0;
  uint8_t *out = direct ? r->buf : malloc(count * DIGEST_LEN);
  unsigned running = atomic_fetch_add(&db->running, 1) + 1;
  unsigned threads = db->ncpu / running ? db->ncpu / running : 1;
  uint64_t t0 = now_ns();
  bool hit = false;
  int err = 0;

  if (!out)
    err = ENOMEM;
  else if (get_digests(db, first, count, out, threads, &hit) < 0)
    err = errno ? errno : EIO;
  else if (!direct)
    memcpy(r->buf, out + skip, r->length);
  atomic_fetch_sub(&db->running, 1);
  if (!direct) free(out);
  log_debug("digests of blocks %" PRIu64 "+%" PRIu64 ": %.1f ms%s (%s)", first, count,
            (double) (now_ns() - t0) / 1e6, hit ? ", read ahead" : "",
            err ? strerror(err) : "ok");
  xreq_complete(r, err);
  if (!err) read_ahead(db, first, count);
}

static void db_pread(void *h, struct xreq *r)
{
  struct digest_backend *db = h;
  if (r->length == 0) { xreq_complete(r, 0); return; }
  r->be_priv = db;
  r->work.fn = db_read_work;
  workq_submit(db->wq, &r->work);
}

/* The export is read-only: the front end refuses writes before they get
 * here; these answer anything that slips through. */
static void db_refuse(void *h, struct xreq *r) { xreq_complete(r, EPERM); }
static void db_nothing(void *h, struct xreq *r) { xreq_complete(r, 0); }

static void db_block_status(void *h, struct xreq *r)
{
  r->extents = malloc(sizeof *r->extents);
  if (!r->extents) { xreq_complete(r, ENOMEM); return; }
  r->extents[0] = (struct xnbd_extent) { r->length, 0 };
  r->n_extents = 1;
  xreq_complete(r, 0);
}

const struct xnbd_backend_ops digest_backend_ops = {
  .name = "digest",
  .get_size = db_get_size,
  .get_flags = db_get_flags,
  .pread = db_pread,
  .pwrite = db_refuse,
  .flush = db_nothing,
  .trim = db_refuse,
  .zero = db_refuse,
  .cache = db_nothing,
  .block_status = db_block_status,
};

/* ---- the guard: writes to the image invalidate their blocks' digests */

struct digest_guard {
  struct xnbd_backend_ops ops;
  const struct xnbd_backend_ops *inner;
  void *ih;
  struct digest_backend *db;
};

/* What a guarded write's request carried for the front end. */
struct guard_req {
  void (*done)(struct xreq *r, int err);
  void *fe_priv;
  struct digest_backend *db;
};

static uint64_t g_get_size(void *h) { struct digest_guard *g = h; return g->inner->get_size(g->ih); }
static uint16_t g_get_flags(void *h) { struct digest_guard *g = h; return g->inner->get_flags(g->ih); }
static void g_get_block_size(void *h, uint32_t *mn, uint32_t *pref, uint32_t *mx)
{
  struct digest_guard *g = h;
  g->inner->get_block_size(g->ih, mn, pref, mx);
}
static void g_pread(void *h, struct xreq *r) { struct digest_guard *g = h; g->inner->pread(g->ih, r); }
static void g_flush(void *h, struct xreq *r) { struct digest_guard *g = h; g->inner->flush(g->ih, r); }
static void g_cache(void *h, struct xreq *r) { struct digest_guard *g = h; g->inner->cache(g->ih, r); }
static void g_block_status(void *h, struct xreq *r)
{
  struct digest_guard *g = h;
  g->inner->block_status(g->ih, r);
}

static void g_done(struct xreq *r, int err)
{
  struct guard_req *gr = r->fe_priv;
  r->done = gr->done;
  r->fe_priv = gr->fe_priv;
  if (gr->db->sc) digest_sidecar_write_end(gr->db->sc);
  atomic_fetch_add(&gr->db->wepoch, 1);
  atomic_fetch_sub(&gr->db->winflight, 1);
  free(gr);
  xreq_complete(r, err);
}

/* Invalidates [offset, offset + length) before the image is written
 * (the sidecar's entries, and the read-ahead stash: any write drops it),
 * and marks the write in flight until it completes (digest-sidecar.h). */
static void g_write(struct digest_guard *g, struct xreq *r,
                    void (*op)(void *h, struct xreq *r))
{
  struct guard_req *gr = malloc(sizeof *gr);
  if (!gr) { xreq_complete(r, ENOMEM); return; }
  gr->done = r->done;
  gr->fe_priv = r->fe_priv;
  gr->db = g->db;
  r->done = g_done;
  r->fe_priv = gr;
  atomic_fetch_add(&g->db->winflight, 1);
  atomic_fetch_add(&g->db->wepoch, 1);
  if (g->db->sc) digest_sidecar_write_begin(g->db->sc, r->offset, r->length);
  op(g->ih, r);
}

static void g_pwrite(void *h, struct xreq *r) { struct digest_guard *g = h; g_write(g, r, g->inner->pwrite); }
static void g_trim(void *h, struct xreq *r) { struct digest_guard *g = h; g_write(g, r, g->inner->trim); }
static void g_zero(void *h, struct xreq *r) { struct digest_guard *g = h; g_write(g, r, g->inner->zero); }

struct digest_guard *digest_guard_new(const struct xnbd_backend_ops *inner, void *ih,
                                      struct digest_backend *db)
{
  struct digest_guard *g = calloc(1, sizeof *g);
  if (!g) return NULL;
  g->inner = inner;
  g->ih = ih;
  g->db = db;
  g->ops = (struct xnbd_backend_ops) {
    .name = inner->name,
    .get_size = g_get_size,
    .get_flags = g_get_flags,
    .get_block_size = inner->get_block_size ? g_get_block_size : NULL,
    .pread = g_pread,
    .pwrite = g_pwrite,
    .flush = g_flush,
    .trim = g_trim,
    .zero = g_zero,
    .cache = g_cache,
    .block_status = inner->block_status ? g_block_status : NULL,
  };
  return g;
}

const struct xnbd_backend_ops *digest_guard_ops(struct digest_guard *g) { return &g->ops; }
void digest_guard_free(struct digest_guard *g) { free(g); }
