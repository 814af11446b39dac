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

/* Bitwise CRC32C, written from the definition in bitmap.h (independent
 * of the table-driven one in bitmap.c). */
static uint32_t crc32c_ref(uint32_t crc, const void *buf, size_t len)
{
  const uint8_t *p = buf;
  crc = ~crc;
  while (len--) {
    crc ^= *p++;
    for (int k = 0; k < 8; k++)
      crc = (crc >> 1) ^ (0x82F63B78u & -(crc & 1));
  }
  return ~crc;
}

#define CB BITMAP_CHUNK_BLOCKS
#define SLOT_OFF(c, slot) (4096 + (uint64_t) (c) * 8192 + (slot) * 4096)

/* Where the bit of block b lies in slot `slot` of its chunk. */
static uint64_t bit_byte(uint64_t b, int slot)
{
  uint64_t j = (b % CB) / 8;
  return SLOT_OFF(b / CB, slot) + (j / 496) * 512 + 16 + j % 496;
}

static bool bit_in_slot(const uint8_t *f, uint64_t b, int slot)
{
  return (f[bit_byte(b, slot)] >> (b % 8)) & 1;
}

/* Checks every sector of a slot as documented; returns its generation
 * (0: never written). */
static uint64_t slot_gen(const uint8_t *f, uint64_t c, int slot)
{
  static const uint8_t zeros[512];
  uint64_t gen = 0;
  for (int s = 0; s < 8; s++) {
    uint64_t off = SLOT_OFF(c, slot) + s * 512;
    const uint8_t *sec = f + off;
    uint8_t ob[8];
    uint32_t crc;
    if (memcmp(sec, zeros, 512) == 0) {
      cr_assert_eq(gen, 0, "chunk %" PRIu64 " slot %d: sector %d never "
                   "written but others are", c, slot, s);
      continue;
    }
    put_be64(ob, off);
    crc = crc32c_ref(0, ob, 8);
    crc = crc32c_ref(crc, sec, 8);
    crc = crc32c_ref(crc, sec + 12, 500);
    cr_assert_eq(get_be32(sec + 8), crc, "chunk %" PRIu64 " slot %d sector "
                 "%d: CRC32C", c, slot, s);
    cr_assert_eq(get_be32(sec + 12), 0);
    cr_assert_gt(get_be64(sec), 0);
    if (s > 0 && gen == 0)
      cr_assert_fail("chunk %" PRIu64 " slot %d: sector %d written, "
                     "sector 0 not", c, slot, s);
    if (gen)
      cr_assert_eq(get_be64(sec), gen, "one generation per slot");
    gen = get_be64(sec);
  }
  return gen;
}

/* The slot holding the newest copy of chunk c (-1: none). */
static int newest_slot(const uint8_t *f, uint64_t c)
{
  uint64_t a = slot_gen(f, c, 0), b = slot_gen(f, c, 1);
  if (!a && !b)
    return -1;
  return b > a;
}

static bool bit_on_disk(const uint8_t *f, uint64_t b)
{
  int s = newest_slot(f, b / CB);
  return s >= 0 && bit_in_slot(f, b, s);
}

/* ------------------------------------------------------------ geometry */

Test(bitmap, creates_file_of_expected_size)
{
  struct bitmap *bm = open_ok("a", 10 * MiB + 1, BS, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), 2561);
  cr_assert_eq(bitmap_block_size(bm), BS);
  cr_assert_eq(bitmap_count(bm), 0);
  bitmap_close(bm);
  /* 2561 blocks: one chunk of 31744, two 4096-byte slots. */
  cr_assert_eq(file_size(tpath("a")), 4096 + 8192);

  bm = open_ok("b", 1024 * MiB, BS, SRC, false);
  cr_assert_eq(bitmap_nblocks(bm), 262144);
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("b")), 4096 + 9 * 8192);   /* 8.26 chunks */

  /* 64 KiB blocks, exactly 8 chunks + 1 block. */
  bm = open_ok("c", (UINT64_C(8) * CB + 1) * 65536 - 100, 65536, SRC,
               false);
  cr_assert_eq(bitmap_nblocks(bm), UINT64_C(8) * CB + 1);
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("c")), 4096 + 9 * 8192);
  bm = open_ok("d", UINT64_C(8) * CB * BS, BS, SRC, false);
  bitmap_close(bm);
  cr_assert_eq(file_size(tpath("d")), 4096 + 8 * 8192);
}

Test(bitmap, on_disk_layout_matches_documentation)
{
  const uint64_t n = CB + 100;         /* two chunks */
  struct bitmap *bm = open_ok("a", n * BS, BS, SRC, false);
  static const uint64_t bits1[] = { 9, 64, 99, CB - 1, CB + 3 };
  uint8_t sum[SHA256_DIGEST_LENGTH];
  uint64_t g1;
  size_t len;
  uint8_t *f, *f1;

  for (size_t i = 0; i < ARRAY_SIZE(bits1); i++)
    bitmap_set(bm, bits1[i]);
  cr_assert_eq(bitmap_persist(bm), 0);
  f1 = f = read_file(tpath("a"), &len);
  cr_assert_eq(len, 4096 + 2 * 8192);
  for (int slot = 0; slot < 2; slot++) {
    const uint8_t *s = f + slot * BITMAP_SLOT_SIZE;
    cr_assert_eq(memcmp(s, "XNBDBMAP", 8), 0);
    cr_assert_eq(get_be32(s + 8), 2);
    cr_assert_eq(get_be32(s + 12), 0);
    cr_assert_eq(get_be64(s + 24), BS);
    cr_assert_eq(get_be64(s + 32), n * BS);
    cr_assert_eq(get_be64(s + 40), n);
    cr_assert_eq(get_be64(s + 48), 4096);
    cr_assert_eq(get_be64(s + 56), (n + 7) / 8);
    cr_assert_eq(get_be32(s + 64), strlen(SRC));
    cr_assert_eq(memcmp(s + 68, SRC, strlen(SRC)), 0);
    cr_assert_eq(get_be32(s + 1092), 31744);
    SHA256(s, 2016, sum);
    cr_assert_eq(memcmp(s + 2016, sum, sizeof sum), 0);
  }
  /* The first write of each chunk goes to slot A, one generation. */
  g1 = slot_gen(f, 0, 0);
  cr_assert_gt(g1, 0);
  cr_assert_eq(slot_gen(f, 1, 0), g1);
  cr_assert_eq(slot_gen(f, 0, 1), 0);
  cr_assert_eq(slot_gen(f, 1, 1), 0);
  /* Chunk byte j in sector j / 496 at 16 + j % 496, LSB first. */
  cr_assert_eq(f[SLOT_OFF(0, 0) + 16 + 1], 0x02);               /* 9 */
  cr_assert_eq(f[SLOT_OFF(0, 0) + 16 + 8], 0x01);               /* 64 */
  cr_assert_eq(f[SLOT_OFF(0, 0) + 16 + 12], 0x08);              /* 99 */
  cr_assert_eq(f[SLOT_OFF(0, 0) + 7 * 512 + 16 + 495], 0x80);   /* CB-1 */
  cr_assert_eq(f[SLOT_OFF(1, 0) + 16], 0x08);                   /* CB+3 */
  for (size_t i = 4096; i < len; i++) {
    uint64_t in = (i - 4096) % 512;
    bool known = false;
    for (size_t k = 0; k < ARRAY_SIZE(bits1); k++)
      known |= i == bit_byte(bits1[k], 0);
    if (in >= 16 && !known)
      cr_assert_eq(f[i], 0, "stray byte at %zu", i);
  }

  /* The next write of chunk 0 goes to slot B with a newer generation;
   * slot A and chunk 1 (not dirty) are left alone. */
  bitmap_set(bm, 4000);
  cr_assert_eq(bitmap_persist(bm), 0);
  f = read_file(tpath("a"), &len);
  cr_assert_gt(slot_gen(f, 0, 1), g1);
  cr_assert_eq(memcmp(f, f1, 4096 + 4096), 0, "slot A of chunk 0 rewritten");
  cr_assert_eq(memcmp(f + SLOT_OFF(1, 0), f1 + SLOT_OFF(1, 0), 8192), 0);
  cr_assert_eq(f[SLOT_OFF(0, 1) + 512 + 16 + 4], 0x01);         /* 4000 */
  for (size_t k = 0; k < ARRAY_SIZE(bits1); k++)
    if (bits1[k] < CB)
      cr_assert(bit_in_slot(f, bits1[k], 1));
  free(f);
  free(f1);
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

  /* 2^32 bits = 135301 chunks of 8 KiB, sparse on disk. */
  cr_assert(stat(tpath("a"), &st) == 0);
  cr_assert_eq(st.st_size, 4096 + UINT64_C(135301) * 8192);
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
  cr_assert_eq(file_size(tpath("b")), 4096 + UINT64_C(135301) * 8192);

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
  if (bit_on_disk(f, s->block))
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
  cr_assert(bit_on_disk(f, s.block));
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
    put_be32(s + 8, 3);
    SHA256(s, 2016, s + 2016);
  }
  write_file(tpath("a"), f, len);
  free(f);
  open_fails("a", MiB, BS, SRC);
  assert_err_has("format version 3");
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
  cr_assert_eq(file_size(tpath("a")), 4096 + 8192);

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

/* ------------------------------------------------ checksums (format 2) */

Test(bitmap, crc32c_matches_reference_values)
{
  static uint8_t buf[1000];
  cr_assert_eq(bitmap_crc32c(0, "123456789", 9), 0xE3069283u);
  cr_assert_eq(bitmap_crc32c(0, "", 0), 0);
  for (size_t i = 0; i < sizeof buf; i++)
    buf[i] = (uint8_t) (i * 131 + 7);
  for (size_t len = 0; len < sizeof buf; len += 37) {
    cr_assert_eq(bitmap_crc32c(0, buf, len), crc32c_ref(0, buf, len));
    /* Continuing a checksum equals computing it in one go. */
    cr_assert_eq(bitmap_crc32c(bitmap_crc32c(0, buf, len / 3), buf + len / 3,
                               len - len / 3), crc32c_ref(0, buf, len));
  }
}

/* A bitmap like the proxy's after a partial copy: 128 MiB of 4 KiB blocks
 * (32768 blocks, 2 chunks), the first blocks present, saved several
 * times (so both slots of chunk 0 are written), closed cleanly. */
#define PROXY_SIZE (128 * MiB)
static uint64_t make_partial(const char *name)
{
  struct bitmap *bm = open_ok(name, PROXY_SIZE, BS, SRC, true);
  for (int round = 0; round < 5; round++) {
    bitmap_set_range(bm, (uint64_t) round * 300, 300);
    cr_assert_eq(bitmap_persist(bm), 0);
  }
  bitmap_set(bm, 32767);
  bitmap_close(bm);
  return 1501;
}

static void flip_byte(const char *name, off_t off, uint8_t v)
{
  size_t len;
  uint8_t *f = read_file(tpath(name), &len);
  cr_assert_lt((size_t) off, len);
  cr_assert_neq(f[off], v, "the byte at %jd is already 0x%02x: the test "
                "would change nothing", (intmax_t) off, v);
  free(f);
  patch_file(tpath(name), off, &v, 1);
}

static bool same_file(const char *a, const char *b)
{
  size_t la, lb;
  uint8_t *fa = read_file(tpath(a), &la), *fb = read_file(tpath(b), &lb);
  bool same = la == lb && memcmp(fa, fb, la) == 0;
  free(fa);
  free(fb);
  return same;
}

Test(bitmap, refuses_flipped_bit_byte)
{
  struct bitmap *bm;
  uint64_t n = make_partial("a");

  bm = open_ok("a", PROXY_SIZE, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), n);
  bitmap_close(bm);
  /* The reliability issue's reproducer: one byte of the bit array set to
   * 0xff (chunk 0, slot A, sector 5: blocks 23232-23239). */
  flip_byte("a", 4096 + 3000, 0xff);
  copy_file(tpath("a"), tpath("before"));
  errno = 0;
  open_fails("a", PROXY_SIZE, BS, SRC);
  cr_assert_eq(errno, EUCLEAN);
  assert_err_has(tpath("a"));
  assert_err_has("damaged");
  assert_err_has("blocks 0-31743");
  assert_err_has("copy A, sector 5");
  assert_err_has("checksum");
  assert_err_has("not an interrupted save");
  assert_err_has("backup");
  assert_err_has("--clear-bitmap");
  assert_err_has("discards the writes");
  cr_assert_null(strstr(errbuf, "blocks 31744"), "chunk 1 is fine: %s", errbuf);
  /* Never repaired silently: the file is as it was, refused again. */
  cr_assert(same_file("a", "before"));
  open_fails("a", PROXY_SIZE, BS, SRC);
  /* The peek (header only) still works; starting over works. */
  {
    struct bitmap_info bi;
    cr_assert_eq(bitmap_peek(tpath("a"), &bi, errbuf, sizeof errbuf), 0);
    cr_assert_eq(bi.image_size, PROXY_SIZE);
  }
  bitmap_close(open_ok("a", PROXY_SIZE, BS, SRC, true));
  bm = open_ok("a", PROXY_SIZE, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 0);
  bitmap_close(bm);
}

Test(bitmap, refuses_damage_anywhere_in_a_written_slot)
{
  size_t len;
  uint8_t *f;
  uint64_t n = make_partial("a");
  struct bitmap *bm = open_ok("a", PROXY_SIZE, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), n);
  bitmap_close(bm);
  f = read_file(tpath("a"), &len);
  /* Both slots of chunk 0 hold a copy, the older one as well: damage to
   * either is refused.  So is damage to a sector's generation, CRC or
   * reserved bytes, and to chunk 1 (written once, slot A). */
  static const off_t where[] = {
    SLOT_OFF(0, 0) + 100, SLOT_OFF(0, 1) + 7 * 512 + 511,
    SLOT_OFF(0, 0) + 3, SLOT_OFF(0, 1) + 512 + 9, SLOT_OFF(0, 0) + 13,
    SLOT_OFF(1, 0) + 2 * 512 + 300,
  };
  cr_assert_neq(slot_gen(f, 0, 0), 0);
  cr_assert_neq(slot_gen(f, 0, 1), 0);
  for (size_t i = 0; i < ARRAY_SIZE(where); i++) {
    uint8_t v = f[where[i]] ^ 0x10;
    write_file(tpath("b"), f, len);
    patch_file(tpath("b"), where[i], &v, 1);
    open_fails("b", PROXY_SIZE, BS, SRC);
    cr_assert_eq(errno, EUCLEAN, "damage at %jd", (intmax_t) where[i]);
    assert_err_has(where[i] >= (off_t) SLOT_OFF(1, 0) ? "blocks 31744-32767"
                                                      : "blocks 0-31743");
  }
  /* A slot copied onto another place fails too (the offset is in its CRC). */
  write_file(tpath("b"), f, len);
  patch_file(tpath("b"), SLOT_OFF(1, 1), f + SLOT_OFF(0, 0), 4096);
  open_fails("b", PROXY_SIZE, BS, SRC);
  assert_err_has("copy B, sector 0");
  free(f);
}

/* Builds the crash image of a chunk write torn between sectors: the file
 * "old" with the sectors in mask (bit s = sector s) of slot `slot` of
 * chunk c taken from the file "new". */
static void tear(const char *out, const char *old, const char *new,
                 uint64_t c, int slot, unsigned mask)
{
  size_t lo, ln;
  uint8_t *fo = read_file(tpath(old), &lo), *fn = read_file(tpath(new), &ln);
  cr_assert_eq(lo, ln);
  for (int s = 0; s < 8; s++)
    if (mask & (1u << s))
      memcpy(fo + SLOT_OFF(c, slot) + s * 512, fn + SLOT_OFF(c, slot) + s * 512,
             512);
  write_file(tpath(out), fo, lo);
  free(fo);
  free(fn);
}

Test(bitmap, survives_torn_chunk_write)
{
  struct bitmap *bm = open_ok("a", PROXY_SIZE, BS, SRC, false);
  size_t len;
  uint8_t *f;

  /* p0: nothing written.  p1: chunk 0's first write (slot A).  p2: its
   * second (slot B).  p3: its third (slot A again).  Each one adds bits
   * in every sector of the chunk. */
  copy_file(tpath("a"), tpath("p0"));
  for (int p = 1; p <= 3; p++) {
    char name[8];
    for (int s = 0; s < 8; s++)
      bitmap_set(bm, (uint64_t) s * 3968 + (uint64_t) p);
    cr_assert_eq(bitmap_persist(bm), 0);
    snprintf(name, sizeof name, "p%d", p);
    copy_file(tpath("a"), tpath(name));
  }
  bitmap_close(bm);
  f = read_file(tpath("p3"), &len);
  cr_assert_eq(newest_slot(f, 0), 0);
  free(f);

  /* Every way a write can be torn between sectors (any non-empty proper
   * subset of them reached the disk), for the first, second and third
   * write: the open succeeds with exactly the bits of the write before,
   * which persist had made durable. */
  for (int p = 1; p <= 3; p++) {
    char old[8], new[8];
    snprintf(old, sizeof old, "p%d", p - 1);
    snprintf(new, sizeof new, "p%d", p);
    for (unsigned mask = 1; mask < 255; mask++) {
      tear("t", old, new, 0, p == 2 ? 1 : 0, mask);
      bm = open_ok("t", PROXY_SIZE, BS, SRC, false);
      cr_assert_eq(bitmap_count(bm), 8u * (unsigned) (p - 1),
                   "write %d torn with sectors 0x%02x new", p, mask);
      for (int s = 0; s < 8; s++)
        for (int q = 1; q <= 3; q++)
          cr_assert_eq(bitmap_test(bm, (uint64_t) s * 3968 + (uint64_t) q),
                       q < p);
      if (mask == 0x0f) {
        /* Going on from there: the next save rewrites the torn slot, the
         * good copy is not touched, and everything survives reopening. */
        for (int s = 0; s < 8; s++)
          bitmap_set(bm, (uint64_t) s * 3968 + 10);
        cr_assert_eq(bitmap_persist(bm), 0);
        copy_file(tpath("t"), tpath("u"));
        bitmap_close(bm);
        f = read_file(tpath("u"), &len);
        cr_assert_eq(newest_slot(f, 0), p == 2 ? 1 : 0);
        free(f);
        cr_assert(same_file("t", "u"), "close wrote again");
        bm = open_ok("t", PROXY_SIZE, BS, SRC, false);
        cr_assert_eq(bitmap_count(bm), 8u * (unsigned) p);
      }
      bitmap_close(bm);
    }
  }
}

Test(bitmap, refuses_states_no_crash_can_leave)
{
  size_t len;
  uint8_t *f;
  struct bitmap *bm = open_ok("a", PROXY_SIZE, BS, SRC, false);
  bitmap_set(bm, 1);
  cr_assert_eq(bitmap_persist(bm), 0);
  copy_file(tpath("a"), tpath("p1"));
  bitmap_set(bm, 2);
  cr_assert_eq(bitmap_persist(bm), 0);
  copy_file(tpath("a"), tpath("p2"));
  bitmap_set(bm, 3);
  cr_assert_eq(bitmap_persist(bm), 0);
  copy_file(tpath("a"), tpath("p3"));
  bitmap_close(bm);

  /* Both slots torn: one save writes only one of them. */
  tear("t", "p1", "p2", 0, 1, 0x0f);      /* B torn over nothing */
  tear("t2", "t", "p3", 0, 0, 0x0f);      /* A torn over p1 */
  open_fails("t2", PROXY_SIZE, BS, SRC);
  assert_err_has("both copies are partly written");

  /* Slot B written, slot A zeros: A is always written first. */
  f = read_file(tpath("p2"), &len);
  memset(f + SLOT_OFF(0, 0), 0, 4096);
  write_file(tpath("z"), f, len);
  free(f);
  open_fails("z", PROXY_SIZE, BS, SRC);
  assert_err_has("copy A reads as zeros");

  /* A "torn" slot older than the other copy: the older copy (B, gen 2)
   * lost a sector (reads as zeros) -- only a write newer than the other
   * copy can be interrupted, so this is damage. */
  tear("o", "p3", "p1", 0, 1, 0x01);
  open_fails("o", PROXY_SIZE, BS, SRC);
  cr_assert_eq(errno, EUCLEAN);
  assert_err_has("not newer than copy A");
  /* Whereas the newest copy (A, gen 3) with a sector of its previous
   * content (gen 1) is exactly what an interrupted third write leaves. */
  tear("i", "p3", "p1", 0, 0, 0x01);
  bm = open_ok("i", PROXY_SIZE, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 2);
  bitmap_close(bm);
}

/* Fails its second call: the persist writes one batch, then fails. */
static int fail_second(void *opaque)
{
  int *calls = opaque;
  if (++*calls == 2) {
    errno = EIO;
    return -1;
  }
  return 0;
}

Test(bitmap, failed_persist_never_overwrites_the_good_copy)
{
  /* 300 chunks: more than one batch of 256. */
  const uint64_t n = 300 * (uint64_t) CB;
  struct bitmap *bm = open_ok("a", n * BS, BS, SRC, false);
  int calls = 0;
  size_t len;
  uint8_t *f, *f2;

  bitmap_set_data_sync(bm, fail_second, &calls);
  for (uint64_t c = 0; c < 300; c++)
    bitmap_set(bm, c * CB + 5);
  cr_assert_eq(bitmap_persist(bm), -1);
  cr_assert_eq(errno, EIO);
  cr_assert_eq(bitmap_persist(bm), 0);      /* writes the rest, syncs */
  f = read_file(tpath("a"), &len);
  for (uint64_t c = 0; c < 300; c++) {
    cr_assert_eq(newest_slot(f, c), 0);
    cr_assert(bit_in_slot(f, c * CB + 5, 0));
  }
  /* The failed persist's first batch counts as saved once a later sync
   * succeeded: the next write of chunk 0 goes to slot B. */
  bitmap_set(bm, 6);
  cr_assert_eq(bitmap_persist(bm), 0);
  f2 = read_file(tpath("a"), &len);
  cr_assert_eq(newest_slot(f2, 0), 1);
  cr_assert_eq(memcmp(f + SLOT_OFF(0, 0), f2 + SLOT_OFF(0, 0), 4096), 0);
  free(f);
  free(f2);
  bitmap_close(bm);
  bm = open_ok("a", n * BS, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), 301);
  bitmap_close(bm);
}

/* ------------------------------------------------------- version 1 */

/* Writes a version 1 file as bitmap.h documents it. */
static void make_v1(const char *name, uint64_t size, uint32_t flags,
                    const uint64_t *bits, size_t nbits, int64_t stray_byte)
{
  uint64_t nb = (size + BS - 1) / BS, alen = (nb + 7) / 8;
  uint64_t flen = 4096 + (alen + 4095) / 4096 * 4096;
  uint8_t *f = calloc(1, flen);
  for (int slot = 0; slot < 2; slot++) {
    uint8_t *s = f + slot * 2048;
    memcpy(s, "XNBDBMAP", 8);
    put_be32(s + 8, 1);
    put_be32(s + 12, flags);
    put_be64(s + 16, 1);
    put_be64(s + 24, BS);
    put_be64(s + 32, size);
    put_be64(s + 40, nb);
    put_be64(s + 48, 4096);
    put_be64(s + 56, alen);
    put_be32(s + 64, strlen(SRC));
    memcpy(s + 68, SRC, strlen(SRC));
    SHA256(s, 2016, s + 2016);
  }
  for (size_t i = 0; i < nbits; i++)
    f[4096 + bits[i] / 8] |= 1 << (bits[i] % 8);
  if (stray_byte >= 0)
    f[4096 + stray_byte] |= 0x80;
  write_file(tpath(name), f, flen);
  free(f);
}

Test(bitmap, upgrades_v1)
{
  static const uint64_t bits[] = { 0, 1, 63, 3967 * 8 + 7, 31744, 50000,
                                   99999 };
  const uint64_t size = 100000 * (uint64_t) BS;
  struct bitmap_info bi;
  struct bitmap *bm;
  struct stat st;
  size_t len;
  uint8_t *f;

  make_v1("a", size, 0, bits, ARRAY_SIZE(bits), -1);
  cr_assert(chmod(tpath("a"), 0640) == 0);
  /* The proxy reaches the file through a symlink, which stays one. */
  cr_assert(symlink(tpath("a"), tpath("link")) == 0);
  copy_file(tpath("a"), tpath("v1"));
  /* peek reads version 1 and changes nothing. */
  cr_assert_eq(bitmap_peek(tpath("link"), &bi, errbuf, sizeof errbuf), 0);
  cr_assert_eq(bi.image_size, size);
  cr_assert_not(bi.complete);
  cr_assert(same_file("a", "v1"));

  bm = open_ok("link", size, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), ARRAY_SIZE(bits));
  for (size_t i = 0; i < ARRAY_SIZE(bits); i++)
    cr_assert(bitmap_test(bm, bits[i]), "block %" PRIu64, bits[i]);
  cr_assert_not(bitmap_test(bm, 2));
  bitmap_close(bm);

  cr_assert(lstat(tpath("link"), &st) == 0 && S_ISLNK(st.st_mode));
  cr_assert(stat(tpath("a"), &st) == 0);
  cr_assert_eq(st.st_mode & 07777, 0640);
  cr_assert_eq(access(tpath("a.v2-upgrade"), F_OK), -1, "temporary file left");
  f = read_file(tpath("a"), &len);
  cr_assert_eq(len, 4096 + 4 * 8192);         /* 100000 blocks: 4 chunks */
  cr_assert_eq(get_be32(f + 8), 2);
  cr_assert_eq(get_be32(f + 2048 + 8), 2);
  for (size_t i = 0; i < ARRAY_SIZE(bits); i++)
    cr_assert(bit_on_disk(f, bits[i]));
  free(f);
  bm = open_ok("a", size, BS, SRC, false);
  cr_assert_eq(bitmap_count(bm), ARRAY_SIZE(bits));
  bitmap_close(bm);

  /* The complete flag comes along when the bits agree. */
  make_v1("c", 64 * BS, BITMAP_FLAG_COMPLETE, NULL, 0, -1);
  {
    int fd = open(tpath("c"), O_WRONLY);
    static const uint8_t ff[8] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                   0xff };
    cr_assert(pwrite_all(fd, ff, 8, 4096) == 0);
    close(fd);
  }
  bm = open_ok("c", 64 * BS, BS, SRC, false);
  cr_assert(bitmap_is_complete(bm));
  bitmap_close(bm);
  cr_assert_eq(bitmap_peek(tpath("c"), &bi, errbuf, sizeof errbuf), 0);
  cr_assert(bi.complete);
}

Test(bitmap, refuses_unsafe_v1_upgrades)
{
  static const uint64_t bits[] = { 5 };
  const uint64_t size = 1000 * (uint64_t) BS;

  /* Bits past the last block: version 1 never writes them. */
  make_v1("a", size, 0, bits, 1, 1000 / 8 + 100);
  copy_file(tpath("a"), tpath("a0"));
  open_fails("a", size, BS, SRC);
  cr_assert_eq(errno, EUCLEAN);
  assert_err_has("past its last block");
  assert_err_has("--clear-bitmap");
  cr_assert(same_file("a", "a0"));

  /* Another source: refused before anything is rewritten. */
  make_v1("b", size, 0, bits, 1, -1);
  copy_file(tpath("b"), tpath("b0"));
  {
    struct bitmap *bm = bitmap_open(tpath("b"), size, BS, "other", false,
                                    errbuf, sizeof errbuf);
    cr_assert_null(bm);
  }
  assert_err_has("source identity");
  cr_assert(same_file("b", "b0"));

  /* Hard links would keep the old bits under another name. */
  cr_assert(link(tpath("b"), tpath("b-link")) == 0);
  open_fails("b", size, BS, SRC);
  cr_assert_eq(errno, EMLINK);
  assert_err_has("hard links");
  cr_assert(same_file("b", "b0"));
  cr_assert(unlink(tpath("b-link")) == 0);
  bitmap_close(open_ok("b", size, BS, SRC, false));
}
