/* window.c: the background copy's window (window.h). */
#include "window.h"
#include "util.h"

void win_init(struct winctl *w)
{
  *w = (struct winctl) { .window = WIN_START, .first = WIN_START };
}

/* Whether the last round trip's queue is longer than min_rtt_ns / div
 * and least_ns. */
static bool queue_over(const struct winctl *w, uint64_t min_rtt_ns, unsigned div, uint64_t least_ns)
{
  return w->queue_ns > MAX(min_rtt_ns / div, least_ns);
}

bool win_queued(const struct winctl *w, uint64_t min_rtt_ns)
{
  return queue_over(w, min_rtt_ns, 2, 5000000u);
}

bool win_queue_seen(const struct winctl *w, uint64_t min_rtt_ns)
{
  return queue_over(w, min_rtt_ns, 8, WIN_RATIO_QUEUE_NS);
}

void win_job_sample(struct winctl *w, uint64_t bytes, uint64_t over_ns, uint64_t path_ns)
{
  if (!bytes || !over_ns) return;
  w->job_rate = MAX(w->job_rate, (uint64_t) ((double) bytes * 1e9 / (double) over_ns));
  w->job_ns = MAX(w->job_ns, path_ns);
}

void win_burst(struct winctl *w, uint64_t bytes, uint64_t ns)
{
  if (ns < WIN_BURST_MIN_NS || !bytes) return;
  w->burst = MAX(w->burst, (uint64_t) ((double) bytes * 1e9 / (double) ns));
}

void win_credit(struct winctl *w, uint64_t bytes)
{
  if (!w->started) w->credit += bytes;
}

double win_ratio(struct winratio *r, bool startup_over, uint64_t wire, uint64_t raw, bool queued)
{
  if (!startup_over) {
    *r = (struct winratio) { 0 };
    return 1;
  }
  if (!r->factor) {
    /* start-up just ended: the base is the first piece from here on */
    *r = (struct winratio) { .factor = 1, .measuring = true, .wire = wire, .raw = raw };
    return 1;
  }
  if (wire > r->wire && raw >= r->raw &&
      (wire >= r->wire + WIN_RATIO_WIRE || raw >= r->raw + WIN_RATIO_RAW)) {
    double piece = (double) (raw - r->raw) / (double) (wire - r->wire);
    r->wire = wire;
    r->raw = raw;
    if (r->measuring) {
      r->measuring = false;
      r->base = r->avg = MAX(piece, 1.0);
    } else
      r->avg = (r->avg + piece) / 2;
  }
  if (queued) r->avg = r->base;
  if (!r->measuring) r->factor = MIN(MAX(r->avg / r->base, 1.0), WIN_RATIO_MAX);
  return r->factor;
}

uint64_t win_update(struct winctl *w, uint64_t now, uint64_t delivered, uint64_t inflight,
                    uint64_t min_rtt_ns, uint64_t last_rtt_ns, bool active)
{
  w->queue_ns = last_rtt_ns > min_rtt_ns ? last_rtt_ns - min_rtt_ns : 0;
  if (delivered != w->moved_bytes) {
    w->moved_bytes = delivered;
    w->moved_at = now;
  }
  if (active && !w->startup_over) {
    /* Start-up grows by what was delivered (about doubling per round
     * trip, as TCP's slow start does), so a thin link is not handed the
     * whole start window at once; it ends when the probes see a queue
     * of more than a round trip (the path is full) or, below, when the
     * rate stops growing. */
    if (!w->started) {
      w->started = true;
      w->start_bytes = delivered - MIN(w->credit, delivered);
    }
    /* The first window: what the thinnest link served carries in two
     * round trips and 5 ms (a client's miss behind it waits at most a
     * round trip more than alone), once the round trip is known (a plain
     * NBD source tells it with its first replies) and while no rate is. */
    if (min_rtt_ns && !w->first_set && !w->early && !w->maxrate) {
      double thin = (double) WIN_THIN_RATE * (double) (2 * min_rtt_ns + 5000000u) / 1e9;
      w->first = MIN(MAX((uint64_t) thin, WIN_MIN), WIN_START);
      w->first_set = true;
      w->window = MIN(w->window, w->first);
    }
    /* The start-up clock starts with the first bytes delivered: the
     * time the copy waited for its connection or for digests is not the
     * path's.  Its first round trip is the one that follows them (what
     * the path brings in a round trip, the first replies left out);
     * counted from a round trip before them, it would hold only those
     * first replies, and a fast path would look thin. */
    if (!w->flowing && delivered > w->start_bytes) {
      w->flowing = true;
      w->flow_at = now;
      w->snap_at = now;
      w->snap_bytes = delivered;
      w->snap_moved = now;
    }
    /* The best rate of a round trip since then (what arrived in it): it
     * stands in for the rate before the first sample (a thin link shows
     * itself within a round trip or two, long before the sample) and
     * after it while it is higher (the first sample may hold time
     * without data; while the rate doubles each round trip, the latest
     * round trip is what counts).  A round trip's bytes are counted from
     * the last delivery before it began: bytes land in lumps (a 512 KiB
     * chunk of digests, a large job), and a lump that took 400 ms to
     * cross a thin link, landing within one round trip, would read as 20
     * times the link's rate. */
    if (w->flowing && now >= w->snap_at + MAX(min_rtt_ns, (uint64_t) 5000000u)) {
      uint64_t from = MIN(w->snap_at, w->snap_moved);
      double r = (double) (delivered - w->snap_bytes) * 1e9 / (double) (now - from);
      w->early = MAX(w->early, (uint64_t) r);
      w->snap_at = now;
      w->snap_bytes = delivered;
      w->snap_moved = w->moved_at;
    }
    /* Each job's rate (window.h) counts as a round trip's: on a thin
     * link the first job tells the path's rate as it lands, where a
     * round trip counted from the first replies may hold none.  A job
     * that took more than two round trips (and 5 ms) waited behind the
     * path: start-up is then bounded by twice its rate, not four times. */
    if (w->job_rate) {
      w->early = MAX(w->early, w->job_rate);
      if (min_rtt_ns && w->job_ns > 2 * min_rtt_ns + 5000000u) w->path_bound = true;
    }
    /* Lumps asked back to back time the path too: the bytes of one over
     * the time since the one before it (a lower bound when the source
     * took longer to make it than the path to carry it). */
    if (w->lumps != w->lump_seen) {
      if (w->lump_at && now >= w->lump_at + WIN_LUMP_GAP_NS && w->lumps > w->lump_seen) {
        double r = (double) (w->lumps - w->lump_seen) * 1e9 / (double) (now - w->lump_at);
        w->early = MAX(w->early, (uint64_t) r);
      }
      w->lump_seen = w->lumps;
      w->lump_at = now;
    }
    double early = (double) w->early;
    /* A queue ends start-up only once the copy's own data has flowed for
     * two round trips: before that, what queued on the path is what came
     * before it (the handshakes, lumps of digests on their connection),
     * and the rate so far -- a round trip or two of the first replies --
     * is not the path's: cut to twice it, the window stayed at a fraction
     * of the path for seconds (a seeded 0.7 s copy took 0.93 s). */
    bool settled = w->flowing && now >= w->flow_at + 2 * min_rtt_ns;
    if (min_rtt_ns && settled && queue_over(w, min_rtt_ns, 2, WIN_QUEUE_FULL_NS)) {
      /* The path is full: what start-up added beyond twice what it
       * carries in a round trip (its rate so far) is queue, handed back
       * now rather than at the next rate sample. */
      w->startup_over = true;
      if (early > 0) {
        double rate = MAX(early, (double) w->maxrate);
        uint64_t bdp2 = 2 * (uint64_t) (rate * (double) min_rtt_ns / 1e9);
        w->window = MAX(WIN_MIN, MIN(w->window, bdp2));
      }
    } else if (delivered >= w->start_bytes) {
      /* ... but not past 4 x the product measured so far (the rate
       * lags a round trip or two, not more): once a round trip's rate is
       * known, a start window larger than that is brought down to it. */
      uint64_t bound = WIN_MAX;
      /* (A burst counts here, not where start-up ends: once the path is
       * full, only what the copy itself delivered says what it carries.) */
      double rate = MAX(MAX(early, (double) w->maxrate), (double) w->burst);
      if (min_rtt_ns && rate > 0)
        bound = MAX(WIN_MIN, (w->path_bound ? 2 : 4) * (uint64_t) (rate * (double) min_rtt_ns / 1e9));
      /* Until a rate is known (a job landed, a round trip passed, two
       * lumps came), nothing grows the window: the first replies, and a
       * lump of digests, say nothing of the link's speed yet. */
      uint64_t got = rate > 0 ? delivered - w->start_bytes : 0;
      uint64_t grown = w->first + 2 * got;
      /* A burst told the path's rate: twice its product at once. */
      if (w->burst && min_rtt_ns)
        grown = MAX(grown, 2 * (uint64_t) ((double) w->burst * (double) min_rtt_ns / 1e9));
      w->window = MIN(MIN(MAX(w->window, grown), bound), WIN_MAX);
    }
  }
  w->job_rate = w->job_ns = 0;
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
  /* Twice the product, but no more than WIN_EXCESS_NS of the rate beyond
   * it: with the source holding the copy's replies back (WAN pacing), what
   * the window holds beyond the product waits there, and a client's miss
   * for a block in it waits as long (I3). */
  uint64_t bdp = (uint64_t) ((double) maxrate * (double) min_rtt_ns / 1e9);
  uint64_t cap = bdp + MIN(bdp, (uint64_t) ((double) maxrate * WIN_EXCESS_NS / 1e9));
  bool grew = w->best && rate > w->best + w->best / 4;
  /* A sample with the window mostly unused (the copy waited for digests,
   * block status or the CPU, not for the path) says nothing of the path:
   * it does not count towards ending start-up, whose window would then
   * settle at twice a rate the path was never asked for. */
  bool used = inflight >= win * 3 / 4;
  if (!w->best || grew) {
    w->best = rate;
    w->flat = 0;
  } else if (used && w->flat < 3 && ++w->flat == 3)
    w->startup_over = true;
  bool doubling = grew && !w->startup_over && win <= 2 * cap;
  if (rate >= maxrate * 85 / 100 && used)
    win = doubling ? win * 2 : w->startup_over ? win * 5 / 4 : win;
  if (w->startup_over) win = MIN(win, cap);
  uint64_t floor = MAX(WIN_MIN, MIN(WIN_FLOOR, maxrate / 10));
  /* The floor keeps a window from shrinking below it; it lifts one that
   * is below only while the path shows no queue (a jump into a queued
   * path is a burst that a client's miss waits behind). */
  if (win_queued(w, min_rtt_ns))
    floor = MAX(WIN_MIN, MIN(floor, w->window));
  w->window = MIN(MAX(win, floor), WIN_MAX);
  return w->window;
}
