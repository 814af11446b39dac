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

/* libnbd's side: flags, then STRUCTURED_REPLY, SET_META_CONTEXT, GO. */
static void libnbd_options(struct bytes *x, const char *name, bool meta)
{
  struct bytes empty = { .n = 0 }, m = { .n = 0 }, go = { .n = 0 };
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
  name_payload(&go, name);
  uint8_t info[4];
  put_be16(info, 1);
  put_be16(info + 2, NBD_INFO_BLOCK_SIZE);
  add(&go, info, 4);
  option(x, NBD_OPT_GO, &go);
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
