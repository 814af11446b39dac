/* negotiate.c: fixed newstyle option haggling (NBD protocol document,
 * "Handshake").  Input is parsed from the connection's evbuffer only when a
 * whole message is there; an oversized option is answered and skipped
 * without buffering it. */
#include "server-int.h"
#include "nbd-proto.h"
#include "proto.h"
#include "log.h"
#include "util.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#define META_BASE_ALLOC "base:allocation"
#define META_BASE_ALLOC_ID 1

void nego_send_greeting(struct nbd_conn *c)
{
  uint8_t g[18];
  put_be64(g, NBD_MAGIC);
  put_be64(g + 8, NBD_IHAVEOPT);
  put_be16(g + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  nbd_conn_send(c, g, sizeof g);
}

static void send_reply(struct nbd_conn *c, uint32_t opt, uint32_t type,
                       const void *data, uint32_t len)
{
  uint8_t h[20];
  put_be64(h, NBD_OPT_REPLY_MAGIC);
  put_be32(h + 8, opt);
  put_be32(h + 12, type);
  put_be32(h + 16, len);
  nbd_conn_send(c, h, sizeof h);
  if (len) nbd_conn_send(c, data, len);
}

static void send_error(struct nbd_conn *c, uint32_t opt, uint32_t type,
                       const char *fmt, ...)
  __attribute__((format(printf, 4, 5)));
static void send_error(struct nbd_conn *c, uint32_t opt, uint32_t type,
                       const char *fmt, ...)
{
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  log_debug("connection %" PRIu64 ": option %s refused: %s", c->id,
            nbd_opt_name(opt), msg);
  send_reply(c, opt, type, msg, strlen(msg));
}

/* Transmission flags for an export on this connection. */
static uint16_t export_tflags(struct nbd_conn *c, struct xnbd_export *e)
{
  const struct xnbd_backend_ops *o = e->ops;
  uint16_t f = o->get_flags(e->handle);
  uint16_t keep = NBD_FLAG_READ_ONLY | NBD_FLAG_ROTATIONAL |
                  NBD_FLAG_CAN_MULTI_CONN;
  if (o->flush) keep |= NBD_FLAG_SEND_FLUSH;
  if (o->pwrite) keep |= NBD_FLAG_SEND_FUA;
  if (o->trim) keep |= NBD_FLAG_SEND_TRIM;
  if (o->zero) keep |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  if (o->cache) keep |= NBD_FLAG_SEND_CACHE;
  f &= keep;
  if (f & NBD_FLAG_READ_ONLY)
    f &= ~(NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
           NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_FUA);
  if (!(f & NBD_FLAG_SEND_WRITE_ZEROES))
    f &= ~NBD_FLAG_SEND_FAST_ZERO;
  f |= NBD_FLAG_HAS_FLAGS;
  if (c->structured) f |= NBD_FLAG_SEND_DF;
  return f;
}

static void export_block_size(struct xnbd_export *e, uint32_t max_request,
                              uint32_t *min, uint32_t *pref, uint32_t *max)
{
  *min = 1; *pref = 4096; *max = max_request;
  if (e->ops->get_block_size) {
    e->ops->get_block_size(e->handle, min, pref, max);
    if (*max > max_request) *max = max_request;
  }
}

/* Common to EXPORT_NAME and GO: the connection starts transmission. */
static void enter_transmission(struct nbd_conn *c, struct xnbd_export *e)
{
  c->exp = e;
  c->tflags = export_tflags(c, e);
  c->size = e->ops->get_size(e->handle);
  export_block_size(e, c->srv->cfg.max_request, &c->min_bs, &c->pref_bs, &c->max_bs);
  /* Contexts were chosen for a named export; they apply only to it. */
  if (c->meta_base_alloc &&
      (!c->meta_export || strcmp(c->meta_export, e->name) != 0))
    c->meta_base_alloc = false;
  c->state = CONN_TRANSMISSION;
  if (c->hs_timer) { event_free(c->hs_timer); c->hs_timer = NULL; }
  log_debug("connection %" PRIu64 " from %s: transmission on export '%s' "
            "(size %" PRIu64 ", flags 0x%x, %s replies%s)", c->id, c->peer,
            e->name, c->size, c->tflags, c->structured ? "structured" : "simple",
            c->meta_base_alloc ? ", base:allocation" : "");
}

static void opt_export_name(struct nbd_conn *c, const uint8_t *p, uint32_t len)
{
  struct xnbd_export *e;
  uint8_t r[10 + 124] = { 0 };
  if (!nbd_string_ok((const char *) p, len) ||
      !(e = c->srv->up.find_export(c->srv, (const char *) p, len))) {
    /* This option cannot be refused with a reply: close (protocol). */
    log_warn("connection %" PRIu64 " from %s asked for unknown export '%.*s'",
             c->id, c->peer, (int) MIN(len, 256u), (const char *) p);
    nbd_conn_close(c, "unknown export requested with NBD_OPT_EXPORT_NAME");
    return;
  }
  enter_transmission(c, e);
  put_be64(r, c->size);
  put_be16(r + 8, c->tflags);
  nbd_conn_send(c, r, c->no_zeroes ? 10 : sizeof r);
}

static void send_info(struct nbd_conn *c, uint32_t opt, uint16_t type,
                      const void *data, uint32_t len)
{
  uint8_t buf[2 + NBD_MAX_STRING];
  put_be16(buf, type);
  memcpy(buf + 2, data, len);
  send_reply(c, opt, NBD_REP_INFO, buf, 2 + len);
}

static void opt_info_go(struct nbd_conn *c, uint32_t opt, const uint8_t *p, uint32_t len)
{
  struct nbd_info_request ir;
  struct xnbd_export *e;
  const char *why;
  uint8_t b[14];
  uint32_t mn, pf, mx;

  if (nbd_parse_info_request(p, len, &ir, &why)) {
    send_error(c, opt, NBD_REP_ERR_INVALID, "%s", why);
    return;
  }
  e = c->srv->up.find_export(c->srv, ir.name, ir.name_len);
  if (!e) {
    send_error(c, opt, NBD_REP_ERR_UNKNOWN,
               "export '%.*s' does not exist on this server (NBD_OPT_LIST "
               "shows the exports)", (int) MIN(ir.name_len, 256u), ir.name);
    return;
  }
  put_be64(b, e->ops->get_size(e->handle));
  put_be16(b + 8, export_tflags(c, e));
  send_info(c, opt, NBD_INFO_EXPORT, b, 10);
  for (uint16_t i = 0; i < ir.n_infos; i++) {
    uint16_t t = get_be16(ir.infos + 2 * i);
    if (t == NBD_INFO_NAME)
      send_info(c, opt, NBD_INFO_NAME, e->name, strlen(e->name));
    else if (t == NBD_INFO_DESCRIPTION && e->description)
      send_info(c, opt, NBD_INFO_DESCRIPTION, e->description,
                MIN(strlen(e->description), (size_t) NBD_MAX_STRING));
  }
  /* Block sizes are always sent: clients that ignore them lose nothing. */
  export_block_size(e, c->srv->cfg.max_request, &mn, &pf, &mx);
  put_be32(b, mn); put_be32(b + 4, pf); put_be32(b + 8, mx);
  send_info(c, opt, NBD_INFO_BLOCK_SIZE, b, 12);
  send_reply(c, opt, NBD_REP_ACK, NULL, 0);
  if (opt == NBD_OPT_GO)
    enter_transmission(c, e);
}

static void opt_list(struct nbd_conn *c, uint32_t len)
{
  if (len) {
    send_error(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID,
               "NBD_OPT_LIST takes no data");
    return;
  }
  for (struct xnbd_export *e = c->srv->exports; e; e = e->next) {
    if (e->unlisted) continue;
    uint32_t nl = strlen(e->name);
    uint32_t dl = e->description ? MIN(strlen(e->description), 1024u) : 0;
    uint8_t *b = malloc(4 + nl + dl);
    if (!b) break;
    put_be32(b, nl);
    memcpy(b + 4, e->name, nl);
    if (dl) memcpy(b + 4 + nl, e->description, dl);
    send_reply(c, NBD_OPT_LIST, NBD_REP_SERVER, b, 4 + nl + dl);
    free(b);
  }
  send_reply(c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

static void send_meta(struct nbd_conn *c, uint32_t opt, uint32_t id)
{
  uint8_t b[4 + sizeof META_BASE_ALLOC];
  put_be32(b, id);
  memcpy(b + 4, META_BASE_ALLOC, sizeof META_BASE_ALLOC - 1);
  send_reply(c, opt, NBD_REP_META_CONTEXT, b, sizeof b - 1);
}

static void opt_meta(struct nbd_conn *c, uint32_t opt, const uint8_t *p, uint32_t len)
{
  struct nbd_meta_request m;
  struct xnbd_export *e;
  const char *why;
  bool set = opt == NBD_OPT_SET_META_CONTEXT, matched = false;

  if (set && !c->structured) {
    send_error(c, opt, NBD_REP_ERR_INVALID,
               "negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts");
    return;
  }
  if (nbd_parse_meta_request(p, len, &m, &why)) {
    send_error(c, opt, NBD_REP_ERR_INVALID, "%s", why);
    return;
  }
  e = c->srv->up.find_export(c->srv, m.name, m.name_len);
  if (!e) {
    send_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%.*s' does not exist",
               (int) MIN(m.name_len, 256u), m.name);
    return;
  }
  if (set) {              /* replaces every earlier selection */
    c->meta_base_alloc = false;
    c->copier = false;
    free(c->meta_export);
    c->meta_export = strndup(m.name, m.name_len);
  }
  for (uint32_t i = 0; set && i < m.n_queries; i++) {
    const char *q;
    uint32_t ql;
    nbd_meta_query(&m, i, &q, &ql);
    if (ql == strlen(XNBD_META_COPIER) && memcmp(q, XNBD_META_COPIER, ql) == 0)
      c->copier = true;       /* noted, never selected (read-map.h) */
  }
  if (e->ops->block_status) {
    if (m.n_queries == 0 && !set)
      matched = true;
    for (uint32_t i = 0; i < m.n_queries && !matched; i++) {
      const char *q;
      uint32_t ql;
      nbd_meta_query(&m, i, &q, &ql);
      if (ql == strlen(META_BASE_ALLOC) && memcmp(q, META_BASE_ALLOC, ql) == 0)
        matched = true;
      else if (!set && ql == 5 && memcmp(q, "base:", 5) == 0)
        matched = true;
    }
  }
  if (matched) {
    send_meta(c, opt, set ? META_BASE_ALLOC_ID : 0);
    if (set) c->meta_base_alloc = true;
  }
  send_reply(c, opt, NBD_REP_ACK, NULL, 0);
}

static void handle_option(struct nbd_conn *c, uint32_t opt, const uint8_t *p,
                          uint32_t len)
{
  log_debug("connection %" PRIu64 ": option %s (%u), %u bytes", c->id,
            nbd_opt_name(opt), opt, len);
  if (c->srv->shutting_down && opt != NBD_OPT_ABORT) {
    if (opt == NBD_OPT_EXPORT_NAME) { nbd_conn_close(c, "server shutting down"); return; }
    send_error(c, opt, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
    return;
  }
  if (c->srv->cfg.tls_require && !c->tls && opt != NBD_OPT_STARTTLS &&
      opt != NBD_OPT_ABORT) {
    if (opt == NBD_OPT_EXPORT_NAME) {
      nbd_conn_close(c, "NBD_OPT_EXPORT_NAME without TLS, and TLS is required");
      return;
    }
    send_error(c, opt, NBD_REP_ERR_TLS_REQD,
               "this server requires TLS: negotiate NBD_OPT_STARTTLS first");
    return;
  }
  switch (opt) {
  case NBD_OPT_EXPORT_NAME:
    opt_export_name(c, p, len);
    break;
  case NBD_OPT_ABORT:
    send_reply(c, opt, NBD_REP_ACK, NULL, 0);
    c->state = CONN_DRAINING;
    break;
  case NBD_OPT_LIST:
    opt_list(c, len);
    break;
  case NBD_OPT_STARTTLS:
    if (len)
      send_error(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
    else if (!c->srv->cfg.ssl_ctx)
      send_error(c, opt, NBD_REP_ERR_POLICY,
                 "TLS is not configured on this server (start it with --tls)");
    else if (c->tls)
      send_error(c, opt, NBD_REP_ERR_INVALID, "TLS is already in use");
    else {
      send_reply(c, opt, NBD_REP_ACK, NULL, 0);
      /* Everything negotiated in plain text is forgotten. */
      c->structured = false;
      c->meta_base_alloc = false;
      c->copier = false;
      free(c->meta_export);
      c->meta_export = NULL;
      if (nbd_conn_start_tls(c) < 0) nbd_conn_close(c, "cannot start TLS");
    }
    break;
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    opt_info_go(c, opt, p, len);
    break;
  case NBD_OPT_STRUCTURED_REPLY:
    if (len) {
      send_error(c, opt, NBD_REP_ERR_INVALID,
                 "NBD_OPT_STRUCTURED_REPLY takes no data");
      break;
    }
    c->structured = true;
    send_reply(c, opt, NBD_REP_ACK, NULL, 0);
    break;
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    opt_meta(c, opt, p, len);
    break;
  default:
    send_error(c, opt, NBD_REP_ERR_UNSUP, "option %u is not supported", opt);
  }
}

bool nego_step(struct nbd_conn *c)
{
  struct evbuffer *in = bufferevent_get_input(c->bev);
  size_t avail = evbuffer_get_length(in);
  uint8_t h[16];
  uint32_t opt, len;

  if (c->skip) {
    size_t n = MIN((uint64_t) avail, c->skip);
    if (!n) return false;
    evbuffer_drain(in, n);
    c->skip -= n;
    return true;
  }
  if (c->state == CONN_WAIT_CLIENT_FLAGS) {
    uint32_t flags;
    if (avail < 4) return false;
    evbuffer_remove(in, h, 4);
    flags = get_be32(h);
    if (flags & ~(uint32_t) (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
      char why[96];
      snprintf(why, sizeof why, "client sent unknown client flags 0x%08x "
               "(not an NBD client, or an oldstyle one)", flags);
      log_warn("connection %" PRIu64 " from %s: %s", c->id, c->peer, why);
      nbd_conn_close(c, why);
      return false;
    }
    c->fixed_newstyle = flags & NBD_FLAG_C_FIXED_NEWSTYLE;
    c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
    c->state = CONN_OPTIONS;
    return true;
  }
  if (avail < 16) return false;
  evbuffer_copyout(in, h, 16);
  if (get_be64(h) != NBD_IHAVEOPT) {
    log_warn("connection %" PRIu64 " from %s: bad option magic 0x%016" PRIx64,
             c->id, c->peer, get_be64(h));
    nbd_conn_close(c, "bad option magic");
    return false;
  }
  opt = get_be32(h + 8);
  len = get_be32(h + 12);
  if (len > XNBD_MAX_OPTION_LEN) {
    evbuffer_drain(in, 16);
    if (opt == NBD_OPT_EXPORT_NAME) {
      nbd_conn_close(c, "NBD_OPT_EXPORT_NAME with an oversized name");
      return false;
    }
    log_warn("connection %" PRIu64 " from %s: option %s of %u bytes is over "
             "the %u-byte limit; skipping it", c->id, c->peer,
             nbd_opt_name(opt), len, XNBD_MAX_OPTION_LEN);
    send_error(c, opt, NBD_REP_ERR_TOO_BIG,
               "option data of %u bytes exceeds the server limit of %u", len,
               XNBD_MAX_OPTION_LEN);
    c->skip = len;
    return true;
  }
  if (avail < 16 + (size_t) len) return false;
  evbuffer_drain(in, 16);
  {
    uint8_t *p = len ? malloc(len) : NULL;
    if (len && !p) { nbd_conn_close(c, "out of memory"); return false; }
    evbuffer_remove(in, p, len);
    handle_option(c, opt, p, len);
    free(p);
  }
  return c->bev && c->state != CONN_DRAINING;
}
