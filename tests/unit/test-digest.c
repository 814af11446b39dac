/* Unit tests for common/dedup/digest.c: block digests checked against
 * sha256sum(1) of the same blocks (an independent implementation), the
 * same results with 1 and 4 threads and on any sub-range, holes not read,
 * and the errors for bad descriptors and ranges; the two-at-once SHA-NI
 * hash (sha256-x2.c) against OpenSSL, and digest_file without it. */
#include <criterion/criterion.h>

#include <errno.h>
#include <sys/resource.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "digest.h"
#include "sha256-x2.h"

static char dir[64];

static void setup(void)
{
  strcpy(dir, "/tmp/xnbd-test-digest.XXXXXX");
  cr_assert_not_null(mkdtemp(dir));
}

static void teardown(void)
{
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  cr_assert_eq(system(cmd), 0);
}

TestSuite(digest, .init = setup, .fini = teardown, .timeout = 120);

static void hex(const uint8_t *d, char *out)
{
  for (unsigned i = 0; i < DIGEST_LEN; i++) sprintf(out + 2 * i, "%02x", d[i]);
}

/* Runs cmd (a shell pipeline) and returns its output's lines' first words
 * (sha256sum's hex digests) in order; *n receives how many. */
static char **run_sums(const char *cmd, size_t *n)
{
  FILE *f = popen(cmd, "r");
  char line[1024];
  char **v = NULL;
  size_t k = 0;
  cr_assert_not_null(f, "popen %s", cmd);
  while (fgets(line, sizeof line, f)) {
    v = realloc(v, (k + 1) * sizeof *v);
    cr_assert_not_null(v);
    line[strcspn(line, " \n")] = '\0';
    cr_assert_eq(strlen(line), 64, "unexpected output of '%s': %s", cmd, line);
    v[k++] = strdup(line);
  }
  cr_assert_eq(pclose(f), 0, "'%s' failed", cmd);
  *n = k;
  return v;
}

static void free_sums(char **v, size_t n)
{
  for (size_t i = 0; i < n; i++) free(v[i]);
  free(v);
}

#define NBLK 1200u                 /* whole blocks, then a partial one */
#define TAIL 1000u
#define FSIZE ((uint64_t) NBLK * DIGEST_BLOCK + TAIL)
#define TOTAL_BLK (NBLK + 1)

/* Deterministic bytes: block b, byte i. */
static uint8_t pattern(uint64_t b, size_t i)
{
  uint64_t x = (b + 1) * 0x9e3779b97f4a7c15ull + i * 0xbf58476d1ce4e5b9ull;
  x ^= x >> 29;
  return (uint8_t) (x * 0x94d049bb133111ebull >> 56);
}

/* Data, holes (blocks 10-19, 500-799), written zeros (block 20), a hole
 * reaching the last whole block (1190-1199) and a partial last block. */
static bool is_hole(uint64_t b)
{
  return (b >= 10 && b < 20) || (b >= 500 && b < 800) || (b >= 1190 && b < NBLK);
}

static const char *make_file(void)
{
  static char path[128];
  uint8_t buf[DIGEST_BLOCK];
  int fd;
  snprintf(path, sizeof path, "%s/img", dir);
  fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  cr_assert(fd >= 0);
  cr_assert_eq(ftruncate(fd, FSIZE), 0);
  for (uint64_t b = 0; b < TOTAL_BLK; b++) {
    size_t len = b == NBLK ? TAIL : DIGEST_BLOCK;
    if (is_hole(b)) continue;
    for (size_t i = 0; i < len; i++) buf[i] = b == 20 ? 0 : pattern(b, i);
    cr_assert_eq(pwrite(fd, buf, len, b * DIGEST_BLOCK), (ssize_t) len);
  }
  cr_assert_eq(fsync(fd), 0);
  close(fd);
  return path;
}

/* sha256sum of every block of path (the last padded with zeros): the file
 * copied, padded, cut into 4 KiB pieces by split(1). */
static char **expected_sums(const char *path, size_t *n)
{
  char cmd[1024];
  snprintf(cmd, sizeof cmd,
           "set -e; cd '%s'; cp --sparse=always '%s' padded; "
           "truncate -s %%4096 padded; mkdir -p blk; "
           "split -b 4096 -d -a 6 padded blk/b.; rm padded; "
           "sha256sum blk/b.* ; rm -r blk", dir, path);
  return run_sums(cmd, n);
}

static uint8_t *digests(const char *path, uint64_t first, uint64_t count, unsigned threads)
{
  uint8_t *out = malloc(count * DIGEST_LEN + 1);
  int fd = open(path, O_RDONLY);
  cr_assert(fd >= 0);
  cr_assert_not_null(out);
  int rc = digest_file(fd, FSIZE, first, count, out, threads);
  cr_assert_eq(rc, 0, "digest_file(%" PRIu64 ", %" PRIu64 ", %u threads): %s",
               first, count, threads, strerror(errno));
  close(fd);
  return out;
}

Test(digest, zero_and_block_match_sha256sum)
{
  size_t n;
  char h[65];
  char **s = run_sums("head -c 4096 /dev/zero | sha256sum", &n);
  cr_assert_eq(n, 1);
  hex(digest_zero(), h);
  cr_assert_str_eq(h, s[0], "digest_zero");
  free_sums(s, n);

  /* One block of pattern 7 through a file. */
  uint8_t buf[DIGEST_BLOCK], d[DIGEST_LEN];
  char path[128], cmd[256];
  for (size_t i = 0; i < sizeof buf; i++) buf[i] = pattern(7, i);
  snprintf(path, sizeof path, "%s/one", dir);
  FILE *f = fopen(path, "w");
  cr_assert_not_null(f);
  cr_assert_eq(fwrite(buf, 1, sizeof buf, f), sizeof buf);
  cr_assert_eq(fclose(f), 0);
  snprintf(cmd, sizeof cmd, "sha256sum '%s'", path);
  s = run_sums(cmd, &n);
  digest_block(buf, d);
  hex(d, h);
  cr_assert_str_eq(h, s[0], "digest_block");
  free_sums(s, n);
}

Test(digest, whole_file_matches_sha256sum)
{
  const char *path = make_file();
  size_t n;
  char **s = expected_sums(path, &n);
  char h[65];
  cr_assert_eq(n, TOTAL_BLK, "split made %zu blocks", n);
  uint8_t *d = digests(path, 0, TOTAL_BLK, 1);
  for (size_t b = 0; b < n; b++) {
    hex(d + b * DIGEST_LEN, h);
    cr_assert_str_eq(h, s[b], "block %zu", b);
  }
  /* The holes and the written zeros are the zero block's digest. */
  cr_assert_eq(memcmp(d + 15 * DIGEST_LEN, digest_zero(), DIGEST_LEN), 0);
  cr_assert_eq(memcmp(d + 20 * DIGEST_LEN, digest_zero(), DIGEST_LEN), 0);
  cr_assert_neq(memcmp(d + 21 * DIGEST_LEN, digest_zero(), DIGEST_LEN), 0);
  free(d);
  free_sums(s, n);
}

Test(digest, openssl_only_path_matches_sha256sum)
{
  setenv("XNBD_SHA256", "openssl", 1);      /* read once, at the first digest */
  const char *path = make_file();
  size_t n;
  char **s = expected_sums(path, &n);
  char h[65];
  uint8_t *d = digests(path, 0, TOTAL_BLK, 2);
  for (size_t b = 0; b < n; b++) {
    hex(d + b * DIGEST_LEN, h);
    cr_assert_str_eq(h, s[b], "block %zu", b);
  }
  free(d);
  free_sums(s, n);
}

Test(digest, sha256_x2_matches_openssl)
{
  if (!sha256_x2_available()) cr_skip_test("this CPU has no SHA-NI");
  static uint8_t a[DIGEST_BLOCK], b[DIGEST_BLOCK];
  uint8_t da[DIGEST_LEN], db[DIGEST_LEN], ea[DIGEST_LEN], eb[DIGEST_LEN];
  for (uint64_t k = 0; k < 300; k++) {
    /* Patterns, a block differing from its partner in one byte, zeros,
     * all ones. */
    for (size_t i = 0; i < DIGEST_BLOCK; i++) {
      a[i] = k % 50 == 3 ? 0 : k % 50 == 4 ? 0xff : pattern(k, i);
      b[i] = k % 3 == 0 ? a[i] : pattern(k + 1000, i);
    }
    if (k % 3 == 0) b[k * 13 % DIGEST_BLOCK] ^= 1;
    sha256_x2(a, b, da, db);
    digest_block(a, ea);
    digest_block(b, eb);
    cr_assert_eq(memcmp(da, ea, DIGEST_LEN), 0, "first block of pair %" PRIu64, k);
    cr_assert_eq(memcmp(db, eb, DIGEST_LEN), 0, "second block of pair %" PRIu64, k);
  }
}

Test(digest, digest_blocks_matches_digest_block)
{
  /* Odd and even counts (the last block alone with SHA-NI), zeros among
   * data, and both hash paths (XNBD_SHA256=openssl is read once per
   * process: this checks whichever this CPU uses, as the proxy does). */
  static uint8_t buf[7 * DIGEST_BLOCK];
  uint8_t got[7 * DIGEST_LEN], want[DIGEST_LEN];
  for (uint64_t n = 0; n <= 7; n++) {
    for (size_t i = 0; i < sizeof buf; i++)
      buf[i] = i / DIGEST_BLOCK == 2 ? 0 : pattern(n * 7 + i / DIGEST_BLOCK, i);
    memset(got, 0xa5, sizeof got);
    digest_blocks(buf, n, got);
    for (uint64_t b = 0; b < n; b++) {
      digest_block(buf + b * DIGEST_BLOCK, want);
      cr_assert_eq(memcmp(got + b * DIGEST_LEN, want, DIGEST_LEN), 0,
                   "block %" PRIu64 " of %" PRIu64, b, n);
    }
    for (uint64_t b = n; b < 7; b++)
      cr_assert_eq(got[b * DIGEST_LEN], 0xa5, "wrote past %" PRIu64 " digests", n);
  }
}

Test(digest, threads_and_subranges_agree)
{
  const char *path = make_file();
  uint8_t *one = digests(path, 0, TOTAL_BLK, 1);
  unsigned counts[] = { 4, 0, 3, 64 };
  for (unsigned i = 0; i < sizeof counts / sizeof *counts; i++) {
    uint8_t *d = digests(path, 0, TOTAL_BLK, counts[i]);
    cr_assert_eq(memcmp(one, d, (size_t) TOTAL_BLK * DIGEST_LEN), 0,
                 "%u threads differ from 1", counts[i]);
    free(d);
  }
  /* Ranges starting and ending inside holes, data, the last block. */
  static const uint64_t r[][2] = {
    { 7, 500 }, { 15, 1 }, { 499, 302 }, { NBLK, 1 }, { 1189, 12 }, { 1, 1199 },
  };
  for (unsigned i = 0; i < sizeof r / sizeof *r; i++)
    for (unsigned t = 1; t <= 4; t += 3) {
      uint8_t *d = digests(path, r[i][0], r[i][1], t);
      cr_assert_eq(memcmp(one + r[i][0] * DIGEST_LEN, d, r[i][1] * DIGEST_LEN), 0,
                   "range %" PRIu64 "+%" PRIu64 " with %u threads", r[i][0], r[i][1], t);
      free(d);
    }
  free(one);
}

/* digest_file_nice: its own threads at a lower priority (the caller's
 * left as it was), the same digests. */
Test(digest, niced_threads_agree_and_leave_the_caller_alone)
{
  const char *path = make_file();
  uint8_t *one = digests(path, 0, TOTAL_BLK, 1);
  int fd = open(path, O_RDONLY);
  cr_assert(fd >= 0);
  errno = 0;
  int before = getpriority(PRIO_PROCESS, 0);
  cr_assert_eq(errno, 0);
  for (unsigned t = 1; t <= 3; t++) {
    uint8_t *d = malloc((size_t) TOTAL_BLK * DIGEST_LEN);
    cr_assert_not_null(d);
    cr_assert_eq(digest_file_nice(fd, FSIZE, 0, TOTAL_BLK, d, t, 10), 0);
    cr_assert_eq(memcmp(one, d, (size_t) TOTAL_BLK * DIGEST_LEN), 0,
                 "niced, %u threads, differ", t);
    free(d);
  }
  cr_assert_eq(getpriority(PRIO_PROCESS, 0), before, "the caller's nice value changed");
  close(fd);
  free(one);
}

static uint64_t rchar(void)
{
  FILE *f = fopen("/proc/self/io", "r");
  char line[128];
  unsigned long long v = 0;
  cr_assert_not_null(f);
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "rchar: %llu", &v) == 1) break;
  fclose(f);
  return v;
}

/* A 256 MiB file that is all hole but one block: hashing reads only that
 * block (bytes read by this process, /proc/self/io rchar). */
Test(digest, holes_are_not_read)
{
  char path[128];
  uint8_t buf[DIGEST_BLOCK];
  const uint64_t size = 256ull << 20, nblk = size / DIGEST_BLOCK;
  int fd;
  snprintf(path, sizeof path, "%s/sparse", dir);
  fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  cr_assert(fd >= 0);
  cr_assert_eq(ftruncate(fd, size), 0);
  for (size_t i = 0; i < sizeof buf; i++) buf[i] = pattern(3, i);
  cr_assert_eq(pwrite(fd, buf, sizeof buf, 1000 * DIGEST_BLOCK), (ssize_t) sizeof buf);
  cr_assert_eq(fsync(fd), 0);
  off_t d = lseek(fd, 0, SEEK_DATA);
  if (d != 1000 * DIGEST_BLOCK)
    cr_skip_test("this filesystem does not report holes (SEEK_DATA: %lld)", (long long) d);

  uint8_t *out = malloc(nblk * DIGEST_LEN), want[DIGEST_LEN];
  cr_assert_not_null(out);
  digest_block(buf, want);
  uint64_t before = rchar();
  cr_assert_eq(digest_file(fd, size, 0, nblk, out, 2), 0, "%s", strerror(errno));
  uint64_t nread = rchar() - before;
  cr_assert_lt(nread, 1u << 20, "%" PRIu64 " bytes read for one data block", nread);
  for (uint64_t b = 0; b < nblk; b++)
    cr_assert_eq(memcmp(out + b * DIGEST_LEN, b == 1000 ? want : digest_zero(),
                        DIGEST_LEN), 0, "block %" PRIu64, b);
  free(out);
  close(fd);
}

Test(digest, bad_fd_and_range)
{
  const char *path = make_file();
  uint8_t out[4 * DIGEST_LEN];
  int fd = open(path, O_RDONLY);
  cr_assert(fd >= 0);

  errno = 0;
  cr_assert_eq(digest_file(-1, FSIZE, 0, 1, out, 1), -1);
  cr_assert_eq(errno, EBADF);
  int closed = dup(fd);
  close(closed);
  errno = 0;
  cr_assert_eq(digest_file(closed, FSIZE, 0, 1, out, 1), -1);
  cr_assert_eq(errno, EBADF);

  static const uint64_t bad[][2] = {
    { TOTAL_BLK, 1 }, { TOTAL_BLK - 1, 2 }, { TOTAL_BLK + 5, 0 },
    { UINT64_MAX, 2 }, { 2, UINT64_MAX },
  };
  for (unsigned i = 0; i < sizeof bad / sizeof *bad; i++) {
    errno = 0;
    cr_assert_eq(digest_file(fd, FSIZE, bad[i][0], bad[i][1], out, 1), -1,
                 "range %" PRIu64 "+%" PRIu64 " accepted", bad[i][0], bad[i][1]);
    cr_assert_eq(errno, EINVAL);
  }
  /* An empty range at the end is fine; the last block alone too. */
  cr_assert_eq(digest_file(fd, FSIZE, TOTAL_BLK, 0, out, 1), 0);
  cr_assert_eq(digest_file(fd, FSIZE, TOTAL_BLK - 1, 1, out, 1), 0);
  close(fd);

  /* A read error (a directory cannot be read) is reported, not hashed. */
  int dfd = open(dir, O_RDONLY | O_DIRECTORY);
  cr_assert(dfd >= 0);
  errno = 0;
  cr_assert_eq(digest_file(dfd, 2 * DIGEST_BLOCK, 0, 2, out, 1), -1);
  cr_assert_eq(errno, EISDIR);
  close(dfd);
}
