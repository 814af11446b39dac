/* fuzz-extents.c: libFuzzer target for the source side's block-status
 * check (common/source/extents.c, being written by the lead): the extents
 * a source sends for a request, as the proxy's libnbd callback sees them,
 * clipped to the request and validated.
 *
 * NOT BUILT until common/source/extents.h exists (the Makefile leaves
 * fuzz-extents out of FUZZ_NAMES before that).  Written against the
 * intended interface:
 *
 *   int extents_clip(uint64_t req_off, uint64_t req_len, uint64_t export_size,
 *                    const uint32_t *entries, size_t n,
 *                    struct extent_run *out, size_t *nout,
 *                    char *why, size_t whylen);
 *
 * entries: n 32-bit words as libnbd's extent callback hands them (pairs of
 * length, flags; an odd n is itself bad input).  ASSUMED here, to adjust
 * when the header lands: returns 0 with *nout runs in out (*nout on entry
 * is out's capacity), or -1 with a non-empty message in why; the runs
 * cover [req_off, req_off + k) for some 0 < k <= req_len, contiguously.
 * The TODO(lead) marks below need struct extent_run's member names.
 *
 * Input: 24 bytes of header (request offset, request length, export size;
 * big-endian 64-bit), then the entries (big-endian 32-bit words). */
#include <stdint.h>
#include <string.h>

#include "extents.h"
#include "fuzz-common.h"
#include "util.h"

#define MAX_WORDS 4096
#define MAX_RUNS  2048

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  fuzz_quiet_logs("fuzz-extents");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static uint32_t entries[MAX_WORDS];
  static struct extent_run out[MAX_RUNS];
  char why[512];
  uint64_t off, len, esize;
  size_t n, nout = MAX_RUNS;
  int r;

  if (size < 24)
    return 0;
  off = get_be64(data);
  len = get_be64(data + 8);
  esize = get_be64(data + 16);
  n = MIN((size - 24) / 4, (size_t) MAX_WORDS);
  for (size_t i = 0; i < n; i++)
    entries[i] = get_be32(data + 24 + 4 * i);

  why[0] = '\0';
  r = extents_clip(off, len, esize, entries, n, out, &nout, why, sizeof why);
  FUZZ_CHECK(r == 0 || r == -1, "extents_clip returned %d", r);
  if (r < 0) {
    FUZZ_CHECK(why[0] != '\0' && memchr(why, '\0', sizeof why),
               "refused without a message");
    return 0;
  }
  FUZZ_CHECK(nout > 0 && nout <= MAX_RUNS, "%zu runs", nout);
  FUZZ_CHECK(n % 2 == 0, "accepted an odd number of words (%zu)", n);
  /* TODO(lead): with struct extent_run's members, check that the runs are
   * non-empty, contiguous from off, end within off + len and within
   * esize, and carry only HOLE/ZERO flags, e.g.:
   *   uint64_t pos = off;
   *   for (size_t i = 0; i < nout; i++) {
   *     FUZZ_CHECK(out[i].length > 0, "empty run %zu", i);
   *     pos += out[i].length;
   *   }
   *   FUZZ_CHECK(pos > off && pos - off <= len && pos <= esize, "runs end at %llu", ...);
   */
  return 0;
}
