/* Unit tests for common/nbd/proto.c (NBD message decoding and validation) and
 * the parsing helpers of common/lib/util.c. */
#include <criterion/criterion.h>

#include <errno.h>

#include "nbd-proto.h"
#include "proto.h"
#include "util.h"

#define MIB (1024u * 1024)

/* ------------------------------------------------------------ helpers */

static void make_hdr(uint8_t h[28], uint32_t magic, uint16_t flags, uint16_t type,
                     uint64_t cookie, uint64_t off, uint32_t len)
{
  put_be32(h, magic);
  put_be16(h + 4, flags);
  put_be16(h + 6, type);
  put_be64(h + 8, cookie);
  put_be64(h + 16, off);
  put_be32(h + 24, len);
}

/* A writable 1 MiB export advertising everything. */
static struct nbd_session_caps caps_all(void)
{
  struct nbd_session_caps c = {
    .size = MIB,
    .tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
              NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_DF |
              NBD_FLAG_SEND_CACHE | NBD_FLAG_SEND_FAST_ZERO,
    .structured = true,
    .meta_context = true,
    .max_payload = 32 * MIB,
  };
  return c;
}

static struct nbd_request rq(uint16_t type, uint16_t flags, uint64_t off, uint32_t len)
{
  struct nbd_request r = { .flags = flags, .type = type, .cookie = 1, .offset = off, .length = len };
  return r;
}

static uint32_t check(uint16_t type, uint16_t flags, uint64_t off, uint32_t len,
                      struct nbd_session_caps c)
{
  struct nbd_request r = rq(type, flags, off, len);
  return nbd_request_check(&r, &c);
}

/* ------------------------------------------------------------ request decode */

Test(request_decode, fields_are_big_endian)
{
  uint8_t h[28];
  struct nbd_request r;
  make_hdr(h, NBD_REQUEST_MAGIC, 0x0102, 0x0304, UINT64_C(0x1122334455667788),
           UINT64_C(0x0a0b0c0d0e0f1011), 0xa1b2c3d4);
  cr_assert(nbd_request_decode(h, &r));
  cr_assert_eq(r.flags, 0x0102);
  cr_assert_eq(r.type, 0x0304);
  cr_assert_eq(r.cookie, UINT64_C(0x1122334455667788));
  cr_assert_eq(r.offset, UINT64_C(0x0a0b0c0d0e0f1011));
  cr_assert_eq(r.length, 0xa1b2c3d4);
}

Test(request_decode, wire_bytes_are_in_protocol_order)
{
  /* Literal bytes from the protocol document's layout. */
  const uint8_t h[28] = {
    0x25, 0x60, 0x95, 0x13,             /* magic */
    0x00, 0x01,                         /* flags: FUA */
    0x00, 0x01,                         /* type: WRITE */
    0, 0, 0, 0, 0, 0, 0, 9,             /* cookie */
    0, 0, 0, 0, 0, 0, 0x10, 0,          /* offset 4096 */
    0, 0, 0x02, 0                       /* length 512 */
  };
  struct nbd_request r;
  cr_assert(nbd_request_decode(h, &r));
  cr_assert_eq(r.flags, NBD_CMD_FLAG_FUA);
  cr_assert_eq(r.type, NBD_CMD_WRITE);
  cr_assert_eq(r.cookie, 9);
  cr_assert_eq(r.offset, 4096);
  cr_assert_eq(r.length, 512);
}

Test(request_decode, bad_magic_is_rejected)
{
  uint8_t h[28];
  struct nbd_request r;
  make_hdr(h, 0x12345678, 0, 0, 0, 0, 512);
  cr_assert_not(nbd_request_decode(h, &r));
}

Test(request_decode, byte_swapped_magic_is_rejected)
{
  uint8_t h[28];
  struct nbd_request r;
  make_hdr(h, 0x13956025, 0, 0, 0, 0, 512);
  cr_assert_not(nbd_request_decode(h, &r));
}

Test(request_decode, reply_magic_is_not_a_request)
{
  uint8_t h[28];
  struct nbd_request r;
  make_hdr(h, NBD_SIMPLE_REPLY_MAGIC, 0, 0, 0, 0, 512);
  cr_assert_not(nbd_request_decode(h, &r));
}

/* ------------------------------------------------------------ request check: allowed */

Test(request_check, read_inside_export_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, 0, 4096, caps_all()), 0);
}

Test(request_check, read_ending_exactly_at_end_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, MIB - 512, 512, caps_all()), 0);
}

Test(request_check, read_of_whole_export_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, 0, MIB, caps_all()), 0);
}

Test(request_check, read_of_max_payload_is_allowed)
{
  struct nbd_session_caps c = caps_all();
  c.size = 64 * MIB;
  cr_assert_eq(check(NBD_CMD_READ, 0, 0, 32 * MIB, c), 0);
}

Test(request_check, write_inside_export_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_WRITE, 0, 4096, 4096, caps_all()), 0);
}

Test(request_check, write_unaligned_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_WRITE, 0, 3, 5, caps_all()), 0);
}

Test(request_check, write_with_fua_is_allowed_when_advertised)
{
  cr_assert_eq(check(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 512, caps_all()), 0);
}

Test(request_check, read_with_df_is_allowed_when_advertised)
{
  cr_assert_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, caps_all()), 0);
}

Test(request_check, flush_with_zero_range_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_FLUSH, 0, 0, 0, caps_all()), 0);
}

Test(request_check, trim_inside_export_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_TRIM, 0, 0, MIB, caps_all()), 0);
}

Test(request_check, trim_larger_than_max_payload_is_allowed)
{
  struct nbd_session_caps c = caps_all();
  c.size = 64 * MIB;
  cr_assert_eq(check(NBD_CMD_TRIM, 0, 0, 64 * MIB, c), 0);
}

Test(request_check, write_zeroes_larger_than_max_payload_is_allowed)
{
  struct nbd_session_caps c = caps_all();
  c.size = 64 * MIB;
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES, 0, 0, 64 * MIB, c), 0);
}

Test(request_check, write_zeroes_with_no_hole_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 4096, caps_all()), 0);
}

Test(request_check, write_zeroes_with_fast_zero_is_allowed_when_advertised)
{
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 4096, caps_all()), 0);
}

Test(request_check, write_zeroes_with_all_its_flags_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES,
                     NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                     0, 4096, caps_all()), 0);
}

Test(request_check, cache_is_allowed_when_advertised)
{
  cr_assert_eq(check(NBD_CMD_CACHE, 0, 0, MIB, caps_all()), 0);
}

Test(request_check, block_status_with_meta_context_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_BLOCK_STATUS, 0, 0, MIB, caps_all()), 0);
}

Test(request_check, block_status_with_req_one_is_allowed)
{
  cr_assert_eq(check(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 4096, caps_all()), 0);
}

Test(request_check, read_on_read_only_export_is_allowed)
{
  struct nbd_session_caps c = caps_all();
  c.tflags |= NBD_FLAG_READ_ONLY;
  cr_assert_eq(check(NBD_CMD_READ, 0, 0, 4096, c), 0);
}

Test(request_check, flush_on_read_only_export_is_allowed)
{
  struct nbd_session_caps c = caps_all();
  c.tflags |= NBD_FLAG_READ_ONLY;
  cr_assert_eq(check(NBD_CMD_FLUSH, 0, 0, 0, c), 0);
}

/* ------------------------------------------------------------ request check: errors */

Test(request_check, unknown_command_is_einval)
{
  cr_assert_eq(check(99, 0, 0, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, command_8_is_einval)
{
  cr_assert_eq(check(8, 0, 0, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, unknown_flag_on_read_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, 0x8000, 0, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, no_hole_on_write_is_einval)
{
  cr_assert_eq(check(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, req_one_on_read_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, df_on_write_is_einval)
{
  cr_assert_eq(check(NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, payload_len_flag_is_einval)
{
  cr_assert_eq(check(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, fua_is_einval_when_not_advertised)
{
  struct nbd_session_caps c = caps_all();
  c.tflags &= ~NBD_FLAG_SEND_FUA;
  cr_assert_eq(check(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 512, c), NBD_EINVAL);
}

Test(request_check, df_is_einval_when_not_advertised)
{
  struct nbd_session_caps c = caps_all();
  c.tflags &= ~NBD_FLAG_SEND_DF;
  cr_assert_eq(check(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, c), NBD_EINVAL);
}

Test(request_check, fast_zero_is_einval_when_not_advertised)
{
  struct nbd_session_caps c = caps_all();
  c.tflags &= ~NBD_FLAG_SEND_FAST_ZERO;
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512, c), NBD_EINVAL);
}

Test(request_check, flush_is_einval_when_not_advertised)
{
  struct nbd_session_caps c = caps_all();
  c.tflags &= ~NBD_FLAG_SEND_FLUSH;
  cr_assert_eq(check(NBD_CMD_FLUSH, 0, 0, 0, c), NBD_EINVAL);
}

Test(request_check, trim_is_einval_when_not_advertised)
{
  struct nbd_session_caps c = caps_all();
  c.tflags &= ~NBD_FLAG_SEND_TRIM;
  cr_assert_eq(check(NBD_CMD_TRIM, 0, 0, 512, c), NBD_EINVAL);
}

Test(request_check, cache_is_einval_when_not_advertised)
{
  struct nbd_session_caps c = caps_all();
  c.tflags &= ~NBD_FLAG_SEND_CACHE;
  cr_assert_eq(check(NBD_CMD_CACHE, 0, 0, 512, c), NBD_EINVAL);
}

Test(request_check, write_zeroes_is_einval_when_not_advertised)
{
  struct nbd_session_caps c = caps_all();
  c.tflags &= ~NBD_FLAG_SEND_WRITE_ZEROES;
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES, 0, 0, 512, c), NBD_EINVAL);
}

Test(request_check, block_status_without_meta_context_is_einval)
{
  struct nbd_session_caps c = caps_all();
  c.meta_context = false;
  cr_assert_eq(check(NBD_CMD_BLOCK_STATUS, 0, 0, 512, c), NBD_EINVAL);
}

Test(request_check, block_status_without_structured_replies_is_einval)
{
  struct nbd_session_caps c = caps_all();
  c.structured = false;
  cr_assert_eq(check(NBD_CMD_BLOCK_STATUS, 0, 0, 512, c), NBD_EINVAL);
}

Test(request_check, block_status_past_end_is_einval)
{
  cr_assert_eq(check(NBD_CMD_BLOCK_STATUS, 0, MIB - 512, 1024, caps_all()), NBD_EINVAL);
}

Test(request_check, write_to_read_only_export_is_eperm)
{
  struct nbd_session_caps c = caps_all();
  c.tflags |= NBD_FLAG_READ_ONLY;
  cr_assert_eq(check(NBD_CMD_WRITE, 0, 0, 512, c), NBD_EPERM);
}

Test(request_check, trim_on_read_only_export_is_eperm)
{
  struct nbd_session_caps c = caps_all();
  c.tflags |= NBD_FLAG_READ_ONLY;
  cr_assert_eq(check(NBD_CMD_TRIM, 0, 0, 512, c), NBD_EPERM);
}

Test(request_check, write_zeroes_on_read_only_export_is_eperm)
{
  struct nbd_session_caps c = caps_all();
  c.tflags |= NBD_FLAG_READ_ONLY;
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES, 0, 0, 512, c), NBD_EPERM);
}

Test(request_check, write_past_end_on_read_only_export_is_eperm_not_enospc)
{
  struct nbd_session_caps c = caps_all();
  c.tflags |= NBD_FLAG_READ_ONLY;
  cr_assert_eq(check(NBD_CMD_WRITE, 0, MIB, 512, c), NBD_EPERM);
}

Test(request_check, zero_length_read_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, 0, 0, caps_all()), NBD_EINVAL);
}

Test(request_check, zero_length_write_is_einval)
{
  cr_assert_eq(check(NBD_CMD_WRITE, 0, 0, 0, caps_all()), NBD_EINVAL);
}

Test(request_check, zero_length_trim_is_einval)
{
  cr_assert_eq(check(NBD_CMD_TRIM, 0, 0, 0, caps_all()), NBD_EINVAL);
}

Test(request_check, zero_length_block_status_is_einval)
{
  cr_assert_eq(check(NBD_CMD_BLOCK_STATUS, 0, 0, 0, caps_all()), NBD_EINVAL);
}

Test(request_check, read_over_max_payload_is_eoverflow)
{
  struct nbd_session_caps c = caps_all();
  c.size = 64 * MIB;
  cr_assert_eq(check(NBD_CMD_READ, 0, 0, 32 * MIB + 1, c), NBD_EOVERFLOW);
}

Test(request_check, write_over_max_payload_is_eoverflow)
{
  struct nbd_session_caps c = caps_all();
  c.size = 64 * MIB;
  cr_assert_eq(check(NBD_CMD_WRITE, 0, 0, 32 * MIB + 1, c), NBD_EOVERFLOW);
}

Test(request_check, read_past_end_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, MIB - 512, 1024, caps_all()), NBD_EINVAL);
}

Test(request_check, read_at_end_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, MIB, 1, caps_all()), NBD_EINVAL);
}

Test(request_check, read_offset_beyond_end_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, 10 * MIB, 512, caps_all()), NBD_EINVAL);
}

Test(request_check, read_whose_end_overflows_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, UINT64_C(0xffffffffffff0000), 0x20000, caps_all()),
               NBD_EINVAL);
}

Test(request_check, read_at_max_offset_is_einval)
{
  cr_assert_eq(check(NBD_CMD_READ, 0, UINT64_MAX, 1, caps_all()), NBD_EINVAL);
}

Test(request_check, write_past_end_is_enospc)
{
  cr_assert_eq(check(NBD_CMD_WRITE, 0, MIB - 512, 1024, caps_all()), NBD_ENOSPC);
}

Test(request_check, write_whose_end_overflows_is_enospc)
{
  cr_assert_eq(check(NBD_CMD_WRITE, 0, UINT64_C(0xffffffffffff0000), 0x20000, caps_all()),
               NBD_ENOSPC);
}

Test(request_check, trim_past_end_is_enospc)
{
  cr_assert_eq(check(NBD_CMD_TRIM, 0, MIB - 512, 1024, caps_all()), NBD_ENOSPC);
}

Test(request_check, write_zeroes_past_end_is_enospc)
{
  cr_assert_eq(check(NBD_CMD_WRITE_ZEROES, 0, MIB, 1, caps_all()), NBD_ENOSPC);
}

Test(request_check, cache_past_end_is_einval)
{
  cr_assert_eq(check(NBD_CMD_CACHE, 0, MIB - 512, 1024, caps_all()), NBD_EINVAL);
}

Test(request_check, any_access_to_empty_export_is_rejected)
{
  struct nbd_session_caps c = caps_all();
  c.size = 0;
  cr_assert_eq(check(NBD_CMD_READ, 0, 0, 1, c), NBD_EINVAL);
  cr_assert_eq(check(NBD_CMD_WRITE, 0, 0, 1, c), NBD_ENOSPC);
}

/* ------------------------------------------------------------ names */

Test(names, known_commands_and_options_have_names)
{
  cr_assert_str_eq(nbd_cmd_name(NBD_CMD_READ), "READ");
  cr_assert_str_eq(nbd_cmd_name(NBD_CMD_BLOCK_STATUS), "BLOCK_STATUS");
  cr_assert_str_eq(nbd_cmd_name(99), "UNKNOWN");
  cr_assert_str_eq(nbd_cmd_name(UINT16_MAX), "UNKNOWN");
  cr_assert_str_eq(nbd_opt_name(NBD_OPT_GO), "GO");
  cr_assert_str_eq(nbd_opt_name(NBD_OPT_SET_META_CONTEXT), "SET_META_CONTEXT");
  cr_assert_str_eq(nbd_opt_name(0x1234), "UNKNOWN");
}

/* ------------------------------------------------------------ strings */

Test(string_ok, plain_string_is_accepted)
{
  cr_assert(nbd_string_ok("export", 6));
  cr_assert(nbd_string_ok("", 0));
}

Test(string_ok, empty_option_payload_may_be_a_null_pointer)
{
  /* An option with length 0 has no payload buffer at all. */
  cr_assert(nbd_string_ok(NULL, 0));
}

Test(string_ok, embedded_nul_is_rejected)
{
  cr_assert_not(nbd_string_ok("ab\0cd", 5));
}

Test(string_ok, string_of_4096_bytes_is_accepted_4097_rejected)
{
  static char s[4097];
  memset(s, 'a', sizeof s);
  cr_assert(nbd_string_ok(s, 4096));
  cr_assert_not(nbd_string_ok(s, 4097));
}

/* ------------------------------------------------------------ info request */

static size_t info_buf(uint8_t *p, const char *name, uint16_t n, const uint16_t *items)
{
  size_t len = strlen(name), pos = 0;
  put_be32(p, len); pos += 4;
  memcpy(p + pos, name, len); pos += len;
  put_be16(p + pos, n); pos += 2;
  for (uint16_t i = 0; i < n; i++, pos += 2) put_be16(p + pos, items[i]);
  return pos;
}

Test(info_request, name_and_no_items_parse)
{
  uint8_t p[64];
  struct nbd_info_request r;
  const char *why = NULL;
  size_t len = info_buf(p, "disk", 0, NULL);
  cr_assert_eq(nbd_parse_info_request(p, len, &r, &why), 0);
  cr_assert_eq(r.name_len, 4);
  cr_assert_eq(memcmp(r.name, "disk", 4), 0);
  cr_assert_eq(r.n_infos, 0);
}

Test(info_request, empty_name_parses)
{
  uint8_t p[16];
  struct nbd_info_request r;
  const char *why = NULL;
  size_t len = info_buf(p, "", 0, NULL);
  cr_assert_eq(len, 6);
  cr_assert_eq(nbd_parse_info_request(p, len, &r, &why), 0);
  cr_assert_eq(r.name_len, 0);
}

Test(info_request, items_are_returned_in_wire_order)
{
  uint8_t p[64];
  uint16_t items[2] = { NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME };
  struct nbd_info_request r;
  const char *why = NULL;
  size_t len = info_buf(p, "x", 2, items);
  cr_assert_eq(nbd_parse_info_request(p, len, &r, &why), 0);
  cr_assert_eq(r.n_infos, 2);
  cr_assert_eq(get_be16(r.infos), NBD_INFO_BLOCK_SIZE);
  cr_assert_eq(get_be16(r.infos + 2), NBD_INFO_NAME);
}

Test(info_request, shorter_than_six_bytes_is_invalid)
{
  uint8_t p[6] = { 0 };
  struct nbd_info_request r;
  const char *why = NULL;
  for (uint32_t len = 0; len < 6; len++) {
    why = NULL;
    cr_assert_eq(nbd_parse_info_request(p, len, &r, &why), NBD_REP_ERR_INVALID, "len %u", len);
    cr_assert_not_null(why);
  }
}

Test(info_request, name_longer_than_option_is_invalid)
{
  uint8_t p[10] = { 0 };
  struct nbd_info_request r;
  const char *why = NULL;
  put_be32(p, 100);
  cr_assert_eq(nbd_parse_info_request(p, sizeof p, &r, &why), NBD_REP_ERR_INVALID);
  cr_assert_not_null(why);
}

Test(info_request, name_length_near_uint32_max_is_invalid)
{
  uint8_t p[10] = { 0 };
  struct nbd_info_request r;
  const char *why = NULL;
  put_be32(p, 0xfffffffe);
  cr_assert_eq(nbd_parse_info_request(p, sizeof p, &r, &why), NBD_REP_ERR_INVALID);
}

Test(info_request, item_count_larger_than_payload_is_invalid)
{
  uint8_t p[64];
  uint16_t items[1] = { NBD_INFO_BLOCK_SIZE };
  struct nbd_info_request r;
  const char *why = NULL;
  size_t len = info_buf(p, "x", 1, items);
  put_be16(p + 5, 3);
  cr_assert_eq(nbd_parse_info_request(p, len, &r, &why), NBD_REP_ERR_INVALID);
}

Test(info_request, trailing_bytes_are_invalid)
{
  uint8_t p[64];
  struct nbd_info_request r;
  const char *why = NULL;
  size_t len = info_buf(p, "x", 0, NULL);
  p[len] = 0;
  cr_assert_eq(nbd_parse_info_request(p, len + 1, &r, &why), NBD_REP_ERR_INVALID);
}

Test(info_request, odd_item_bytes_are_invalid)
{
  uint8_t p[64];
  uint16_t items[1] = { NBD_INFO_BLOCK_SIZE };
  struct nbd_info_request r;
  const char *why = NULL;
  size_t len = info_buf(p, "x", 1, items);
  cr_assert_eq(nbd_parse_info_request(p, len - 1, &r, &why), NBD_REP_ERR_INVALID);
}

Test(info_request, name_with_nul_is_invalid)
{
  uint8_t p[64];
  struct nbd_info_request r;
  const char *why = NULL;
  size_t len = info_buf(p, "abc", 0, NULL);
  p[5] = '\0';
  cr_assert_eq(nbd_parse_info_request(p, len, &r, &why), NBD_REP_ERR_INVALID);
}

Test(info_request, name_over_4096_bytes_is_invalid)
{
  static uint8_t p[4097 + 6];
  struct nbd_info_request r;
  const char *why = NULL;
  put_be32(p, 4097);
  memset(p + 4, 'a', 4097);
  put_be16(p + 4 + 4097, 0);
  cr_assert_eq(nbd_parse_info_request(p, sizeof p, &r, &why), NBD_REP_ERR_INVALID);
}

/* ------------------------------------------------------------ meta request */

/* Builds name + queries; returns the length. */
static size_t meta_buf(uint8_t *p, const char *name, uint32_t n, const char *const *q)
{
  size_t len = strlen(name), pos = 0;
  put_be32(p, len); pos += 4;
  memcpy(p + pos, name, len); pos += len;
  put_be32(p + pos, n); pos += 4;
  for (uint32_t i = 0; i < n; i++) {
    size_t ql = strlen(q[i]);
    put_be32(p + pos, ql); pos += 4;
    memcpy(p + pos, q[i], ql); pos += ql;
  }
  return pos;
}

Test(meta_request, one_query_parses)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL, *s;
  uint32_t sl;
  size_t len = meta_buf(p, "disk", 1, q);
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), 0);
  cr_assert_eq(m.name_len, 4);
  cr_assert_eq(memcmp(m.name, "disk", 4), 0);
  cr_assert_eq(m.n_queries, 1);
  nbd_meta_query(&m, 0, &s, &sl);
  cr_assert_eq(sl, strlen("base:allocation"));
  cr_assert_eq(memcmp(s, "base:allocation", sl), 0);
}

Test(meta_request, several_queries_are_returned_in_order)
{
  uint8_t p[256];
  const char *q[] = { "base:", "qemu:dirty-bitmap:x", "" };
  struct nbd_meta_request m;
  const char *why = NULL, *s;
  uint32_t sl;
  size_t len = meta_buf(p, "", 3, q);
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), 0);
  cr_assert_eq(m.n_queries, 3);
  for (uint32_t i = 0; i < 3; i++) {
    nbd_meta_query(&m, i, &s, &sl);
    cr_assert_eq(sl, strlen(q[i]), "query %u", i);
    cr_assert_eq(memcmp(s, q[i], sl), 0, "query %u", i);
  }
}

Test(meta_request, no_queries_parse)
{
  uint8_t p[64];
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "disk", 0, NULL);
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), 0);
  cr_assert_eq(m.n_queries, 0);
}

Test(meta_request, shorter_than_eight_bytes_is_invalid)
{
  uint8_t p[8] = { 0 };
  struct nbd_meta_request m;
  const char *why = NULL;
  for (uint32_t len = 0; len < 8; len++)
    cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), NBD_REP_ERR_INVALID, "len %u", len);
}

Test(meta_request, name_longer_than_option_is_invalid)
{
  uint8_t p[12] = { 0 };
  struct nbd_meta_request m;
  const char *why = NULL;
  put_be32(p, 9);
  cr_assert_eq(nbd_parse_meta_request(p, sizeof p, &m, &why), NBD_REP_ERR_INVALID);
  cr_assert_not_null(why);
}

Test(meta_request, query_count_larger_than_payload_is_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "", 1, q);
  put_be32(p + 4, 2);
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), NBD_REP_ERR_INVALID);
}

Test(meta_request, huge_query_count_is_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "", 1, q);
  put_be32(p + 4, 0xffffffff);
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), NBD_REP_ERR_INVALID);
}

Test(meta_request, query_longer_than_option_is_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "", 1, q);
  put_be32(p + 8, 1000);
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), NBD_REP_ERR_INVALID);
}

Test(meta_request, query_length_near_uint32_max_is_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "", 1, q);
  put_be32(p + 8, 0xfffffffc);
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), NBD_REP_ERR_INVALID);
}

Test(meta_request, truncated_query_header_is_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  meta_buf(p, "", 1, q);
  /* Option ends two bytes into the query's length field. */
  cr_assert_eq(nbd_parse_meta_request(p, 10, &m, &why), NBD_REP_ERR_INVALID);
}

Test(meta_request, trailing_bytes_are_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "", 1, q);
  cr_assert_eq(nbd_parse_meta_request(p, len + 3, &m, &why), NBD_REP_ERR_INVALID);
}

Test(meta_request, query_with_nul_is_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "", 1, q);
  p[12 + 4] = '\0';
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), NBD_REP_ERR_INVALID);
}

Test(meta_request, name_with_nul_is_invalid)
{
  uint8_t p[128];
  const char *q[] = { "base:allocation" };
  struct nbd_meta_request m;
  const char *why = NULL;
  size_t len = meta_buf(p, "ab", 1, q);
  p[4] = '\0';
  cr_assert_eq(nbd_parse_meta_request(p, len, &m, &why), NBD_REP_ERR_INVALID);
}

/* ------------------------------------------------------------ parse_size */

static uint64_t size_ok(const char *s)
{
  uint64_t v = 12345;
  const char *why = NULL;
  cr_assert_eq(parse_size(s, &v, &why), 0, "parse_size(\"%s\") failed: %s", s, why ? why : "");
  return v;
}

static void size_bad(const char *s)
{
  uint64_t v = 0;
  const char *why = NULL;
  cr_assert_eq(parse_size(s, &v, &why), -1, "parse_size(\"%s\") accepted", s);
  cr_assert_not_null(why, "parse_size(\"%s\") gave no reason", s);
}

Test(parse_size, plain_numbers_are_bytes)
{
  cr_assert_eq(size_ok("0"), 0);
  cr_assert_eq(size_ok("4096"), 4096);
  cr_assert_eq(size_ok("18446744073709551615"), UINT64_MAX);
}

Test(parse_size, binary_suffixes_in_any_case)
{
  cr_assert_eq(size_ok("4k"), 4096);
  cr_assert_eq(size_ok("4K"), 4096);
  cr_assert_eq(size_ok("64M"), 64ull << 20);
  cr_assert_eq(size_ok("1G"), 1ull << 30);
  cr_assert_eq(size_ok("2T"), 2ull << 40);
  cr_assert_eq(size_ok("16MiB"), 16ull << 20);
  cr_assert_eq(size_ok("16MB"), 16ull << 20);
  cr_assert_eq(size_ok("512B"), 512);
}

Test(parse_size, garbage_is_rejected)
{
  size_bad("");
  size_bad("abc");
  size_bad("-1");
  size_bad(" 1");
  size_bad("12x");
  size_bad("1.5G");
  size_bad("4kq");
  size_bad("M");
}

Test(parse_size, overflow_is_rejected)
{
  size_bad("18446744073709551616");
  size_bad("17179869184T");      /* 2^34 TiB = 2^74 */
  size_bad("99999999999999999999");
}

Test(parse_size, null_is_rejected)
{
  uint64_t v;
  const char *why = NULL;
  cr_assert_eq(parse_size(NULL, &v, &why), -1);
}

/* ------------------------------------------------------------ parse_rate */

static uint64_t rate_ok(const char *s)
{
  uint64_t v = 12345;
  const char *why = NULL;
  cr_assert_eq(parse_rate(s, &v, &why), 0, "parse_rate(\"%s\") failed: %s", s, why ? why : "");
  return v;
}

static void rate_bad(const char *s)
{
  uint64_t v = 0;
  const char *why = NULL;
  cr_assert_eq(parse_rate(s, &v, &why), -1, "parse_rate(\"%s\") accepted", s);
  cr_assert_not_null(why);
}

Test(parse_rate, zero_means_unlimited)
{
  cr_assert_eq(rate_ok("0"), 0);
}

Test(parse_rate, network_units_are_decimal_bits)
{
  cr_assert_eq(rate_ok("100mbit"), 12500000);
  cr_assert_eq(rate_ok("1gbit"), 125000000);
  cr_assert_eq(rate_ok("8kbit"), 1000);
  cr_assert_eq(rate_ok("8bit"), 1);
  cr_assert_eq(rate_ok("100Mbit"), 12500000);
}

Test(parse_rate, byte_units_are_binary)
{
  cr_assert_eq(rate_ok("12M"), 12ull << 20);
  cr_assert_eq(rate_ok("4k"), 4096);
  cr_assert_eq(rate_ok("1000"), 1000);
}

Test(parse_rate, garbage_is_rejected)
{
  rate_bad("");
  rate_bad("fast");
  rate_bad("10xbit");
  rate_bad("10kbits");
  rate_bad("10 mbit");
  rate_bad("10q");
  rate_bad("-5");
}

Test(parse_rate, overflow_is_rejected)
{
  rate_bad("18446744073709551616");
  rate_bad("18446744073709551615gbit");
}

/* ------------------------------------------------------------ parse_host_port */

struct hp { char *host, *port; };

static struct hp hp_ok(const char *s, const char *def)
{
  struct hp r = { NULL, NULL };
  const char *why = NULL;
  cr_assert_eq(parse_host_port(s, def, &r.host, &r.port, &why), 0,
               "parse_host_port(\"%s\") failed: %s", s, why ? why : "");
  return r;
}

static void hp_bad(const char *s, const char *def)
{
  char *h = (char *) 1, *p = (char *) 1;
  const char *why = NULL;
  cr_assert_eq(parse_host_port(s, def, &h, &p, &why), -1, "parse_host_port(\"%s\") accepted", s);
  cr_assert_null(h, "host not reset for \"%s\"", s);
  cr_assert_null(p, "port not reset for \"%s\"", s);
  cr_assert_not_null(why);
}

static void hp_free(struct hp r) { free(r.host); free(r.port); }

Test(parse_host_port, host_and_port)
{
  struct hp r = hp_ok("127.0.0.1:10809", NULL);
  cr_assert_str_eq(r.host, "127.0.0.1");
  cr_assert_str_eq(r.port, "10809");
  hp_free(r);
}

Test(parse_host_port, name_and_port)
{
  struct hp r = hp_ok("localhost:1", NULL);
  cr_assert_str_eq(r.host, "localhost");
  cr_assert_str_eq(r.port, "1");
  hp_free(r);
}

Test(parse_host_port, bracketed_ipv6)
{
  struct hp r = hp_ok("[::1]:10809", NULL);
  cr_assert_str_eq(r.host, "::1");
  cr_assert_str_eq(r.port, "10809");
  hp_free(r);
}

Test(parse_host_port, bracketed_ipv6_takes_default_port)
{
  struct hp r = hp_ok("[::1]", "10809");
  cr_assert_str_eq(r.host, "::1");
  cr_assert_str_eq(r.port, "10809");
  hp_free(r);
}

Test(parse_host_port, colon_port_means_any_address)
{
  struct hp r = hp_ok(":10809", NULL);
  cr_assert_null(r.host);
  cr_assert_str_eq(r.port, "10809");
  hp_free(r);
}

Test(parse_host_port, bare_port_means_any_address)
{
  struct hp r = hp_ok("10809", NULL);
  cr_assert_null(r.host);
  cr_assert_str_eq(r.port, "10809");
  hp_free(r);
}

Test(parse_host_port, bare_host_takes_default_port)
{
  struct hp r = hp_ok("example.com", "10809");
  cr_assert_str_eq(r.host, "example.com");
  cr_assert_str_eq(r.port, "10809");
  hp_free(r);
}

Test(parse_host_port, port_zero_is_allowed_for_listeners)
{
  struct hp r = hp_ok("127.0.0.1:0", NULL);
  cr_assert_str_eq(r.host, "127.0.0.1");
  cr_assert_str_eq(r.port, "0");
  hp_free(r);
}

Test(parse_host_port, port_limits)
{
  hp_free(hp_ok("h:65535", NULL));
  hp_bad("h:65536", NULL);
  hp_bad("h:99999999999999999999", NULL);
  hp_bad("h:-1", NULL);
  hp_bad("h:80x", NULL);
  hp_bad("h:http", NULL);
}

Test(parse_host_port, malformed_addresses_are_rejected)
{
  hp_bad("", "1");
  hp_bad("h:", NULL);
  hp_bad("[::1", "1");
  hp_bad("[::1]x", "1");
  hp_bad("[::1]:", NULL);
  hp_bad("::1:80", NULL);
  hp_bad("example.com", NULL);
}

Test(parse_host_port, null_is_rejected)
{
  char *h, *p;
  const char *why = NULL;
  cr_assert_eq(parse_host_port(NULL, "1", &h, &p, &why), -1);
}

/* ------------------------------------------------------------ is_zero */

Test(is_zero, empty_buffer_is_zero)
{
  cr_assert(is_zero("x", 0));
}

Test(is_zero, zero_buffers_of_every_small_length_are_zero)
{
  static uint8_t z[4096];
  for (size_t len = 1; len <= 64; len++)
    cr_assert(is_zero(z, len), "len %zu", len);
  cr_assert(is_zero(z, sizeof z));
}

Test(is_zero, one_nonzero_byte_anywhere_is_found)
{
  static uint8_t b[1000];
  for (size_t i = 0; i < sizeof b; i++) {
    memset(b, 0, sizeof b);
    b[i] = 1;
    cr_assert_not(is_zero(b, sizeof b), "nonzero byte at %zu missed", i);
  }
}

Test(is_zero, nonzero_byte_in_each_position_of_short_buffers_is_found)
{
  uint8_t b[40];
  for (size_t len = 1; len <= sizeof b; len++)
    for (size_t i = 0; i < len; i++) {
      memset(b, 0, sizeof b);
      b[i] = 0x80;
      cr_assert_not(is_zero(b, len), "len %zu byte %zu", len, i);
    }
}

Test(is_zero, unaligned_start_is_handled)
{
  static uint8_t b[4096 + 7];
  cr_assert(is_zero(b + 3, 4096));
  b[3 + 4095] = 9;
  cr_assert_not(is_zero(b + 3, 4096));
  cr_assert(is_zero(b + 3, 4095));
}

Test(is_zero, repeating_nonzero_pattern_is_not_zero)
{
  /* Would fool a "compare with itself shifted" check without the head test. */
  uint8_t b[64];
  memset(b, 0x55, sizeof b);
  cr_assert_not(is_zero(b, sizeof b));
}

/* ------------------------------------------------------------ errno_to_nbd */

Test(errno_to_nbd, maps_every_protocol_error)
{
  cr_assert_eq(errno_to_nbd(0), NBD_SUCCESS);
  cr_assert_eq(errno_to_nbd(EPERM), NBD_EPERM);
  cr_assert_eq(errno_to_nbd(EROFS), NBD_EPERM);
  cr_assert_eq(errno_to_nbd(EACCES), NBD_EPERM);
  cr_assert_eq(errno_to_nbd(EIO), NBD_EIO);
  cr_assert_eq(errno_to_nbd(ENOMEM), NBD_ENOMEM);
  cr_assert_eq(errno_to_nbd(EINVAL), NBD_EINVAL);
  cr_assert_eq(errno_to_nbd(ENOSPC), NBD_ENOSPC);
  cr_assert_eq(errno_to_nbd(EDQUOT), NBD_ENOSPC);
  cr_assert_eq(errno_to_nbd(EFBIG), NBD_ENOSPC);
  cr_assert_eq(errno_to_nbd(EOVERFLOW), NBD_EOVERFLOW);
  cr_assert_eq(errno_to_nbd(ENOTSUP), NBD_ENOTSUP);
  cr_assert_eq(errno_to_nbd(EOPNOTSUPP), NBD_ENOTSUP);
  cr_assert_eq(errno_to_nbd(ESHUTDOWN), NBD_ESHUTDOWN);
}

Test(errno_to_nbd, other_errors_become_eio)
{
  cr_assert_eq(errno_to_nbd(EBADF), NBD_EIO);
  cr_assert_eq(errno_to_nbd(ENOENT), NBD_EIO);
  cr_assert_eq(errno_to_nbd(EAGAIN), NBD_EIO);
  cr_assert_eq(errno_to_nbd(-1), NBD_EIO);
}

/* ------------------------------------------------------------ byte order helpers */

Test(byte_order, put_and_get_are_big_endian)
{
  uint8_t b[8];
  put_be16(b, 0x0102);
  cr_assert_eq(b[0], 1);
  cr_assert_eq(b[1], 2);
  put_be32(b, 0x01020304);
  cr_assert_eq(memcmp(b, "\1\2\3\4", 4), 0);
  put_be64(b, UINT64_C(0x0102030405060708));
  cr_assert_eq(memcmp(b, "\1\2\3\4\5\6\7\10", 8), 0);
  cr_assert_eq(get_be64(b), UINT64_C(0x0102030405060708));
  cr_assert_eq(get_be32(b + 1), 0x02030405);
  cr_assert_eq(get_be16(b + 3), 0x0405);
}
