/* fuzz-nbd.c: libFuzzer target for the NBD server core (common/nbd):
 * option haggling (negotiate.c), request parsing and validation (proto.c,
 * transmit.c) and the replies, as a client's byte stream sees them.
 *
 * Each input runs a fresh server (xnbd_server_new, the production code)
 * on the harness's event loop, with an in-memory backend that checks the
 * backend contract (backend.h: never a range outside the export).  The
 * client is one end of a socketpair; the server gets the other through
 * nbd_conn_new, exactly as after accept().  The harness writes the input to
 * the socket, half-closes it, reads and discards everything the server
 * sends, and runs the loop until the server has closed the connection and
 * freed it.  A server that never closes after the client's EOF hangs the
 * input (libFuzzer reports a timeout).
 *
 * Input: byte 0 selects the run's conditions, the rest is the client's
 * stream, starting with the 4-byte client flags that answer the greeting.
 *   bit 0   the backend completes requests later, from the loop, in
 *           reverse order (else at once, inside the call)
 *   bit 1   the backend fails some requests (EIO; ENOTSUP for fast zero)
 *   bit 2   the server has TLS (a context without certificate: every
 *           handshake fails) and requires it; else it has no TLS
 *   bit 3   the connection is "secured" (a WAN transport is in front)
 *   4..7    k > 0: a graceful server shutdown starts after the k-th
 *           backend call */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/ssl.h>

#include "fuzz-common.h"
#include "nbd-proto.h"
#include "server-int.h"
#include "util.h"

#define RW_SIZE  (256 * 1024 + 512)   /* not a multiple of 4096 on purpose */
#define RO_SIZE  (64 * 1024 + 1)
#define GRAIN    4096
#define MAX_BS_EXTENTS 16

struct mem {
  uint8_t *data;
  uint64_t size;
  bool ro;
};

static struct event_base *base;
static struct xnbd_server *srv;
static struct mem rw_mem, ro_mem;
static unsigned mode;
static unsigned ops_seen;
static struct xreq *pending;          /* async completions, newest first */
static struct event *complete_ev, *shutdown_ev;
static SSL_CTX *ssl_ctx;

/* ---- the in-memory backend ------------------------------------------- */

static void check_range(struct mem *m, struct xreq *r)
{
  FUZZ_CHECK(r->offset <= m->size && r->length <= m->size - r->offset,
             "backend called with %llu+%llu on an export of %llu bytes",
             (unsigned long long) r->offset, (unsigned long long) r->length,
             (unsigned long long) m->size);
}

static void finish(struct xreq *r, int err)
{
  if (++ops_seen == (mode >> 4) && shutdown_ev)
    event_active(shutdown_ev, EV_TIMEOUT, 0);
  if (!(mode & 1)) {
    xreq_complete(r, err);
    return;
  }
  r->be_u64 = (uint64_t) err;
  r->be_priv = pending;
  pending = r;
  event_active(complete_ev, EV_TIMEOUT, 0);
}

static void complete_cb(evutil_socket_t fd, short what, void *arg)
{
  struct xreq *list = pending;
  pending = NULL;
  while (list) {
    struct xreq *r = list;
    list = r->be_priv;
    xreq_complete(r, (int) r->be_u64);
  }
}

static bool inject_error(struct xreq *r)
{
  return (mode & 2) && (r->offset / GRAIN) % 7 == 3;
}

/* Runs of GRAIN-aligned zero / data regions covering [off, end), at most
 * max runs; returns the count.  Neighbours with the same flags are merged
 * unless split (backends need not merge; the front end must cope). */
static size_t map_runs(struct mem *m, uint64_t off, uint64_t end,
                       struct xnbd_extent *x, size_t max, bool split)
{
  size_t n = 0;
  while (off < end && n < max) {
    uint64_t next = MIN((off / GRAIN + 1) * GRAIN, end);
    uint32_t fl = is_zero(m->data + off, next - off)
                  ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0;
    if (n && x[n - 1].flags == fl && !split)
      x[n - 1].length += next - off;
    else
      x[n++] = (struct xnbd_extent) { next - off, fl };
    off = next;
  }
  return n;
}

static uint64_t mem_size(void *h) { return ((struct mem *) h)->size; }

static uint16_t mem_flags(void *h)
{
  struct mem *m = h;
  return m->ro ? NBD_FLAG_READ_ONLY | NBD_FLAG_ROTATIONAL
               : NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
                 NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO |
                 NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;
}

static void mem_block_size(void *h, uint32_t *min, uint32_t *pref, uint32_t *max)
{
  *min = 512; *pref = 4096; *max = 64 * 1024;
}

static void mem_pread(void *h, struct xreq *r)
{
  struct mem *m = h;
  check_range(m, r);
  FUZZ_CHECK(r->length > 0 && r->buf, "read of %llu bytes, buffer %p",
             (unsigned long long) r->length, r->buf);
  if (inject_error(r)) { finish(r, EIO); return; }
  memcpy(r->buf, m->data + r->offset, r->length);
  if (r->flags & XREQ_F_WANT_HOLES) {
    struct xnbd_extent x[1024];
    size_t n = map_runs(m, r->offset, r->offset + r->length, x, 1024,
                        r->offset & 1);
    FUZZ_CHECK(n < 1024, "read map too long");
    if (n > 1 || x[0].flags) {
      r->extents = malloc(n * sizeof *x);
      FUZZ_CHECK(r->extents, "out of memory");
      memcpy(r->extents, x, n * sizeof *x);
      r->n_extents = n;
    }
  }
  finish(r, 0);
}

static void mem_pwrite(void *h, struct xreq *r)
{
  struct mem *m = h;
  check_range(m, r);
  FUZZ_CHECK(!m->ro, "write on a read-only export");
  FUZZ_CHECK(r->length > 0 && r->buf, "write of %llu bytes",
             (unsigned long long) r->length);
  if (inject_error(r)) { finish(r, EIO); return; }
  memcpy(m->data + r->offset, r->buf, r->length);
  finish(r, 0);
}

static void mem_flush(void *h, struct xreq *r)
{
  finish(r, (mode & 2) ? EIO : 0);
}

static void mem_trim_zero(void *h, struct xreq *r)
{
  struct mem *m = h;
  check_range(m, r);
  FUZZ_CHECK(!m->ro, "trim or zero on a read-only export");
  if ((r->flags & XREQ_F_FAST_ZERO) && (mode & 2)) { finish(r, ENOTSUP); return; }
  if (inject_error(r)) { finish(r, EIO); return; }
  memset(m->data + r->offset, 0, r->length);
  finish(r, 0);
}

static void mem_cache(void *h, struct xreq *r)
{
  check_range(h, r);
  finish(r, inject_error(r) ? EIO : 0);
}

/* Extents from offset on, past the request's end (the front end clips). */
static void mem_block_status(void *h, struct xreq *r)
{
  struct mem *m = h;
  struct xnbd_extent x[MAX_BS_EXTENTS];
  size_t n;
  check_range(m, r);
  FUZZ_CHECK(r->length > 0, "block status of 0 bytes");
  if (inject_error(r)) { finish(r, EIO); return; }
  n = map_runs(m, r->offset, m->size, x,
               (r->flags & XREQ_F_REQ_ONE) ? 1 : MAX_BS_EXTENTS, r->offset & 1);
  r->extents = malloc(n * sizeof *x);
  FUZZ_CHECK(r->extents, "out of memory");
  memcpy(r->extents, x, n * sizeof *x);
  r->n_extents = n;
  finish(r, 0);
}

static const struct xnbd_backend_ops rw_ops = {
  .name = "fuzz-rw", .get_size = mem_size, .get_flags = mem_flags,
  .pread = mem_pread, .pwrite = mem_pwrite, .flush = mem_flush,
  .trim = mem_trim_zero, .zero = mem_trim_zero, .cache = mem_cache,
  .block_status = mem_block_status,
};

static const struct xnbd_backend_ops ro_ops = {
  .name = "fuzz-ro", .get_size = mem_size, .get_flags = mem_flags,
  .get_block_size = mem_block_size, .pread = mem_pread,
};

static void shutdown_done(void *arg) { (void) arg; }

static void shutdown_cb(evutil_socket_t fd, short what, void *arg)
{
  xnbd_server_shutdown(srv, shutdown_done, NULL);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  fuzz_quiet_logs("fuzz-nbd");
  base = xnbd_event_base_new();
  FUZZ_CHECK(base, "cannot make an event base");
  rw_mem = (struct mem) { malloc(RW_SIZE), RW_SIZE, false };
  ro_mem = (struct mem) { malloc(RO_SIZE), RO_SIZE, true };
  FUZZ_CHECK(rw_mem.data && ro_mem.data, "out of memory");
  complete_ev = event_new(base, -1, 0, complete_cb, NULL);
  shutdown_ev = event_new(base, -1, 0, shutdown_cb, NULL);
  FUZZ_CHECK(complete_ev && shutdown_ev, "cannot make events");
  ssl_ctx = SSL_CTX_new(TLS_server_method());
  FUZZ_CHECK(ssl_ctx, "SSL_CTX_new");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  /* Small limits, so inputs reach them: READ/WRITE up to 128 KiB, reading
   * paused above 64 KiB of requests in flight. */
  struct xnbd_server_config cfg = { .max_request = 128 * 1024,
                                    .max_inflight_bytes = 64 * 1024 };
  struct fuzz_client c;
  int sv[2];

  if (size < 1)
    return 0;
  mode = data[0];
  ops_seen = 0;
  /* A fixed image each run: zeros, with data in [64 KiB, 128 KiB) and in
   * the last 512 bytes; the read-only export is all data. */
  memset(rw_mem.data, 0, RW_SIZE);
  memset(rw_mem.data + 64 * 1024, 0xa5, 64 * 1024);
  memset(rw_mem.data + RW_SIZE - 512, 0x5a, 512);
  memset(ro_mem.data, 0x3c, RO_SIZE);

  cfg.tls_require = mode & 4;
  cfg.ssl_ctx = (mode & 4) ? ssl_ctx : NULL;
  srv = xnbd_server_new(base, &cfg);
  FUZZ_CHECK(srv, "xnbd_server_new failed");
  FUZZ_CHECK(xnbd_server_add_export(srv, "", NULL, &rw_ops, &rw_mem) == 0, "export");
  FUZZ_CHECK(xnbd_server_add_export(srv, "ro", "a read-only export",
                                    &ro_ops, &ro_mem) == 0, "export");

  FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0,
             "socketpair: %s", strerror(errno));
  evutil_make_socket_nonblocking(sv[0]);
  nbd_conn_new(srv, sv[0], "fuzz", mode & 8);
  FUZZ_CHECK(srv->nconns == 1, "nbd_conn_new failed");
  fuzz_client_start(&c, base, sv[1], data + 1, size - 1);

  /* Until the server has closed and freed the connection.  Bounded: a
   * server that stops making progress is a bug (libFuzzer's -timeout
   * catches one that waits forever). */
  for (unsigned i = 0; !c.eof || srv->nconns > 0; i++) {
    FUZZ_CHECK(i < 1000000, "no end after %u loop turns", i);
    event_base_loop(base, EVLOOP_ONCE);
  }
  FUZZ_CHECK(pending == NULL, "completions left after the connection closed");
  event_del(shutdown_ev);
  event_del(complete_ev);
  event_free(c.ev);
  if (c.fd >= 0) close(c.fd);
  /* Shutdown's own event may still be active; free removes it. */
  xnbd_server_free(srv);
  srv = NULL;
  return 0;
}
