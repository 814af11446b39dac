/* extents.c: see extents.h. */
#include "extents.h"

#include <inttypes.h>
#include <stdio.h>

#define NBD_STATE_ZERO_BIT (1u << 1)

int extents_clip(uint64_t req_off, uint64_t req_len, uint64_t export_size,
                 uint64_t reply_off, const uint32_t *entries, size_t n,
                 struct extent_run *out, char *why, size_t whylen)
{
  uint64_t end, off = reply_off;
  int nout = 0;

  if (req_len == 0 || req_off > export_size || req_len > export_size - req_off) {
    snprintf(why, whylen, "request %" PRIu64 "+%" PRIu64 " is outside the "
             "%" PRIu64 "-byte export", req_off, req_len, export_size);
    return -1;
  }
  end = req_off + req_len;
  if (n == 0 || n % 2) {
    snprintf(why, whylen, "block status reply has %zu entries (expected a "
             "non-zero even number: length/flags pairs)", n);
    return -1;
  }
  if (reply_off != req_off) {
    snprintf(why, whylen, "block status reply starts at %" PRIu64 ", not at "
             "the requested offset %" PRIu64, reply_off, req_off);
    return -1;
  }
  for (size_t i = 0; i < n; i += 2) {
    uint64_t len = entries[i];
    if (len == 0) {
      snprintf(why, whylen, "block status reply has a zero-length extent at "
               "%" PRIu64 " (forbidden by the NBD protocol)", off);
      return -1;
    }
    if (off >= end) break;                  /* past the request: ignored */
    if (len > end - off) len = end - off;   /* clipped to the request */
    out[nout++] = (struct extent_run) {
      off, len, (entries[i + 1] & NBD_STATE_ZERO_BIT) != 0
    };
    off += len;
  }
  return nout;
}
