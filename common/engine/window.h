/* window.h: the background copy's window (bytes in flight).
 *
 * The copy must fill the link (throughput close to the physical limit)
 * without queueing more than the link carries in a round trip: a client's
 * miss that joins a background fetch waits for everything requested before
 * that fetch.  So the window is WIN_GAIN x the bottleneck's rate x the
 * smallest round trip (the bandwidth-delay product, as BBR sizes its
 * window), at least WIN_MIN:
 *   - rate: the best delivery rate (bytes landed per second, raw) over the
 *     last WIN_RATE_SPAN_NS, sampled once per max(round trip, 100 ms);
 *   - start-up: from WIN_START the window doubles per round trip while the
 *     copy uses it (but stays under 4 x the measured product), until the
 *     rate stops growing (3 rate samples without a quarter more), as TCP's
 *     slow start and BBR's start-up do;
 *   - a copy that does not use its window (rate cap, waiting for digests)
 *     teaches nothing about the path: start-up does not double then.
 * Each round-trip sample also gives the queue on the path (sample - the
 * smallest round trip), kept for the status.  Pure arithmetic, no locks:
 * copy.c calls it on the source thread. */
#ifndef XNBD_WINDOW_H
#define XNBD_WINDOW_H

#include <stdbool.h>
#include <stdint.h>

#define WIN_MIN ((uint64_t) 256 << 10)
#define WIN_MAX ((uint64_t) 256 << 20)
#define WIN_START ((uint64_t) 512 << 10)
#define WIN_GAIN 2.0
#define WIN_RATE_SPAN_NS 10000000000u
#define WIN_RATES 128

struct winctl {
  uint64_t window;              /* bytes */
  bool startup;
  unsigned flat;                /* start-up samples without growth */
  uint64_t best;                /* start-up: best rate so far */
  uint64_t at, bytes;           /* the last rate sample: when, bytes then */
  struct { uint64_t at, rate; } rates[WIN_RATES];
  unsigned nrates;
  uint64_t queue_ns;            /* the last round-trip sample's queue */
};

void win_init(struct winctl *w);
/* The best rate (bytes/s) of the samples taken since now - span. */
uint64_t win_rate(const struct winctl *w, uint64_t now);
/* A round-trip sample at now (ns): min_rtt_ns the smallest recent round
 * trip, sample_ns this one, delivered the bytes the copy has landed so far
 * (a running total), used whether it kept at least half its window in
 * flight since the last call.  Returns the window. */
uint64_t win_sample(struct winctl *w, uint64_t now, uint64_t min_rtt_ns,
                    uint64_t sample_ns, uint64_t delivered, bool used);

#endif
