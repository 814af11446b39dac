/* Unit tests for common/wan/pace.c: a bulk connection's socket may hold
 * no more than gain x rate x (smallest round trip + PACE_QUEUE_US) plus a
 * segment; before a rate is known the rate is the thinnest link's; the
 * rate is the median of what TCP acknowledged over PACE_SAMPLE_NS (one
 * burst does not count), the latest during start-up and the best of the
 * last two periods after, kept over an idle stretch; the gain is 2 until
 * a queue is seen and 5/4 after; a write is let through only when a
 * segment (and a TLS write's length) fits; on a 10 Mbit/s link with a
 * 1 ms round trip the bytes that can queue stay within 6 ms of the link;
 * an idle gap is not a sample, and an unmeasured round trip is not huge. */
#include <criterion/criterion.h>

#include "pace.h"

#define MS UINT64_C(1000000)

/* Feeds n samples, one every PACE_SAMPLE_NS, of a path delivering rate
 * bytes/s with round trips srtt_us / min_rtt_us; returns the time. */
static uint64_t feed(struct pace *p, uint64_t now, uint64_t *acked, uint64_t rate,
                     uint64_t srtt_us, uint64_t min_rtt_us, unsigned n)
{
  for (unsigned i = 0; i < n; i++) {
    now += PACE_SAMPLE_NS;
    *acked += rate * PACE_SAMPLE_NS / 1000000000u;
    pace_control(p, now, srtt_us, min_rtt_us, *acked);
  }
  return now;
}

/* A path of 10 MB/s and 1 ms, ten samples in; returns the time. */
static uint64_t settled(struct pace *p, uint64_t *acked)
{
  pace_control(p, 1 * MS, 1000, 1000, *acked);
  return feed(p, 1 * MS, acked, 10000000, 1000, 1000, 10);
}

static uint64_t expect_limit(double gain, uint64_t rate, uint64_t min_rtt_us)
{
  uint64_t b = (uint64_t) (gain * (double) rate * (double) (min_rtt_us + PACE_QUEUE_US) / 1e6);
  b += PACE_EXTRA;
  return b > PACE_MIN_LIMIT ? b : PACE_MIN_LIMIT;
}

Test(pace, before_a_rate_the_thinnest_links_product_is_held)
{
  struct pace p = { 0 };
  cr_assert_eq(pace_allow(&p, 1u << 30, 100000), 100000);   /* no step yet */
  pace_control(&p, 1 * MS, 20000, 20000, 0);
  cr_assert_eq(p.rate, 0);
  cr_assert_eq(p.limit, expect_limit(2.0, PACE_THIN_RATE, 20000));
  cr_assert_eq(pace_allow(&p, 0, 1u << 20), p.limit);
}

Test(pace, limit_is_twice_the_product_until_a_queue_then_five_quarters)
{
  struct pace p = { 0 };
  uint64_t acked = 0, now = 1 * MS;
  pace_control(&p, now, 20000, 20000, acked);
  now = feed(&p, now, &acked, 25000000, 20500, 20000, 5);   /* 200 Mbit/s, 20 ms */
  cr_assert_eq(p.rate, 25000000);
  cr_assert(!p.queued);
  cr_assert_eq(p.limit, expect_limit(2.0, 25000000, 20000));
  /* the smoothed round trip 5 ms above the smallest: start-up is over */
  feed(&p, now, &acked, 25000000, 20000 + PACE_QUEUE_US + 1000, 20000, 1);
  cr_assert(p.queued);
  cr_assert_eq(p.limit, expect_limit(1.25, 25000000, 20000));
}

Test(pace, rate_is_a_median_then_the_best_of_two_periods_and_survives_idleness)
{
  struct pace p = { 0 };
  uint64_t acked = 0, now = settled(&p, &acked);
  cr_assert_eq(p.rate, 10000000);
  /* one sample of a burst at 8 times the rate: the median does not move */
  now = feed(&p, now, &acked, 80000000, 1000, 1000, 1);
  cr_assert_eq(p.rate, 10000000);
  now = feed(&p, now, &acked, 10000000, 1000 + PACE_QUEUE_US + 1, 1000, 5);
  cr_assert(p.queued);
  /* slower for a period: the best of the last two still counts */
  now = feed(&p, now, &acked, 4000000, 1000, 1000, PACE_FILTER_NS / PACE_SAMPLE_NS);
  cr_assert_eq(p.rate, 10000000);
  /* two more periods at the lower rate: the old best has gone */
  now = feed(&p, now, &acked, 4000000, 1000, 1000, 2 * PACE_FILTER_NS / PACE_SAMPLE_NS + 1);
  cr_assert_eq(p.rate, 4000000);
  /* idle (nothing acknowledged) for three periods: the last rate is kept */
  feed(&p, now, &acked, 0, 1000, 1000, 3 * PACE_FILTER_NS / PACE_SAMPLE_NS + 1);
  cr_assert_eq(p.rate, 4000000);
  cr_assert_eq(p.limit, expect_limit(1.25, 4000000, 1000));
}

Test(pace, start_up_follows_the_latest_median_as_it_doubles)
{
  struct pace p = { 0 };
  uint64_t acked = 0, now = 1 * MS;
  pace_control(&p, now, 500, 500, acked);
  uint64_t r = 2000000;
  for (int i = 0; i < 4; i++, r *= 2) now = feed(&p, now, &acked, r, 500, 500, 3);
  cr_assert(!p.queued);
  cr_assert_eq(p.rate, r / 2, "rate %lu", (unsigned long) p.rate);   /* the last, not the first */
}

Test(pace, writes_only_what_fits_and_at_least_a_segment)
{
  struct pace p = { .limit = 20000 };
  cr_assert_eq(pace_allow(&p, 0, 50000), 20000);
  cr_assert_eq(pace_allow(&p, 15000, 50000), 5000);
  cr_assert_eq(pace_allow(&p, 19000, 50000), 0);          /* less than a segment of room */
  cr_assert_eq(pace_allow(&p, 19000, 500), 500);          /* ... but a small write fits */
  cr_assert_eq(pace_allow(&p, 25000, 500), 0);            /* over the limit already */
}

Test(pace, a_thin_short_path_queues_at_most_six_ms)
{
  /* 10 Mbit/s, 1 ms: a client's miss waits at most 2 round trips, its own
   * 4 KiB (3.3 ms) and 5 ms, so the queue may hold ~6 ms of the link */
  struct pace p = { 0 };
  uint64_t acked = 0, now = 1 * MS, rate = 1250000;
  pace_control(&p, now, 1000, 1000, acked);
  feed(&p, now, &acked, rate, 1000 + PACE_QUEUE_US + 500, 1000, 10);
  cr_assert(p.queued);
  uint64_t queue_bytes = p.limit - rate * 1000 / 1000000;  /* beyond the path's own */
  cr_assert_leq(queue_bytes * 1000000 / rate, 6000, "%lu us of queue",
                (unsigned long) (queue_bytes * 1000000 / rate));
}

Test(pace, an_idle_gap_is_not_a_sample_and_no_round_trip_is_not_huge)
{
  struct pace p = { 0 };
  uint64_t acked = 0, now = settled(&p, &acked);
  cr_assert_eq(p.rate, 10000000);
  /* three times a second with nothing to write, then 10 KB more
   * acknowledged at once: not 10 KB/s (the gap is not the path's time) */
  for (int i = 0; i < 3; i++) {
    acked += 10000;
    now += 1000 * MS;
    pace_control(&p, now, 1000, 1000, acked);
    now += PACE_SAMPLE_NS;
    pace_control(&p, now, 1000, 1000, acked);   /* (idle: no sample) */
  }
  cr_assert_eq(p.rate, 10000000, "rate %lu", (unsigned long) p.rate);
  now = feed(&p, now, &acked, 10000000, 1000, 1000, 1);
  cr_assert_eq(p.rate, 10000000);
  /* TCP_INFO's min_rtt before any sample is ~0: not 71 minutes */
  struct pace q = { 0 };
  pace_control(&q, 1 * MS, 0, UINT32_MAX, 0);
  cr_assert_eq(q.limit, expect_limit(2.0, PACE_THIN_RATE, 0));
}
