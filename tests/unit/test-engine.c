/* Unit tests of the engine's block states and fetch splitting/coalescing,
 * through its backend interface, against an nbdkit source on a private
 * unix socket.  Fetch counts come from the engine's statistics. */
#include <criterion/criterion.h>

#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine.h"
#include "host.h"
#include "log.h"
#include "nbd-proto.h"
#include "workq.h"
#include "util.h"

#define BS 4096
#define NBLOCKS 256
#define SIZE ((uint64_t) NBLOCKS * BS)

static char dir[64];
static pid_t nbdkit_pid;
static struct workq *wq;
static struct engine *eng;
static char src_path[128];

/* Source byte at offset: never zero, so holes are never mistaken. */
static uint8_t src_byte(uint64_t off) { return (uint8_t) (off * 7 / 512 + 1) | 1; }

static void start_source(void)
{
  char sock[128], pidf[128], uri[256];
  snprintf(src_path, sizeof src_path, "%s/src.img", dir);
  FILE *f = fopen(src_path, "w");
  cr_assert(f);
  for (uint64_t o = 0; o < SIZE; o++) fputc(src_byte(o), f);
  fclose(f);
  snprintf(sock, sizeof sock, "%s/src.sock", dir);
  snprintf(pidf, sizeof pidf, "%s/src.pid", dir);
  nbdkit_pid = fork();
  if (nbdkit_pid == 0) {
    int null = open("/dev/null", O_WRONLY);
    dup2(null, 2);
    execlp("nbdkit", "nbdkit", "-f", "-r", "-U", sock, "-P", pidf, "file", src_path, NULL);
    _exit(127);
  }
  for (int i = 0; i < 200 && access(pidf, F_OK) != 0; i++) usleep(20000);
  cr_assert_eq(access(pidf, F_OK), 0, "nbdkit did not start");
  (void) uri;
}

static void setup(void)
{
  strcpy(dir, "/tmp/xnbd-test-engine.XXXXXX");
  cr_assert(mkdtemp(dir));
  start_source();
  wq = workq_new(2, "t");
  cr_assert(wq);
}

static struct engine *open_engine(uint32_t max_fetch)
{
  char target[256], cache[128], bm[128], err[4096];
  snprintf(target, sizeof target, "nbd+unix:///?socket=%s/src.sock", dir);
  snprintf(cache, sizeof cache, "%s/cache.img", dir);
  snprintf(bm, sizeof bm, "%s/cache.bm", dir);
  struct engine_config c = {
    .target = target, .cache_path = cache, .bitmap_path = bm, .block_size = BS,
    .connections = 1, .max_fetch = max_fetch, .source_timeout_s = 30, .wq = wq,
  };
  struct engine *e = engine_open(&c, err, sizeof err);
  cr_assert(e, "engine_open: %s", err);
  return e;
}

static struct engine_host *host;

static void teardown(void)
{
  char cmd[128];
  host_close(host);
  host = NULL;
  log_set_hook(NULL);
  engine_close(eng);
  eng = NULL;
  workq_free(wq);
  if (nbdkit_pid > 0) { kill(nbdkit_pid, SIGTERM); waitpid(nbdkit_pid, NULL, 0); }
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) { /* best effort */ }
}

/* Synchronous requests through the backend interface. */
struct sync { pthread_mutex_t m; pthread_cond_t c; bool done; int err; };

static void sync_done(struct xreq *r, int err)
{
  struct sync *s = r->fe_priv;
  pthread_mutex_lock(&s->m);
  s->done = true;
  s->err = err;
  pthread_cond_signal(&s->c);
  pthread_mutex_unlock(&s->m);
}

static struct xreq *req(enum xreq_type t, uint64_t off, uint64_t len, void *buf,
                        struct sync *s)
{
  struct xreq *r = calloc(1, sizeof *r);
  *s = (struct sync) { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, 0 };
  r->type = t; r->offset = off; r->length = len; r->buf = buf;
  r->done = sync_done; r->fe_priv = s;
  return r;
}

static void submit(struct xreq *r)
{
  const struct xnbd_backend_ops *o = &engine_backend_ops;
  switch (r->type) {
  case XREQ_READ: o->pread(eng, r); break;
  case XREQ_WRITE: o->pwrite(eng, r); break;
  case XREQ_TRIM: o->trim(eng, r); break;
  case XREQ_ZERO: o->zero(eng, r); break;
  case XREQ_FLUSH: o->flush(eng, r); break;
  case XREQ_CACHE: o->cache(eng, r); break;
  default: cr_assert_fail("unexpected type");
  }
}

static int wait_req(struct xreq *r, struct sync *s)
{
  pthread_mutex_lock(&s->m);
  while (!s->done) pthread_cond_wait(&s->c, &s->m);
  pthread_mutex_unlock(&s->m);
  int err = s->err;
  free(r->extents);
  free(r);
  return err;
}

static int run(enum xreq_type t, uint64_t off, uint64_t len, void *buf)
{
  struct sync s;
  struct xreq *r = req(t, off, len, buf, &s);
  submit(r);
  return wait_req(r, &s);
}

static struct engine_stats stats(void)
{
  struct engine_stats st;
  engine_get_stats(eng, &st);
  return st;
}

static void expect_source(const uint8_t *buf, uint64_t off, uint64_t len)
{
  for (uint64_t i = 0; i < len; i++)
    if (buf[i] != src_byte(off + i))
      cr_assert_fail("byte at %" PRIu64 " is %u, source has %u", off + i, buf[i],
                     src_byte(off + i));
}

TestSuite(engine, .init = setup, .fini = teardown, .timeout = 60);

Test(engine, read_of_missing_block_fetches_once_and_keeps_it)
{
  uint8_t buf[BS];
  eng = open_engine(1 << 20);
  cr_assert_eq(stats().blocks_present, 0);
  cr_assert_eq(run(XREQ_READ, 5 * BS, BS, buf), 0);
  expect_source(buf, 5 * BS, BS);
  cr_assert_eq(stats().fetches_ondemand, 1);
  cr_assert_eq(stats().blocks_present, 1);
  cr_assert_eq(run(XREQ_READ, 5 * BS, BS, buf), 0);     /* now local */
  cr_assert_eq(stats().fetches_ondemand, 1);
  cr_assert_eq(stats().bytes_fetched, BS);
}

Test(engine, adjacent_missing_blocks_coalesce_into_one_fetch)
{
  static uint8_t buf[16 * BS];
  eng = open_engine(1 << 20);
  cr_assert_eq(run(XREQ_READ, 10 * BS, 16 * BS, buf), 0);
  expect_source(buf, 10 * BS, 16 * BS);
  cr_assert_eq(stats().fetches_ondemand, 1);
  cr_assert_eq(stats().blocks_present, 16);
}

Test(engine, read_larger_than_max_fetch_is_split)
{
  static uint8_t buf[64 * BS];
  eng = open_engine(16 * BS);                  /* 64 KiB per fetch */
  cr_assert_eq(run(XREQ_READ, 0, 64 * BS, buf), 0);
  expect_source(buf, 0, 64 * BS);
  cr_assert_eq(stats().fetches_ondemand, 4);
}

Test(engine, present_blocks_split_a_read_into_missing_runs_only)
{
  static uint8_t buf[12 * BS];
  eng = open_engine(1 << 20);
  cr_assert_eq(run(XREQ_READ, 4 * BS, BS, buf), 0);      /* block 4 present */
  cr_assert_eq(run(XREQ_READ, 8 * BS, BS, buf), 0);      /* block 8 present */
  cr_assert_eq(stats().fetches_ondemand, 2);
  cr_assert_eq(run(XREQ_READ, 0, 12 * BS, buf), 0);      /* runs 0-3, 5-7, 9-11 */
  expect_source(buf, 0, 12 * BS);
  cr_assert_eq(stats().fetches_ondemand, 5);
  cr_assert_eq(stats().bytes_fetched, 12 * BS);          /* nothing twice (I3) */
}

Test(engine, concurrent_reads_of_a_missing_block_share_one_fetch)
{
  static uint8_t bufs[8][BS];
  struct sync s[8];
  struct xreq *r[8];
  eng = open_engine(1 << 20);
  /* All are submitted before any can complete: the fetch needs a source
   * round trip, and the engine joins requests to a fetch in flight. */
  for (int i = 0; i < 8; i++) r[i] = req(XREQ_READ, 20 * BS, BS, bufs[i], &s[i]);
  for (int i = 0; i < 8; i++) submit(r[i]);
  for (int i = 0; i < 8; i++) {
    cr_assert_eq(wait_req(r[i], &s[i]), 0);
    expect_source(bufs[i], 20 * BS, BS);
  }
  cr_assert_eq(stats().bytes_fetched, BS, "a block crossed more than once");
}

Test(engine, whole_block_write_to_missing_block_needs_no_fetch)
{
  uint8_t w[BS], r[BS];
  memset(w, 0xab, BS);
  eng = open_engine(1 << 20);
  cr_assert_eq(run(XREQ_WRITE, 30 * BS, BS, w), 0);
  cr_assert_eq(stats().fetches_ondemand, 0);
  cr_assert_eq(stats().blocks_present, 1);
  cr_assert_eq(run(XREQ_READ, 30 * BS, BS, r), 0);
  cr_assert_arr_eq(r, w, BS);
}

Test(engine, partial_write_to_missing_block_fetches_then_applies)
{
  uint8_t w[100], r[BS];
  memset(w, 0xcd, sizeof w);
  eng = open_engine(1 << 20);
  cr_assert_eq(run(XREQ_WRITE, 40 * BS + 1000, sizeof w, w), 0);
  cr_assert_eq(stats().fetches_ondemand, 1);
  cr_assert_eq(run(XREQ_READ, 40 * BS, BS, r), 0);
  expect_source(r, 40 * BS, 1000);
  cr_assert_arr_eq(r + 1000, w, sizeof w);
  expect_source(r + 1100, 40 * BS + 1100, BS - 1100);
}

Test(engine, write_straddling_two_missing_blocks_fetches_both_ends_only)
{
  static uint8_t w[3 * BS], r[4 * BS];
  memset(w, 0x5a, sizeof w);
  eng = open_engine(1 << 20);
  /* blocks 50 (partial), 51, 52 (whole), 53 (partial) */
  cr_assert_eq(run(XREQ_WRITE, 50 * BS + 2048, sizeof w, w), 0);
  cr_assert_eq(stats().bytes_fetched, 2 * BS);
  cr_assert_eq(run(XREQ_READ, 50 * BS, 4 * BS, r), 0);
  expect_source(r, 50 * BS, 2048);
  cr_assert_arr_eq(r + 2048, w, sizeof w);
  expect_source(r + 2048 + sizeof w, 50 * BS + 2048 + sizeof w, 2048);
}

Test(engine, trim_and_zero_of_whole_missing_blocks_need_no_fetch)
{
  static uint8_t r[4 * BS], zero[4 * BS];
  eng = open_engine(1 << 20);
  cr_assert_eq(run(XREQ_ZERO, 60 * BS, 2 * BS, NULL), 0);
  cr_assert_eq(run(XREQ_TRIM, 62 * BS, 2 * BS, NULL), 0);
  cr_assert_eq(stats().bytes_fetched, 0);
  cr_assert_eq(stats().blocks_present, 4);
  cr_assert_eq(run(XREQ_READ, 60 * BS, 4 * BS, r), 0);
  cr_assert_arr_eq(r, zero, 4 * BS);
}

Test(engine, cache_request_fetches_without_reading)
{
  eng = open_engine(1 << 20);
  cr_assert_eq(run(XREQ_CACHE, 70 * BS, 8 * BS, NULL), 0);
  cr_assert_eq(stats().blocks_present, 8);
  cr_assert_eq(stats().fetches_ondemand, 1);
}

Test(engine, flush_persists_bits_of_written_blocks)
{
  uint8_t w[BS];
  memset(w, 0x77, BS);
  eng = open_engine(1 << 20);
  cr_assert_eq(run(XREQ_WRITE, 80 * BS, BS, w), 0);
  cr_assert_eq(run(XREQ_FLUSH, 0, 0, NULL), 0);
  engine_close(eng);
  /* Reopened: the written block is present and not fetched again. */
  eng = open_engine(1 << 20);
  uint8_t r[BS];
  cr_assert_eq(stats().blocks_present, 1);
  cr_assert_eq(run(XREQ_READ, 80 * BS, BS, r), 0);
  cr_assert_arr_eq(r, w, BS);
  cr_assert_eq(stats().bytes_fetched, 0);
}

Test(engine, detach_is_refused_while_blocks_are_missing)
{
  char err[512];
  eng = open_engine(1 << 20);
  cr_assert_eq(engine_detach(eng, false, err, sizeof err), -1);
  cr_assert(strstr(err, "missing"), "message: %s", err);
  cr_assert_eq(engine_bg_start(eng, err, sizeof err), 0);
  for (int i = 0; i < 600 && stats().state != ENGINE_COMPLETE; i++) usleep(10000);
  cr_assert_eq(stats().state, ENGINE_COMPLETE);
  cr_assert_eq(stats().bytes_fetched + stats().bytes_zero_skipped, SIZE);
  cr_assert_eq(engine_detach(eng, false, err, sizeof err), 0, "%s", err);
  cr_assert_eq(stats().state, ENGINE_DETACHED);
}

/* ---------- the host adapter (a synchronous caller, as nbdkit is) ---------- */

static struct engine_host *open_host(void)
{
  char target[256], cache[128], bm[128], err[4096];
  snprintf(target, sizeof target, "nbd+unix:///?socket=%s/src.sock", dir);
  snprintf(cache, sizeof cache, "%s/host-cache.img", dir);
  snprintf(bm, sizeof bm, "%s/host-cache.bm", dir);
  struct engine_config c = {
    .target = target, .cache_path = cache, .bitmap_path = bm, .block_size = BS,
    .connections = 2, .source_timeout_s = 30,
  };
  struct engine_host *h = host_open(&c, 2, err, sizeof err);
  cr_assert(h, "host_open: %s", err);
  eng = NULL;
  return h;
}

static struct engine_stats host_stats(void)
{
  struct engine_stats st;
  engine_get_stats(host_engine(host), &st);
  return st;
}

static int seen_info;
static void hook(enum log_level lvl, const char *msg)
{
  if (lvl == LOG_LVL_INFO && strstr(msg, "blocks of 4096 bytes present")) seen_info++;
}

Test(engine, host_serves_reads_writes_and_flush_synchronously)
{
  static uint8_t buf[8 * BS], w[100];
  log_set_hook(hook);
  host = open_host();
  cr_assert_eq(seen_info, 1, "the engine's start-up line did not reach the log hook");
  cr_assert_eq(host_size(host), SIZE);
  cr_assert_eq(host_pread(host, buf, 8 * BS, 3 * BS), 0);
  expect_source(buf, 3 * BS, 8 * BS);
  /* A partial write of a missing block: fetched first, then applied (I1). */
  memset(w, 0xAB, sizeof w);
  cr_assert_eq(host_pwrite(host, w, sizeof w, 40 * BS + 10, true), 0);
  cr_assert_eq(host_pread(host, buf, BS, 40 * BS), 0);
  expect_source(buf, 40 * BS, 10);
  cr_assert_eq(memcmp(buf + 10, w, sizeof w), 0);
  expect_source(buf + 110, 40 * BS + 110, BS - 110);
  cr_assert_eq(host_flush(host), 0);
  cr_assert_eq(host_cache(host, 4 * BS, 60 * BS), 0);
  cr_assert_eq(host_stats().blocks_present, 8 + 1 + 4);
  errno = 0;
  cr_assert_eq(host_pread(host, buf, BS, SIZE), -1);
  cr_assert_eq(errno, EINVAL);
}

Test(engine, host_fast_zero_of_a_partial_missing_block_is_refused)
{
  static uint8_t buf[2 * BS];
  host = open_host();
  errno = 0;
  cr_assert_eq(host_zero(host, BS, 100 * BS + 512, false, false, true), -1);
  cr_assert_eq(errno, ENOTSUP, "a fast zero needing a fetch must fail fast");
  cr_assert_eq(host_stats().bytes_fetched, 0);
  /* Whole missing blocks: no source needed, fast is fine. */
  cr_assert_eq(host_zero(host, 2 * BS, 100 * BS, true, false, true), 0);
  cr_assert_eq(host_pread(host, buf, 2 * BS, 100 * BS), 0);
  for (int i = 0; i < 2 * BS; i++) cr_assert_eq(buf[i], 0);
  cr_assert_eq(host_stats().bytes_fetched, 0);
}

static int count_runs(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  uint64_t *covered = opaque;
  cr_assert_eq(off, *covered, "runs must be consecutive");
  *covered += len;
  return 0;
}

Test(engine, host_extents_cover_the_range)
{
  uint8_t buf[BS];
  host = open_host();
  cr_assert_eq(host_pread(host, buf, BS, 2 * BS), 0);   /* one present block */
  uint64_t covered = 0;
  cr_assert_eq(host_extents(host, 8 * BS, 0, false, count_runs, &covered), 0);
  cr_assert_eq(covered, 8 * BS);
}
