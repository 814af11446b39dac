/* Unit tests for common/store/read-map.c: the server's map of recent reads
 * (what it notes, the export's bytes, read whole or in odd pieces) and the
 * proxy's reading of it (order, and maps it must refuse). */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "read-map.h"
#include "util.h"

#define M (UINT64_C(1) << 20)

static int done_err = -1;
static void done(struct xreq *r, int err) { done_err = err; }

/* The export's bytes [off, off + len) of m. */
static void export_read(struct read_map *m, uint64_t off, uint64_t len, uint8_t *buf)
{
  struct xreq r = { .type = XREQ_READ, .offset = off, .length = len, .buf = buf, .done = done };
  done_err = -1;
  read_map_ops.pread(m, &r);
  cr_assert_eq(done_err, 0);
}

static uint8_t *whole(struct read_map *m, uint64_t size, uint64_t *len)
{
  *len = read_map_export_size(size);
  uint8_t *b = malloc(*len);
  cr_assert(b);
  export_read(m, 0, *len, b);
  return b;
}

Test(read_map, ranks_regions_by_their_last_read)
{
  uint64_t size = 10 * M + 5, len, *reg, n;
  unsigned shift;
  char err[256];
  struct read_map *m = read_map_new(size);
  cr_assert(m);
  cr_assert_eq(read_map_export_size(size), 16 + 4 * 11);
  read_map_note(m, 4 * M + 100, 10);          /* region 4 */
  read_map_note(m, 7 * M - 1, 2);             /* regions 6 and 7 */
  read_map_note(m, 2 * M, 4096);              /* region 2 */
  read_map_note(m, 10 * M, 5);                /* the last, partial region */
  read_map_note(m, 4 * M, 1);                 /* region 4 again: now the newest but one */
  read_map_note(m, 11 * M, 4096);             /* past the end: ignored */
  read_map_note(m, 3 * M, 0);                 /* empty: ignored */
  uint8_t *b = whole(m, size, &len);
  cr_assert(memcmp(b, "XNBDREAD", 8) == 0);
  cr_assert_eq(get_be32(b + 8), 20);
  cr_assert_eq(get_be32(b + 12), 0);
  cr_assert_eq(get_be32(b + 16 + 4 * 4), 1);  /* newest */
  cr_assert_eq(get_be32(b + 16 + 4 * 10), 2);
  cr_assert_eq(get_be32(b + 16 + 4 * 0), 0);  /* never read */
  cr_assert_eq(read_map_order(b, len, size, &reg, &n, &shift, err, sizeof err), 0, "%s", err);
  cr_assert_eq(shift, 20);
  cr_assert_eq(n, 5);
  uint64_t want[] = { 4, 10, 2, 6, 7 };        /* 6 and 7 tie: by region */
  for (unsigned i = 0; i < 5; i++) cr_assert_eq(reg[i], want[i], "rank %u: %lu", i, reg[i]);
  free(reg);
  free(b);
  read_map_free(m);
}

Test(read_map, reads_in_odd_pieces_match_the_whole)
{
  uint64_t size = 40 * M, len;
  struct read_map *m = read_map_new(size);
  for (unsigned i = 0; i < 40; i += 3) read_map_note(m, i * M, 1);
  uint8_t *b = whole(m, size, &len);
  uint8_t *p = calloc(1, len);
  for (uint64_t off = 0; off < len; ) {
    uint64_t k = MIN(len - off, 1 + off % 7);   /* 1..7 bytes, unaligned */
    export_read(m, off, k, p + off);
    off += k;
  }
  cr_assert(memcmp(b, p, len) == 0);
  free(b);
  free(p);
  read_map_free(m);
}

Test(read_map, an_unread_image_names_no_region)
{
  uint64_t len, *reg = (uint64_t *) 1, n = 7;
  unsigned shift;
  char err[256];
  struct read_map *m = read_map_new(3 * M);
  uint8_t *b = whole(m, 3 * M, &len);
  cr_assert_eq(read_map_order(b, len, 3 * M, &reg, &n, &shift, err, sizeof err), 0);
  cr_assert_null(reg);
  cr_assert_eq(n, 0);
  free(b);
  read_map_free(m);
}

Test(read_map, refuses_what_is_not_a_map_for_this_image)
{
  uint64_t size = 4 * M, len, *reg, n;
  unsigned shift;
  char err[256];
  struct read_map *m = read_map_new(size);
  read_map_note(m, 0, 1);
  uint8_t *b = whole(m, size, &len);
  /* Another image size. */
  cr_assert_eq(read_map_order(b, len, 5 * M, &reg, &n, &shift, err, sizeof err), -1);
  cr_assert(strstr(err, "needs"), "%s", err);
  /* Short, wrong magic, region sizes out of range, reserved bytes set. */
  cr_assert_eq(read_map_order(b, 8, size, &reg, &n, &shift, err, sizeof err), -1);
  b[0] = 'Y';
  cr_assert_eq(read_map_order(b, len, size, &reg, &n, &shift, err, sizeof err), -1);
  cr_assert(strstr(err, "not a read map"), "%s", err);
  b[0] = 'X';
  put_be32(b + 8, 11);
  cr_assert_eq(read_map_order(b, len, size, &reg, &n, &shift, err, sizeof err), -1);
  put_be32(b + 8, 41);
  cr_assert_eq(read_map_order(b, len, size, &reg, &n, &shift, err, sizeof err), -1);
  put_be32(b + 8, 20);
  put_be32(b + 12, 1);
  cr_assert_eq(read_map_order(b, len, size, &reg, &n, &shift, err, sizeof err), -1);
  put_be32(b + 12, 0);
  cr_assert_eq(read_map_order(b, len, size, &reg, &n, &shift, err, sizeof err), 0);
  cr_assert_eq(n, 1);
  free(reg);
  /* Another region size, consistent with its length: accepted. */
  uint8_t big[16 + 4] = "XNBDREAD";
  put_be32(big + 8, 22);                       /* 4 MiB regions: one */
  put_be32(big + 16, 9);
  cr_assert_eq(read_map_order(big, sizeof big, size, &reg, &n, &shift, err, sizeof err), 0);
  cr_assert_eq(shift, 22);
  cr_assert_eq(n, 1);
  cr_assert_eq(reg[0], 0);
  free(reg);
  free(b);
  read_map_free(m);
}

Test(read_map, the_export_is_read_only)
{
  struct read_map *m = read_map_new(M);
  uint8_t x[4] = { 0 };
  struct xreq r = { .type = XREQ_WRITE, .offset = 0, .length = 4, .buf = x, .done = done };
  read_map_ops.pwrite(m, &r);
  cr_assert_eq(done_err, EPERM);
  cr_assert(read_map_ops.get_flags(m) & 2);    /* NBD_FLAG_READ_ONLY */
  read_map_free(m);
}
