/* fuzz-bitmap.c: libFuzzer target for reading bitmap files
 * (common/store/bitmap.c), through its public API only.
 *
 * The input is the whole file.  The harness writes it to a scratch file
 * (on /dev/shm when there is one, so syncs cost nothing) and then does
 * what xnbd-proxy does at start-up: bitmap_peek, and bitmap_open with the
 * geometry and source the file claims when it is complete (the engine
 * takes them from the file then), else with a fixed 1 MiB / 4 KiB
 * geometry.  An open that succeeds is exercised (count, next set and
 * clear, test) and closed, which persists.  A second open with the other
 * geometry checks that mismatches are refused, not misread.
 *
 * Only opens of plausible size are tried: an image of more than 64 TiB
 * in 4 KiB blocks would need a bit array over 2 GiB, more than libFuzzer
 * lets a run allocate (the engine asks the source for the size when the
 * file is not complete). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "bitmap.h"
#include "fuzz-common.h"
#include "util.h"

#define DEF_SIZE (UINT64_C(1) << 20)
#define DEF_BS   4096u
#define DEF_SRC  "fuzz-source"
#define MAX_BITS (UINT64_C(1) << 31)     /* 256 MiB of bit array */

static char dir[64], path[128];
static char err[BITMAP_ERR_MAX];

static void cleanup(void)
{
  unlink(path);
  rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  fuzz_quiet_logs("fuzz-bitmap");
  snprintf(dir, sizeof dir, "%s/xnbd-fuzz-bitmap.XXXXXX",
           access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  FUZZ_CHECK(mkdtemp(dir), "mkdtemp: %s", strerror(errno));
  snprintf(path, sizeof path, "%s/bitmap", dir);
  atexit(cleanup);
  return 0;
}

static void exercise(uint64_t size, uint32_t bs, const char *src)
{
  struct bitmap *bm;
  uint64_t n, count, seen = 0;

  if (bs == 0 || size / bs >= MAX_BITS)
    return;
  bm = bitmap_open(path, size, bs, src, false, err, sizeof err);
  if (!bm) {
    FUZZ_CHECK(err[0] != '\0', "bitmap_open failed without a message");
    return;
  }
  n = bitmap_nblocks(bm);
  FUZZ_CHECK(bitmap_block_size(bm) == bs && bitmap_image_size(bm) == size,
             "opened with other geometry than asked");
  FUZZ_CHECK(n == size / bs + (size % bs != 0), "nblocks %llu for %llu / %u",
             (unsigned long long) n, (unsigned long long) size, bs);
  FUZZ_CHECK(strcmp(bitmap_source_id(bm), src) == 0, "source id changed");
  count = bitmap_count(bm);
  FUZZ_CHECK(count <= n, "count %llu > nblocks %llu",
             (unsigned long long) count, (unsigned long long) n);
  /* Walk the present runs (bounded: at most 4096 runs). */
  for (uint64_t b = bitmap_next_set(bm, 0), runs = 0; b < n && runs < 4096; runs++) {
    uint64_t end = bitmap_next_clear(bm, b);
    FUZZ_CHECK(end > b && end <= n, "next_clear(%llu) = %llu",
               (unsigned long long) b, (unsigned long long) end);
    FUZZ_CHECK(bitmap_test(bm, b) && (end == n || !bitmap_test(bm, end)),
               "test disagrees with next_set/next_clear");
    seen += end - b;
    b = end < n ? bitmap_next_set(bm, end) : n;
    if (b >= n)
      FUZZ_CHECK(seen == count, "runs add up to %llu, count is %llu",
                 (unsigned long long) seen, (unsigned long long) count);
  }
  FUZZ_CHECK(!bitmap_test(bm, n), "bit past the end");
  if (bitmap_is_complete(bm))
    FUZZ_CHECK(count == n, "complete with %llu of %llu blocks",
               (unsigned long long) count, (unsigned long long) n);
  if (n > 0 && !bitmap_test(bm, 0))
    bitmap_set(bm, 0);
  bitmap_close(bm);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct bitmap_info bi;
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

  FUZZ_CHECK(fd >= 0, "cannot write %s: %s", path, strerror(errno));
  FUZZ_CHECK(write_all(fd, data, size) == 0, "write: %s", strerror(errno));
  close(fd);

  err[0] = '\0';
  if (bitmap_peek(path, &bi, err, sizeof err) == 0) {
    FUZZ_CHECK(memchr(bi.source_id, '\0', sizeof bi.source_id) != NULL,
               "source id not terminated");
    if (bi.complete)
      exercise(bi.image_size, bi.block_size, bi.source_id);
  } else {
    FUZZ_CHECK(err[0] != '\0' || errno == ENOENT, "bitmap_peek failed without a message");
  }
  /* The file may have been rewritten by a close; start from the input. */
  fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
  FUZZ_CHECK(fd >= 0 && write_all(fd, data, size) == 0, "rewrite: %s", strerror(errno));
  close(fd);
  err[0] = '\0';
  exercise(DEF_SIZE, DEF_BS, DEF_SRC);
  return 0;
}
