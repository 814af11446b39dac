/* window.h: the background copy's window (bytes in flight), sized from
 * what the path delivers.
 *
 * Every WIN_SAMPLE_NS the copy's delivery rate is sampled (bytes landed,
 * raw); the bottleneck rate is the best sample of the last 10 s (a max
 * filter), the path's delay the smallest recent round trip (source.c's
 * probes every other round trip, and small misses alone on the reserved
 * connection, a windowed minimum).  Start-up: the first window is what
 * a 10 Mbit/s link carries in two round trips and 5 ms (WIN_THIN_RATE;
 * between WIN_MIN and WIN_START, WIN_START if the round trip is not
 * known), so a client's miss sent behind it on the thinnest link served
 * waits at most a round trip more than alone.  Once a rate is known, the
 * window grows by twice every byte delivered (more than doubling per
 * round trip on a fat path), but never past 4 x rate x round trip (2 x
 * once a job took more than two round trips: the path, not the window,
 * set its pace) -- the rate being the best of the samples, of what
 * arrived in each round trip since the first bytes, and of each job's
 * rate (the bytes that landed between its request and its landing, over
 * that time: on a thin link the first job tells the rate as it lands; a
 * chunk of digests counts as a job, its own bytes over the time from its
 * sending) --
 * and also
 * doubles each time a sample's rate grew by a quarter while the window is
 * at most 4 x rate x round trip; it ends when a probe sees a queue longer
 * than half a round trip (and WIN_QUEUE_FULL_NS) two round trips or more
 * after the copy's first bytes came (a queue before that is not the
 * copy's, nor is its rate so far the path's), the window then falling to
 * twice the product of the rate so far (the queue start-up built is
 * handed back at once), or after three samples without such growth; from
 * then on the window grows by a quarter while the copy delivers at its
 * best and uses the window, capped at 2 x rate x round trip and at the
 * product plus WIN_EXCESS_NS of the rate (on a long path: what the window
 * holds beyond the product waits at the source or in the path, and a
 * client's miss for a block in it waits as long, I3).  Floor: 2
 * MiB, or 100 ms of the best rate if that is less (at least 64 KiB); it
 * keeps the window from shrinking below it, and lifts a window below it
 * only while the probes see no queue (a jump into a queued path is a burst
 * a client's miss waits behind).  Ceiling 256 MiB.  Pure arithmetic, no
 * locks: copy.c calls it on the source thread. */
#ifndef XNBD_WINDOW_H
#define XNBD_WINDOW_H

#include <stdbool.h>
#include <stdint.h>

#define WIN_START ((uint64_t) 1 << 20)
#define WIN_THIN_RATE 1250000u         /* bytes/s: 10 Mbit/s, the first window's link */
#define WIN_QUEUE_FULL_NS 20000000u    /* start-up ends at a queue this long */
#define WIN_FLOOR ((uint64_t) 2 << 20)
#define WIN_MIN ((uint64_t) 64 << 10)
#define WIN_MAX ((uint64_t) 256 << 20)
#define WIN_SAMPLE_NS 250000000u
#define WIN_LUMP_GAP_NS 2000000u       /* two lumps closer than this: no timing */
#define WIN_RATES 40                   /* 10 s of samples */
#define WIN_EXCESS_NS 40000000u        /* after start-up: beyond the product, at most this */

struct winctl {
  uint64_t window;              /* bytes */
  uint64_t at, bytes;           /* the last sample: when, bytes landed then */
  uint64_t rates[WIN_RATES];
  unsigned nrates;
  uint64_t best, flat;          /* start-up: best rate, samples without growth */
  bool startup_over;
  bool started;                 /* start-up: start_bytes is set */
  uint64_t start_bytes;         /* bytes delivered when the copy started */
  uint64_t credit;              /* of those, bytes that count as after it */
  uint64_t burst;               /* start-up: the best rate of a reply that
                                 * crossed as one burst (win_burst) */
  uint64_t first;               /* the first window */
  bool first_set;               /* first is from the round trip */
  bool flowing;                 /* start-up: bytes have been delivered */
  uint64_t flow_at;             /* start-up: when they first were */
  uint64_t snap_at, snap_bytes; /* start-up: the round trip being measured */
  uint64_t snap_moved;          /* the last delivery before it began */
  bool path_bound;              /* start-up: a job took > 2 round trips + 5 ms */
  uint64_t moved_at, moved_bytes; /* when delivered last changed, and to what */
  /* Set by the caller before win_update: how much of delivered came in
   * lumps (chunks of digests): two of them asked back to back time the
   * path. */
  uint64_t lumps;
  uint64_t lump_seen, lump_at;  /* start-up: lumps at the last one, and when it landed */
  /* Set by the caller, cleared by win_update: of the jobs that landed
   * since the last call, the best rate (the bytes that landed between a
   * job's making and its landing, over that time) and the longest time
   * one was on the path (from its sending to its reply). */
  uint64_t job_rate, job_ns;
  uint64_t early;               /* start-up: the best round trip's rate */
  uint64_t maxrate;             /* the best rate of the last 10 s */
  uint64_t queue_ns;            /* the last round trip minus the smallest */
};

/* Compression on the link.  Windows and rates above are in bytes of the
 * image; over zstd, a run of data that compresses far better than the
 * data before it (a file of few distinct bytes after random data) would
 * be held to the window the random data needed while the link idles.
 * After start-up, the controller counts bytes as they cross the link:
 * win_ratio's factor, by which the copy divides what it hands win_update
 * and multiplies the window it gets back, is how much better the latest
 * data compresses (image bytes per byte received, a moving average over
 * pieces of WIN_RATIO_WIRE bytes received or WIN_RATIO_RAW of the image,
 * whichever comes first) than the data when start-up ended, between 1
 * and WIN_RATIO_MAX: data that turns random again puts at most that many
 * times the window on the link once.  Any queue on the path (an eighth
 * of the smallest round trip and WIN_RATIO_QUEUE_NS: the link is what
 * limits the copy, not the window) sets the factor back to 1 at once, so
 * a thin link, always a little queued, never gets the wider window; during
 * start-up it is 1 (block status replies alone would make a ratio the
 * data does not have). */
#define WIN_RATIO_WIRE (256u << 10)
#define WIN_RATIO_RAW (2u << 20)
#define WIN_RATIO_MAX 4.0
#define WIN_RATIO_QUEUE_NS 1000000u    /* a queue this long (and 1/8 round trip): factor 1 */

struct winratio {
  double factor;                /* 1..WIN_RATIO_MAX (0: not set yet) */
  double base, avg;             /* image per link bytes: when start-up ended, lately */
  bool measuring;               /* start-up is over, base not measured yet */
  uint64_t wire, raw;           /* the counters at the last piece */
};

void win_init(struct winctl *w);
/* Whether the last round trip saw a queue worth giving way to: longer
 * than half the smallest round trip and 5 ms. */
bool win_queued(const struct winctl *w, uint64_t min_rtt_ns);
/* Whether it saw any queue at all: an eighth of the smallest round trip
 * and WIN_RATIO_QUEUE_NS (win_ratio's factor is 1 then). */
bool win_queue_seen(const struct winctl *w, uint64_t min_rtt_ns);
/* A job (or a chunk of digests) landed: bytes over over_ns is its rate,
 * path_ns how long it was on the path (job_rate, job_ns above). */
void win_job_sample(struct winctl *w, uint64_t bytes, uint64_t over_ns, uint64_t path_ns);
/* Before the copy starts: bytes already delivered that start-up counts as
 * delivered after its start (digests read with the handshake, which the
 * copy would otherwise have asked as it started): they grow the window
 * as they would have. */
void win_credit(struct winctl *w, uint64_t bytes);
/* A reply of bytes (image bytes) crossed the path as one burst in ns (from
 * its first bytes to its last; the sender had it whole): the path's rate
 * for such data, not held back by any window.  Start-up then opens the
 * window to twice that rate x the round trip at once (within its bound)
 * rather than doubling up to it round trip by round trip.  Bursts shorter
 * than WIN_BURST_MIN_NS are not timed. */
void win_burst(struct winctl *w, uint64_t bytes, uint64_t ns);
#define WIN_BURST_MIN_NS 1000000u
/* The factor (above), given whether start-up is over, the bytes received
 * so far on the link (wire) and as they were before compression (raw),
 * and whether the path queues. */
double win_ratio(struct winratio *r, bool startup_over, uint64_t wire, uint64_t raw, bool queued);
/* At now (ns), called often: delivered the bytes the copy landed so far (a
 * running total), inflight the bytes in flight now, min_rtt_ns the
 * smallest recent round trip and last_rtt_ns the latest; active whether
 * the copy runs unpaused.  Returns the window. */
uint64_t win_update(struct winctl *w, uint64_t now, uint64_t delivered, uint64_t inflight,
                    uint64_t min_rtt_ns, uint64_t last_rtt_ns, bool active);

#endif
