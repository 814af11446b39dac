/* extents.h: checking a source's base:allocation reply before anything
 * believes it.  Pure functions; no I/O, no state.
 *
 * The NBD protocol says a block-status reply describes consecutive runs
 * starting at the requested offset, each of non-zero length, and that a
 * reply may end before the requested length or (only in its last extent)
 * run past it.  A proxy that trusted a run past the request -- or past the
 * end of the export -- would mark real data present as zeros (reliability
 * defect D1); one that accepted zero-length runs would ask again forever
 * (D6).  So every reply goes through extents_clip() first. */
#ifndef XNBD_EXTENTS_H
#define XNBD_EXTENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct extent_run {
  uint64_t off, len;
  bool zero;                  /* reads as zeros (NBD_STATE_ZERO) */
};

/* entries: n uint32_t values, (length, flags) pairs, as libnbd hands them
 * to an extent callback, describing the export from reply_off on.  The
 * request was [req_off, req_off + req_len) of an export of export_size
 * bytes.  Writes at most n / 2 runs to out (clipped to the request and the
 * export; runs past them are dropped) and returns how many; returns -1
 * with a reason in why if the reply cannot be used at all: an odd number
 * of entries, no entries, a start other than req_off, a zero-length run,
 * or a request outside the export. */
int extents_clip(uint64_t req_off, uint64_t req_len, uint64_t export_size,
                 uint64_t reply_off, const uint32_t *entries, size_t n,
                 struct extent_run *out, char *why, size_t whylen);

#endif
