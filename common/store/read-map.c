/* read-map.c: the map of recent reads (read-map.h). */
#include "read-map.h"
#include "nbd-proto.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct read_map {
  uint64_t image_size, nregions;
  atomic_uint_fast64_t clock;     /* reads noted so far */
  atomic_uint_fast64_t *last;     /* per region: clock at its last read, 0: never */
};

static uint64_t regions_of(uint64_t image_size)
{
  return (image_size >> READ_MAP_SHIFT) + ((image_size & ((1u << READ_MAP_SHIFT) - 1)) != 0);
}

uint64_t read_map_export_size(uint64_t image_size)
{
  return READ_MAP_HEADER + 4 * regions_of(image_size);
}

struct read_map *read_map_new(uint64_t image_size)
{
  struct read_map *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  m->image_size = image_size;
  m->nregions = regions_of(image_size);
  m->last = calloc(m->nregions + 1, sizeof *m->last);
  if (!m->last) { free(m); return NULL; }
  atomic_init(&m->clock, 0);
  return m;
}

void read_map_free(struct read_map *m)
{
  if (!m) return;
  free(m->last);
  free(m);
}

void read_map_note(struct read_map *m, uint64_t off, uint64_t len)
{
  if (!m || !len || off >= m->image_size) return;
  uint64_t t = atomic_fetch_add_explicit(&m->clock, 1, memory_order_relaxed) + 1;
  uint64_t last = MIN(off + len - 1, m->image_size - 1) >> READ_MAP_SHIFT;
  for (uint64_t r = off >> READ_MAP_SHIFT; r <= last; r++)
    atomic_store_explicit(&m->last[r], t, memory_order_relaxed);
}

/* ---- the export ---- */

static uint64_t rm_get_size(void *h)
{
  return read_map_export_size(((struct read_map *) h)->image_size);
}

static uint16_t rm_get_flags(void *h)
{
  return NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN;
}

/* Region r's entry when the clock reads now. */
static uint32_t entry(struct read_map *m, uint64_t r, uint64_t now)
{
  uint64_t t = atomic_load_explicit(&m->last[r], memory_order_relaxed);
  return !t ? 0 : now - t >= UINT32_MAX - 1 ? UINT32_MAX : (uint32_t) (now - t) + 1;
}

/* Small (4 bytes per MiB of image): answered at once, on the caller's
 * thread, with the clock read once per request. */
static void rm_pread(void *h, struct xreq *r)
{
  struct read_map *m = h;
  uint64_t now = atomic_load_explicit(&m->clock, memory_order_relaxed);
  uint8_t hdr[READ_MAP_HEADER] = { 0 }, *out = r->buf;
  memcpy(hdr, READ_MAP_MAGIC, 8);
  put_be32(hdr + 8, READ_MAP_SHIFT);
  for (uint64_t i = 0; i < r->length; ) {
    uint64_t o = r->offset + i;
    if (o < READ_MAP_HEADER) {
      out[i++] = hdr[o];
      continue;
    }
    uint8_t e[4];                 /* the entry o falls in, from its byte o % 4 on */
    uint64_t k = (o - READ_MAP_HEADER) % 4, n = MIN(4 - k, r->length - i);
    put_be32(e, entry(m, (o - READ_MAP_HEADER) / 4, now));
    memcpy(out + i, e + k, n);
    i += n;
  }
  xreq_complete(r, 0);
}

static void rm_refuse(void *h, struct xreq *r) { xreq_complete(r, EPERM); }
static void rm_nothing(void *h, struct xreq *r) { xreq_complete(r, 0); }

const struct xnbd_backend_ops read_map_ops = {
  .name = "read-map",
  .get_size = rm_get_size,
  .get_flags = rm_get_flags,
  .pread = rm_pread,
  .pwrite = rm_refuse,
  .flush = rm_nothing,
  .trim = rm_refuse,
  .zero = rm_refuse,
  .cache = rm_nothing,
};

/* ---- the reader ---- */

struct ranked { uint32_t v; uint64_t region; };

static int by_recency(const void *a, const void *b)
{
  const struct ranked *x = a, *y = b;
  if (x->v != y->v) return x->v < y->v ? -1 : 1;
  return x->region < y->region ? -1 : x->region > y->region;
}

int read_map_order(const uint8_t *buf, uint64_t len, uint64_t image_size,
                   uint64_t **regions, uint64_t *n, unsigned *shift,
                   char *err, size_t errlen)
{
  *regions = NULL;
  *n = 0;
  if (len < READ_MAP_HEADER || memcmp(buf, READ_MAP_MAGIC, 8) != 0) {
    snprintf(err, errlen, "it does not start with %s: not a read map", READ_MAP_MAGIC);
    return -1;
  }
  uint32_t s = get_be32(buf + 8);
  if (s < 12 || s > 40 || get_be32(buf + 12) != 0) {
    snprintf(err, errlen, "region size 2^%u (or reserved bytes not 0): not a "
             "read map this proxy understands", s);
    return -1;
  }
  uint64_t nreg = (image_size >> s) + ((image_size & ((UINT64_C(1) << s) - 1)) != 0);
  if (len != READ_MAP_HEADER + 4 * nreg) {
    snprintf(err, errlen, "%" PRIu64 " bytes where a %" PRIu64 "-byte image with "
             "regions of 2^%u bytes needs %" PRIu64, len, image_size, s,
             READ_MAP_HEADER + 4 * nreg);
    return -1;
  }
  uint64_t k = 0;
  for (uint64_t r = 0; r < nreg; r++) k += get_be32(buf + READ_MAP_HEADER + 4 * r) != 0;
  *shift = s;
  if (!k) return 0;
  struct ranked *rk = malloc(k * sizeof *rk);
  uint64_t *out = malloc(k * sizeof *out);
  if (!rk || !out) {
    free(rk);
    free(out);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  k = 0;
  for (uint64_t r = 0; r < nreg; r++) {
    uint32_t v = get_be32(buf + READ_MAP_HEADER + 4 * r);
    if (v) rk[k++] = (struct ranked) { v, r };
  }
  qsort(rk, k, sizeof *rk, by_recency);
  for (uint64_t i = 0; i < k; i++) out[i] = rk[i].region;
  free(rk);
  *regions = out;
  *n = k;
  return 0;
}
