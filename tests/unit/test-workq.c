/* The work queue's three lanes: first, FIFO, low (workq.h). */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <time.h>
#include <unistd.h>

#include "workq.h"

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static bool gate_open;
static unsigned low_now, low_peak, done_count;
static char order[16];
static unsigned norder;

struct item {
  struct xwork w;
  char tag;
  bool low;
  bool gated;                  /* waits for gate_open before it returns */
};

/* Waits (at most 10 s) until pred holds; under mu. */
static bool wait_until(bool (*pred)(void))
{
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  t.tv_sec += 10;
  while (!pred())
    if (pthread_cond_timedwait(&cv, &mu, &t) == ETIMEDOUT) return pred();
  return true;
}

static void run(struct xwork *w)
{
  struct item *it = (struct item *) w;
  pthread_mutex_lock(&mu);
  if (norder < sizeof order - 1) order[norder++] = it->tag;
  if (it->low && ++low_now > low_peak) low_peak = low_now;
  pthread_cond_broadcast(&cv);
  if (it->gated) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += 10;
    while (!gate_open && pthread_cond_timedwait(&cv, &mu, &t) != ETIMEDOUT)
      ;
  }
  if (it->low) low_now--;
  done_count++;
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
}

static void reset(void)
{
  gate_open = false;
  low_now = low_peak = done_count = norder = 0;
  memset(order, 0, sizeof order);
}

static unsigned want_started, want_done;
static bool started_enough(void) { return norder >= want_started; }
static bool done_enough(void) { return done_count >= want_done; }

/* Runs a gated item on the (one-thread) queue and waits until it runs:
 * what is queued next waits behind it. */
static void occupy(struct workq *wq, struct item *block)
{
  workq_submit(wq, &block->w);
  pthread_mutex_lock(&mu);
  want_started = 1;
  cr_assert(wait_until(started_enough), "the blocking item did not start");
  pthread_mutex_unlock(&mu);
}

/* Opens the gate and waits until n items have run. */
static void release_and_wait(unsigned n)
{
  pthread_mutex_lock(&mu);
  gate_open = true;
  pthread_cond_broadcast(&cv);
  want_done = n;
  cr_assert(wait_until(done_enough), "only %u of %u items ran", done_count, n);
  pthread_mutex_unlock(&mu);
}

Test(workq, low_items_run_after_everything_else_queued)
{
  reset();
  struct workq *wq = workq_new(1, "t");
  cr_assert_not_null(wq);
  struct item block = { .w.fn = run, .tag = 'B', .gated = true };
  struct item low = { .w.fn = run, .tag = 'L', .low = true };
  struct item fifo = { .w.fn = run, .tag = 'N' };
  struct item first = { .w.fn = run, .tag = 'F' };
  occupy(wq, &block);
  workq_submit_low(wq, &low.w);       /* queued first, runs last */
  workq_submit(wq, &fifo.w);
  workq_submit_first(wq, &first.w);
  release_and_wait(4);
  cr_assert_str_eq(order, "BFNL");
  workq_free(wq);
}

Test(workq, low_items_take_at_most_half_the_threads)
{
  /* Half the threads (2 of 4), and at most half the CPUs (one on a
   * machine of fewer than 4). */
  reset();
  struct workq *wq = workq_new(4, "t");
  cr_assert_not_null(wq);
  cpu_set_t set;
  long cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                          : sysconf(_SC_NPROCESSORS_ONLN);
  unsigned lmax = cpus >= 4 ? 2 : 1;
  cr_assert_eq(workq_low_max(wq), lmax, "low lane of %u on %ld CPUs", workq_low_max(wq), cpus);
  struct item low[6], fifo = { .w.fn = run, .tag = 'N' };
  for (unsigned i = 0; i < 6; i++) {
    low[i] = (struct item) { .w.fn = run, .tag = 'L', .low = true, .gated = true };
    workq_submit_low(wq, &low[i].w);
  }
  pthread_mutex_lock(&mu);
  want_started = lmax;
  cr_assert(wait_until(started_enough), "low items did not start");
  pthread_mutex_unlock(&mu);
  /* Threads are free: an ordinary item runs while the low ones wait. */
  workq_submit(wq, &fifo.w);
  pthread_mutex_lock(&mu);
  want_started = lmax + 1;
  cr_assert(wait_until(started_enough), "an ordinary item waited behind low ones");
  cr_assert_eq(order[lmax], 'N', "order %s", order);
  cr_assert_eq(low_peak, lmax, "%u low items ran at once on 4 threads", low_peak);
  gate_open = true;
  pthread_cond_broadcast(&cv);
  want_done = 7;
  cr_assert(wait_until(done_enough), "only %u of 7 items ran", done_count);
  cr_assert_eq(low_peak, lmax, "%u low items ran at once on 4 threads", low_peak);
  pthread_mutex_unlock(&mu);
  workq_free(wq);
}

Test(workq, free_runs_every_queued_low_item)
{
  reset();
  struct workq *wq = workq_new(1, "t");
  cr_assert_not_null(wq);
  struct item low[5];
  for (unsigned i = 0; i < 5; i++) {
    low[i] = (struct item) { .w.fn = run, .tag = 'L', .low = true };
    workq_submit_low(wq, &low[i].w);
  }
  workq_free(wq);
  cr_assert_eq(done_count, 5);
}

Test(workq, a_promoted_low_item_runs_first)
{
  reset();
  struct workq *wq = workq_new(1, "t");
  cr_assert_not_null(wq);
  struct item block = { .w.fn = run, .tag = 'B', .gated = true };
  struct item low1 = { .w.fn = run, .tag = 'L', .low = true };
  struct item low2 = { .w.fn = run, .tag = 'P', .low = true };
  struct item fifo = { .w.fn = run, .tag = 'N' };
  occupy(wq, &block);
  workq_submit_low(wq, &low1.w);
  workq_submit_low(wq, &low2.w);
  workq_submit(wq, &fifo.w);
  workq_promote(wq, &low2.w);         /* a client now waits on it */
  workq_promote(wq, &block.w);        /* not in the low lane: nothing happens */
  release_and_wait(4);
  cr_assert_str_eq(order, "BPNL");
  workq_free(wq);
}
