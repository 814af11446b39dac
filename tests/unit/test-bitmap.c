/* Unit tests for common/store/bitmap.c: the persistent cached-block bitmap. */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/sha.h>

#include "bitmap.h"
#include "util.h"

#define BS 4096u
#define MiB (UINT64_C(1) << 20)
#define TiB (UINT64_C(1) << 40)
#define SRC "nbd://siteA:10809/vm1 size=1048576"

static char dir[64];
static char errbuf[BITMAP_ERR_MAX];

static const char *tpath(const char *name)
{
  static char buf[4][512];
  static int n;
  char *p = buf[n++ % 4];
  snprintf(p, 512, "%s/%s", dir, name);
  return p;
}

static void setup(void)
{
  strcpy(dir, "/tmp/xnbd-test-bitmap.XXXXXX");
  cr_assert_not_null(mkdtemp(dir));
}

static void teardown(void)
{
  DIR *d = opendir(dir);
  struct dirent *e;
  if (!d)
    return;
  while ((e = readdir(d)) != NULL)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
      unlink(tpath(e->d_name));
  closedir(d);
  rmdir(dir);
}

TestSuite(bitmap, .init = setup, .fini = teardown, .timeout = 120);

static struct bitmap *open_ok(const char *name, uint64_t size, uint32_t bs,
                              const char *src, bool clear)
{
  struct bitmap *bm = bitmap_open(tpath(name), size, bs, src, clear,
                                  errbuf, sizeof errbuf);
  cr_assert_not_null(bm, "bitmap_open failed: %s", errbuf);
  return bm;
}

/* Expects bitmap_open to fail; leaves the message in errbuf. */
static void open_fails(const char *name, uint64_t size, uint32_t bs,
                       const char *src)
{
  struct bitmap *bm = bitmap_open(tpath(name), size, bs, src, false,
                                  errbuf, sizeof errbuf);
  cr_assert_null(bm, "bitmap_open of %s should have failed", name);
  cr_assert(errbuf[0] != '\0', "no error message");
}

static void assert_err_has(const char *needle)
{
  cr_assert(strstr(errbuf, needle) != NULL,
            "error message lacks \"%s\": %s", needle, errbuf);
}

static uint8_t *read_file(const char *path, size_t *len)
{
  struct stat st;
  int fd = open(path, O_RDONLY);
  uint8_t *buf;
  cr_assert(fd >= 0);
  cr_assert(fstat(fd, &st) == 0);
  buf = malloc(st.st_size ? st.st_size : 1);
  cr_assert(pread_all(fd, buf, st.st_size, 0) == 0);
  close(fd);
  *len = st.st_size;
  return buf;
}

static void write_file(const char *path, const void *buf, size_t len)
{
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  cr_assert(fd >= 0);
  cr_assert(pwrite_all(fd, buf, len, 0) == 0);
  close(fd);
}

/* Copies the file as it is on disk now (a crash image, as far as the
 * bitmap's own writes go). */
static void copy_file(const char *from, const char *to)
{
  size_t len;
  uint8_t *buf = read_file(from, &len);
  write_file(to, buf, len);
  free(buf);
}

static void patch_file(const char *path, off_t off, const void *buf,
                       size_t len)
{
  int fd = open(path, O_WRONLY);
  cr_assert(fd >= 0);
  cr_assert(pwrite_all(fd, buf, len, off) == 0);
  close(fd);
}

static off_t file_size(const char *path)
{
  struct stat st;
  cr_assert(stat(path, &st) == 0);
  return st.st_size;
}

/* ------------------------------------------------------------ geometry */

Test(bitmap, creates_file_of_expected_size)
{
  struct bitmap *bm = open_ok("a", 10 * MiB + 1, BS, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), 2561);
  cr_assert_eq(bitmap_block_size(bm), BS);
  cr_assert_eq(bitmap_count(bm), 0);
  bitmap_close(bm);
  /* 2561 bits = 321 bytes, rounded up to one page. */
  cr_assert_eq(file_size(tpath("a")), 4096 + 4096);

  bm = open_ok("b", 1024 * MiB, BS, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), 262144);
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("b")), 4096 + 32768);

  /* 64 KiB blocks, 8 pages + 1 bit of bit array. */
  bm = open_ok("c", (UINT64_C(8) * 4096 * 8 + 1) * 65536 - 100, 65536, SRC,
               false);
  cr_assert_eq(bitmap_nblocks(bm), UINT64_C(8) * 4096 * 8 + 1);
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("c")), 4096 + 9 * 4096);
}

Test(bitmap, on_disk_layout_matches_documentation)
{
  struct bitmap *bm = open_ok("a", 100 * BS, BS, SRC, false);
  uint8_t sum[SHA256_DIGEST_LENGTH];
  size_t len;
  uint8_t *f;

  bitmap_set(bm, 9);
  bitmap_set(bm, 64);
  bitmap_set(bm, 99);
  cr_assert_eq(bitmap_persist(bm), 0);
  f = read_file(tpath("a"), &len);
  cr_assert_eq(len, 8192);
  for (int slot = 0; slot < 2; slot++) {
    const uint8_t *s = f + slot * BITMAP_SLOT_SIZE;
    cr_assert_eq(memcmp(s, "XNBDBMAP", 8), 0);
    cr_assert_eq(get_be32(s + 8), 1);
    cr_assert_eq(get_be32(s + 12), 0);
    cr_assert_eq(get_be64(s + 24), BS);
    cr_assert_eq(get_be64(s + 32), 100 * BS);
    cr_assert_eq(get_be64(s + 40), 100);
    cr_assert_eq(get_be64(s + 48), 4096);
    cr_assert_eq(get_be64(s + 56), 13);
    cr_assert_eq(get_be32(s + 64), strlen(SRC));
    cr_assert_eq(memcmp(s + 68, SRC, strlen(SRC)), 0);
    SHA256(s, 2016, sum);
    cr_assert_eq(memcmp(s + 2016, sum, sizeof sum), 0);
  }
  /* Bit i in byte i / 8, LSB first. */
  cr_assert_eq(f[4096 + 1], 0x02);
  cr_assert_eq(f[4096 + 8], 0x01);
  cr_assert_eq(f[4096 + 12], 0x08);
  for (size_t i = 4096; i < len; i++)
    if (i != 4096 + 1 && i != 4096 + 8 && i != 4096 + 12)
      cr_assert_eq(f[i], 0, "stray byte at %zu", i);
  free(f);
  bitmap_close(bm);
}

Test(bitmap, last_partial_block_counted)
{
  struct bitmap *bm = open_ok("a", 3 * BS + 1, BS, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), 4);
  cr_assert_eq(bitmap_next_clear(bm, 0), 0);
  bitmap_set_range(bm, 0, 3);
  cr_assert_eq(bitmap_next_clear(bm, 0), 3);
  cr_assert_eq(bitmap_mark_complete(bm), -1);
  cr_assert_eq(errno, EBUSY);
  bitmap_set(bm, 3);
  cr_assert_eq(bitmap_count(bm), 4);
  cr_assert(bitmap_test(bm, 3));
  cr_assert_not(bitmap_test(bm, 4));
  cr_assert_eq(bitmap_next_clear(bm, 0), 4);
  cr_assert_eq(bitmap_mark_complete(bm), 0);
  bitmap_close(bm);

  bm = open_ok("a", 3 * BS + 1, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 4);
  cr_assert(bitmap_is_complete(bm));
  bitmap_close(bm);
}

Test(bitmap, rejects_block_size_not_power_of_two_from_4096_to_32M)
{
  static const uint32_t bad[] = { 0, 1, 512, 2048, 4095, 4097, 6144, 12288,
                                  64u << 20, 1u << 31, 0x80000001u };
  static const uint32_t good[] = { 4096, 8192, 65536, 1u << 20, 32u << 20 };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    errno = 0;
    open_fails("a", 1024 * MiB, bad[i], SRC);
    cr_assert_eq(errno, EINVAL);
    assert_err_has("block size");
    assert_err_has("power of two");
  }
  for (size_t i = 0; i < ARRAY_SIZE(good); i++)
    bitmap_close(open_ok("a", 1024 * MiB, good[i], SRC, true));
}

Test(bitmap, huge_image_size_bitmap_geometry)
{
  struct bitmap *bm = open_ok("a", 16 * TiB, BS, SRC, false);
  struct stat st;

  cr_assert_eq(bitmap_nblocks(bm), UINT64_C(1) << 32);
  cr_assert_eq(bitmap_next_set(bm, 0), UINT64_C(1) << 32);
  bitmap_set(bm, 0);
  bitmap_set(bm, (UINT64_C(1) << 32) - 1);
  bitmap_set_range(bm, UINT64_C(3) << 30, 1000);
  cr_assert_eq(bitmap_count(bm), 1002);
  cr_assert_eq(bitmap_next_set(bm, 1), UINT64_C(3) << 30);
  cr_assert_eq(bitmap_next_set(bm, (UINT64_C(3) << 30) + 1000),
               (UINT64_C(1) << 32) - 1);
  cr_assert_eq(bitmap_next_clear(bm, UINT64_C(3) << 30),
               (UINT64_C(3) << 30) + 1000);
  bitmap_close(bm);

  /* 2^32 bits = 512 MiB, sparse on disk. */
  cr_assert(stat(tpath("a"), &st) == 0);
  cr_assert_eq(st.st_size, 4096 + (UINT64_C(1) << 29));
  cr_assert_lt((uint64_t) st.st_blocks * 512, 16 * MiB);

  bm = open_ok("a", 16 * TiB, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 1002);
  cr_assert(bitmap_test(bm, (UINT64_C(1) << 32) - 1));
  cr_assert(bitmap_test(bm, (UINT64_C(3) << 30) + 999));
  cr_assert_not(bitmap_test(bm, (UINT64_C(3) << 30) + 1000));
  bitmap_close(bm);

  /* One byte more: one more (partial) block, no overflow. */
  bm = open_ok("b", 16 * TiB + 1, BS, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), (UINT64_C(1) << 32) + 1);
  bitmap_set(bm, UINT64_C(1) << 32);
  cr_assert_eq(bitmap_next_set(bm, 0), UINT64_C(1) << 32);
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("b")), 4096 + (UINT64_C(1) << 29) + 4096);

  /* A 256 PiB image with the largest blocks (32M). */
  bm = open_ok("c", UINT64_C(1) << 58, 32u << 20, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), UINT64_C(1) << 33);
  bitmap_close(bm);
}

/* --------------------------------------------------------- persistence */

Test(bitmap, set_bits_survive_close_and_reopen)
{
  struct bitmap *bm = open_ok("a", 1000 * BS, BS, SRC, false);
  bitmap_set(bm, 0);
  bitmap_set(bm, 63);
  bitmap_set(bm, 64);
  bitmap_set_range(bm, 500, 300);
  bitmap_set(bm, 999);
  cr_assert_eq(bitmap_count(bm), 304);
  bitmap_close(bm);                  /* close persists */

  bm = open_ok("a", 1000 * BS, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 304);
  cr_assert(bitmap_test(bm, 0));
  cr_assert(bitmap_test(bm, 63));
  cr_assert(bitmap_test(bm, 64));
  cr_assert_not(bitmap_test(bm, 65));
  cr_assert_not(bitmap_test(bm, 499));
  cr_assert(bitmap_test(bm, 500));
  cr_assert(bitmap_test(bm, 799));
  cr_assert_not(bitmap_test(bm, 800));
  cr_assert(bitmap_test(bm, 999));
  cr_assert_str_eq(bitmap_source_id(bm), SRC);
  cr_assert_not(bitmap_is_complete(bm));
  bitmap_close(bm);
}

Test(bitmap, unpersisted_bits_are_lost_but_persisted_survive)
{
  struct bitmap *bm = open_ok("a", 100000 * BS, BS, SRC, false);
  struct bitmap *crashed;

  bitmap_set(bm, 1);
  bitmap_set_range(bm, 40000, 5);
  cr_assert_eq(bitmap_persist(bm), 0);
  bitmap_set(bm, 2);                 /* same page as a persisted bit */
  bitmap_set(bm, 90000);             /* a page never persisted */

  /* "Crash" now: the file as it is on disk, opened by a new process. */
  copy_file(tpath("a"), tpath("crash"));
  crashed = open_ok("crash", 100000 * BS, BS, SRC, false);
  cr_assert_eq(bitmap_count(crashed), 6);
  cr_assert(bitmap_test(crashed, 1));
  cr_assert(bitmap_test(crashed, 40004));
  cr_assert_not(bitmap_test(crashed, 2));
  cr_assert_not(bitmap_test(crashed, 90000));
  bitmap_close(crashed);

  /* The next persist writes the rest. */
  cr_assert_eq(bitmap_persist(bm), 0);
  copy_file(tpath("a"), tpath("crash"));
  crashed = open_ok("crash", 100000 * BS, BS, SRC, false);
  cr_assert_eq(bitmap_count(crashed), 8);
  cr_assert(bitmap_test(crashed, 2));
  cr_assert(bitmap_test(crashed, 90000));
  bitmap_close(crashed);
  bitmap_close(bm);
}

struct hook_state {
  const char *path;
  uint64_t block;
  int calls;
  bool bit_on_disk_at_sync;
  bool fail;
};

static int hook(void *opaque)
{
  struct hook_state *s = opaque;
  size_t len;
  uint8_t *f = read_file(s->path, &len);
  s->calls++;
  if ((f[4096 + s->block / 8] >> (s->block % 8)) & 1)
    s->bit_on_disk_at_sync = true;
  free(f);
  if (s->fail) {
    errno = EIO;
    return -1;
  }
  return 0;
}

Test(bitmap, persist_syncs_data_before_writing_bits)
{
  struct bitmap *bm = open_ok("a", 100000 * BS, BS, SRC, false);
  struct hook_state s = { .path = tpath("a"), .block = 77777 };
  size_t len;
  uint8_t *f;

  bitmap_set_data_sync(bm, hook, &s);
  cr_assert_eq(bitmap_persist(bm), 0);
  cr_assert_eq(s.calls, 0, "nothing dirty: no data sync needed");

  bitmap_set(bm, s.block);
  cr_assert_eq(bitmap_persist(bm), 0);
  cr_assert_eq(s.calls, 1);
  cr_assert_not(s.bit_on_disk_at_sync, "bit written before the data sync");
  f = read_file(tpath("a"), &len);
  cr_assert((f[4096 + s.block / 8] >> (s.block % 8)) & 1);
  free(f);
  bitmap_close(bm);
}

Test(bitmap, failed_data_sync_keeps_bits_dirty)
{
  struct bitmap *bm = open_ok("a", 100000 * BS, BS, SRC, false);
  struct hook_state s = { .path = tpath("a"), .block = 5, .fail = true };
  struct bitmap *copy;

  bitmap_set_data_sync(bm, hook, &s);
  bitmap_set(bm, 5);
  bitmap_set(bm, 99999);
  cr_assert_eq(bitmap_persist(bm), -1);
  cr_assert_eq(errno, EIO);
  copy_file(tpath("a"), tpath("b"));
  copy = open_ok("b", 100000 * BS, BS, SRC, false);
  cr_assert_eq(bitmap_count(copy), 0, "bits written although data sync failed");
  bitmap_close(copy);

  s.fail = false;
  cr_assert_eq(bitmap_persist(bm), 0);
  copy_file(tpath("a"), tpath("b"));
  copy = open_ok("b", 100000 * BS, BS, SRC, false);
  cr_assert_eq(bitmap_count(copy), 2);
  bitmap_close(copy);
  bitmap_close(bm);
}

/* Setter t owns the pages p with p % nthreads == t.  In each it first sets
 * one bit alone (nothing else in that page is set later: a bit lost to a
 * race with persist would never be rewritten), in the first pages also a
 * dense stretch of single bits and overlapping ranges. */
#define BITS_PER_PAGE (4096 * 8)
#define NPAGES 4096
#define DENSE_PAGES 8

struct setter {
  struct bitmap *bm;
  unsigned id, nthreads;
};

static uint64_t lone_bit(uint64_t page)
{
  return page * BITS_PER_PAGE + (page * 7919) % BITS_PER_PAGE;
}

struct persister {
  struct bitmap *bm;
  atomic_bool stop;
  atomic_int rounds;
};

static struct persister *the_persister;

static void *setter_thread(void *arg)
{
  struct setter *s = arg;
  for (uint64_t p = s->id; p < NPAGES; p += s->nthreads) {
    /* Halfway, wait (bounded) for two persists to finish, so persisting
     * provably overlaps setting whatever the scheduler does. */
    if (p / s->nthreads == NPAGES / s->nthreads / 2)
      for (int spin = 0; spin < 2000000 && atomic_load(&the_persister->rounds) < 2; spin++)
        sched_yield();
    if (p < DENSE_PAGES) {
      uint64_t base = p * BITS_PER_PAGE;
      for (uint64_t b = 0; b < BITS_PER_PAGE; b++) {
        if (b % 1000 == 0)
          bitmap_set_range(s->bm, base + b, MIN(37, BITS_PER_PAGE - b));
        else
          bitmap_set(s->bm, base + b);
      }
    }
    else
      bitmap_set(s->bm, lone_bit(p));
  }
  return NULL;
}

static void *persister_thread(void *arg)
{
  struct persister *p = arg;
  while (!atomic_load(&p->stop)) {
    cr_assert_eq(bitmap_persist(p->bm), 0);
    p->rounds++;
  }
  return NULL;
}

Test(bitmap, concurrent_set_and_persist_lose_no_bit)
{
  const uint64_t n = (uint64_t) NPAGES * BITS_PER_PAGE;
  const uint64_t expect = DENSE_PAGES * BITS_PER_PAGE + NPAGES - DENSE_PAGES;
  struct bitmap *bm = open_ok("a", n * BS, BS, SRC, false);
  struct setter s[4];
  struct persister p = { .bm = bm };
  pthread_t st[4], pt;
  struct bitmap *copy;

  the_persister = &p;
  cr_assert_eq(pthread_create(&pt, NULL, persister_thread, &p), 0);
  for (unsigned i = 0; i < 4; i++) {
    s[i] = (struct setter) { .bm = bm, .id = i, .nthreads = 4 };
    cr_assert_eq(pthread_create(&st[i], NULL, setter_thread, &s[i]), 0);
  }
  for (unsigned i = 0; i < 4; i++)
    pthread_join(st[i], NULL);
  atomic_store(&p.stop, true);
  pthread_join(pt, NULL);
  cr_assert_eq(bitmap_count(bm), expect);
  cr_assert_gt(p.rounds, 1);

  /* The file alone (no close) must hold every bit after one more persist. */
  cr_assert_eq(bitmap_persist(bm), 0);
  copy_file(tpath("a"), tpath("b"));
  copy = open_ok("b", n * BS, BS, SRC, false);
  cr_assert_eq(bitmap_next_clear(copy, 0), DENSE_PAGES * BITS_PER_PAGE);
  for (uint64_t pg = DENSE_PAGES; pg < NPAGES; pg++)
    cr_assert(bitmap_test(copy, lone_bit(pg)), "bit of page %" PRIu64
              " lost (persist rounds: %d)", pg, p.rounds);
  cr_assert_eq(bitmap_count(copy), expect);
  bitmap_close(copy);
  bitmap_close(bm);
}

/* ---------------------------------------------------------- scanning */

Test(bitmap, next_clear_and_next_set_scan)
{
  struct bitmap *bm = open_ok("a", 1000 * BS, BS, SRC, false);

  cr_assert_eq(bitmap_next_set(bm, 0), 1000);
  cr_assert_eq(bitmap_next_clear(bm, 0), 0);
  cr_assert_eq(bitmap_next_clear(bm, 999), 999);
  cr_assert_eq(bitmap_next_clear(bm, 1000), 1000);
  cr_assert_eq(bitmap_next_set(bm, 5000), 1000);

  bitmap_set_range(bm, 0, 130);      /* crosses two word boundaries */
  bitmap_set(bm, 200);
  bitmap_set_range(bm, 900, 100);    /* to the end */
  cr_assert_eq(bitmap_count(bm), 231);
  cr_assert_eq(bitmap_next_clear(bm, 0), 130);
  cr_assert_eq(bitmap_next_clear(bm, 64), 130);
  cr_assert_eq(bitmap_next_set(bm, 130), 200);
  cr_assert_eq(bitmap_next_set(bm, 129), 129);
  cr_assert_eq(bitmap_next_clear(bm, 200), 201);
  cr_assert_eq(bitmap_next_set(bm, 201), 900);
  cr_assert_eq(bitmap_next_clear(bm, 900), 1000);
  cr_assert_eq(bitmap_next_set(bm, 999), 999);

  /* Setting again changes nothing. */
  bitmap_set_range(bm, 0, 1000 - 1);
  bitmap_set(bm, 999);
  cr_assert_eq(bitmap_count(bm), 1000);
  cr_assert_eq(bitmap_next_clear(bm, 0), 1000);
  bitmap_close(bm);
}

/* ---------------------------------------------------------- refusals */

Test(bitmap, refuses_other_source_identity)
{
  bitmap_close(open_ok("a", MiB, BS, "nbd://siteA:10809/vm1 size=1048576",
                       false));
  open_fails("a", MiB, BS, "nbd://siteC:10809/vm7 size=1048576");
  cr_assert_eq(errno, EINVAL);
  assert_err_has("\"nbd://siteA:10809/vm1 size=1048576\"");
  assert_err_has("\"nbd://siteC:10809/vm7 size=1048576\"");
  assert_err_has("source identity");
  assert_err_has("--clear-bitmap");
  assert_err_has("--target");
  cr_assert_null(strstr(errbuf, "image size"), "only the identity differs: %s",
                 errbuf);
  /* Refusing did not damage it. */
  bitmap_close(open_ok("a", MiB, BS, "nbd://siteA:10809/vm1 size=1048576",
                       false));
}

Test(bitmap, refuses_other_image_size)
{
  bitmap_close(open_ok("a", 1048576, BS, SRC, false));
  open_fails("a", 2097152, BS, SRC);
  assert_err_has("image size is 1048576 bytes in the bitmap but 2097152");
  assert_err_has("--clear-bitmap");
  cr_assert_null(strstr(errbuf, "block size is"), "%s", errbuf);
  cr_assert_null(strstr(errbuf, "source identity"), "%s", errbuf);
  /* Same number of blocks, one byte less: still another image. */
  open_fails("a", 1048575, BS, SRC);
  assert_err_has("1048575");
}

Test(bitmap, refuses_other_block_size)
{
  bitmap_close(open_ok("a", MiB, BS, SRC, false));
  open_fails("a", MiB, 65536, SRC);
  assert_err_has("block size is 4096 in the bitmap but 65536");
  assert_err_has("--clear-bitmap");
  /* Everything at once is named at once. */
  open_fails("a", 2 * MiB, 8192, "other");
  assert_err_has("image size");
  assert_err_has("block size");
  assert_err_has("\"other\"");
}

Test(bitmap, refuses_bad_magic)
{
  static uint8_t junk[3 * 4096];
  memset(junk, 'x', sizeof junk);
  write_file(tpath("a"), junk, sizeof junk);
  open_fails("a", MiB, BS, SRC);
  assert_err_has("not an xnbd bitmap");
  assert_err_has("--clear-bitmap");
  /* A short file is not one either. */
  write_file(tpath("b"), junk, 100);
  open_fails("b", MiB, BS, SRC);
  assert_err_has("not an xnbd bitmap");
  /* Refusing left the file alone. */
  cr_assert_eq(file_size(tpath("a")), sizeof junk);
}

Test(bitmap, refuses_other_format_version)
{
  struct bitmap *bm = open_ok("a", MiB, BS, SRC, false);
  size_t len;
  uint8_t *f;
  bitmap_close(bm);
  f = read_file(tpath("a"), &len);
  for (int i = 0; i < 2; i++) {
    uint8_t *s = f + i * BITMAP_SLOT_SIZE;
    put_be32(s + 8, 2);
    SHA256(s, 2016, s + 2016);
  }
  write_file(tpath("a"), f, len);
  free(f);
  open_fails("a", MiB, BS, SRC);
  assert_err_has("format version 2");
  assert_err_has("--clear-bitmap");
}

Test(bitmap, detects_corrupted_header_checksum)
{
  struct bitmap *bm = open_ok("a", MiB, BS, SRC, false);
  uint8_t b = 'Z';
  bitmap_close(bm);
  /* Change a byte of the source identity in both copies: the fields
   * still parse, only the checksums tell. */
  patch_file(tpath("a"), 68 + 3, &b, 1);
  patch_file(tpath("a"), 2048 + 68 + 3, &b, 1);
  open_fails("a", MiB, BS, SRC);
  cr_assert_eq(errno, EUCLEAN);
  assert_err_has("damaged");
  assert_err_has("checksum");
  assert_err_has("--clear-bitmap");
}

Test(bitmap, survives_torn_header)
{
  static const uint8_t zeros[1024];
  struct bitmap *bm = open_ok("a", 10 * BS, BS, SRC, false);
  bitmap_set_range(bm, 0, 10);
  cr_assert_eq(bitmap_mark_complete(bm), 0);   /* writes copy B, seq 2 */
  cr_assert(bitmap_is_complete(bm));
  bitmap_close(bm);

  /* The complete-flag write to copy B was torn: back to copy A, which
   * says "not complete", while the bits say every block is present. */
  copy_file(tpath("a"), tpath("b"));
  patch_file(tpath("b"), 2048 + 1024, zeros, sizeof zeros);
  bm = open_ok("b", 10 * BS, BS, SRC, false);
  cr_assert_not(bitmap_is_complete(bm));
  cr_assert_eq(bitmap_count(bm), 10);
  /* Marking complete again writes the torn copy and works. */
  cr_assert_eq(bitmap_mark_complete(bm), 0);
  bitmap_close(bm);
  bm = open_ok("b", 10 * BS, BS, SRC, false);
  cr_assert(bitmap_is_complete(bm));
  bitmap_close(bm);

  /* Copy A damaged instead: copy B (the newer) is used. */
  copy_file(tpath("a"), tpath("c"));
  patch_file(tpath("c"), 100, zeros, 100);
  bm = open_ok("c", 10 * BS, BS, SRC, false);
  cr_assert(bitmap_is_complete(bm));
  bitmap_close(bm);

  /* A fresh file with copy A damaged: copy B holds the same header. */
  bm = open_ok("d", 10 * BS, BS, SRC, false);
  bitmap_set(bm, 3);
  bitmap_close(bm);
  patch_file(tpath("d"), 0, zeros, 8);
  bm = open_ok("d", 10 * BS, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 1);
  cr_assert(bitmap_test(bm, 3));
  bitmap_close(bm);
}

Test(bitmap, clear_starts_over)
{
  struct bitmap *bm = open_ok("a", MiB, BS, SRC, false);
  bitmap_set_range(bm, 0, 256);
  cr_assert_eq(bitmap_mark_complete(bm), 0);
  bitmap_close(bm);

  bm = open_ok("a", MiB, BS, SRC, true);
  cr_assert_eq(bitmap_count(bm), 0);
  cr_assert_not(bitmap_is_complete(bm));
  bitmap_close(bm);
  bm = open_ok("a", MiB, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 0);
  cr_assert_not(bitmap_is_complete(bm));
  bitmap_close(bm);

  /* Clearing also takes a new geometry and source... */
  bm = open_ok("a", 64 * MiB, 65536, "other", true);
  cr_assert_eq(bitmap_nblocks(bm), 1024);
  bitmap_close(bm);
  bitmap_close(open_ok("a", 64 * MiB, 65536, "other", false));
  /* ...and a damaged file. */
  patch_file(tpath("a"), 0, "garbage!", 8);
  patch_file(tpath("a"), 2048, "garbage!", 8);
  open_fails("a", 64 * MiB, 65536, "other");
  bitmap_close(open_ok("a", 64 * MiB, 65536, "other", true));
  bitmap_close(open_ok("a", 64 * MiB, 65536, "other", false));
}

Test(bitmap, second_open_of_same_file_is_refused)
{
  struct bitmap *bm = open_ok("a", MiB, BS, SRC, false);
  errno = 0;
  open_fails("a", MiB, BS, SRC);
  cr_assert_eq(errno, EBUSY);
  assert_err_has("in use");
  bitmap_close(bm);
  bitmap_close(open_ok("a", MiB, BS, SRC, false));
}

Test(bitmap, refuses_truncated_file)
{
  bitmap_close(open_ok("a", 100 * MiB, BS, SRC, false));
  cr_assert(truncate(tpath("a"), 4096 + 100) == 0);
  open_fails("a", 100 * MiB, BS, SRC);
  assert_err_has("damaged");
  assert_err_has("--clear-bitmap");
}

Test(bitmap, empty_file_is_created_and_long_identity_refused)
{
  char longid[BITMAP_SOURCE_ID_MAX + 2];
  struct bitmap *bm;

  write_file(tpath("a"), "", 0);
  bm = open_ok("a", MiB, BS, NULL, false);
  cr_assert_str_eq(bitmap_source_id(bm), "");
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("a")), 8192);

  memset(longid, 'i', sizeof longid - 1);
  longid[sizeof longid - 1] = '\0';
  open_fails("b", MiB, BS, longid);
  assert_err_has("1025 bytes");
  longid[BITMAP_SOURCE_ID_MAX] = '\0';   /* exactly the maximum fits */
  bitmap_close(open_ok("b", MiB, BS, longid, false));
  bm = open_ok("b", MiB, BS, longid, false);
  cr_assert_str_eq(bitmap_source_id(bm), longid);
  bitmap_close(bm);
}

Test(bitmap, empty_image_has_no_blocks)
{
  struct bitmap *bm = open_ok("a", 0, BS, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), 0);
  cr_assert_eq(bitmap_next_clear(bm, 0), 0);
  cr_assert_eq(bitmap_mark_complete(bm), 0);
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("a")), 4096);
  bm = open_ok("a", 0, BS, SRC, false);
  cr_assert(bitmap_is_complete(bm));
  bitmap_close(bm);
}
