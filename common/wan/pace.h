/* pace.h: the source's bulk replies, held at the source, not in the
 * path's queue.
 *
 * The proxy's background copy sizes its window in bytes of the image; the
 * link carries them compressed, and how well the data ahead compresses is
 * not known when it is asked.  A window that suited data compressing 2:1
 * puts twice the time in the link's queue when random data follows, and
 * a client's miss waits behind that queue (on a 10 Mbit/s link, 64 KiB is
 * 50 ms).  Only the sender knows the bytes on the link, so the sender
 * keeps the queue short: the proxy marks the WAN connections that carry
 * its background copy and its digests (WAN_F_PACED in the hello; never
 * connection 0, which its clients' misses use), and on those the server
 * lets its TCP socket hold no more than the path needs -- sent and not
 * yet acknowledged, or not yet sent (SIOCOUTQ):
 *
 *     limit = gain x rate x (smallest round trip + PACE_QUEUE_US) + PACE_EXTRA
 *
 * rate being the path's delivery rate: bytes TCP_INFO says were
 * acknowledged over PACE_SAMPLE_NS, the median of the last PACE_MEDIAN
 * such samples (a token bucket lets a burst through at line rate: one
 * sample is not the path's rate); gain 2 with the latest median until
 * TCP's smoothed round trip first exceeds the smallest by PACE_QUEUE_US
 * (start-up: the rate doubles each sample until the path is full), then
 * 5/4 with the best median of the last two PACE_FILTER_NS periods (the
 * quarter finds a faster path; the queue it leaves is about a quarter of
 * the round trip and PACE_QUEUE_US, more on a machine too busy to refill
 * the socket in time: pace_starved).  Before any sample the rate is
 * PACE_THIN_RATE, the thinnest link served (10 Mbit/s), so a first
 * burst does not queue on it.  What the copy asked beyond the limit waits
 * in the server, where a client's miss, on its own connection, passes it.
 *
 * Pure arithmetic but pace_tcp_*, no locks: one per WAN pump. */
#ifndef XNBD_PACE_H
#define XNBD_PACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PACE_QUEUE_US 3000u           /* the queue allowed, at first and at least */
#define PACE_QUEUE_MAX_US 20000u      /* ... and at most (pace_starved) */
#define PACE_STARVE_GAP_NS 5000000u   /* raised at most this often */
#define PACE_RELAX_NS 1000000000u     /* lowered after this long without starving */
#define PACE_EXTRA 1448u              /* a segment of headroom at any rate */
#define PACE_MIN_LIMIT 5792u
#define PACE_CTL_NS 1000000u          /* TCP_INFO at most this often */
#define PACE_SAMPLE_NS 5000000u       /* a delivery rate sample: bytes acked over this */
#define PACE_MEDIAN 5
#define PACE_THIN_RATE 1250000u       /* bytes/s: 10 Mbit/s */
#define PACE_FILTER_NS 500000000u
#define PACE_MIN_WRITE 1448u          /* a segment: less is not worth a write */

struct pace {
  uint64_t rate;                /* bytes/s: the best of best[] (0: none yet) */
  uint64_t acked, acked_at;     /* bytes TCP had acknowledged then */
  uint64_t samples[PACE_MEDIAN];
  unsigned nsamples;
  uint64_t best[2];             /* the best sample of this period, the last */
  uint64_t period_at;           /* when this period began */
  uint64_t min_rtt_us;
  bool queued;                  /* a queue was seen: start-up is over */
  uint64_t ctl_at;              /* the last control step */
  uint64_t limit;               /* bytes the socket may hold (0: no limit yet) */
  uint64_t queue_us;            /* the queue allowed (0: PACE_QUEUE_US) */
  uint64_t starved_at;          /* the last pace_starved that raised it */
  uint64_t wrote_at;            /* the last write */
};

/* Whether a control step is due at now (ns). */
bool pace_due(const struct pace *p, uint64_t now);
/* A control step at now: TCP's smoothed and smallest round trip (us) and
 * the bytes it had acknowledged so far. */
void pace_control(struct pace *p, uint64_t now, uint64_t srtt_us, uint64_t min_rtt_us,
                  uint64_t acked);
/* Of want bytes ready, how many may be written with outq bytes in the
 * socket: 0 (wait), or at least min(want, PACE_MIN_WRITE).  (A TLS record
 * that must be written again is not paced: wan.c writes it whole.) */
size_t pace_allow(const struct pace *p, uint64_t outq, size_t want);

/* Bytes were written at now. */
void pace_wrote(struct pace *p, uint64_t now);
/* The socket ran dry at now while replies were held back.  If the last
 * write was longer ago than the limit takes to cross at the rate, the
 * limit was too small for how late this thread gets to refill it (a busy
 * machine): the queue allowed grows by a quarter (at most every
 * PACE_STARVE_GAP_NS, up to PACE_QUEUE_MAX_US); a second without that
 * brings it back down by a tenth a second, to PACE_QUEUE_US. */
void pace_starved(struct pace *p, uint64_t now);

/* TCP_INFO of socket fd; -1 if it cannot tell (then nothing is paced). */
int pace_tcp_sample(int fd, uint64_t *srtt_us, uint64_t *min_rtt_us, uint64_t *acked);
/* Bytes in socket fd's send queue (not acknowledged or not sent); -1. */
int64_t pace_tcp_outq(int fd);

#endif
