/* lat: latency of single reads through one NBD connection (benchmarks).
 *
 *   lat [-n N] [-l LEN] [-s SEED] [-r START:END] [-f FILE] [-o SAMPLES] URI
 *       Connects once, then does N reads of LEN bytes (default 100 reads of
 *       4096 bytes), one at a time, and prints
 *         n=N p50_us=.. p90_us=.. p99_us=.. max_us=.. min_us=.. mean_us=..
 *       Offsets: one per line (bytes, decimal) from FILE, else N distinct
 *       LEN-aligned offsets spread over [START, END) (default: the whole
 *       export): the range is cut into N slots and one offset is drawn in
 *       each (seeded, default seed 1), then the order is shuffled, so
 *       consecutive reads are far apart.  -o writes every sample to
 *       SAMPLES: offset, microseconds, and the wall-clock time the read
 *       started (seconds since the epoch).  p99 is the nearest-rank
 *       percentile.
 *
 *   lat -H [-t SECONDS] URI
 *       Hold: connects and stays connected, doing nothing, until SIGTERM or
 *       SIGINT, or until SECONDS (default 3600) pass; then disconnects
 *       cleanly.  Prints "connected" once connected.  (For
 *       servers that work only while a client is connected, such as
 *       nbdkit's scan filter.)
 *
 * Exit status 0 on success, 1 if a read or the connection fails, 2 for a
 * usage error. */
#include "util.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void) sig; stop = 1; }

static void usage(void)
{
  fprintf(stderr,
          "usage: lat [-n N] [-l LEN] [-s SEED] [-r START:END] [-f FILE] [-o SAMPLES] URI\n"
          "       lat -H [-t SECONDS] URI\n");
  exit(2);
}

/* xorshift64*: small, seeded, good enough for picking offsets. */
static uint64_t rng_state;
static uint64_t rnd(void)
{
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 2685821657736338717ull;
}

static int cmp_u64(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

static uint64_t pct(const uint64_t *sorted, size_t n, unsigned p)
{
  size_t rank = (n * p + 99) / 100;          /* nearest rank, 1-based */
  if (rank < 1) rank = 1;
  return sorted[rank - 1];
}

static struct nbd_handle *open_uri(const char *uri)
{
  struct nbd_handle *h = nbd_create();
  if (!h) {
    fprintf(stderr, "lat: nbd_create: %s\n", nbd_get_error());
    exit(1);
  }
  if (nbd_connect_uri(h, uri) < 0) {
    fprintf(stderr, "lat: cannot connect to %s: %s\n", uri, nbd_get_error());
    nbd_close(h);
    exit(1);
  }
  return h;
}

static int hold(const char *uri, unsigned seconds)
{
  struct nbd_handle *h = open_uri(uri);
  uint64_t end = now_ns() + (uint64_t) seconds * 1000000000u;
  printf("connected\n");
  fflush(stdout);
  while (!stop && now_ns() < end)
    poll(NULL, 0, 100);
  nbd_shutdown(h, 0);
  nbd_close(h);
  return 0;
}

int main(int argc, char **argv)
{
  unsigned long n = 100, len = 4096, seconds = 3600;
  uint64_t seed = 1, start = 0, end = 0;
  bool have_range = false, hold_mode = false;
  const char *file = NULL, *samples_path = NULL;
  int c;
  while ((c = getopt(argc, argv, "n:l:s:r:f:o:Ht:h")) != -1) {
    char *e;
    switch (c) {
    case 'n': n = strtoul(optarg, &e, 10); if (*e || !n || n > 10000000) usage(); break;
    case 'l': len = strtoul(optarg, &e, 10); if (*e || !len || len > (32u << 20)) usage(); break;
    case 's': seed = strtoull(optarg, &e, 10); if (*e) usage(); break;
    case 'r':
      if (sscanf(optarg, "%" SCNu64 ":%" SCNu64, &start, &end) != 2 || end <= start)
        usage();
      have_range = true;
      break;
    case 'f': file = optarg; break;
    case 'o': samples_path = optarg; break;
    case 'H': hold_mode = true; break;
    case 't': seconds = strtoul(optarg, &e, 10); if (*e || !seconds) usage(); break;
    default: usage();
    }
  }
  if (optind != argc - 1) usage();
  const char *uri = argv[optind];

  struct sigaction sa = { .sa_handler = on_signal };
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  if (hold_mode) return hold(uri, seconds);

  uint64_t *offs = NULL;
  size_t count = 0;
  if (file) {
    FILE *f = fopen(file, "r");
    if (!f) { fprintf(stderr, "lat: %s: %s\n", file, strerror(errno)); return 2; }
    size_t cap = 0;
    uint64_t v;
    while (count < n && fscanf(f, "%" SCNu64, &v) == 1) {
      if (count == cap) {
        cap = cap ? cap * 2 : 1024;
        offs = realloc(offs, cap * sizeof *offs);
        if (!offs) { fprintf(stderr, "lat: out of memory\n"); return 1; }
      }
      offs[count++] = v;
    }
    fclose(f);
    if (!count) { fprintf(stderr, "lat: no offsets in %s\n", file); return 2; }
    n = count;
  }

  struct nbd_handle *h = open_uri(uri);
  int64_t size = nbd_get_size(h);
  if (size < 0) { fprintf(stderr, "lat: size: %s\n", nbd_get_error()); return 1; }
  if (!file) {
    if (!have_range) { start = 0; end = (uint64_t) size; }
    if (end > (uint64_t) size) end = (uint64_t) size;
    start = start / len * len;
    uint64_t units = end > start ? (end - start) / len : 0;
    if (units < n) {
      fprintf(stderr, "lat: the range holds %" PRIu64 " reads of %lu bytes, fewer than %lu\n",
              units, len, n);
      return 2;
    }
    offs = malloc(n * sizeof *offs);
    if (!offs) { fprintf(stderr, "lat: out of memory\n"); return 1; }
    rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
    for (unsigned long i = 0; i < n; i++) {
      uint64_t lo = units * i / n, hi = units * (i + 1) / n;   /* slot [lo, hi) */
      offs[i] = start + (lo + rnd() % (hi - lo)) * len;
    }
    for (unsigned long i = n - 1; i > 0; i--) {               /* shuffle */
      unsigned long k = rnd() % (i + 1);
      uint64_t t = offs[i]; offs[i] = offs[k]; offs[k] = t;
    }
  }
  char *buf = malloc(len);
  uint64_t *us = malloc(n * sizeof *us);
  if (!buf || !us) { fprintf(stderr, "lat: out of memory\n"); return 1; }
  FILE *sf = samples_path ? fopen(samples_path, "w") : NULL;
  if (samples_path && !sf) {
    fprintf(stderr, "lat: %s: %s\n", samples_path, strerror(errno));
    return 2;
  }
  unsigned long done = 0;
  for (; done < n && !stop; done++) {
    if (offs[done] + len > (uint64_t) size) {
      fprintf(stderr, "lat: offset %" PRIu64 " is beyond the export (%" PRId64 " bytes)\n",
              offs[done], size);
      return 2;
    }
    uint64_t t0 = now_ns();
    if (nbd_pread(h, buf, len, offs[done], 0) < 0) {
      fprintf(stderr, "lat: read of %lu bytes at %" PRIu64 " failed: %s\n", len,
              offs[done], nbd_get_error());
      return 1;
    }
    us[done] = (now_ns() - t0) / 1000;
    if (sf) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      fprintf(sf, "%" PRIu64 " %" PRIu64 " %.6f\n", offs[done], us[done],
              (double) ts.tv_sec + ts.tv_nsec / 1e9 - us[done] / 1e6);
    }
  }
  if (sf) fclose(sf);
  nbd_shutdown(h, 0);
  nbd_close(h);
  if (!done) return 1;
  uint64_t sum = 0;
  for (unsigned long i = 0; i < done; i++) sum += us[i];
  qsort(us, done, sizeof *us, cmp_u64);
  printf("n=%lu p50_us=%" PRIu64 " p90_us=%" PRIu64 " p99_us=%" PRIu64
         " max_us=%" PRIu64 " min_us=%" PRIu64 " mean_us=%" PRIu64 "\n",
         done, pct(us, done, 50), pct(us, done, 90), pct(us, done, 99),
         us[done - 1], us[0], sum / done);
  return 0;
}
