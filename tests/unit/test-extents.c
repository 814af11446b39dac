/* Unit tests for common/source/extents.c: a source's block-status reply is
 * clipped to the request and the export, and refused when it breaks the
 * protocol (reliability defects D1 and D6). */
#include <criterion/criterion.h>

#include "extents.h"

#define ZERO 3u                     /* NBD_STATE_HOLE | NBD_STATE_ZERO */
#define M (UINT64_C(1) << 20)

static struct extent_run out[16];
static char why[256];

Test(extents, accepts_a_reply_that_matches_the_request)
{
  uint32_t e[] = { 1 << 20, 0, 1 << 20, ZERO };
  int n = extents_clip(0, 2 * M, 64 * M, 0, e, 4, out, why, sizeof why);
  cr_assert_eq(n, 2);
  cr_assert(!out[0].zero && out[0].off == 0 && out[0].len == M);
  cr_assert(out[1].zero && out[1].off == M && out[1].len == M);
}

Test(extents, drops_an_extra_extent_past_the_request)
{
  /* D1: correct answer for 16 MiB, then an 8 MiB zero extent beyond it. */
  uint32_t e[] = { 16 << 20, 0, 8 << 20, ZERO };
  int n = extents_clip(16 * M, 16 * M, 64 * M, 16 * M, e, 4, out, why, sizeof why);
  cr_assert_eq(n, 1);
  cr_assert(!out[0].zero && out[0].off == 16 * M && out[0].len == 16 * M);
}

Test(extents, clips_a_huge_extent_to_the_request)
{
  /* D1: one extent of 0xFFFFF000 bytes for a 16 MiB question. */
  uint32_t e[] = { 0xFFFFF000u, ZERO };
  int n = extents_clip(0, 16 * M, 64 * M, 0, e, 2, out, why, sizeof why);
  cr_assert_eq(n, 1);
  cr_assert(out[0].zero && out[0].len == 16 * M);
}

Test(extents, clips_to_the_end_of_the_export)
{
  uint32_t e[] = { 0xFFFFF000u, ZERO };
  int n = extents_clip(60 * M, 4 * M, 64 * M, 60 * M, e, 2, out, why, sizeof why);
  cr_assert_eq(n, 1);
  cr_assert_eq(out[0].off + out[0].len, 64 * M);
}

Test(extents, keeps_a_short_reply_short)
{
  uint32_t e[] = { 4096, ZERO };
  int n = extents_clip(0, 16 * M, 64 * M, 0, e, 2, out, why, sizeof why);
  cr_assert_eq(n, 1);
  cr_assert_eq(out[0].len, 4096);
}

Test(extents, refuses_a_zero_length_extent)
{
  /* D6: zero-length extents made the proxy ask again forever. */
  uint32_t e[] = { 0, ZERO, 4096, 0 };
  cr_assert_eq(extents_clip(0, 16 * M, 64 * M, 0, e, 4, out, why, sizeof why), -1);
  cr_assert(strstr(why, "zero-length"), "%s", why);
  uint32_t f[] = { 4096, 0, 0, ZERO };
  cr_assert_eq(extents_clip(0, 16 * M, 64 * M, 0, f, 4, out, why, sizeof why), -1);
}

Test(extents, refuses_a_reply_for_another_offset)
{
  uint32_t e[] = { 4096, ZERO };
  cr_assert_eq(extents_clip(8192, 4096, 64 * M, 0, e, 2, out, why, sizeof why), -1);
  cr_assert(strstr(why, "requested offset"), "%s", why);
}

Test(extents, refuses_odd_or_empty_entry_lists)
{
  uint32_t e[] = { 4096, ZERO, 4096 };
  cr_assert_eq(extents_clip(0, 4096, 64 * M, 0, e, 3, out, why, sizeof why), -1);
  cr_assert_eq(extents_clip(0, 4096, 64 * M, 0, e, 0, out, why, sizeof why), -1);
}

Test(extents, refuses_a_request_outside_the_export)
{
  uint32_t e[] = { 4096, ZERO };
  cr_assert_eq(extents_clip(64 * M, 4096, 64 * M, 64 * M, e, 2, out, why, sizeof why), -1);
  cr_assert_eq(extents_clip(UINT64_MAX - 10, 4096, 64 * M, UINT64_MAX - 10, e, 2, out,
                            why, sizeof why), -1);
}
