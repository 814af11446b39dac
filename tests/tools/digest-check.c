/* digest-check FILE SIZE SAMPLE_HEX [FIRST COUNT]: opens a digest file
 * with digest_file_open() (common/dedup/digest-file.h) for a source of
 * SIZE bytes with that sampled identity, and writes the digests of blocks
 * [FIRST, FIRST + COUNT) (default: all) to stdout.  Exit 0, or 1 with the
 * reader's message on stderr. */
#include "digest-file.h"
#include "digest.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t num(const char *s)
{
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end || end == s) {
    fprintf(stderr, "digest-check: '%s' is not a number\n", s);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv)
{
  struct digest_file *df;
  char err[1024];
  uint64_t first = 0, count;
  uint8_t *buf;

  if (argc != 4 && argc != 6) {
    fprintf(stderr, "usage: digest-check FILE SIZE SAMPLE_HEX [FIRST COUNT]\n");
    return 2;
  }
  if (digest_file_open(argv[1], num(argv[2]), argv[3], &df, err, sizeof err) < 0) {
    fprintf(stderr, "digest-check: %s\n", err);
    return 1;
  }
  count = digest_file_blocks(df);
  if (argc == 6) { first = num(argv[4]); count = num(argv[5]); }
  buf = malloc(count * DIGEST_LEN + 1);
  if (!buf) { fprintf(stderr, "digest-check: out of memory\n"); return 1; }
  if (digest_file_read(df, first, count, buf) < 0) {
    fprintf(stderr, "digest-check: digest_file_read(%" PRIu64 ", %" PRIu64 "): %s\n",
            first, count, strerror(errno));
    return 1;
  }
  if (write_all(1, buf, count * DIGEST_LEN) < 0) return 1;
  free(buf);
  digest_file_close(df);
  return 0;
}
