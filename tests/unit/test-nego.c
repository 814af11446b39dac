/* The NBD handshake sent ahead by the WAN pump (common/wan/nego.c): what
 * it sends, how it answers libnbd's options with the server's replies, in
 * order and only once asked, and what it refuses. */
#include <criterion/criterion.h>
#include <string.h>

#include "nego.h"
#include "nbd-proto.h"
#include "util.h"

struct bytes { uint8_t b[4096]; size_t n; };

static void add(struct bytes *x, const void *p, size_t n)
{
  if (n == 0) return;
  cr_assert(x->n + n <= sizeof x->b);
  memcpy(x->b + x->n, p, n);
  x->n += n;
}
static void add32(struct bytes *x, uint32_t v) { uint8_t b[4]; put_be32(b, v); add(x, b, 4); }
static void add64(struct bytes *x, uint64_t v) { uint8_t b[8]; put_be64(b, v); add(x, b, 8); }

static void greeting(struct bytes *x)
{
  uint8_t f[2];
  add64(x, NBD_MAGIC);
  add64(x, NBD_IHAVEOPT);
  put_be16(f, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  add(x, f, 2);
}

static void reply(struct bytes *x, uint32_t opt, uint32_t type, const char *data)
{
  add64(x, NBD_OPT_REPLY_MAGIC);
  add32(x, opt);
  add32(x, type);
  add32(x, (uint32_t) strlen(data));
  add(x, data, strlen(data));
}

static void option(struct bytes *x, uint32_t opt, const struct bytes *payload)
{
  add64(x, NBD_IHAVEOPT);
  add32(x, opt);
  add32(x, (uint32_t) payload->n);
  add(x, payload->b, payload->n);
}

static void name_payload(struct bytes *p, const char *name)
{
  add32(p, (uint32_t) strlen(name));
  add(p, name, strlen(name));
}

/* libnbd's GO for name, asking for the block size. */
static void go_option(struct bytes *x, const char *name)
{
  struct bytes go = { .n = 0 };
  name_payload(&go, name);
  uint8_t info[4];
  put_be16(info, 1);
  put_be16(info + 2, NBD_INFO_BLOCK_SIZE);
  add(&go, info, 4);
  option(x, NBD_OPT_GO, &go);
}

/* libnbd's side: flags, then STRUCTURED_REPLY, SET_META_CONTEXT, GO. */
static void libnbd_options(struct bytes *x, const char *name, bool meta)
{
  struct bytes empty = { .n = 0 }, m = { .n = 0 };
  add32(x, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  option(x, NBD_OPT_STRUCTURED_REPLY, &empty);
  if (meta) {
    name_payload(&m, name);
    add32(&m, 2);
    add32(&m, 15);
    add(&m, "base:allocation", 15);
    add32(&m, 11);
    add(&m, "xnbd:copier", 11);
    option(x, NBD_OPT_SET_META_CONTEXT, &m);
  }
  go_option(x, name);
}

/* The server's side: greeting, then the replies to the three options. */
static void server_replies(struct bytes *x)
{
  greeting(x);
  reply(x, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, "");
  reply(x, NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT, "\0\0\0\1base:allocation");
  reply(x, NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, "");
  reply(x, NBD_OPT_GO, NBD_REP_INFO, "\0\0" "12345678" "\0\1");
  reply(x, NBD_OPT_GO, NBD_REP_ACK, "");
}

static void drain(struct nego *n, struct bytes *to)
{
  size_t len;
  const uint8_t *b = nego_to_local(n, &len);
  add(to, b, len);
  nego_delivered(n, len);
}

static struct nego *make(const char *name)
{
  struct wan_nego_cfg c = { .export_name = name, .structured = true, .base_alloc = true };
  struct nego *n = nego_new(&c);
  cr_assert_not_null(n);
  return n;
}

Test(nego, sends_flags_and_the_three_options_ahead)
{
  struct nego *n = make("vm1");
  size_t len;
  const uint8_t *pre = nego_preamble(n, &len);
  cr_assert_geq(len, 4 + 16 + 16 + 16);
  cr_assert_eq(get_be32(pre), NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  cr_assert_eq(get_be64(pre + 4), NBD_IHAVEOPT);
  cr_assert_eq(get_be32(pre + 12), NBD_OPT_STRUCTURED_REPLY);
  cr_assert_eq(get_be32(pre + 20 + 8), NBD_OPT_SET_META_CONTEXT);
  uint32_t mlen = get_be32(pre + 20 + 12);
  cr_assert_eq(get_be32(pre + 36 + mlen + 8), NBD_OPT_GO);
  nego_free(n);
}

Test(nego, answers_each_option_once_asked_in_order)
{
  struct nego *n = make("vm1");
  struct bytes srv = { .n = 0 }, lib = { .n = 0 }, out = { .n = 0 };
  server_replies(&srv);
  add64(&srv, UINT64_C(0x1122334455667788));      /* bytes after GO's answer */
  libnbd_options(&lib, "vm1", true);
  /* The server answers everything before libnbd asked anything: only the
   * greeting may reach libnbd. */
  cr_assert_eq(nego_from_server(n, srv.b, srv.n), 0);
  drain(n, &out);
  cr_assert_eq(out.n, 18, "%zu bytes before libnbd asked", out.n);
  /* libnbd's options, one byte at a time. */
  size_t taken, total = 0;
  for (size_t i = 0; i < lib.n; i++) {
    cr_assert_eq(nego_from_local(n, lib.b + i, 1, &taken), 0, "%s", nego_error(n));
    total += taken;
  }
  cr_assert_eq(total, lib.n);
  drain(n, &out);
  cr_assert_eq(out.n, srv.n, "libnbd got %zu of %zu bytes", out.n, srv.n);
  cr_assert_arr_eq(out.b, srv.b, srv.n);
  cr_assert(nego_over(n));
  /* After GO: libnbd's requests are not taken. */
  cr_assert_eq(nego_from_local(n, (const uint8_t *) "abcd", 4, &taken), 0);
  cr_assert_eq(taken, 0);
  nego_free(n);
}

Test(nego, server_bytes_in_pieces_give_the_same)
{
  struct nego *n = make("");
  struct bytes srv = { .n = 0 }, lib = { .n = 0 }, out = { .n = 0 };
  server_replies(&srv);
  libnbd_options(&lib, "", true);
  size_t taken;
  cr_assert_eq(nego_from_local(n, lib.b, lib.n, &taken), 0, "%s", nego_error(n));
  cr_assert_eq(taken, lib.n);
  for (size_t i = 0; i < srv.n; i += 7) {
    cr_assert_eq(nego_from_server(n, srv.b + i, MIN((size_t) 7, srv.n - i)), 0, "%s", nego_error(n));
    drain(n, &out);
  }
  cr_assert_eq(out.n, srv.n);
  cr_assert_arr_eq(out.b, srv.b, srv.n);
  cr_assert(nego_over(n));
  nego_free(n);
}

Test(nego, an_option_libnbd_skips_is_dropped_with_its_answer)
{
  struct nego *n = make("d");
  struct bytes srv = { .n = 0 }, lib = { .n = 0 }, out = { .n = 0 }, want = { .n = 0 };
  server_replies(&srv);
  libnbd_options(&lib, "d", false);               /* no SET_META_CONTEXT */
  size_t taken;
  cr_assert_eq(nego_from_local(n, lib.b, lib.n, &taken), 0, "%s", nego_error(n));
  cr_assert_eq(nego_from_server(n, srv.b, srv.n), 0);
  drain(n, &out);
  greeting(&want);
  reply(&want, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, "");
  reply(&want, NBD_OPT_GO, NBD_REP_INFO, "\0\0" "12345678" "\0\1");
  reply(&want, NBD_OPT_GO, NBD_REP_ACK, "");
  cr_assert_eq(out.n, want.n);
  cr_assert_arr_eq(out.b, want.b, want.n);
  nego_free(n);
}

/* libnbd's bytes lib, against options sent ahead for export "vm1", are
 * refused with an error that says want. */
static void refused(const struct bytes *lib, const char *want)
{
  struct nego *n = make("vm1");
  size_t taken;
  cr_assert_eq(nego_from_local(n, lib->b, lib->n, &taken), -1);
  cr_assert(strstr(nego_error(n), want), "error: %s", nego_error(n));
  nego_free(n);
}

Test(nego, refuses_another_export)
{
  struct bytes lib = { .n = 0 };
  libnbd_options(&lib, "vm2", true);
  refused(&lib, "export");
}

Test(nego, refuses_an_option_not_sent_ahead)
{
  struct bytes lib = { .n = 0 }, empty = { .n = 0 };
  add32(&lib, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  option(&lib, NBD_OPT_LIST, &empty);
  refused(&lib, "not sent ahead");
}

Test(nego, refuses_a_malformed_server_reply)
{
  struct nego *n = make("vm1");
  struct bytes srv = { .n = 0 };
  greeting(&srv);
  reply(&srv, NBD_OPT_GO, NBD_REP_ACK, "");      /* GO's answer where SR's belongs */
  cr_assert_eq(nego_from_server(n, srv.b, srv.n), -1);
  cr_assert(strstr(nego_error(n), "malformed"), "error: %s", nego_error(n));
  nego_free(n);
  n = make("vm1");
  struct bytes bad = { .n = 0 };
  add64(&bad, UINT64_C(0x0123456789abcdef));      /* not a greeting */
  add64(&bad, NBD_IHAVEOPT);
  add(&bad, "\0\3", 2);
  cr_assert_eq(nego_from_server(n, bad.b, bad.n), -1);
  nego_free(n);
}

Test(nego, holds_at_most_a_mebibyte_of_server_replies)
{
  struct nego *n = make("vm1");
  struct bytes g = { .n = 0 }, r = { .n = 0 };
  greeting(&g);
  cr_assert_eq(nego_from_server(n, g.b, g.n), 0);
  reply(&r, NBD_OPT_STRUCTURED_REPLY, NBD_REP_INFO, "endless, never final");
  int rc = 0;
  for (unsigned i = 0; i < 200000 && rc == 0; i++)   /* about 8 MB at most */
    rc = nego_from_server(n, r.b, r.n);
  cr_assert_eq(rc, -1, "a server that never ends its replies was held without bound");
  cr_assert(strstr(nego_error(n), "1 MiB"), "error: %s", nego_error(n));
  cr_assert_not(nego_server_done(n));
  nego_free(n);
}

Test(nego, refuses_a_malformed_go)
{
  struct bytes lib = { .n = 0 }, go = { .n = 0 };
  add32(&lib, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  name_payload(&go, "vm1");
  uint8_t info[2];
  put_be16(info, 5);                              /* five infos announced, none sent */
  add(&go, info, 2);
  option(&lib, NBD_OPT_GO, &go);
  refused(&lib, "GO");
}

/* ---- the early read (digest export: GO alone, no structured replies) ---- */

static struct nego *make_early(struct wan_early *x)
{
  struct wan_nego_cfg c = { .export_name = "vm1@xnbd-sha256", .early = x };
  struct nego *n = nego_new(&c);
  cr_assert_not_null(n);
  return n;
}

/* libnbd's side of a connection without structured replies: flags, GO. */
static void libnbd_go(struct bytes *x, const char *name)
{
  add32(x, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  go_option(x, name);
}

/* The read request at the end of the preamble; returns its cookie. */
static uint64_t early_request(struct nego *n, uint64_t off, uint32_t len)
{
  size_t plen;
  const uint8_t *pre = nego_preamble(n, &plen);
  cr_assert_geq(plen, 4 + 16 + 28);
  const uint8_t *r = pre + plen - 28;
  cr_assert_eq(get_be32(r), NBD_REQUEST_MAGIC);
  cr_assert_eq(get_be16(r + 4), 0);
  cr_assert_eq(get_be16(r + 6), NBD_CMD_READ);
  cr_assert_eq(get_be64(r + 16), off);
  cr_assert_eq(get_be32(r + 24), len);
  return get_be64(r + 8);
}

static void simple_reply(struct bytes *x, uint64_t cookie, uint32_t err)
{
  add32(x, NBD_SIMPLE_REPLY_MAGIC);
  add32(x, err);
  add64(x, cookie);
}

static void feed_libnbd(struct nego *n, const struct bytes *lib)
{
  size_t taken;
  cr_assert_eq(nego_from_local(n, lib->b, lib->n, &taken), 0, "%s", nego_error(n));
  cr_assert_eq(taken, lib->n);
}

Test(nego, an_early_read_goes_with_go_and_its_reply_never_reaches_libnbd)
{
  struct wan_early *x = wan_early_new(4096, 64);
  cr_assert_not_null(x);
  struct nego *n = make_early(x);
  uint64_t cookie = early_request(n, 4096, 64);
  struct bytes srv = { .n = 0 }, lib = { .n = 0 }, out = { .n = 0 }, want = { .n = 0 };
  uint8_t data[64];
  for (unsigned i = 0; i < sizeof data; i++) data[i] = (uint8_t) (i * 7 + 1);
  greeting(&srv);
  reply(&srv, NBD_OPT_GO, NBD_REP_INFO, "\0\0" "12345678" "\0\1");
  reply(&srv, NBD_OPT_GO, NBD_REP_ACK, "");
  size_t go_end = srv.n;
  add(&want, srv.b, srv.n);
  simple_reply(&srv, cookie, 0);
  add(&srv, data, sizeof data);
  add64(&srv, UINT64_C(0x1122334455667788));      /* what follows: libnbd's */
  add64(&want, UINT64_C(0x1122334455667788));
  libnbd_go(&lib, "vm1@xnbd-sha256");
  feed_libnbd(n, &lib);
  /* GO's answer and half the read's reply: GO's answer is held. */
  size_t half = go_end + 16 + 32;
  cr_assert_eq(nego_from_server(n, srv.b, half), 0, "%s", nego_error(n));
  drain(n, &out);
  cr_assert_eq(out.n, 18, "libnbd got %zu bytes before the read's reply was in", out.n);
  cr_assert(nego_early_receiving(n));
  bool ok = false;
  cr_assert_null(nego_early_resolved(n, &ok));
  cr_assert_not(nego_server_done(n));
  cr_assert_eq(nego_from_server(n, srv.b + half, srv.n - half), 0, "%s", nego_error(n));
  cr_assert_eq(nego_early_resolved(n, &ok), x);
  cr_assert(ok);
  cr_assert_null(nego_early_resolved(n, &ok), "resolved twice");
  drain(n, &out);
  cr_assert_eq(out.n, want.n, "libnbd got %zu bytes, not %zu", out.n, want.n);
  cr_assert_arr_eq(out.b, want.b, want.n, "libnbd's bytes differ (the read's reply leaked?)");
  cr_assert(nego_over(n));
  cr_assert_arr_eq(x->buf, data, sizeof data);
  /* What the pump then does, and what the owner takes. */
  struct wan_early_info ei;
  cr_assert_null(wan_early_take(x, &ei), "taken before it was published");
  x->done_ns = 42;
  atomic_store(&x->state, WAN_EARLY_DONE);
  uint8_t *b = wan_early_take(x, &ei);
  cr_assert_not_null(b);
  cr_assert_arr_eq(b, data, sizeof data);
  cr_assert_eq(ei.done_ns, 42);
  cr_assert_eq(ei.first_ns, 42, "no first byte stamped: the reply's end stands for it");
  cr_assert_eq(ei.wire, 0, "link bytes of a reply not timed");
  cr_assert_null(wan_early_take(x, &ei), "taken twice");
  free(b);
  nego_free(n);
  wan_early_put(x);
}

Test(nego, an_early_read_that_fails_or_a_refused_go_lets_go_through_at_once)
{
  for (int refused_go = 0; refused_go <= 1; refused_go++) {
    struct wan_early *x = wan_early_new(0, 512);
    struct nego *n = make_early(x);
    uint64_t cookie = early_request(n, 0, 512);
    struct bytes srv = { .n = 0 }, lib = { .n = 0 }, out = { .n = 0 };
    greeting(&srv);
    if (refused_go)
      reply(&srv, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "no such export");
    else {
      reply(&srv, NBD_OPT_GO, NBD_REP_ACK, "");
      simple_reply(&srv, cookie, NBD_EINVAL);        /* e.g. past the export's end */
    }
    size_t answers = srv.n - (refused_go ? 0 : 16);
    libnbd_go(&lib, "vm1@xnbd-sha256");
    feed_libnbd(n, &lib);
    cr_assert_eq(nego_from_server(n, srv.b, srv.n), 0, "%s", nego_error(n));
    bool ok = true;
    cr_assert_eq(nego_early_resolved(n, &ok), x);
    cr_assert_not(ok, "a %s counted as the read's data", refused_go ? "refused GO" : "error");
    cr_assert(nego_server_done(n));
    drain(n, &out);
    cr_assert_eq(out.n, answers, "libnbd got %zu bytes, not GO's answer (%zu)", out.n, answers);
    nego_free(n);
    wan_early_put(x);
  }
}

Test(nego, refuses_another_reply_before_the_early_reads)
{
  struct wan_early *x = wan_early_new(0, 32);
  struct nego *n = make_early(x);
  uint64_t cookie = early_request(n, 0, 32);
  struct bytes srv = { .n = 0 }, lib = { .n = 0 };
  greeting(&srv);
  reply(&srv, NBD_OPT_GO, NBD_REP_ACK, "");
  simple_reply(&srv, cookie + 1, 0);
  libnbd_go(&lib, "vm1@xnbd-sha256");
  feed_libnbd(n, &lib);
  cr_assert_eq(nego_from_server(n, srv.b, srv.n), -1);
  cr_assert(strstr(nego_error(n), "first reply"), "error: %s", nego_error(n));
  nego_free(n);
  wan_early_put(x);
}

Test(nego, no_early_read_with_structured_replies)
{
  struct wan_early *x = wan_early_new(0, 32);
  struct wan_nego_cfg c = { .export_name = "vm1", .structured = true, .early = x };
  struct nego *n = nego_new(&c);
  size_t len;
  const uint8_t *pre = nego_preamble(n, &len);
  cr_assert_neq(get_be32(pre + len - 28), NBD_REQUEST_MAGIC);
  cr_assert_null(nego_early(n));
  nego_free(n);
  wan_early_put(x);
}
