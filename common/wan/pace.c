/* pace.c: the source's bulk replies, held at the source (pace.h).
 * TCP_INFO comes from <linux/tcp.h> (glibc's struct lacks the newer
 * fields), so this file includes no <netinet/tcp.h>. */
#include "pace.h"
#include "util.h"

#include <linux/sockios.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

bool pace_due(const struct pace *p, uint64_t now)
{
  return !p->ctl_at || now >= p->ctl_at + PACE_CTL_NS;
}

/* The median of the last samples (one sample read off a token bucket's
 * burst is not the path's rate). */
static uint64_t median(const struct pace *p)
{
  unsigned n = MIN(p->nsamples, (unsigned) PACE_MEDIAN);
  uint64_t v[PACE_MEDIAN];
  for (unsigned i = 0; i < n; i++) v[i] = p->samples[i];
  for (unsigned i = 1; i < n; i++)          /* (insertion sort of 5) */
    for (unsigned j = i; j > 0 && v[j - 1] > v[j]; j--) {
      uint64_t t = v[j]; v[j] = v[j - 1]; v[j - 1] = t;
    }
  return n ? v[n / 2] : 0;
}

void pace_control(struct pace *p, uint64_t now, uint64_t srtt_us, uint64_t min_rtt_us,
                  uint64_t acked)
{
  /* A gap since the last step (nothing to write: idle) is not the
   * path's time: the next sample starts here. */
  bool gap = p->ctl_at && now > p->ctl_at + PACE_SAMPLE_NS + PACE_CTL_NS;
  p->ctl_at = now;
  /* (~0: no round trip measured yet) */
  if (min_rtt_us && min_rtt_us != UINT32_MAX) p->min_rtt_us = min_rtt_us;
  if (!p->period_at || gap) {
    if (!p->period_at) p->period_at = now;
    p->acked_at = now;
    p->acked = acked;
  }
  /* What the path delivered since the last sample: bytes acknowledged
   * over PACE_SAMPLE_NS (TCP's own per-ACK estimate reads a burst as the
   * path's rate). */
  if (now >= p->acked_at + PACE_SAMPLE_NS && acked >= p->acked) {
    uint64_t r = (uint64_t) ((double) (acked - p->acked) * 1e9 / (double) (now - p->acked_at));
    p->acked = acked;
    p->acked_at = now;
    if (!r) goto limit;               /* idle: says nothing of the path */
    p->samples[p->nsamples++ % PACE_MEDIAN] = r;
    uint64_t m = median(p);
    if (now >= p->period_at + PACE_FILTER_NS) {
      p->best[1] = now >= p->period_at + 2 * (uint64_t) PACE_FILTER_NS ? 0 : p->best[0];
      p->best[0] = 0;
      p->period_at = now;
    }
    p->best[0] = MAX(p->best[0], m);
    /* Start-up: the latest (it doubles); after: the best of two periods
     * (a path that slowed down is followed within them). */
    p->rate = p->queued ? MAX(p->best[0], p->best[1]) : m;
  }
limit:
  if (srtt_us > p->min_rtt_us + MAX(p->queue_us, (uint64_t) PACE_QUEUE_US) && !p->queued) {
    p->queued = true;
    p->best[0] = p->best[1] = p->rate;   /* the periods start from here */
  }
  if (!p->queue_us) p->queue_us = PACE_QUEUE_US;
  if (p->queue_us > PACE_QUEUE_US && now >= p->starved_at + PACE_RELAX_NS) {
    p->queue_us = MAX(p->queue_us * 9 / 10, (uint64_t) PACE_QUEUE_US);
    p->starved_at = now;
  }
  /* Before a rate: what the thinnest link served carries (pace.h). */
  double rate = p->rate ? (double) p->rate : (double) PACE_THIN_RATE;
  double gain = p->queued ? 1.25 : 2.0;
  double bytes = gain * rate * (double) (p->min_rtt_us + p->queue_us) / 1e6;
  p->limit = MAX((uint64_t) bytes + PACE_EXTRA, (uint64_t) PACE_MIN_LIMIT);
}

size_t pace_allow(const struct pace *p, uint64_t outq, size_t want)
{
  if (!p->limit || !want) return want;
  uint64_t room = p->limit > outq ? p->limit - outq : 0;
  size_t need = MIN(want, (size_t) PACE_MIN_WRITE);
  if (room < need) return 0;
  return MIN(want, (size_t) room);
}

void pace_wrote(struct pace *p, uint64_t now) { p->wrote_at = now; }

void pace_starved(struct pace *p, uint64_t now)
{
  if (!p->limit || !p->rate || now < p->starved_at + PACE_STARVE_GAP_NS) return;
  /* Late: the limit takes this long to cross at the rate; sooner, the
   * socket emptied faster than the rate (a token bucket's burst), and
   * more room would only queue more. */
  uint64_t drain_ns = (uint64_t) ((double) p->limit * 1e9 / (double) p->rate);
  if (now < p->wrote_at + drain_ns) return;
  if (!p->queue_us) p->queue_us = PACE_QUEUE_US;
  p->queue_us = MIN(p->queue_us * 5 / 4, (uint64_t) PACE_QUEUE_MAX_US);
  p->starved_at = now;
}

int pace_tcp_sample(int fd, uint64_t *srtt_us, uint64_t *min_rtt_us, uint64_t *acked)
{
  struct tcp_info ti = { 0 };
  socklen_t len = sizeof ti;
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
      len < offsetof(struct tcp_info, tcpi_min_rtt) + sizeof ti.tcpi_min_rtt)
    return -1;
  *srtt_us = ti.tcpi_rtt;
  *min_rtt_us = ti.tcpi_min_rtt;
  *acked = ti.tcpi_bytes_acked;
  return 0;
}

int64_t pace_tcp_outq(int fd)
{
  int n = 0;
  return ioctl(fd, SIOCOUTQ, &n) < 0 ? -1 : n;
}
