/* backend.h: the contract between an NBD front end (the libevent server
 * core in server.c, or later nbdkit) and whatever stores the data (an image
 * file, the proxy engine, a test double).
 *
 * The front end fills a struct xreq and calls one operation of the table.
 * The backend performs it now or later, on any thread, and then calls
 * xreq_complete(r, err) exactly once.  Until then the backend owns the
 * request; afterwards it must not touch it.  The front end frees the
 * request, its buffer and any extents array the backend attached (with
 * free()).  Operations are never called with ranges outside [0, size). */
#ifndef XNBD_BACKEND_H
#define XNBD_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "workq.h"   /* struct xwork */

enum xreq_type {
  XREQ_READ, XREQ_WRITE, XREQ_FLUSH, XREQ_TRIM, XREQ_ZERO, XREQ_CACHE,
  XREQ_BLOCK_STATUS,
};

/* Request flags (front-end independent). */
#define XREQ_F_FUA        (1u << 0) /* write, trim, zero: durable before done */
#define XREQ_F_NO_HOLE    (1u << 1) /* zero: keep the range allocated */
#define XREQ_F_FAST_ZERO  (1u << 2) /* zero: fail with ENOTSUP unless it is fast */
#define XREQ_F_REQ_ONE    (1u << 3) /* block status: one extent is enough */
#define XREQ_F_WANT_HOLES (1u << 4) /* read: may describe zero runs in extents */

/* One run of a block-status answer, or of a read buffer when the backend
 * reports holes (flags are NBD_STATE_HOLE / NBD_STATE_ZERO). */
struct xnbd_extent {
  uint64_t length;
  uint32_t flags;
};

struct xreq {
  /* Set by the front end; read-only for the backend. */
  enum xreq_type type;
  uint32_t flags;
  uint64_t offset;
  uint64_t length;
  void *buf;                   /* READ: filled by backend; WRITE: the data */

  /* Set by the backend before completing (optional).  For BLOCK_STATUS: the
   * extents from offset on (at least one on success).  For READ with
   * XREQ_F_WANT_HOLES: a map of buf; runs with NBD_STATE_ZERO read as zero
   * and their bytes in buf need not be filled. */
  struct xnbd_extent *extents; /* malloc'd; freed by the front end */
  size_t n_extents;

  /* For the backend's own use while it owns the request. */
  struct xwork work;
  void *be_priv;
  uint64_t be_u64;

  /* Front-end private. */
  void (*done)(struct xreq *r, int err);
  void *fe_priv;
  struct xreq *fe_next;
};

static inline void xreq_complete(struct xreq *r, int err) { r->done(r, err); }

struct xnbd_backend_ops {
  const char *name;
  uint64_t (*get_size)(void *h);
  /* Transmission flags the backend supports, from NBD_FLAG_READ_ONLY,
   * SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_CACHE,
   * SEND_FAST_ZERO, CAN_MULTI_CONN, ROTATIONAL.  The front end adds
   * HAS_FLAGS and the flags that depend on negotiation. */
  uint16_t (*get_flags)(void *h);
  /* Block size constraints (optional; default 1 / 4096 / 32 MiB). */
  void (*get_block_size)(void *h, uint32_t *min, uint32_t *pref, uint32_t *max);

  void (*pread)(void *h, struct xreq *r);
  void (*pwrite)(void *h, struct xreq *r);
  void (*flush)(void *h, struct xreq *r);
  void (*trim)(void *h, struct xreq *r);
  void (*zero)(void *h, struct xreq *r);
  void (*cache)(void *h, struct xreq *r);
  /* NULL: base:allocation is not offered. */
  void (*block_status)(void *h, struct xreq *r);
};

#endif
