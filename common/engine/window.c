/* window.c: the background copy's window (window.h). */
#include "window.h"
#include "util.h"

void win_init(struct winctl *w)
{
  *w = (struct winctl) { .window = WIN_START, .startup = true };
}

uint64_t win_rate(const struct winctl *w, uint64_t now)
{
  uint64_t best = 0;
  unsigned n = MIN(w->nrates, (unsigned) WIN_RATES);
  for (unsigned i = 0; i < n; i++)
    if (now - w->rates[i].at <= WIN_RATE_SPAN_NS) best = MAX(best, w->rates[i].rate);
  return best;
}

uint64_t win_sample(struct winctl *w, uint64_t now, uint64_t min_rtt_ns,
                    uint64_t sample_ns, uint64_t delivered, bool used)
{
  if (!min_rtt_ns || !sample_ns) return w->window;
  w->queue_ns = sample_ns > min_rtt_ns ? sample_ns - min_rtt_ns : 0;
  if (!w->at || delivered < w->bytes) {         /* first call, or a reset */
    w->at = now;
    w->bytes = delivered;
    return w->window;
  }
  /* A delivery-rate sample every max(round trip, 100 ms). */
  uint64_t dt = now - w->at;
  if (dt >= MAX(min_rtt_ns, (uint64_t) 100000000u)) {
    uint64_t rate = (uint64_t) ((double) (delivered - w->bytes) * 1e9 / (double) dt);
    w->at = now;
    w->bytes = delivered;
    w->rates[w->nrates % WIN_RATES].rate = rate;
    w->rates[w->nrates % WIN_RATES].at = now;
    w->nrates++;
    if (w->startup) {
      if (rate > w->best + w->best / 4) {
        w->best = rate;
        w->flat = 0;
      } else if (used && ++w->flat >= 3)
        w->startup = false;
    }
  }
  double bdp = (double) win_rate(w, now) * (double) min_rtt_ns / 1e9;
  double win = (double) w->window;
  /* Start-up doubles per round trip (one sample each), but never beyond
   * 4 x what the path delivered in a round trip: the rate lags by a
   * round trip or two, not by more. */
  if (w->startup && used && (bdp == 0 || win < 4 * bdp)) win *= 2;
  if (!w->startup) win = WIN_GAIN * bdp;
  if (win < (double) WIN_MIN) win = (double) WIN_MIN;
  if (win > (double) WIN_MAX) win = (double) WIN_MAX;
  w->window = (uint64_t) win;
  return w->window;
}
