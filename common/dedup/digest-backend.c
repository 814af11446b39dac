/* digest-backend.c: the digest export as a backend (digest-backend.h). */
#include "digest-backend.h"
#include "digest.h"
#include "nbd-proto.h"
#include "workq.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct digest_backend {
  int fd;
  uint64_t image_size;
  struct workq *wq;
  unsigned ncpu;
  atomic_uint running;        /* digest reads being computed now */
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
  return db;
}

void digest_backend_close(struct digest_backend *db)
{
  free(db);
}

static uint64_t db_get_size(void *h)
{
  return digest_export_size(((struct digest_backend *) h)->image_size);
}

static uint16_t db_get_flags(void *h)
{
  return NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN;
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
  int err = 0;

  if (!out)
    err = ENOMEM;
  else if (digest_file(db->fd, db->image_size, first, count, out, threads) < 0)
    err = errno ? errno : EIO;
  else if (!direct)
    memcpy(r->buf, out + skip, r->length);
  atomic_fetch_sub(&db->running, 1);
  if (!direct) free(out);
  xreq_complete(r, err);
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
