/* minwin.h: a windowed minimum -- the least value seen over the last
 * MINWIN_BUCKETS buckets of span_ns each (a value inflated by a passing
 * queue never replaces a smaller one still in the window; an old small one
 * ages out).  Not thread-safe: one owner, or under the owner's lock. */
#ifndef XNBD_MINWIN_H
#define XNBD_MINWIN_H

#include <stdint.h>
#include <string.h>

#define MINWIN_BUCKETS 3

struct minwin {
  uint64_t min[MINWIN_BUCKETS];   /* 0: no value in that bucket */
  uint64_t at;                    /* start of bucket 0 */
};

static inline uint64_t minwin_add(struct minwin *m, uint64_t now, uint64_t span_ns, uint64_t v)
{
  if (!m->at) m->at = now;
  if (now - m->at >= MINWIN_BUCKETS * span_ns) {       /* all aged out */
    memset(m->min, 0, sizeof m->min);
    m->at = now;
  }
  while (now - m->at >= span_ns) {
    memmove(&m->min[1], &m->min[0], (MINWIN_BUCKETS - 1) * sizeof m->min[0]);
    m->min[0] = 0;
    m->at += span_ns;
  }
  if (!m->min[0] || v < m->min[0]) m->min[0] = v;
  uint64_t best = 0;
  for (unsigned i = 0; i < MINWIN_BUCKETS; i++)
    if (m->min[i] && (!best || m->min[i] < best)) best = m->min[i];
  return best;
}

#endif
