/* host.c: see host.h.  Each call builds a request on its stack, hands it
 * to the engine's backend table and waits for its completion. */
#include "host.h"
#include "backend.h"
#include "workq.h"
#include "util.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>

struct engine_host {
  struct workq *wq;
  struct engine *e;
};

struct engine_host *host_open(const struct engine_config *cfg, unsigned io_threads,
                              char *err, size_t errlen)
{
  struct engine_host *h = calloc(1, sizeof *h);
  struct engine_config c = *cfg;
  if (!h) { snprintf(err, errlen, "out of memory"); return NULL; }
  h->wq = workq_new(io_threads ? io_threads : 4, "xnbd-io");
  if (!h->wq) {
    snprintf(err, errlen, "cannot start I/O threads: %s", strerror(errno));
    free(h);
    return NULL;
  }
  c.wq = h->wq;
  h->e = engine_open(&c, err, errlen);
  if (!h->e) {
    workq_free(h->wq);
    free(h);
    return NULL;
  }
  return h;
}

void host_close(struct engine_host *h)
{
  if (!h) return;
  engine_close(h->e);
  workq_free(h->wq);
  free(h);
}

struct engine *host_engine(struct engine_host *h) { return h->e; }
uint64_t host_size(struct engine_host *h) { return engine_backend_ops.get_size(h->e); }
uint16_t host_flags(struct engine_host *h) { return engine_backend_ops.get_flags(h->e); }
void host_block_size(struct engine_host *h, uint32_t *min, uint32_t *pref, uint32_t *max)
{
  engine_backend_ops.get_block_size(h->e, min, pref, max);
}

struct waitreq {
  struct xreq r;
  pthread_mutex_t m;
  pthread_cond_t c;
  bool done;
  int err;
};

static void wr_done(struct xreq *r, int err)
{
  struct waitreq *w = (struct waitreq *) r;
  pthread_mutex_lock(&w->m);
  w->done = true;
  w->err = err;
  pthread_cond_signal(&w->c);
  pthread_mutex_unlock(&w->m);
}

/* Runs one request to completion.  Returns 0 or -1 with errno. */
static int run(struct engine_host *h, struct waitreq *w, enum xreq_type t,
               uint64_t off, uint64_t len, void *buf, uint32_t flags)
{
  const struct xnbd_backend_ops *o = &engine_backend_ops;
  *w = (struct waitreq) {
    .r = { .type = t, .flags = flags, .offset = off, .length = len, .buf = buf,
           .done = wr_done },
  };
  pthread_mutex_init(&w->m, NULL);
  pthread_cond_init(&w->c, NULL);
  if (t != XREQ_FLUSH && (len == 0 || off > host_size(h) || len > host_size(h) - off)) {
    errno = EINVAL;
    return -1;
  }
  switch (t) {
  case XREQ_READ: o->pread(h->e, &w->r); break;
  case XREQ_WRITE: o->pwrite(h->e, &w->r); break;
  case XREQ_FLUSH: o->flush(h->e, &w->r); break;
  case XREQ_TRIM: o->trim(h->e, &w->r); break;
  case XREQ_ZERO: o->zero(h->e, &w->r); break;
  case XREQ_CACHE: o->cache(h->e, &w->r); break;
  case XREQ_BLOCK_STATUS: o->block_status(h->e, &w->r); break;
  }
  pthread_mutex_lock(&w->m);
  while (!w->done) pthread_cond_wait(&w->c, &w->m);
  pthread_mutex_unlock(&w->m);
  pthread_mutex_destroy(&w->m);
  pthread_cond_destroy(&w->c);
  if (w->err) { errno = w->err; return -1; }
  return 0;
}

int host_pread(struct engine_host *h, void *buf, uint64_t count, uint64_t off)
{
  struct waitreq w;
  return run(h, &w, XREQ_READ, off, count, buf, 0);
}

int host_pwrite(struct engine_host *h, const void *buf, uint64_t count, uint64_t off,
                bool fua)
{
  struct waitreq w;
  return run(h, &w, XREQ_WRITE, off, count, (void *) buf, fua ? XREQ_F_FUA : 0);
}

int host_zero(struct engine_host *h, uint64_t count, uint64_t off, bool may_trim,
              bool fua, bool fast)
{
  struct waitreq w;
  uint32_t f = (fua ? XREQ_F_FUA : 0) | (may_trim ? 0 : XREQ_F_NO_HOLE) |
               (fast ? XREQ_F_FAST_ZERO : 0);
  return run(h, &w, XREQ_ZERO, off, count, NULL, f);
}

int host_trim(struct engine_host *h, uint64_t count, uint64_t off, bool fua)
{
  struct waitreq w;
  return run(h, &w, XREQ_TRIM, off, count, NULL, fua ? XREQ_F_FUA : 0);
}

int host_flush(struct engine_host *h)
{
  struct waitreq w;
  return run(h, &w, XREQ_FLUSH, 0, 0, NULL, 0);
}

int host_cache(struct engine_host *h, uint64_t count, uint64_t off)
{
  struct waitreq w;
  return run(h, &w, XREQ_CACHE, off, count, NULL, 0);
}

int host_extents(struct engine_host *h, uint64_t count, uint64_t off, bool req_one,
                 int (*add)(void *opaque, uint64_t off, uint64_t len, uint32_t flags),
                 void *opaque)
{
  while (count) {
    struct waitreq w;
    if (run(h, &w, XREQ_BLOCK_STATUS, off, count, NULL, req_one ? XREQ_F_REQ_ONE : 0) < 0)
      return -1;
    uint64_t covered = 0;
    int rc = 0;
    for (size_t i = 0; i < w.r.n_extents && covered < count && rc == 0; i++) {
      uint64_t len = MIN(w.r.extents[i].length, count - covered);
      rc = add(opaque, off + covered, len, w.r.extents[i].flags);
      covered += len;
    }
    free(w.r.extents);
    if (rc < 0) return -1;
    if (!covered || req_one) return 0;
    off += covered;
    count -= covered;
  }
  return 0;
}
