/* Unit tests for common/engine/window.c: the background copy's window
 * follows the bandwidth-delay product (start-up doubling bounded by what
 * the path delivers, then 2 x rate x smallest round trip), stays within
 * its bounds, does not grow when the copy does not use it, and reports
 * the queue each round-trip sample sees. */
#include <criterion/criterion.h>

#include "window.h"
#include "minwin.h"

#define MS UINT64_C(1000000)
#define S (1000 * MS)
#define MB UINT64_C(1000000)

/* A path of rate bytes/s and round trip rtt: the copy delivers
 * min(window, rate x rtt) per round trip.  Runs n samples, one per
 * round trip, from *now; returns the last window. */
static uint64_t run(struct winctl *w, uint64_t *now, uint64_t *delivered,
                    uint64_t rate, uint64_t rtt, unsigned n, bool used)
{
  for (unsigned i = 0; i < n; i++) {
    double bdp = (double) rate * (double) rtt / 1e9;
    double per_rtt = (double) w->window < bdp ? (double) w->window : bdp;
    *now += rtt;
    *delivered += (uint64_t) per_rtt;
    win_sample(w, *now, rtt, rtt, *delivered, used);
  }
  return w->window;
}

Test(window, starts_small)
{
  struct winctl w;
  win_init(&w);
  cr_assert_eq(w.window, WIN_START);
  cr_assert(w.startup);
}

Test(window, settles_at_twice_the_bandwidth_delay_product)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  /* 25 MB/s, 20 ms: the product is 500 kB. */
  run(&w, &now, &delivered, 25 * MB, 20 * MS, 200, true);
  cr_assert(!w.startup, "start-up never ended");
  double want = 2.0 * 25 * MB * 0.020;
  cr_assert(w.window >= want * 0.9 && w.window <= want * 1.1,
            "window %lu, want about %.0f", (unsigned long) w.window, want);
}

Test(window, fills_a_long_fat_path_quickly)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  /* 150 MB/s, 50 ms: 7.5 MB in flight needed; start-up doubles per
   * round trip, so 12 round trips (0.6 s) reach it. */
  run(&w, &now, &delivered, 150 * MB, 50 * MS, 12, true);
  cr_assert(w.window >= 7500000, "window %lu after 12 round trips", (unsigned long) w.window);
  run(&w, &now, &delivered, 150 * MB, 50 * MS, 200, true);
  cr_assert(w.window <= 2 * 7500000 * 11 / 10, "window %lu: more than twice the product",
            (unsigned long) w.window);
}

Test(window, start_up_never_runs_far_past_what_the_path_delivers)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  /* A thin link: 1.25 MB/s (10 Mbit/s), 100 ms: the product is 125 kB. */
  for (unsigned i = 0; i < 100; i++) {
    run(&w, &now, &delivered, 1250000, 100 * MS, 1, true);
    cr_assert(w.window <= 8 * WIN_START, "window %lu on a 125 kB path",
              (unsigned long) w.window);
  }
  cr_assert_eq(w.window, WIN_MIN, "a thin path keeps the smallest window");
}

Test(window, does_not_grow_unused)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  run(&w, &now, &delivered, 150 * MB, 50 * MS, 50, false);
  cr_assert_leq(w.window, WIN_START);
}

Test(window, stays_within_bounds)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  run(&w, &now, &delivered, UINT64_C(10000) * MB, 200 * MS, 300, true);
  cr_assert_eq(w.window, WIN_MAX);
}

Test(window, old_rates_age_out)
{
  struct winctl w;
  uint64_t now = 1 * S, delivered = 0;
  win_init(&w);
  run(&w, &now, &delivered, 100 * MB, 20 * MS, 200, true);
  uint64_t fast = w.window;
  /* The path slows to a tenth: after the 10 s span the window follows. */
  run(&w, &now, &delivered, 10 * MB, 20 * MS, 700, true);
  cr_assert(w.window < fast / 5, "window %lu, was %lu", (unsigned long) w.window,
            (unsigned long) fast);
}

Test(window, reports_the_queue)
{
  struct winctl w;
  win_init(&w);
  win_sample(&w, 1 * S, 20 * MS, 27 * MS, 0, true);
  cr_assert_eq(w.queue_ns, 7 * MS);
  win_sample(&w, 2 * S, 20 * MS, 19 * MS, 0, true);
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
