/* nego.c: the NBD handshake of an xnbd:// connection, sent ahead (nego.h). */
#include "nego.h"
#include "nbd-proto.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define META_BASE_ALLOC "base:allocation"
#define MAX_OPTS 3
#define MAX_PAYLOAD 65536             /* an option or a reply, more is refused */
#define MAX_HELD (UINT64_C(1) << 20)  /* server bytes held for libnbd, at most */

struct buf { uint8_t *p; size_t len, cap; bool oom; };

static int buf_add(struct buf *b, const void *d, size_t n)
{
  if (n == 0) return 0;             /* d may be NULL (an empty payload) */
  if (b->len + n > b->cap) {
    size_t cap = MAX(b->cap * 2, b->len + n + 256);
    uint8_t *p = realloc(b->p, cap);
    if (!p) { b->oom = true; return -1; }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, d, n);
  b->len += n;
  return 0;
}

static void buf_drop(struct buf *b, size_t n)   /* the first n bytes */
{
  memmove(b->p, b->p + n, b->len - n);
  b->len -= n;
}

struct opt {
  uint32_t opt;
  bool asked, skipped, answered;
  struct buf ans;               /* the server's replies to it, whole */
};

/* The early read's cookie: libnbd numbers its own from 1. */
#define EARLY_COOKIE UINT64_C(0x786e62642d656172)   /* "xnbd-ear" */

struct nego {
  char *name;
  struct buf pre;               /* flags and options, sent ahead */
  struct buf meta;              /* SET_META_CONTEXT's payload sent ahead */
  struct opt o[MAX_OPTS];
  unsigned nopt;
  unsigned srv_k;               /* option whose replies come next */
  unsigned loc_m;               /* next option libnbd may ask */
  unsigned deliver;             /* next answer to hand to libnbd */
  bool greeted, flags_seen, go_asked;
  bool go_ok;                   /* the server accepted GO */
  struct wan_early *early;      /* a reference, or NULL */
  enum { EARLY_NONE, EARLY_WAIT, EARLY_OK, EARLY_FAIL, EARLY_SHOWN } early_st;
  struct buf sin, lin;          /* partial server / libnbd bytes */
  struct buf out;               /* for libnbd */
  size_t out_off;
  char err[256];
};

static void put32(struct buf *b, uint32_t v)
{
  uint8_t x[4];
  put_be32(x, v);
  buf_add(b, x, 4);
}

static void put_opt(struct nego *n, uint32_t opt, const struct buf *payload)
{
  uint8_t h[16];
  put_be64(h, NBD_IHAVEOPT);
  put_be32(h + 8, opt);
  put_be32(h + 12, (uint32_t) payload->len);
  buf_add(&n->pre, h, sizeof h);
  buf_add(&n->pre, payload->p, payload->len);
  n->o[n->nopt++].opt = opt;
}

struct nego *nego_new(const struct wan_nego_cfg *cfg)
{
  struct nego *n = calloc(1, sizeof *n);
  if (!n) return NULL;
  n->name = strdup(cfg->export_name ? cfg->export_name : "");
  if (!n->name) { free(n); return NULL; }
  size_t nl = strlen(n->name);
  struct buf p = { 0 };
  put32(&n->pre, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  if (cfg->structured) put_opt(n, NBD_OPT_STRUCTURED_REPLY, &p);
  if (cfg->structured && cfg->base_alloc) {
    put32(&p, (uint32_t) nl);
    buf_add(&p, n->name, nl);
    put32(&p, 2);               /* the copier mark, as source.c asks it */
    put32(&p, (uint32_t) strlen(META_BASE_ALLOC));
    buf_add(&p, META_BASE_ALLOC, strlen(META_BASE_ALLOC));
    put32(&p, (uint32_t) strlen(XNBD_META_COPIER));
    buf_add(&p, XNBD_META_COPIER, strlen(XNBD_META_COPIER));
    buf_add(&n->meta, p.p, p.len);
    put_opt(n, NBD_OPT_SET_META_CONTEXT, &p);
    p.len = 0;
  }
  put32(&p, (uint32_t) nl);
  buf_add(&p, n->name, nl);
  uint8_t info[8];
  put_be16(info, 3);
  put_be16(info + 2, NBD_INFO_NAME);
  put_be16(info + 4, NBD_INFO_DESCRIPTION);
  put_be16(info + 6, NBD_INFO_BLOCK_SIZE);
  buf_add(&p, info, sizeof info);
  put_opt(n, NBD_OPT_GO, &p);
  _Static_assert(WAN_EARLY_MAX <= MAX_HELD / 2, "an early read's reply is held whole");
  if (cfg->early && !cfg->structured && cfg->early->len <= WAN_EARLY_MAX) {
    uint8_t r[28];
    put_be32(r, NBD_REQUEST_MAGIC);
    put_be16(r + 4, 0);
    put_be16(r + 6, NBD_CMD_READ);
    put_be64(r + 8, EARLY_COOKIE);
    put_be64(r + 16, cfg->early->off);
    put_be32(r + 24, cfg->early->len);
    buf_add(&n->pre, r, sizeof r);
    n->early = cfg->early;
    atomic_fetch_add(&n->early->refs, 1);
    n->early_st = EARLY_WAIT;
  }
  bool oom = p.oom || n->pre.oom || n->meta.oom;
  free(p.p);
  if (oom) { nego_free(n); return NULL; }
  return n;
}

void nego_free(struct nego *n)
{
  if (!n) return;
  for (unsigned i = 0; i < MAX_OPTS; i++) free(n->o[i].ans.p);
  free(n->pre.p);
  free(n->meta.p);
  free(n->sin.p);
  free(n->lin.p);
  free(n->out.p);
  free(n->name);
  wan_early_put(n->early);
  free(n);
}

struct wan_early *wan_early_new(uint64_t off, uint32_t len)
{
  struct wan_early *x = calloc(1, sizeof *x);
  if (!x || !len || !(x->buf = malloc(len))) { free(x); return NULL; }
  x->off = off;
  x->len = len;
  atomic_init(&x->state, WAN_EARLY_ASKED);
  atomic_init(&x->refs, 1);
  return x;
}

void wan_early_put(struct wan_early *x)
{
  if (!x || atomic_fetch_sub(&x->refs, 1) != 1) return;
  free(x->buf);
  free(x);
}

uint8_t *wan_early_take(struct wan_early *x, struct wan_early_info *info)
{
  if (!x || atomic_load_explicit(&x->state, memory_order_acquire) != WAN_EARLY_DONE)
    return NULL;
  uint8_t *b = x->buf;
  x->buf = NULL;
  *info = (struct wan_early_info) {
    .sent_ns = x->sent_ns, .first_ns = x->first_ns ? x->first_ns : x->done_ns,
    .done_ns = x->done_ns, .wire = x->first_ns ? x->wire : 0,
  };
  return b;
}

struct wan_early *nego_early(const struct nego *n) { return n->early; }

bool nego_early_receiving(const struct nego *n)
{
  return n->early_st == EARLY_WAIT && n->srv_k == n->nopt && n->go_ok && n->sin.len > 0;
}

struct wan_early *nego_early_resolved(struct nego *n, bool *ok)
{
  if (n->early_st != EARLY_OK && n->early_st != EARLY_FAIL) return NULL;
  *ok = n->early_st == EARLY_OK;
  n->early_st = EARLY_SHOWN;
  return n->early;
}

const uint8_t *nego_preamble(struct nego *n, size_t *len)
{
  *len = n->pre.len;
  return n->pre.p;
}

static int fail(struct nego *n, const char *what)
{
  if (!n->err[0]) snprintf(n->err, sizeof n->err, "%s", what);
  return -1;
}

/* Answers libnbd asked for, in the order it asked; GO's last. */
static int deliver(struct nego *n)
{
  while (n->deliver < n->nopt) {
    struct opt *o = &n->o[n->deliver];
    if (o->skipped) { n->deliver++; continue; }
    if (!o->asked || !o->answered) return 0;
    if (n->deliver == n->nopt - 1 && n->early_st == EARLY_WAIT) return 0;
    if (buf_add(&n->out, o->ans.p, o->ans.len) < 0) return fail(n, "out of memory");
    n->deliver++;
    if (n->deliver == n->nopt && n->sin.len) {   /* what followed GO's answer */
      if (buf_add(&n->out, n->sin.p, n->sin.len) < 0) return fail(n, "out of memory");
      n->sin.len = 0;
    }
  }
  return 0;
}

int nego_from_server(struct nego *n, const uint8_t *b, size_t len)
{
  if (n->err[0]) return -1;
  if (n->deliver == n->nopt)            /* over: straight through */
    return buf_add(&n->out, b, len) < 0 ? fail(n, "out of memory") : 0;
  if (buf_add(&n->sin, b, len) < 0) return fail(n, "out of memory");
  size_t held = n->sin.len + n->out.len;
  for (unsigned i = 0; i < n->nopt; i++) held += n->o[i].ans.len;
  if (held > MAX_HELD)
    return fail(n, "the server sent more than 1 MiB during the NBD handshake");
  for (;;) {
    if (!n->greeted) {
      if (n->sin.len < 18) break;
      if (get_be64(n->sin.p) != NBD_MAGIC || get_be64(n->sin.p + 8) != NBD_IHAVEOPT)
        return fail(n, "the server's NBD greeting is not fixed newstyle");
      uint16_t f = get_be16(n->sin.p + 16);
      if (!(f & NBD_FLAG_FIXED_NEWSTYLE) || !(f & NBD_FLAG_NO_ZEROES))
        return fail(n, "the server's NBD greeting lacks FIXED_NEWSTYLE or NO_ZEROES");
      if (buf_add(&n->out, n->sin.p, 18) < 0) return fail(n, "out of memory");
      buf_drop(&n->sin, 18);
      n->greeted = true;
      continue;
    }
    if (n->srv_k == n->nopt) {          /* the rest follows GO's answer */
      if (n->early_st != EARLY_WAIT) break;
      if (!n->go_ok) {                  /* refused: the read was not served */
        n->early_st = EARLY_FAIL;
        break;
      }
      if (n->sin.len < 16) break;
      if (get_be32(n->sin.p) != NBD_SIMPLE_REPLY_MAGIC ||
          get_be64(n->sin.p + 8) != EARLY_COOKIE)
        return fail(n, "the server's first reply is not the one to the read sent "
                       "with the handshake");
      if (get_be32(n->sin.p + 4)) {     /* an error: no data follows */
        buf_drop(&n->sin, 16);
        n->early_st = EARLY_FAIL;
        break;
      }
      if (n->sin.len < 16 + (size_t) n->early->len) break;
      memcpy(n->early->buf, n->sin.p + 16, n->early->len);
      buf_drop(&n->sin, 16 + n->early->len);
      n->early_st = EARLY_OK;
      break;
    }
    if (n->sin.len < 20) break;
    uint32_t opt = get_be32(n->sin.p + 8), type = get_be32(n->sin.p + 12);
    uint32_t rlen = get_be32(n->sin.p + 16);
    if (get_be64(n->sin.p) != NBD_OPT_REPLY_MAGIC || opt != n->o[n->srv_k].opt ||
        rlen > MAX_PAYLOAD)
      return fail(n, "the server's reply to an option sent ahead is malformed");
    if (n->sin.len < 20 + (size_t) rlen) break;
    struct opt *o = &n->o[n->srv_k];
    if (buf_add(&o->ans, n->sin.p, 20 + rlen) < 0) return fail(n, "out of memory");
    buf_drop(&n->sin, 20 + rlen);
    if (type == NBD_REP_ACK || (type & NBD_REP_FLAG_ERROR)) {
      o->answered = true;
      if (o->opt == NBD_OPT_GO) n->go_ok = type == NBD_REP_ACK;
      n->srv_k++;
    }
  }
  return deliver(n);
}

/* libnbd's option opt with payload p (len bytes) against those sent. */
static int match(struct nego *n, uint32_t opt, const uint8_t *p, uint32_t len)
{
  unsigned j = n->loc_m;
  while (j < n->nopt && n->o[j].opt != opt) j++;
  if (j == n->nopt) {
    char m[96];
    snprintf(m, sizeof m, "libnbd asked NBD option %u, which was not sent ahead", opt);
    return fail(n, m);
  }
  size_t nl = strlen(n->name);
  if (opt == NBD_OPT_STRUCTURED_REPLY && len != 0)
    return fail(n, "libnbd's STRUCTURED_REPLY option has a payload");
  if (opt != NBD_OPT_STRUCTURED_REPLY &&
      (len < 4 + nl || get_be32(p) != nl || memcmp(p + 4, n->name, nl) != 0))
    return fail(n, "libnbd asked for another export than the one sent ahead");
  if (opt == NBD_OPT_GO &&
      (len < 4 + nl + 2 || len != 4 + nl + 2 + 2 * (uint32_t) get_be16(p + 4 + nl)))
    return fail(n, "libnbd's GO option is malformed");
  if (opt == NBD_OPT_SET_META_CONTEXT &&
      (len != n->meta.len || memcmp(p, n->meta.p, len) != 0))
    return fail(n, "libnbd asked for other meta contexts than base:allocation and "
                XNBD_META_COPIER);
  for (unsigned i = n->loc_m; i < j; i++) n->o[i].skipped = true;
  n->o[j].asked = true;
  n->loc_m = j + 1;
  if (opt == NBD_OPT_GO) n->go_asked = true;
  return deliver(n);
}

int nego_from_local(struct nego *n, const uint8_t *b, size_t len, size_t *taken)
{
  *taken = 0;
  if (n->err[0]) return -1;
  if (n->go_asked) return 0;
  if (buf_add(&n->lin, b, len) < 0) return fail(n, "out of memory");
  while (!n->go_asked) {
    if (!n->flags_seen) {
      if (n->lin.len < 4) break;
      if (get_be32(n->lin.p) != (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
        return fail(n, "libnbd's client flags differ from those sent ahead");
      buf_drop(&n->lin, 4);
      n->flags_seen = true;
      continue;
    }
    if (n->lin.len < 16) break;
    uint32_t opt = get_be32(n->lin.p + 8), olen = get_be32(n->lin.p + 12);
    if (get_be64(n->lin.p) != NBD_IHAVEOPT || olen > MAX_PAYLOAD)
      return fail(n, "libnbd's NBD option is malformed");
    if (n->lin.len < 16 + (size_t) olen) break;
    if (match(n, opt, n->lin.p + 16, olen) < 0) return -1;
    buf_drop(&n->lin, 16 + olen);
  }
  if (!n->go_asked) {             /* all of it is handshake (a part may wait) */
    *taken = len;
    return 0;
  }
  /* Bytes after GO are not the handshake's: they were this call's last. */
  *taken = len - n->lin.len;
  n->lin.len = 0;
  return 0;
}

const uint8_t *nego_to_local(struct nego *n, size_t *len)
{
  *len = n->out.len - n->out_off;
  return *len ? n->out.p + n->out_off : NULL;
}

void nego_delivered(struct nego *n, size_t len)
{
  n->out_off += len;
  if (n->out_off == n->out.len) n->out_off = n->out.len = 0;
}

bool nego_server_done(const struct nego *n)
{
  return n->srv_k == n->nopt && n->early_st != EARLY_WAIT;
}

bool nego_over(const struct nego *n)
{
  return n->deliver == n->nopt && n->out.len == n->out_off;
}

const char *nego_error(const struct nego *n) { return n->err; }
