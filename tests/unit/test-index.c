/* Unit tests for common/dedup/index.c and index-file.c: the seed index.
 * Digests are computed here with OpenSSL's SHA256() of each 4 KiB block
 * (independent of digest.c), so a lookup is checked against the definition
 * of a block digest. */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/sha.h>

#include "index.h"
#include "log.h"
#include "util.h"

#define BS DIGEST_BLOCK

static char dir[64];
static char err[512];
static char warnings[8192];      /* every log_warn of the test, concatenated */

static const char *tpath(const char *name)
{
  static char buf[8][512];
  static int n;
  char *p = buf[n++ % 8];
  snprintf(p, 512, "%s/%s", dir, name);
  return p;
}

static void hook(enum log_level level, const char *msg)
{
  if (level <= LOG_LVL_WARN && strlen(warnings) + strlen(msg) + 2 < sizeof warnings) {
    strcat(warnings, msg);
    strcat(warnings, "\n");
  }
}

static void setup(void)
{
  strcpy(dir, "/tmp/xnbd-test-index.XXXXXX");
  cr_assert_not_null(mkdtemp(dir));
  warnings[0] = '\0';
  log_set_hook(hook);
}

static void teardown(void)
{
  DIR *d = opendir(dir);
  struct dirent *e;
  log_set_hook(NULL);
  if (!d)
    return;
  while ((e = readdir(d)) != NULL)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
      unlink(tpath(e->d_name));
  closedir(d);
  rmdir(dir);
}

TestSuite(index, .init = setup, .fini = teardown, .timeout = 120);

/* The content of block b of seed s: distinct for every (s, b), or, for
 * tag 0, a block shared by every seed that uses it. */
static void fill_block(uint8_t *buf, unsigned s, uint64_t b)
{
  uint64_t x = (uint64_t) s << 40 ^ b ^ UINT64_C(0x5eed5eed5eed5eed);
  for (unsigned i = 0; i < BS; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    memcpy(buf + i, &x, 8);
  }
}

/* Writes a seed of size bytes: block b holds fill_block(s, b), except
 * blocks where b % 5 == 3: zeros (written) and b % 7 == 6: holes. */
static void make_seed(const char *path, unsigned s, uint64_t size)
{
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  uint8_t buf[BS];
  cr_assert(fd >= 0);
  cr_assert(ftruncate(fd, size) == 0);
  for (uint64_t b = 0; b * BS < size; b++) {
    if (b % 7 == 6)
      continue;
    if (b % 5 == 3)
      memset(buf, 0, BS);
    else
      fill_block(buf, s, b);
    cr_assert(pwrite_all(fd, buf, MIN(BS, size - b * BS), b * BS) == 0);
  }
  close(fd);
}

static bool is_data_block(uint64_t b) { return b % 7 != 6 && b % 5 != 3; }

/* The digest of block b of the file as it is now (zero-padded). */
static void file_block_digest(const char *path, uint64_t b, uint8_t *buf, uint8_t *dig)
{
  int fd = open(path, O_RDONLY);
  cr_assert(fd >= 0);
  cr_assert(pread_all(fd, buf, BS, b * BS) == 0);     /* zeros past EOF */
  close(fd);
  SHA256(buf, BS, dig);
}

static struct index *open_ok(const char *const *seeds, unsigned n, const char *ipath)
{
  struct index *ix = index_open(seeds, n, ipath, 0, err, sizeof err);
  cr_assert_not_null(ix, "index_open failed: %s", err);
  return ix;
}

static struct index_stats stats(struct index *ix)
{
  struct index_stats st;
  index_get_stats(ix, &st);
  return st;
}

/* Asserts that every data block of seed path (number s in the index, made
 * by make_seed with content id c) is found there and fetched intact. */
static void assert_seed_found(struct index *ix, const char *path, unsigned s,
                              unsigned c, uint64_t size)
{
  uint8_t want[BS], got[BS], dig[DIGEST_LEN];
  for (uint64_t b = 0; b * BS < size; b++) {
    struct index_loc loc[4];
    unsigned n, hit = 0;
    if (!is_data_block(b))
      continue;
    file_block_digest(path, b, want, dig);
    n = index_lookup(ix, dig, loc, 4);
    cr_assert(n >= 1, "block %" PRIu64 " of %s not found", b, path);
    for (unsigned i = 0; i < n; i++)
      if (loc[i].seed == s && loc[i].block == b) {
        hit++;
        cr_assert_eq(index_fetch(ix, &loc[i], dig, got), 1);
        cr_assert(memcmp(got, want, BS) == 0, "block %" PRIu64 " fetched wrong", b);
      }
    cr_assert_eq(hit, 1, "block %" PRIu64 " of %s (seed %u, content %u) "
                 "found at the wrong place", b, path, s, c);
  }
}

/* SHA-256 of a whole file and its times: "byte-identical and untouched". */
struct snap { uint8_t sum[32]; struct timespec mtim, ctim; off_t size; };

static struct snap snap_of(const char *path)
{
  struct snap sn;
  struct stat st;
  uint8_t *buf;
  int fd = open(path, O_RDONLY);
  cr_assert(fd >= 0 && fstat(fd, &st) == 0);
  buf = malloc(st.st_size + 1);
  cr_assert(pread_all(fd, buf, st.st_size, 0) == 0);
  SHA256(buf, st.st_size, sn.sum);
  free(buf);
  close(fd);
  sn.mtim = st.st_mtim;
  sn.ctim = st.st_ctim;
  sn.size = st.st_size;
  return sn;
}

static void assert_same_snap(const struct snap *a, const struct snap *b, const char *path)
{
  cr_assert_eq(a->size, b->size, "%s changed size", path);
  cr_assert(memcmp(a->sum, b->sum, 32) == 0, "%s changed content", path);
  cr_assert(a->mtim.tv_sec == b->mtim.tv_sec && a->mtim.tv_nsec == b->mtim.tv_nsec,
            "%s changed mtime", path);
  cr_assert(a->ctim.tv_sec == b->ctim.tv_sec && a->ctim.tv_nsec == b->ctim.tv_nsec,
            "%s changed ctime", path);
}

#define S0 (37 * BS)
#define S1 (64 * BS)
#define S2 (10 * BS + 100)        /* a partial last block */

static void make_three(const char **seeds)
{
  seeds[0] = tpath("seed0");
  seeds[1] = tpath("seed1");
  seeds[2] = tpath("seed2");
  make_seed(seeds[0], 0, S0);
  make_seed(seeds[1], 1, S1);
  make_seed(seeds[2], 2, S2);
}

static uint64_t data_blocks(uint64_t size)
{
  uint64_t n = 0;
  for (uint64_t b = 0; b * BS < size; b++)
    n += is_data_block(b);
  return n;
}

Test(index, finds_blocks_of_several_seeds_at_any_offset)
{
  const char *seeds[3];
  struct index *ix;
  struct index_stats st;
  uint8_t dig[DIGEST_LEN], buf[BS];
  struct index_loc loc[4];
  make_three(seeds);
  ix = open_ok(seeds, 3, NULL);
  st = stats(ix);
  cr_assert_eq(st.seeds, 3);
  cr_assert_eq(st.blocks_indexed, data_blocks(S0) + data_blocks(S1) + data_blocks(S2));
  cr_assert_eq(st.blocks_hashed, 37 + 64 + 11);
  assert_seed_found(ix, seeds[0], 0, 0, S0);
  assert_seed_found(ix, seeds[1], 1, 1, S1);
  assert_seed_found(ix, seeds[2], 2, 2, S2);
  /* Content found wherever it is asked for: a block never written to any
   * seed is absent. */
  fill_block(buf, 9, 1);
  SHA256(buf, BS, dig);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 0);
  index_close(ix);
}

Test(index, duplicate_blocks_keep_the_first_and_are_found_anywhere)
{
  const char *a = tpath("a"), *b = tpath("b"), *seeds[2] = { a, b };
  uint8_t blk[BS], dig[DIGEST_LEN], got[BS];
  struct index_loc loc[4];
  struct index *ix;
  int fd;
  make_seed(a, 0, 16 * BS);
  make_seed(b, 1, 16 * BS);
  /* b's block 9 holds a's block 2 (another offset of another seed), b's
   * block 10 holds b's block 4. */
  fill_block(blk, 0, 2);
  fd = open(b, O_WRONLY);
  cr_assert(pwrite_all(fd, blk, BS, 9 * BS) == 0);
  fill_block(blk, 1, 4);
  cr_assert(pwrite_all(fd, blk, BS, 10 * BS) == 0);
  close(fd);
  ix = open_ok(seeds, 2, NULL);
  cr_assert_eq(stats(ix).blocks_indexed, data_blocks(16 * BS) * 2 - 2);
  fill_block(blk, 0, 2);
  SHA256(blk, BS, dig);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 1);
  cr_assert(loc[0].seed == 0 && loc[0].block == 2);
  cr_assert_eq(index_fetch(ix, &loc[0], dig, got), 1);
  cr_assert(memcmp(got, blk, BS) == 0);
  fill_block(blk, 1, 4);
  SHA256(blk, BS, dig);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 1);
  cr_assert(loc[0].seed == 1 && loc[0].block == 4);
  index_close(ix);
}

Test(index, zero_blocks_are_not_indexed)
{
  const char *s = tpath("zeros"), *seeds[1] = { s };
  uint8_t zero[BS] = { 0 }, dig[DIGEST_LEN];
  struct index_loc loc[4];
  struct index *ix;
  int fd = open(s, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  /* Written zeros, then a hole, then one data block. */
  cr_assert(pwrite_all(fd, zero, BS, 0) == 0);
  fill_block(zero, 3, 3);
  cr_assert(pwrite_all(fd, zero, BS, 5 * BS) == 0);
  close(fd);
  memset(zero, 0, BS);
  ix = open_ok(seeds, 1, NULL);
  cr_assert_eq(stats(ix).blocks_hashed, 6);
  cr_assert_eq(stats(ix).blocks_indexed, 1);
  SHA256(zero, BS, dig);
  cr_assert(memcmp(dig, digest_zero(), DIGEST_LEN) == 0);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 0);
  index_close(ix);
}

Test(index, changed_seed_block_is_never_returned)
{
  const char *seeds[3];
  uint8_t old[BS], dig[DIGEST_LEN], got[BS], blk[BS];
  struct index_loc loc[4];
  struct index *ix;
  int fd;
  make_three(seeds);
  ix = open_ok(seeds, 3, NULL);
  file_block_digest(seeds[1], 7, old, dig);
  /* Changed behind the index's back. */
  fill_block(blk, 77, 77);
  fd = open(seeds[1], O_WRONLY);
  cr_assert(pwrite_all(fd, blk, BS, 7 * BS) == 0);
  close(fd);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 1);
  cr_assert(loc[0].seed == 1 && loc[0].block == 7);
  cr_assert_eq(index_fetch(ix, &loc[0], dig, got), 0, "a changed block was returned");
  /* The rest of that seed is still good. */
  file_block_digest(seeds[1], 9, old, dig);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 1);
  cr_assert_eq(index_fetch(ix, &loc[0], dig, got), 1);
  cr_assert(memcmp(got, old, BS) == 0);
  index_close(ix);
}

Test(index, truncated_seed_is_never_returned)
{
  const char *seeds[3];
  uint8_t old[BS], d22[DIGEST_LEN], d10[DIGEST_LEN], d1[DIGEST_LEN], got[BS];
  struct index_loc loc[4];
  struct index *ix;
  make_three(seeds);
  ix = open_ok(seeds, 3, NULL);
  file_block_digest(seeds[1], 22, old, d22);
  file_block_digest(seeds[1], 10, old, d10);
  file_block_digest(seeds[1], 1, old, d1);
  /* Cut in the middle of block 10: block 22 is gone, block 10 is half
   * there, block 1 is intact. */
  cr_assert(truncate(seeds[1], 10 * BS + 1000) == 0);
  cr_assert_eq(index_lookup(ix, d22, loc, 4), 1);
  cr_assert_eq(index_fetch(ix, &loc[0], d22, got), 0);
  cr_assert_eq(index_lookup(ix, d10, loc, 4), 1);
  cr_assert_eq(index_fetch(ix, &loc[0], d10, got), 0);
  cr_assert_eq(index_lookup(ix, d1, loc, 4), 1);
  cr_assert_eq(index_fetch(ix, &loc[0], d1, got), 1);
  cr_assert(memcmp(got, old, BS) == 0);
  index_close(ix);
}

Test(index, read_runs_are_the_seed_as_it_is_now)
{
  const char *seeds[3];
  struct index *ix;
  struct stat st;
  make_three(seeds);
  ix = open_ok(seeds, 3, NULL);
  cr_assert(stat(seeds[2], &st) == 0);
  uint64_t nb = ((uint64_t) st.st_size + BS - 1) / BS;
  /* A run in the middle, then one that runs past the end (zeros after
   * the last byte, as a truncated seed reads). */
  uint64_t first[] = { 3, nb - 2 }, n = 5;
  uint8_t *got = malloc(n * BS), want[BS], dig[DIGEST_LEN];
  cr_assert_not_null(got);
  for (unsigned r = 0; r < 2; r++) {
    memset(got, 0xa5, n * BS);
    cr_assert_eq(index_read(ix, 2, first[r], n, got), 0);
    for (uint64_t i = 0; i < n; i++) {
      file_block_digest(seeds[2], first[r] + i, want, dig);   /* zeros past EOF */
      cr_assert(memcmp(got + i * BS, want, BS) == 0, "block %" PRIu64, first[r] + i);
    }
  }
  errno = 0;
  cr_assert_eq(index_read(ix, 3, 0, 1, got), -1, "a seed that does not exist");
  cr_assert_eq(errno, EINVAL);
  free(got);
  index_close(ix);
}

Test(index, index_file_is_reused_when_seeds_are_unchanged)
{
  const char *seeds[3], *ipath = tpath("index");
  const char *reordered[3];
  struct index *ix;
  struct index_stats st1, st2;
  make_three(seeds);
  ix = open_ok(seeds, 3, ipath);
  st1 = stats(ix);
  cr_assert_eq(st1.blocks_hashed, 37 + 64 + 11);
  index_close(ix);
  cr_assert_eq(access(ipath, F_OK), 0, "no index file written");

  ix = open_ok(seeds, 3, ipath);
  st2 = stats(ix);
  cr_assert_eq(st2.blocks_hashed, 0, "seeds were hashed again");
  cr_assert_eq(st2.blocks_indexed, st1.blocks_indexed);
  assert_seed_found(ix, seeds[0], 0, 0, S0);
  assert_seed_found(ix, seeds[2], 2, 2, S2);
  index_close(ix);

  /* Reordered: still loaded; seed numbers follow the new order. */
  reordered[0] = seeds[2];
  reordered[1] = seeds[0];
  reordered[2] = seeds[1];
  ix = open_ok(reordered, 3, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 0);
  assert_seed_found(ix, seeds[2], 0, 2, S2);
  assert_seed_found(ix, seeds[1], 2, 1, S1);
  index_close(ix);
  cr_assert_str_empty(warnings, "unexpected warnings: %s", warnings);
}

Test(index, seed_with_new_mtime_is_hashed_again_alone)
{
  const char *seeds[3], *ipath = tpath("index");
  struct timespec times[2] = { { 0, UTIME_OMIT }, { 1000000, 0 } };
  struct index *ix;
  make_three(seeds);
  index_close(open_ok(seeds, 3, ipath));
  cr_assert(utimensat(AT_FDCWD, seeds[1], times, 0) == 0);
  ix = open_ok(seeds, 3, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 64, "only the changed seed is hashed");
  assert_seed_found(ix, seeds[1], 1, 1, S1);
  index_close(ix);
  /* And the file was written again: nothing to hash now. */
  ix = open_ok(seeds, 3, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 0);
  index_close(ix);
}

Test(index, seed_with_new_content_same_size_is_hashed_again)
{
  const char *seeds[3], *ipath = tpath("index");
  uint8_t blk[BS], dig[DIGEST_LEN];
  struct index_loc loc[4];
  struct index *ix;
  int fd;
  make_three(seeds);
  index_close(open_ok(seeds, 3, ipath));
  /* Replaced in place (ctime and mtime move), one block now new. */
  fill_block(blk, 42, 42);
  fd = open(seeds[0], O_WRONLY);
  cr_assert(pwrite_all(fd, blk, BS, 3 * BS) == 0);
  close(fd);
  ix = open_ok(seeds, 3, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 37);
  SHA256(blk, BS, dig);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 1);
  cr_assert(loc[0].seed == 0 && loc[0].block == 3);
  index_close(ix);
}

Test(index, removed_seed_is_dropped_and_new_seed_hashed)
{
  const char *seeds[3], *ipath = tpath("index"), *later[2];
  uint8_t old[BS], dig[DIGEST_LEN];
  struct index_loc loc[4];
  struct index *ix;
  make_three(seeds);
  index_close(open_ok(seeds, 2, ipath));             /* seeds 0 and 1 */
  later[0] = seeds[1];
  later[1] = seeds[2];
  ix = open_ok(later, 2, ipath);                     /* 0 gone, 2 new */
  cr_assert_eq(stats(ix).blocks_hashed, 11);
  file_block_digest(seeds[0], 1, old, dig);
  cr_assert_eq(index_lookup(ix, dig, loc, 4), 0, "a dropped seed is still indexed");
  assert_seed_found(ix, seeds[1], 0, 1, S1);
  assert_seed_found(ix, seeds[2], 1, 2, S2);
  index_close(ix);
  ix = open_ok(later, 2, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 0);
  index_close(ix);
}

Test(index, foreign_index_file_is_rebuilt_with_a_warning)
{
  const char *seeds[3], *ipath = tpath("index");
  struct index *ix;
  make_three(seeds);
  index_close(open_ok(&seeds[0], 1, ipath));
  ix = open_ok(&seeds[1], 1, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 64);
  cr_assert(strstr(warnings, "built for other seeds"), "warnings: %s", warnings);
  assert_seed_found(ix, seeds[1], 0, 1, S1);
  index_close(ix);
  ix = open_ok(&seeds[1], 1, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 0);
  index_close(ix);
}

static void flip_byte(const char *path, off_t off)
{
  uint8_t c;
  int fd = open(path, O_RDWR);
  cr_assert(fd >= 0);
  cr_assert(pread(fd, &c, 1, off) == 1);
  c ^= 0x40;
  cr_assert(pwrite(fd, &c, 1, off) == 1);
  close(fd);
}

static off_t size_of(const char *path)
{
  struct stat st;
  cr_assert(stat(path, &st) == 0);
  return st.st_size;
}

/* Damages the index file with fn, reopens: a warning containing why,
 * everything hashed again, lookups right, and the file good again. */
static void check_rebuilt(void (*damage)(const char *), const char *why)
{
  const char *seeds[3], *ipath = tpath("index");
  struct index *ix;
  make_three(seeds);
  index_close(open_ok(seeds, 3, ipath));
  damage(ipath);
  ix = open_ok(seeds, 3, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 37 + 64 + 11);
  cr_assert(strstr(warnings, why), "no warning with \"%s\"; warnings: %s", why, warnings);
  assert_seed_found(ix, seeds[0], 0, 0, S0);
  assert_seed_found(ix, seeds[1], 1, 1, S1);
  assert_seed_found(ix, seeds[2], 2, 2, S2);
  index_close(ix);
  ix = open_ok(seeds, 3, ipath);
  cr_assert_eq(stats(ix).blocks_hashed, 0);
  index_close(ix);
}

static void damage_list(const char *p) { flip_byte(p, size_of(p) - 8 * 40); }
static void damage_header(const char *p) { flip_byte(p, 40); }
static void damage_path(const char *p) { flip_byte(p, 64 + 96 + 2); }
static void cut_lists(const char *p) { cr_assert(truncate(p, size_of(p) - 8) == 0); }
static void cut_header(const char *p) { cr_assert(truncate(p, 30) == 0); }
static void cut_magic(const char *p) { cr_assert(truncate(p, 5) == 0); }
static void make_empty(const char *p)
{
  int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  cr_assert(fd >= 0);
  close(fd);
}

static void grow(const char *p)
{
  int fd = open(p, O_WRONLY | O_APPEND);
  cr_assert(write(fd, "x", 1) == 1);
  close(fd);
}

static void other_version(const char *p) { flip_byte(p, 11); }

Test(index, damaged_digest_list_is_rebuilt) { check_rebuilt(damage_list, "checksum"); }
Test(index, damaged_header_is_rebuilt) { check_rebuilt(damage_header, "checksum"); }
Test(index, damaged_seed_path_is_rebuilt) { check_rebuilt(damage_path, "checksum"); }
Test(index, truncated_lists_are_rebuilt) { check_rebuilt(cut_lists, "truncated"); }
Test(index, truncated_header_is_rebuilt) { check_rebuilt(cut_header, "truncated"); }
Test(index, file_cut_in_its_magic_is_rebuilt) { check_rebuilt(cut_magic, "truncated"); }
Test(index, file_with_trailing_bytes_is_rebuilt) { check_rebuilt(grow, "after its end"); }
Test(index, other_version_is_rebuilt) { check_rebuilt(other_version, "version"); }

Test(index, empty_index_file_is_filled_silently)
{
  const char *seeds[1] = { tpath("s") }, *ipath = tpath("index");
  struct index *ix;
  make_seed(seeds[0], 0, 8 * BS);
  make_empty(ipath);
  ix = open_ok(seeds, 1, ipath);
  index_close(ix);
  cr_assert_str_empty(warnings);
  cr_assert(size_of(ipath) > 64);
}

Test(index, file_that_is_not_an_index_is_refused_and_kept)
{
  const char *seeds[1] = { tpath("s") }, *ipath = tpath("image");
  struct snap before, after;
  make_seed(seeds[0], 0, 8 * BS);
  make_seed(ipath, 5, 4 * BS);
  before = snap_of(ipath);
  cr_assert_null(index_open(seeds, 1, ipath, 0, err, sizeof err));
  cr_assert(strstr(err, "not an xnbd index file") && strstr(err, ipath), "%s", err);
  after = snap_of(ipath);
  assert_same_snap(&before, &after, ipath);
}

Test(index, index_file_named_as_a_seed_is_refused)
{
  const char *ipath = tpath("index"), *seeds[2] = { tpath("s"), ipath };
  make_seed(seeds[0], 0, 8 * BS);
  index_close(open_ok(seeds, 1, ipath));
  cr_assert_null(index_open(seeds, 2, ipath, 0, err, sizeof err));
  cr_assert(strstr(err, "index file") && strstr(err, "another --index"), "%s", err);
}

Test(index, missing_seed_fails_naming_it)
{
  const char *seeds[2] = { tpath("s"), tpath("no-such-seed") };
  make_seed(seeds[0], 0, 8 * BS);
  cr_assert_null(index_open(seeds, 2, NULL, 0, err, sizeof err));
  cr_assert(strstr(err, seeds[1]) && strstr(err, "No such file") && strstr(err, "--seed"),
            "%s", err);
}

Test(index, unreadable_seed_fails_naming_it)
{
  const char *seeds[1] = { tpath("dir") };
  cr_assert(mkdir(seeds[0], 0755) == 0);
  cr_assert_null(index_open(seeds, 1, NULL, 0, err, sizeof err));
  cr_assert(strstr(err, seeds[0]) && strstr(err, "not a regular file"), "%s", err);
  rmdir(seeds[0]);
}

Test(index, seed_named_twice_is_refused)
{
  const char *seeds[2] = { tpath("s"), tpath("s") };
  make_seed(seeds[0], 0, 8 * BS);
  cr_assert_null(index_open(seeds, 2, NULL, 0, err, sizeof err));
  cr_assert(strstr(err, "same file"), "%s", err);
}

/* The access mode of every descriptor of this process that names path. */
static unsigned count_fds_open_for_write(const char *path, unsigned *total)
{
  char real[PATH_MAX], link[PATH_MAX + 32], target[PATH_MAX], line[256];
  DIR *d = opendir("/proc/self/fd");
  struct dirent *e;
  unsigned writable = 0;
  cr_assert_not_null(realpath(path, real));
  cr_assert_not_null(d);
  while ((e = readdir(d)) != NULL) {
    ssize_t n;
    FILE *f;
    if (e->d_name[0] == '.')
      continue;
    snprintf(link, sizeof link, "/proc/self/fd/%s", e->d_name);
    n = readlink(link, target, sizeof target - 1);
    if (n < 0)
      continue;
    target[n] = '\0';
    if (strcmp(target, real))
      continue;
    (*total)++;
    snprintf(link, sizeof link, "/proc/self/fdinfo/%s", e->d_name);
    f = fopen(link, "r");
    cr_assert_not_null(f);
    while (fgets(line, sizeof line, f)) {
      unsigned long flags;
      if (sscanf(line, "flags: %lo", &flags) == 1 && (flags & O_ACCMODE) != O_RDONLY)
        writable++;
    }
    fclose(f);
  }
  closedir(d);
  return writable;
}

Test(index, seeds_are_opened_read_only_and_never_changed)
{
  const char *seeds[3], *ipath = tpath("index");
  struct snap before[3], after;
  struct index *ix;
  char ev[4096];
  int in;
  make_three(seeds);
  in = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  cr_assert(in >= 0);
  for (int i = 0; i < 3; i++) {
    before[i] = snap_of(seeds[i]);
    cr_assert(inotify_add_watch(in, seeds[i], IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE) >= 0);
  }
  for (int round = 0; round < 2; round++) {       /* hashed, then loaded */
    uint8_t old[BS], dig[DIGEST_LEN], got[BS];
    struct index_loc loc[1];
    ix = open_ok(seeds, 3, ipath);
    for (int i = 0; i < 3; i++) {
      unsigned total = 0;
      cr_assert_eq(count_fds_open_for_write(seeds[i], &total), 0,
                   "%s is open for writing", seeds[i]);
      cr_assert_eq(total, 1, "%s: %u descriptors", seeds[i], total);
    }
    file_block_digest(seeds[1], 2, old, dig);
    cr_assert_eq(index_lookup(ix, dig, loc, 1), 1);
    cr_assert_eq(index_fetch(ix, &loc[0], dig, got), 1);
    index_close(ix);
  }
  cr_assert(read(in, ev, sizeof ev) < 0 && errno == EAGAIN,
            "a seed was modified, written or had its attributes changed");
  close(in);
  for (int i = 0; i < 3; i++) {
    after = snap_of(seeds[i]);
    assert_same_snap(&before[i], &after, seeds[i]);
  }
}

Test(index, ram_per_indexed_block_is_at_most_16_bytes)
{
  const char *seeds[2] = { tpath("big"), tpath("dups") };
  uint8_t blk[BS];
  struct index_stats st;
  struct index *ix;
  int fd;
  make_seed(seeds[0], 0, 6000 * BS);
  /* A seed of which most blocks are copies of a few (as in memory images):
   * the table is sized for the distinct blocks, not for all of them. */
  fd = open(seeds[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
  cr_assert(fd >= 0);
  for (uint64_t b = 0; b < 4000; b++) {
    fill_block(blk, 1, b % 100);
    cr_assert(pwrite_all(fd, blk, BS, b * BS) == 0);
  }
  close(fd);
  ix = open_ok(seeds, 2, NULL);
  st = stats(ix);
  cr_assert_eq(st.blocks_indexed, data_blocks(6000 * BS) + 100);
  cr_assert(st.table_bytes <= 16 * st.blocks_indexed,
            "%" PRIu64 " bytes of table for %" PRIu64 " blocks",
            st.table_bytes, st.blocks_indexed);
  cr_log_info("index RAM: %" PRIu64 " bytes for %" PRIu64 " indexed blocks = %.2f "
              "bytes per block", st.table_bytes, st.blocks_indexed,
              (double) st.table_bytes / st.blocks_indexed);
  fprintf(stderr, "index RAM: %.2f bytes per indexed block\n",
          (double) st.table_bytes / st.blocks_indexed);
  assert_seed_found(ix, seeds[0], 0, 0, 6000 * BS);
  index_close(ix);
}

Test(index, seed_without_blocks_is_fine)
{
  const char *seeds[2] = { tpath("empty"), tpath("s") };
  struct index *ix;
  make_seed(seeds[0], 0, 0);
  make_seed(seeds[1], 1, 8 * BS);
  ix = open_ok(seeds, 2, tpath("index"));
  assert_seed_found(ix, seeds[1], 1, 1, 8 * BS);
  index_close(ix);
  ix = open_ok(seeds, 2, tpath("index"));
  cr_assert_eq(stats(ix).blocks_hashed, 0);
  assert_seed_found(ix, seeds[1], 1, 1, 8 * BS);
  index_close(ix);
}

Test(index, unwritable_index_file_leaves_a_working_index_and_a_warning)
{
  const char *seeds[1] = { tpath("s") }, *ipath = tpath("no-such-dir/index");
  struct index *ix;
  make_seed(seeds[0], 0, 8 * BS);
  ix = open_ok(seeds, 1, ipath);
  cr_assert(strstr(warnings, "cannot write the index file") && strstr(warnings, ipath),
            "warnings: %s", warnings);
  assert_seed_found(ix, seeds[0], 0, 0, 8 * BS);
  index_close(ix);
}
