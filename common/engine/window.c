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
  if (now - w->at < WIN_SAMPLE_NS) return w->window;
  uint64_t rate = w->at && delivered >= w->bytes && now > w->at
    ? (uint64_t) ((double) (delivered - w->bytes) * 1e9 / (double) (now - w->at)) : 0;
  w->at = now;
  w->bytes = delivered;
  w->rates[w->nrates++ % WIN_RATES] = rate;
  uint64_t maxrate = 0;
  for (unsigned i = 0; i < WIN_RATES; i++) maxrate = MAX(maxrate, w->rates[i]);
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
