/* Unit tests for common/engine/window.c: the background copy's window
 * starts with what a thin link carries in two round trips, grows by what
 * the path delivers once a rate is known until the path queues (by at
 * most twice a job's rate when the job waited behind the path),
 * settles between one and two bandwidth-delay products, keeps only about
 * 100 ms of data in flight on a thin link, stays within its bounds, does
 * not move while the copy is stopped, follows a path that slowed down,
 * reports the queue of the last round-trip sample, keeps a thin link's
 * start-up to what it delivers, hands back the queue start-up built,
 * does not lift a window into a queued path, and does not take the first
 * replies alone for a round trip's rate; after start-up, widens the
 * window for data that compresses better than before, at most 4 times,
 * and not while the path queues. */
#include <criterion/criterion.h>

#include "window.h"
#include "minwin.h"

#define MS UINT64_C(1000000)
#define S (1000 * MS)
#define MB UINT64_C(1000000)

/* A path of rate bytes/s and round trip rtt; the copy keeps its window in
 * flight and receives min(rate, window / rtt) bytes a second.  Calls
 * win_update every 50 ms for secs seconds. */
static void run(struct winctl *w, uint64_t *now, uint64_t *delivered,
                uint64_t rate, uint64_t rtt, unsigned secs, bool active)
{
  for (unsigned i = 0; i < secs * 20; i++) {
    double per_s = (double) w->window * 1e9 / (double) rtt;
    if (per_s > (double) rate) per_s = (double) rate;
    *now += 50 * MS;
    if (active) *delivered += (uint64_t) (per_s / 20);
    win_update(w, *now, *delivered, w->window, rtt, rtt, active);
  }
}

Test(window, starts_small_and_grows_by_what_was_delivered)
{
  struct winctl w;
  win_init(&w);
  cr_assert_eq(w.window, WIN_START);
  win_update(&w, 1 * S, 0, 0, 20 * MS, 20 * MS, true);
  cr_assert_eq(w.window, WIN_MIN, "first window %lu at 20 ms", (unsigned long) w.window);
  /* Replies, but no rate yet: no growth. */
  win_update(&w, 1 * S + 10 * MS, 1 * MB, WIN_MIN, 20 * MS, 20 * MS, true);
  cr_assert_eq(w.window, WIN_MIN, "window %lu before a rate was known", (unsigned long) w.window);
  /* A job landed at 100 MB/s: the window grows by twice what was delivered. */
  w.job_rate = 100 * MB;
  w.job_ns = 21 * MS;
  win_update(&w, 1 * S + 20 * MS, 2 * MB, WIN_MIN, 20 * MS, 20 * MS, true);
  cr_assert_eq(w.window, WIN_MIN + 4 * MB, "window %lu after 2 MB delivered",
               (unsigned long) w.window);
  cr_assert_eq(w.job_rate, 0, "the job's rate was not consumed");
}

Test(window, the_first_window_is_what_a_thin_link_carries_in_two_round_trips)
{
  /* 10 Mbit/s x (2 round trips + 5 ms), between WIN_MIN and WIN_START;
   * WIN_START when the round trip is not known yet. */
  const struct { uint64_t rtt, first; } cases[] = {
    { 1 * MS, WIN_MIN }, { 20 * MS, WIN_MIN }, { 100 * MS, 256250 },
    { 200 * MS, 506250 }, { 1000 * MS, WIN_START }, { 0, WIN_START },
  };
  for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    struct winctl w;
    win_init(&w);
    win_update(&w, 1 * S, 0, 0, cases[i].rtt, cases[i].rtt, true);
    cr_assert_eq(w.window, cases[i].first, "first window %lu at %lu ms",
                 (unsigned long) w.window, (unsigned long) (cases[i].rtt / MS));
  }
}

Test(window, a_job_that_waited_behind_the_path_bounds_start_up_to_twice_its_rate)
{
  /* 10 Mbit/s, 20 ms: the first window's one job (64 KiB) took 70 ms. */
  for (int slow = 0; slow <= 1; slow++) {
    struct winctl w;
    win_init(&w);
    win_update(&w, 1 * S, 0, 0, 20 * MS, 20 * MS, true);
    w.job_rate = 1 * MB;
    w.job_ns = slow ? 70 * MS : 40 * MS;
    win_update(&w, 1 * S + 70 * MS, 65536, 0, 20 * MS, 20 * MS, true);
    /* grown 192 KiB; bound 2 x 1 MB/s x 20 ms (40 kB, WIN_MIN), or 4 x (80 kB) */
    uint64_t want = slow ? WIN_MIN : 80000;
    cr_assert_eq(w.window, want, "window %lu after a job of %s", (unsigned long) w.window,
                 slow ? "70 ms" : "40 ms");
  }
}

Test(window, start_up_ends_when_the_path_queues)
{
  struct winctl w;
  win_init(&w);
  win_update(&w, 1 * S, 0, 0, 20 * MS, 20 * MS, true);
  /* The copy's data flows (10 MB/s, its jobs' rate) ... */
  w.job_rate = 10 * MB;
  win_update(&w, 1 * S + 10 * MS, 100000, w.window, 20 * MS, 20 * MS, true);
  uint64_t before = w.window;
  /* ... and two round trips later a probe waited 45 ms behind it: the
   * path is full. */
  win_update(&w, 1 * S + 50 * MS, 400000, before, 20 * MS, 65 * MS, true);
  cr_assert(w.startup_over);
  cr_assert_leq(w.window, before, "the window grew past a full path");
  uint64_t after = w.window;
  win_update(&w, 1 * S + 60 * MS, 9 * MB, after, 20 * MS, 20 * MS, true);
  cr_assert_eq(w.window, after, "start-up growth after it ended");
}

Test(window, a_queue_before_the_copys_data_flowed_two_round_trips_does_not_end_start_up)
{
  /* Seen on a seeded RAM copy (20 ms, 200 Mbit/s): the first fetches had
   * just landed (600 kB, the rate so far 8 MB/s) when a probe waited
   * 21 ms behind the digests crossing on their own connection.  Ending
   * start-up there cut the window to 2 x 8 MB/s x 20 ms and kept it
   * there: the copy took 0.93 s instead of 0.70.  That queue is not the
   * copy's: start-up goes on. */
  struct winctl w;
  win_init(&w);
  win_burst(&w, 512 << 10, 6 * MS);   /* the first digests: ~87 MB/s of image */
  win_update(&w, 1 * S, 0, 0, 20 * MS, 20 * MS, true);
  uint64_t opened = w.window;
  cr_assert_gt(opened, 3 * MB, "window %lu after the burst", (unsigned long) opened);
  w.job_rate = 8 * MB;
  win_update(&w, 1 * S + 60 * MS, 600000, w.window, 20 * MS, 20 * MS, true);
  win_update(&w, 1 * S + 65 * MS, 600000, w.window, 20 * MS, 41 * MS, true);
  cr_assert(!w.startup_over, "start-up ended on a queue of the first round trip");
  cr_assert_geq(w.window, opened, "window %lu cut by it", (unsigned long) w.window);
  /* The same queue two round trips into the copy's data ends it. */
  win_update(&w, 1 * S + 101 * MS, 1200000, w.window, 20 * MS, 41 * MS, true);
  cr_assert(w.startup_over, "a queue two round trips in did not end start-up");
}

Test(window, start_up_on_a_thin_link_grows_by_its_rate)
{
  /* 10 Mbit/s (1.25 MB/s), 20 ms: before the first rate sample (250 ms)
   * the window grows no further than 4 x what was delivered per round
   * trip, not by twice every byte delivered, and the start window comes
   * down to that once a round trip's rate is known. */
  struct winctl w;
  win_init(&w);
  uint64_t now = 1 * S, delivered = 0;
  win_update(&w, now, delivered, 0, 20 * MS, 20 * MS, true);
  for (unsigned i = 0; i < 20; i++) {      /* 200 ms, the link full */
    now += 10 * MS;
    delivered += 12500;
    win_update(&w, now, delivered, w.window, 20 * MS, 20 * MS, true);
  }
  cr_assert(w.window <= 4 * 25000 * 11 / 10, "window %lu on a 25 kB path",
            (unsigned long) w.window);
}

Test(window, start_up_does_not_count_the_wait_before_data)
{
  /* 200 ms with the copy running but nothing delivered (connections,
   * digests), then a 100 MB/s, 20 ms path (2 MB in flight fill it): the
   * window still fills it within a second. */
  struct winctl w;
  win_init(&w);
  uint64_t now = 1 * S, delivered = 0;
  for (unsigned i = 0; i < 20; i++, now += 10 * MS)
    win_update(&w, now, delivered, w.window, 20 * MS, 20 * MS, true);
  run(&w, &now, &delivered, 100 * MB, 20 * MS, 1, true);
  cr_assert_geq(w.window, 2 * MB, "window %lu after a second on a 2 MB path",
                (unsigned long) w.window);
}

Test(window, start_up_ending_in_a_queue_hands_it_back)
{
  /* 250 kB delivered in 100 ms (2.5 MB/s; the first bytes 20 ms in, a
   * round trip after their request) at 20 ms: a probe that waited
   * 30 ms more ends start-up and the window falls to twice the product
   * of that rate (100 kB). */
  struct winctl w;
  win_init(&w);
  win_update(&w, 1 * S, 0, 0, 20 * MS, 20 * MS, true);
  win_update(&w, 1 * S + 20 * MS, 50000, w.window, 20 * MS, 20 * MS, true);
  w.window = 1000000;
  win_update(&w, 1 * S + 100 * MS, 250000, w.window, 20 * MS, 50 * MS, true);
  cr_assert(w.startup_over);
  cr_assert(w.window >= 100000 * 9 / 10 && w.window <= 100000 * 11 / 10,
            "window %lu, want about 100 kB", (unsigned long) w.window);
}

Test(window, the_floor_does_not_lift_a_window_into_a_queue)
{
  /* A window below the floor (100 ms of 2.5 MB/s: 250 kB) stays where it
   * is while the probes see a queue, and is lifted once they do not. */
  struct winctl w;
  win_init(&w);
  w.startup_over = true;
  w.started = true;
  w.window = 100000;
  uint64_t now = 1 * S, delivered = 0;
  for (unsigned i = 0; i < 4; i++) {       /* 1 s at 2.5 MB/s, 25 ms queued */
    now += WIN_SAMPLE_NS;
    delivered += 625000;
    win_update(&w, now, delivered, w.window, 20 * MS, 45 * MS, true);
  }
  cr_assert_lt(w.window, 250000 * 9 / 10, "window %lu lifted into a queue",
               (unsigned long) w.window);
  now += WIN_SAMPLE_NS;
  delivered += 625000;
  win_update(&w, now, delivered, w.window, 20 * MS, 20 * MS, true);
  cr_assert_geq(w.window, 250000 * 9 / 10, "window %lu not lifted once the queue was gone",
                (unsigned long) w.window);
}

Test(window, settles_between_one_and_two_products)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  /* 150 MB/s, 50 ms: 7.5 MB in flight fill the path. */
  run(&w, &now, &delivered, 150 * MB, 50 * MS, 20, true);
  cr_assert(w.window >= 7500000 && w.window <= 15000000 * 11 / 10,
            "window %lu for a 7.5 MB path", (unsigned long) w.window);
}

Test(window, keeps_about_100_ms_on_a_thin_link)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  /* 20 Mbit/s (2.5 MB/s), 20 ms: 50 kB fill it; 16 MiB would be 6.7 s.
   * The floor is 100 ms of rate: 250 kB. */
  run(&w, &now, &delivered, 2500000, 20 * MS, 20, true);
  cr_assert(w.window >= 250000 * 9 / 10 && w.window <= 250000 * 11 / 10,
            "window %lu on a 50 kB path", (unsigned long) w.window);
  struct winctl w2;
  now = 1 * S, delivered = 0;
  win_init(&w2);
  /* 100 Mbit/s, 5 ms: the floor is 100 ms of rate (1.25 MB), not 2 MiB. */
  run(&w2, &now, &delivered, 12500000, 5 * MS, 20, true);
  cr_assert(w2.window >= 1250000 * 9 / 10 && w2.window <= 1250000 * 11 / 10,
            "window %lu, want about 1.25 MB", (unsigned long) w2.window);
}

Test(window, stays_within_bounds)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  run(&w, &now, &delivered, UINT64_C(20000) * MB, 200 * MS, 30, true);
  cr_assert_eq(w.window, WIN_MAX);
}

Test(window, does_not_move_while_stopped)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  run(&w, &now, &delivered, 2500000, 20 * MS, 20, false);
  cr_assert_eq(w.window, WIN_START);
}

Test(window, follows_a_path_that_slowed)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  run(&w, &now, &delivered, 150 * MB, 50 * MS, 20, true);
  uint64_t fast = w.window;
  /* A tenth of the rate: once the 10 s of fast samples are gone, the
   * window is a tenth too. */
  run(&w, &now, &delivered, 15 * MB, 50 * MS, 15, true);
  cr_assert(w.window <= fast / 5, "window %lu, was %lu", (unsigned long) w.window,
            (unsigned long) fast);
}

Test(window, reports_the_queue)
{
  struct winctl w;
  win_init(&w);
  win_update(&w, 1 * S, 0, 0, 20 * MS, 27 * MS, true);
  cr_assert_eq(w.queue_ns, 7 * MS);
  win_update(&w, 2 * S, 0, 0, 20 * MS, 19 * MS, true);
  cr_assert_eq(w.queue_ns, 0);
}

Test(minwin, keeps_the_least_until_it_ages_out)
{
  struct minwin m = { { 0 }, 0 };
  cr_assert_eq(minwin_add(&m, 1 * S, 10 * S, 20 * MS), 20 * MS);
  cr_assert_eq(minwin_add(&m, 2 * S, 10 * S, 80 * MS), 20 * MS, "a queued sample replaced the minimum");
  cr_assert_eq(minwin_add(&m, 25 * S, 10 * S, 60 * MS), 20 * MS, "aged out too early");
  cr_assert_eq(minwin_add(&m, 35 * S, 10 * S, 60 * MS), 60 * MS, "never aged out");
  cr_assert_eq(minwin_add(&m, 200 * S, 10 * S, 90 * MS), 90 * MS);
}

Test(window, the_first_replies_alone_do_not_make_a_fast_path_look_thin)
{
  /* 50 MB/s, 20 ms (1 MB fills the path): the first reply, 24 kB, lands
   * alone, the rest of the start window over the next round trip.  The
   * first round trip's rate is what that round trip brings, not the
   * first reply over a round trip: the window stays at least the start
   * window. */
  struct winctl w;
  win_init(&w);
  uint64_t now = 1 * S, delivered = 0;
  win_update(&w, now, delivered, 0, 20 * MS, 20 * MS, true);
  now += 20 * MS;
  delivered += 24000;
  win_update(&w, now, delivered, w.window, 20 * MS, 20 * MS, true);
  cr_assert_geq(w.window, w.first, "window %lu after the first reply",
                (unsigned long) w.window);
  for (unsigned i = 0; i < 10; i++) {      /* 100 ms at 50 MB/s */
    now += 2 * MS;
    delivered += 100000;
    win_update(&w, now, delivered, w.window, 20 * MS, 20 * MS, true);
    cr_assert_geq(w.window, w.first, "window %lu at %u ms on a 1 MB path",
                  (unsigned long) w.window, 2 * (i + 1));
    /* The first window is WIN_MIN here, which the bound never goes below:
     * the rate itself says whether the first reply was taken for a round
     * trip's worth (1.2 MB/s). */
    cr_assert(w.early == 0 || w.early >= 25 * MB, "start-up rate %lu B/s at %u ms on a 50 MB/s path",
              (unsigned long) w.early, 2 * (i + 1));
  }
  cr_assert_geq(w.window, 2 * MB, "window %lu after 100 ms at 50 MB/s", (unsigned long) w.window);
}

/* A lump of 512 KiB (a chunk of digests) lands gap after the last one,
 * then the source thread ticks every 10 ms until the next one is due
 * (20 ms round trips). */
static void land_lump(struct winctl *w, uint64_t *now, uint64_t *delivered, uint64_t gap)
{
  *now += gap;
  *delivered += 512 << 10;
  w->lumps = *delivered;
  win_update(w, *now, *delivered, 0, 20 * MS, 20 * MS, true);
  for (uint64_t t = 10 * MS; t < gap; t += 10 * MS)
    win_update(w, *now + t, *delivered, 0, 20 * MS, 20 * MS, true);
}

Test(window, lumps_on_a_thin_link_read_at_the_link_s_rate)
{
  /* 10 Mbit/s, 20 ms: chunks of digests, 512 KiB each (~130 kB on the
   * wire), land every 100 ms.  Each lump counts over the time since the
   * one before it, not as 512 KiB in one round trip (25 MB/s); and before
   * a rate is known the lumps do not grow the window. */
  struct winctl w;
  win_init(&w);
  uint64_t now = 1 * S, delivered = 0;
  win_update(&w, now, delivered, 0, 20 * MS, 20 * MS, true);
  land_lump(&w, &now, &delivered, 100 * MS);
  cr_assert_eq(w.window, w.first, "window %lu after the first lump", (unsigned long) w.window);
  for (unsigned i = 0; i < 3; i++) land_lump(&w, &now, &delivered, 100 * MS);
  cr_assert_leq(w.early, 6000000, "start-up rate %lu B/s for 5.2 MB/s of lumps",
                (unsigned long) w.early);
  cr_assert_leq(w.window, 4 * 6000000 / 50, "window %lu", (unsigned long) w.window);
}

Test(window, lumps_back_to_back_time_a_fat_path)
{
  /* 200 Mbit/s: chunks of digests (512 KiB) land 5 ms apart, before any
   * data is fetched.  The second one gives the rate (~100 MB/s), and the
   * window grows by the lumps at once rather than a round trip later. */
  struct winctl w;
  win_init(&w);
  uint64_t now = 1 * S, delivered = 0;
  win_update(&w, now, delivered, 0, 20 * MS, 20 * MS, true);
  for (unsigned i = 0; i < 2; i++) land_lump(&w, &now, &delivered, 5 * MS);
  cr_assert(w.early >= 90000000 && w.early <= 120000000, "rate %lu B/s", (unsigned long) w.early);
  cr_assert_eq(w.window, w.first + 2 * (1024 << 10), "window %lu", (unsigned long) w.window);
}

Test(window, samples_with_the_window_unused_do_not_end_start_up)
{
  /* 1.5 s of a copy that waits for digests (the source hashes them): 2.5
   * MB per sample, flat, with little in flight.  Those samples say
   * nothing of the path: start-up goes on, and ends (three flat samples)
   * only once the window is in use. */
  struct winctl w;
  win_init(&w);
  uint64_t now = 1 * S, delivered = 0;
  win_update(&w, now, delivered, 0, 20 * MS, 20 * MS, true);
  for (unsigned i = 0; i < 6; i++) {
    now += WIN_SAMPLE_NS;
    delivered += 2500000;
    win_update(&w, now, delivered, 100000, 20 * MS, 20 * MS, true);
  }
  cr_assert(!w.startup_over, "start-up ended on samples of an idle window");
  for (unsigned i = 0; i < 4; i++) {
    now += WIN_SAMPLE_NS;
    delivered += 2500000;
    win_update(&w, now, delivered, w.window, 20 * MS, 20 * MS, true);
  }
  cr_assert(w.startup_over, "start-up went on with the window in use and the rate flat");
}

/* Pieces of the link: wire bytes received, and the image bytes they held. */
static double piece(struct winratio *r, uint64_t *wire, uint64_t *raw, uint64_t w, double ratio,
                    bool startup_over, bool queued)
{
  *wire += w;
  *raw += (uint64_t) ((double) w * ratio);
  return win_ratio(r, startup_over, *wire, *raw, queued);
}

Test(window, compressible_data_after_start_up_widens_the_window_at_most_4_times)
{
  struct winratio r = { 0 };
  uint64_t wire = 0, raw = 0;
  /* During start-up the factor is 1 whatever crosses. */
  for (int i = 0; i < 4; i++)
    cr_assert_eq(piece(&r, &wire, &raw, WIN_RATIO_WIRE, 30.0, false, false), 1.0);
  /* Start-up ends; the first piece after it (2:1) is the base. */
  cr_assert_eq(win_ratio(&r, true, wire, raw, false), 1.0);
  cr_assert_eq(piece(&r, &wire, &raw, MB, 2.0, true, false), 1.0);
  /* Less than a piece: no change. */
  cr_assert_eq(piece(&r, &wire, &raw, 1000, 40.0, true, false), 1.0);
  /* Data of 6:1 (avg 4 = twice the base), then 40:1: bounded. */
  double f = piece(&r, &wire, &raw, WIN_RATIO_WIRE, 6.0, true, false);
  cr_assert(f > 1.9 && f < 2.1, "factor %g after a piece three times as compressible", f);
  f = piece(&r, &wire, &raw, WIN_RATIO_WIRE / 16, 40.0, true, false);   /* 640 KiB of image */
  cr_assert(f > 1.9 && f < 2.1, "factor %g before a piece was complete", f);
  f = piece(&r, &wire, &raw, WIN_RATIO_WIRE * 5 / 32, 40.0, true, false);   /* 2.25 MiB of image */
  cr_assert_eq(f, WIN_RATIO_MAX, "factor %g on data 20 times as compressible", f);
  /* Random data (1:1, less than the base) again: the factor comes down
   * piece by piece, to 1. */
  double last = f;
  for (int i = 0; i < 8; i++) {
    f = piece(&r, &wire, &raw, WIN_RATIO_WIRE, 1.0, true, false);
    cr_assert(f <= last, "factor %g rose from %g on random data", f, last);
    last = f;
  }
  cr_assert_eq(f, 1.0, "factor %g after 2 MiB of random data", f);
}

Test(window, a_queue_sets_the_link_factor_back_to_one)
{
  struct winratio r = { 0 };
  uint64_t wire = 0, raw = 0;
  win_ratio(&r, true, wire, raw, false);
  piece(&r, &wire, &raw, MB, 1.0, true, false);
  for (int i = 0; i < 4; i++) piece(&r, &wire, &raw, WIN_RATIO_WIRE / 16, 50.0, true, false);
  cr_assert_eq(r.factor, WIN_RATIO_MAX);
  cr_assert_eq(win_ratio(&r, true, wire, raw, true), 1.0, "a queue left the factor up");
  cr_assert_eq(win_ratio(&r, true, wire, raw, false), 1.0, "the factor came back without data");
  /* win_queued: half a round trip and 5 ms. */
  struct winctl w;
  win_init(&w);
  win_update(&w, 1 * S, 0, 0, 20 * MS, 29 * MS, true);
  cr_assert(!win_queued(&w, 20 * MS));
  win_update(&w, 1 * S + MS, 0, 0, 20 * MS, 31 * MS, true);
  cr_assert(win_queued(&w, 20 * MS));
  win_update(&w, 1 * S + 2 * MS, 0, 0, 2 * MS, 6 * MS, true);
  cr_assert(!win_queued(&w, 2 * MS), "a 4 ms queue counted on a 2 ms path");
}

Test(window, the_first_window_follows_a_round_trip_learnt_late)
{
  /* A plain NBD source: no round trip at the start, the first replies
   * bring one (100 ms) before any rate is known. */
  struct winctl w;
  win_init(&w);
  win_update(&w, 1 * S, 0, 0, 0, 0, true);
  cr_assert_eq(w.window, WIN_START);
  win_update(&w, 1 * S + 100 * MS, 0, WIN_START, 100 * MS, 100 * MS, true);
  cr_assert_eq(w.window, 256250, "window %lu once the round trip was known", (unsigned long) w.window);
}

Test(window, a_burst_opens_start_up_to_twice_its_rate_times_the_round_trip)
{
  /* 512 KiB of digests read with the handshake (credited: they grow the
   * window as if asked by the copy), their 200 kB on the link in one 4 ms
   * burst (50 MB/s), 40 ms round trip, a job's rate of 10 MB/s: the first
   * window is twice 50 MB/s x 40 ms (4 MB), within the bound (4 x the
   * best rate, the burst's, x 40 ms), not the credit's 64 KiB + 1 MiB. */
  struct winctl w;
  uint64_t len = 512 << 10;
  win_init(&w);
  win_job_sample(&w, len, 52 * MS, 4 * MS);
  win_burst(&w, 200000, 4 * MS);
  win_credit(&w, len);
  win_update(&w, 1 * S, len, 0, 40 * MS, 40 * MS, true);
  cr_assert_eq(w.window, 4000000, "window %lu with the burst", (unsigned long) w.window);
  /* Without the burst: the credit alone, the first window (10 Mbit/s x
   * 85 ms) + twice the 512 KiB, within 4 x 10 MB/s x 40 ms. */
  win_init(&w);
  win_job_sample(&w, len, 52 * MS, 4 * MS);
  win_credit(&w, len);
  win_update(&w, 1 * S, len, 0, 40 * MS, 40 * MS, true);
  cr_assert_eq(w.window, 106250 + 2 * len, "window %lu with the credit alone",
               (unsigned long) w.window);
  /* Neither: 512 KiB delivered before the start grow nothing. */
  win_init(&w);
  win_job_sample(&w, len, 52 * MS, 4 * MS);
  win_update(&w, 1 * S, len, 0, 40 * MS, 40 * MS, true);
  cr_assert_eq(w.window, 106250, "window %lu", (unsigned long) w.window);
  /* A burst that overstates the link is not what start-up falls back to
   * when the path queues: the copy's own rate (512 KiB in 52 ms) is. */
  win_init(&w);
  win_job_sample(&w, len, 52 * MS, 4 * MS);
  win_burst(&w, 200000, 4 * MS);
  win_update(&w, 1 * S, len, 0, 40 * MS, 40 * MS, true);
  win_update(&w, 1 * S + 10 * MS, len + 4096, 0, 40 * MS, 40 * MS, true);   /* the copy's first bytes */
  /* 60 ms queued, two round trips later */
  win_update(&w, 1 * S + 90 * MS, len + 4096, 0, 40 * MS, 100 * MS, true);
  cr_assert(w.startup_over);
  cr_assert(w.window > 800000 && w.window < 810000,     /* 2 x 10.08 MB/s x 40 ms */
            "window %lu after the queue", (unsigned long) w.window);
}

Test(window, a_burst_too_short_to_time_or_after_start_up_changes_nothing)
{
  struct winctl w;
  win_init(&w);
  win_burst(&w, 1 << 20, WIN_BURST_MIN_NS - 1);
  cr_assert_eq(w.burst, 0, "a burst of under 1 ms was timed");
  /* Two controllers through start-up and past a rate sample, one told of
   * a burst after its start-up ended: the same windows. */
  struct winctl a, b;
  win_init(&a);
  win_init(&b);
  uint64_t now = 1 * S, delivered = 0;
  for (int i = 0; i < 40; i++) {
    if (i == 10) {
      a.startup_over = b.startup_over = true;
      win_burst(&b, 50 << 20, 2 * MS);
    }
    now += 50 * MS;
    delivered += 100000;
    win_update(&a, now, delivered, a.window, 20 * MS, 20 * MS, true);
    win_update(&b, now, delivered, b.window, 20 * MS, 20 * MS, true);
    cr_assert_eq(a.window, b.window, "step %d: window %lu with a late burst, %lu without",
                 i, (unsigned long) b.window, (unsigned long) a.window);
  }
  cr_assert_gt(a.at, 1 * S, "no rate sample was taken");
  /* A credit after the copy started is not taken either. */
  win_credit(&a, 1 << 20);
  cr_assert_eq(a.credit, 0);
}
