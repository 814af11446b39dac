/* Unit tests for the one parser of each kind of front-end input:
 * target_parse() (common/lib/target.c) and util_parse_block_size()
 * (common/lib/util.c). */
#include <criterion/criterion.h>

#include <string.h>

#include "target.h"
#include "util.h"

TestSuite(target, .timeout = 30);
TestSuite(block_size, .timeout = 30);

static void parse_ok(const char *s, const char *exp_in, struct target *t)
{
  char err[512] = "";
  cr_assert_eq(target_parse(s, exp_in, t, err, sizeof err), 0, "%s: %s", s, err);
}

Test(target, xnbd_uris_give_host_port_and_export)
{
  struct target t;
  parse_ok("xnbd://siteA:10900/vm1", NULL, &t);
  cr_assert_eq(t.kind, TARGET_XNBD);
  cr_assert_not(t.tls);
  cr_assert_str_eq(t.host, "siteA");
  cr_assert_str_eq(t.port, "10900");
  cr_assert_str_eq(t.export_name, "vm1");
  target_free(&t);

  parse_ok("xnbds://[fe80::1]/", NULL, &t);
  cr_assert_eq(t.kind, TARGET_XNBD);
  cr_assert(t.tls);
  cr_assert_str_eq(t.host, "fe80::1");
  cr_assert_str_eq(t.port, TARGET_XNBD_PORT);
  cr_assert_str_eq(t.export_name, "");
  target_free(&t);

  parse_ok("xnbd://h", NULL, &t);
  cr_assert_str_eq(t.export_name, "");
  target_free(&t);
}

Test(target, nbd_uris_are_left_to_libnbd_with_their_tls)
{
  static const struct { const char *uri; bool tls; } ok[] = {
    { "nbd://siteA/vm1", false }, { "nbds://siteA:10809/vm1", true },
    { "nbd+unix:///vm1?socket=/run/x.sock", false },
    { "nbds+unix:///?socket=/s", true }, { "nbd+vsock://2", false },
    { "nbds+vsock://2", true },
  };
  for (size_t i = 0; i < ARRAY_SIZE(ok); i++) {
    struct target t;
    parse_ok(ok[i].uri, "ignored", &t);
    cr_assert_eq(t.kind, TARGET_NBD_URI, "%s", ok[i].uri);
    cr_assert_eq(t.tls, ok[i].tls, "%s", ok[i].uri);
    cr_assert_null(t.host);
    cr_assert_null(t.export_name);
    target_free(&t);
  }
}

Test(target, host_port_gets_the_given_export_and_default_port)
{
  struct target t;
  parse_ok("siteB:10811", "vm2", &t);
  cr_assert_eq(t.kind, TARGET_HOST_PORT);
  cr_assert_str_eq(t.host, "siteB");
  cr_assert_str_eq(t.port, "10811");
  cr_assert_str_eq(t.export_name, "vm2");
  target_free(&t);
  parse_ok("siteB", NULL, &t);
  cr_assert_str_eq(t.port, TARGET_NBD_PORT);
  cr_assert_str_eq(t.export_name, "");
  target_free(&t);
}

Test(target, bad_targets_are_refused_with_the_reason)
{
  static const struct { const char *s, *why; } bad[] = {
    { "", "empty target" },
    { "http://siteA/vm1", "unknown scheme \"http://\"" },
    { "NBD://siteA/", "unknown scheme" },
    { "xnbd:///vm1", "missing host" },
    { "xnbd://h:99999/x", "port must be a number" },
    { "xnbd://h:0/x", "port 0" },
    { "10809", "missing host" },
    { ":10809", "missing host" },
    { "siteA:", "missing port" },
    { "fe80::1:10809", "IPv6 addresses must be written [ADDR]:PORT" },
    { "siteA:http", "port must be a number" },
  };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    struct target t;
    char err[512] = "";
    cr_assert_eq(target_parse(bad[i].s, NULL, &t, err, sizeof err), -1, "accepted \"%s\"", bad[i].s);
    cr_assert_not_null(strstr(err, bad[i].why), "\"%s\": %s", bad[i].s, err);
    cr_assert_null(t.host);
    cr_assert_null(t.port);
    target_free(&t);                /* harmless on an empty target */
  }
}

Test(block_size, powers_of_two_from_4K_to_32M_are_accepted)
{
  static const struct { const char *s; uint32_t v; } ok[] = {
    { "4096", 4096 }, { "4K", 4096 }, { "64K", 65536 }, { "1M", 1 << 20 },
    { "32M", 32u << 20 }, { "33554432", 32u << 20 },
  };
  for (size_t i = 0; i < ARRAY_SIZE(ok); i++) {
    uint32_t v = 0;
    const char *why = NULL;
    cr_assert_eq(util_parse_block_size(ok[i].s, &v, &why), 0, "%s: %s", ok[i].s, why);
    cr_assert_eq(v, ok[i].v, "%s", ok[i].s);
  }
}

Test(block_size, others_are_refused_naming_the_range)
{
  static const char *bad[] = { "0", "2048", "4095", "6K", "12288", "64M", "1G",
                               "8G", "-4096", "4k4", "", "lots" };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    uint32_t v = 7;
    const char *why = NULL;
    cr_assert_eq(util_parse_block_size(bad[i], &v, &why), -1, "accepted \"%s\"", bad[i]);
    cr_assert_not_null(why);
    cr_assert_eq(v, 7, "\"%s\" changed the output", bad[i]);
  }
  const char *why = NULL;
  cr_assert_not(util_block_size_ok(UINT64_C(1) << 32, &why));
  cr_assert_not_null(strstr(why, XNBD_BLOCK_SIZE_RANGE), "%s", why);
  cr_assert(util_block_size_ok(XNBD_BLOCK_SIZE_MIN, &why));
  cr_assert(util_block_size_ok(XNBD_BLOCK_SIZE_MAX, &why));
}
