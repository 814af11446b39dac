/* transmit.c: the transmission phase: requests are validated (proto.c),
 * handed to the backend, and answered as each completes, with simple or
 * structured replies as negotiated. */
#include "server-int.h"
#include "nbd-proto.h"
#include "proto.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/socket.h>

#define MAX_STATUS_DESCRIPTORS 8192  /* 64 KiB reply; fewer round trips on a WAN */
#define MAX_READ_CHUNKS 1024
#define DIRECT_WRITE_MIN (64 * 1024)  /* payloads read straight from the socket */

/* The server's request: the backend's xreq plus the wire identity. */
struct treq {
  struct xreq r;
  uint64_t cookie;
  uint16_t cmd;
  uint16_t cmd_flags;
};



void trans_free_req(struct xreq *r)
{
  free(r->buf);
  free(r->extents);
  free(r);
}

static void simple_reply(struct nbd_conn *c, uint64_t cookie, uint32_t err)
{
  uint8_t h[NBD_SIMPLE_REPLY_SIZE];
  put_be32(h, NBD_SIMPLE_REPLY_MAGIC);
  put_be32(h + 4, err);
  put_be64(h + 8, cookie);
  nbd_conn_send(c, h, sizeof h);
}

static void chunk_header(struct nbd_conn *c, uint64_t cookie, uint16_t flags,
                         uint16_t type, uint32_t len)
{
  uint8_t h[NBD_STRUCTURED_HDR_SIZE];
  put_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
  put_be16(h + 4, flags);
  put_be16(h + 6, type);
  put_be64(h + 8, cookie);
  put_be32(h + 16, len);
  nbd_conn_send(c, h, sizeof h);
}

static const char *nbd_err_text(uint32_t e)
{
  switch (e) {
  case NBD_EPERM: return "operation not permitted (read-only export)";
  case NBD_EIO: return "input/output error";
  case NBD_ENOMEM: return "out of memory";
  case NBD_EINVAL: return "invalid request";
  case NBD_ENOSPC: return "request extends past the end of the export";
  case NBD_EOVERFLOW: return "request larger than the maximum block size";
  case NBD_ENOTSUP: return "operation not supported";
  case NBD_ESHUTDOWN: return "server is shutting down";
  default: return "error";
  }
}

/* An error answer: a structured error chunk where negotiated (it carries a
 * message), else a simple reply. */
static void error_reply(struct nbd_conn *c, uint64_t cookie, uint32_t nbd_err,
                        const char *msg)
{
  c->nerr++;
  if (!c->structured) {
    simple_reply(c, cookie, nbd_err);
    return;
  }
  if (!msg) msg = nbd_err_text(nbd_err);
  size_t ml = MIN(strlen(msg), 1024u);
  uint8_t p[6];
  chunk_header(c, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + ml);
  put_be32(p, nbd_err);
  put_be16(p + 4, ml);
  nbd_conn_send(c, p, 6);
  nbd_conn_send(c, msg, ml);
}

static void free_cb(const void *data, size_t len, void *arg) { free(arg); }

static bool read_extents_valid(const struct xreq *r)
{
  uint64_t sum = 0;
  if (r->n_extents == 0 || r->n_extents > MAX_READ_CHUNKS) return false;
  for (size_t i = 0; i < r->n_extents; i++) {
    if (r->extents[i].length == 0) return false;
    sum += r->extents[i].length;
  }
  return sum == r->length;
}

static void read_reply(struct nbd_conn *c, struct treq *t, int err)
{
  struct xreq *r = &t->r;
  struct evbuffer *out = bufferevent_get_output(c->bev);

  if (err) {
    error_reply(c, t->cookie, errno_to_nbd(err), strerror(err));
    return;
  }
  if (!c->structured) {
    simple_reply(c, t->cookie, 0);
    evbuffer_add_reference(out, r->buf, r->length, free_cb, r->buf);
    r->buf = NULL;
    return;
  }
  if (r->extents && !read_extents_valid(r)) {
    log_error("backend %s returned an inconsistent read map; failing the "
              "read at %" PRIu64, c->exp->ops->name, r->offset);
    error_reply(c, t->cookie, NBD_EIO, "internal error: bad read map");
    return;
  }
  if (!r->extents) {
    uint8_t off[8];
    chunk_header(c, t->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
                 8 + r->length);
    put_be64(off, r->offset);
    nbd_conn_send(c, off, 8);
    evbuffer_add_reference(out, r->buf, r->length, free_cb, r->buf);
    r->buf = NULL;
    return;
  }
  /* Data runs as OFFSET_DATA chunks (slices of one buffer, freed with the
   * last slice), zero runs as OFFSET_HOLE. */
  size_t last_data = SIZE_MAX;
  for (size_t i = 0; i < r->n_extents; i++)
    if (!(r->extents[i].flags & NBD_STATE_ZERO)) last_data = i;
  uint64_t pos = 0;
  for (size_t i = 0; i < r->n_extents; i++) {
    const struct xnbd_extent *x = &r->extents[i];
    uint16_t fl = i + 1 == r->n_extents ? NBD_REPLY_FLAG_DONE : 0;
    uint8_t p[12];
    put_be64(p, r->offset + pos);
    if (x->flags & NBD_STATE_ZERO) {
      chunk_header(c, t->cookie, fl, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
      put_be32(p + 8, x->length);
      nbd_conn_send(c, p, 12);
    } else {
      chunk_header(c, t->cookie, fl, NBD_REPLY_TYPE_OFFSET_DATA, 8 + x->length);
      nbd_conn_send(c, p, 8);
      if (i == last_data) {
        evbuffer_add_reference(out, (char *) r->buf + pos, x->length, free_cb, r->buf);
        r->buf = NULL;
      } else
        evbuffer_add_reference(out, (char *) r->buf + pos, x->length, NULL, NULL);
    }
    pos += x->length;
  }
}

static void block_status_reply(struct nbd_conn *c, struct treq *t, int err)
{
  struct xreq *r = &t->r;
  uint8_t *p;
  size_t n = 0;
  uint64_t left = r->length;
  size_t maxd = (t->cmd_flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_STATUS_DESCRIPTORS;

  if (err) {
    error_reply(c, t->cookie, errno_to_nbd(err), strerror(err));
    return;
  }
  p = malloc(4 + 8 * MIN(maxd, r->n_extents));
  if (!p || r->n_extents == 0) {
    free(p);
    error_reply(c, t->cookie, NBD_EIO, "no block status available");
    return;
  }
  put_be32(p, 1);  /* base:allocation's context id */
  for (size_t i = 0; i < r->n_extents && left; i++) {
    uint64_t len = MIN(r->extents[i].length, left);
    uint32_t fl = r->extents[i].flags & (NBD_STATE_HOLE | NBD_STATE_ZERO);
    if (len == 0) continue;
    if (n && get_be32(p + 4 + 8 * (n - 1) + 4) == fl) {
      /* merge with the previous descriptor (same flags) */
      uint32_t prev = get_be32(p + 4 + 8 * (n - 1));
      put_be32(p + 4 + 8 * (n - 1), prev + len);
    } else {
      if (n == maxd) break;
      put_be32(p + 4 + 8 * n, len);
      put_be32(p + 4 + 8 * n + 4, fl);
      n++;
    }
    left -= len;
  }
  chunk_header(c, t->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
               4 + 8 * n);
  nbd_conn_send(c, p, 4 + 8 * n);
  free(p);
}

void trans_reply(struct nbd_conn *c, struct xreq *r, int err)
{
  struct treq *t = (struct treq *) r;
  if (err)
    log_debug("connection %" PRIu64 ": %s at %" PRIu64 "+%" PRIu64 " failed: %s",
              c->id, nbd_cmd_name(t->cmd), r->offset, r->length, strerror(err));
  switch (t->cmd) {
  case NBD_CMD_READ:
    read_reply(c, t, err);
    break;
  case NBD_CMD_BLOCK_STATUS:
    block_status_reply(c, t, err);
    break;
  default:
    if (err)
      error_reply(c, t->cookie, errno_to_nbd(err), strerror(err));
    else
      simple_reply(c, t->cookie, 0);
  }
}

static void dispatch(struct nbd_conn *c, struct treq *t)
{
  const struct xnbd_backend_ops *o = c->exp->ops;
  void *h = c->exp->handle;
  struct xreq *r = &t->r;
  void (*op)(void *, struct xreq *) = NULL;
  uint16_t f = t->cmd_flags;

  if (f & NBD_CMD_FLAG_FUA) r->flags |= XREQ_F_FUA;
  switch (t->cmd) {
  case NBD_CMD_READ:
    r->type = XREQ_READ; op = o->pread;
    if (c->structured && !(f & NBD_CMD_FLAG_DF)) r->flags |= XREQ_F_WANT_HOLES;
    break;
  case NBD_CMD_WRITE: r->type = XREQ_WRITE; op = o->pwrite; break;
  case NBD_CMD_FLUSH: r->type = XREQ_FLUSH; op = o->flush; break;
  case NBD_CMD_TRIM: r->type = XREQ_TRIM; op = o->trim; break;
  case NBD_CMD_CACHE: r->type = XREQ_CACHE; op = o->cache; break;
  case NBD_CMD_WRITE_ZEROES:
    r->type = XREQ_ZERO; op = o->zero;
    if (f & NBD_CMD_FLAG_NO_HOLE) r->flags |= XREQ_F_NO_HOLE;
    if (f & NBD_CMD_FLAG_FAST_ZERO) r->flags |= XREQ_F_FAST_ZERO;
    break;
  case NBD_CMD_BLOCK_STATUS:
    r->type = XREQ_BLOCK_STATUS; op = o->block_status;
    if (f & NBD_CMD_FLAG_REQ_ONE) r->flags |= XREQ_F_REQ_ONE;
    break;
  }
  r->done = nbd_req_done;
  r->fe_priv = c;
  c->inflight++;
  if (r->type == XREQ_READ || r->type == XREQ_WRITE)
    c->inflight_bytes += r->length;
  c->nreq++;
  if ((r->type == XREQ_READ || r->type == XREQ_CACHE) && c->exp->on_read && !c->copier)
    c->exp->on_read(c->exp->on_read_arg, r->offset, r->length);
  if (!op) {
    xreq_complete(r, ENOTSUP);
    return;
  }
  op(h, r);
}

static void direct_cb(evutil_socket_t fd, short what, void *arg)
{
  struct nbd_conn *c = arg;
  c->busy++;
  if (c->direct) trans_direct_read(c);
  c->busy--;
  nbd_conn_maybe_free(c);
}

bool trans_step(struct nbd_conn *c)
{
  struct evbuffer *in = bufferevent_get_input(c->bev);
  size_t avail = evbuffer_get_length(in);
  uint8_t h[NBD_REQUEST_SIZE];
  struct nbd_request rq;
  struct nbd_session_caps caps;
  struct treq *t;
  uint32_t err;

  if (c->skip) {
    size_t n = MIN((uint64_t) avail, c->skip);
    if (!n) return false;
    evbuffer_drain(in, n);
    c->skip -= n;
    return true;
  }
  if (avail < NBD_REQUEST_SIZE) return false;
  evbuffer_copyout(in, h, sizeof h);
  if (!nbd_request_decode(h, &rq)) {
    log_warn("connection %" PRIu64 " from %s: bad request magic 0x%08x; "
             "closing", c->id, c->peer, get_be32(h));
    nbd_conn_close(c, "bad request magic");
    return false;
  }
  if (rq.type == NBD_CMD_DISC) {
    evbuffer_drain(in, sizeof h);
    c->state = CONN_DRAINING;
    return false;
  }
  caps = (struct nbd_session_caps) {
    .size = c->size, .tflags = c->tflags, .structured = c->structured,
    .meta_context = c->meta_base_alloc, .max_payload = c->max_bs,
  };
  err = nbd_request_check(&rq, &caps);
  if (!err && c->srv->shutting_down) err = NBD_ESHUTDOWN;
  if (err) {
    evbuffer_drain(in, sizeof h);
    if (rq.type == NBD_CMD_WRITE)
      c->skip = rq.length;       /* the payload is discarded, not buffered */
    log_debug("connection %" PRIu64 ": %s flags 0x%x at %" PRIu64 "+%u "
              "refused: %s", c->id, nbd_cmd_name(rq.type), rq.flags,
              rq.offset, rq.length, nbd_err_text(err));
    error_reply(c, rq.cookie, err, NULL);
    return true;
  }
  if (rq.type == NBD_CMD_WRITE && avail < NBD_REQUEST_SIZE + (size_t) rq.length &&
      (rq.length < DIRECT_WRITE_MIN || c->tls_filter))
    return false;                /* wait for the whole payload */
  evbuffer_drain(in, sizeof h);

  t = calloc(1, sizeof *t);
  if (t && (rq.type == NBD_CMD_READ || rq.type == NBD_CMD_WRITE)) {
    t->r.buf = malloc(rq.length);
    if (!t->r.buf) { free(t); t = NULL; }
  }
  if (!t) {
    if (rq.type == NBD_CMD_WRITE) c->skip = rq.length;
    error_reply(c, rq.cookie, NBD_ENOMEM, NULL);
    return true;
  }
  t->cookie = rq.cookie;
  t->cmd = rq.type;
  t->cmd_flags = rq.flags;
  t->r.offset = rq.offset;
  t->r.length = rq.type == NBD_CMD_FLUSH ? 0 : rq.length;
  if (rq.type == NBD_CMD_FLUSH) t->r.offset = 0;
  if (rq.type == NBD_CMD_WRITE) {
    int n = evbuffer_remove(in, t->r.buf, rq.length);
    if (n < (int) rq.length) {
      /* Receive the rest straight into the buffer. */
      c->direct = &t->r;
      c->direct_got = n < 0 ? 0 : n;
      bufferevent_disable(c->bev, EV_READ);
      if (!c->direct_ev)
        c->direct_ev = event_new(c->srv->base, bufferevent_getfd(c->bev),
                                 EV_READ | EV_PERSIST, direct_cb, c);
      event_add(c->direct_ev, NULL);
      trans_direct_read(c);
      return false;
    }
  }
  dispatch(c, t);
  return c->bev != NULL;
}

/* Reads what the socket has of the pending direct payload; dispatches the
 * write once complete and goes back to buffered input. */
void trans_direct_read(struct nbd_conn *c)
{
  struct xreq *r = c->direct;
  while (c->direct_got < r->length) {
    ssize_t n = recv(bufferevent_getfd(c->bev), (char *) r->buf + c->direct_got,
                     r->length - c->direct_got, 0);
    if (n > 0) { c->direct_got += n; continue; }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    nbd_conn_close(c, n == 0 ? "client hung up in the middle of a write payload"
                         : "socket error while reading a write payload");
    return;
  }
  event_del(c->direct_ev);
  c->direct = NULL;
  dispatch(c, (struct treq *) r);
  if (!c->bev) return;
  if (!c->read_paused)
    bufferevent_enable(c->bev, EV_READ);
  nbd_conn_process_input(c);
}
