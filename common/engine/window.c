/* window.c: the background copy's window (window.h). */
#include "window.h"
#include "util.h"

void win_init(struct winctl *w)
{
  *w = (struct winctl) { .window = WIN_START };
}

uint64_t win_update(struct winctl *w, uint64_t now, uint64_t delivered, uint64_t inflight,
                    uint64_t min_rtt_ns, uint64_t last_rtt_ns, bool active)
{
  w->queue_ns = last_rtt_ns > min_rtt_ns ? last_rtt_ns - min_rtt_ns : 0;
  if (active && !w->startup_over) {
    /* Start-up grows by what was delivered (about doubling per round
     * trip, as TCP's slow start does), so a thin link is not handed the
     * whole start window at once; it ends when the probes see a queue
     * of more than a round trip (the path is full) or, below, when the
     * rate stops growing. */
    if (!w->started) {
      w->started = true;
      w->start_bytes = delivered;
    }
    if (min_rtt_ns && w->queue_ns > MAX(min_rtt_ns, (uint64_t) WIN_QUEUE_FULL_NS))
      w->startup_over = true;
    else if (delivered >= w->start_bytes) {
      /* ... but not past 4 x the product measured so far (the rate
       * lags a round trip or two, not more). */
      uint64_t bound = w->maxrate && min_rtt_ns
        ? MAX(w->window, 4 * (uint64_t) ((double) w->maxrate * (double) min_rtt_ns / 1e9))
        : WIN_MAX;
      uint64_t grown = WIN_START + 2 * (delivered - w->start_bytes);
      w->window = MIN(MAX(w->window, MIN(grown, bound)), WIN_MAX);
    }
  }
  if (now - w->at < WIN_SAMPLE_NS) return w->window;
  uint64_t rate = w->at && delivered >= w->bytes && now > w->at
    ? (uint64_t) ((double) (delivered - w->bytes) * 1e9 / (double) (now - w->at)) : 0;
  w->at = now;
  w->bytes = delivered;
  w->rates[w->nrates++ % WIN_RATES] = rate;
  uint64_t maxrate = 0;
  for (unsigned i = 0; i < WIN_RATES; i++) maxrate = MAX(maxrate, w->rates[i]);
  w->maxrate = maxrate;
  if (!active || !min_rtt_ns || !rate) return w->window;
  uint64_t win = w->window;
  uint64_t cap = 2 * (uint64_t) ((double) maxrate * (double) min_rtt_ns / 1e9);
  bool grew = w->best && rate > w->best + w->best / 4;
  if (!w->best || grew) {
    w->best = rate;
    w->flat = 0;
  } else if (w->flat < 3 && ++w->flat == 3)
    w->startup_over = true;
  bool doubling = grew && !w->startup_over && win <= 2 * cap;
  if (rate >= maxrate * 85 / 100 && inflight >= win * 3 / 4)
    win = doubling ? win * 2 : w->startup_over ? win * 5 / 4 : win;
  if (w->startup_over) win = MIN(win, cap);
  uint64_t floor = MAX(WIN_MIN, MIN(WIN_FLOOR, maxrate / 10));
  w->window = MIN(MAX(win, floor), WIN_MAX);
  return w->window;
}
