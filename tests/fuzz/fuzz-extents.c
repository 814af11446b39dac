/* fuzz-extents.c: libFuzzer target for the source side's block-status
 * check (common/source/extents.c, extents_clip): the extents a source
 * sends for a request, as the proxy's libnbd callback sees them.  Whatever
 * the source says, the runs accepted must be non-empty, contiguous from
 * the requested offset, and end within the request and the export (D1);
 * zero-length extents, odd entry counts and replies for another offset
 * must be refused with a message (D6).
 *
 * Input: 32 bytes of header (request offset, request length, export size,
 * reply offset -- used only when its lowest bit is set, else the request's;
 * big-endian 64-bit), then the entries (big-endian 32-bit words, pairs of
 * length and flags). */
#include <stdint.h>
#include <inttypes.h>
#include <string.h>

#include "extents.h"
#include "fuzz-common.h"
#include "util.h"

#define MAX_WORDS 4096

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  fuzz_quiet_logs("fuzz-extents");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static uint32_t entries[MAX_WORDS];
  static struct extent_run out[MAX_WORDS / 2];
  char why[512];
  uint64_t off, len, esize, reply_off;
  size_t n;
  int r;

  if (size < 32)
    return 0;
  off = get_be64(data);
  len = get_be64(data + 8);
  esize = get_be64(data + 16);
  /* The reply's offset: the request's, or (rarely) another. */
  reply_off = data[24] & 1 ? get_be64(data + 24) : off;
  n = MIN((size - 32) / 4, (size_t) MAX_WORDS);
  for (size_t i = 0; i < n; i++)
    entries[i] = get_be32(data + 32 + 4 * i);

  why[0] = '\0';
  r = extents_clip(off, len, esize, reply_off, entries, n, out, why, sizeof why);
  FUZZ_CHECK(r >= -1 && r <= (int) (n / 2), "extents_clip returned %d for %zu words", r, n);
  if (r < 0) {
    FUZZ_CHECK(why[0] != '\0' && memchr(why, '\0', sizeof why),
               "refused without a message");
    return 0;
  }
  FUZZ_CHECK(n % 2 == 0 && n > 0, "accepted %zu words", n);
  FUZZ_CHECK(reply_off == off, "accepted a reply for another offset");
  /* D1: runs are non-empty, contiguous from off, and never pass the
   * request or the export. */
  uint64_t pos = off;
  for (int i = 0; i < r; i++) {
    FUZZ_CHECK(out[i].len > 0, "empty run %d", i);
    FUZZ_CHECK(out[i].off == pos, "run %d at %" PRIu64 ", expected %" PRIu64, i,
               out[i].off, pos);
    pos += out[i].len;
  }
  FUZZ_CHECK(pos - off <= len && pos <= esize,
             "runs end at %" PRIu64 ": past the request %" PRIu64 "+%" PRIu64
             " or the export %" PRIu64, pos, off, len, esize);
  return 0;
}
