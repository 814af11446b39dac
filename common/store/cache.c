/* cache.c: see cache.h. */
#include "cache.h"
#include "file-backend.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

struct cache {
  struct file_backend *fb;
  int fd;
};

/* fsync of the directory holding path. */
static int sync_dir_of(const char *path)
{
  char *copy = strdup(path);
  if (!copy) return -1;
  int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  free(copy);
  if (fd < 0) return -1;
  int rc = fsync(fd);
  int saved = errno;
  close(fd);
  errno = saved;
  return rc;
}

struct cache *cache_open(const char *path, uint64_t size, bool must_exist,
                         bool discard_content, struct workq *wq,
                         uint64_t *old_size, char *err, size_t errlen)
{
  struct stat st;
  struct cache *c;
  if (old_size) *old_size = size;
  if (stat(path, &st) < 0) {
    if (errno != ENOENT || must_exist) {
      snprintf(err, errlen, "cannot use cache image %s: %s", path, strerror(errno));
      return NULL;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    /* Its name must survive a power cut before any bit of it is persisted:
     * sync the new file, then its directory (I2). */
    if (fd < 0 || ftruncate(fd, size) < 0 || fsync(fd) < 0 || sync_dir_of(path) < 0) {
      snprintf(err, errlen, "cannot create cache image %s: %s", path, strerror(errno));
      if (fd >= 0) close(fd);
      return NULL;
    }
    close(fd);
    log_info("created sparse cache image %s (%" PRIu64 " bytes)", path, size);
  } else if (S_ISREG(st.st_mode) && (uint64_t) st.st_size != size) {
    if (old_size) *old_size = st.st_size;
    if (((uint64_t) st.st_size > size && !discard_content) || truncate(path, size) < 0) {
      snprintf(err, errlen, "cache image %s is %" PRIu64 " bytes but the "
               "source is %" PRIu64 " bytes: use a new --cache file for this "
               "source", path, (uint64_t) st.st_size, size);
      return NULL;
    }
  }
  c = calloc(1, sizeof *c);
  if (!c) { snprintf(err, errlen, "out of memory"); return NULL; }
  c->fb = file_backend_open(path, false, wq, err, errlen);
  if (!c->fb) { free(c); return NULL; }
  c->fd = file_backend_fd(c->fb);
  return c;
}

void cache_close(struct cache *c)
{
  if (!c) return;
  file_backend_close(c->fb);
  free(c);
}

int cache_write(struct cache *c, const void *buf, uint64_t len, uint64_t off)
{
  return pwrite_all(c->fd, buf, len, off);
}

int cache_read(struct cache *c, void *buf, uint64_t len, uint64_t off)
{
  return pread_all(c->fd, buf, len, off);
}

int64_t cache_data_blocks(struct cache *c, uint32_t block_size, uint64_t *bits)
{
  struct stat st;
  int64_t n = 0;
  if (fstat(c->fd, &st) < 0) return -1;
  uint64_t size = st.st_size, pos = 0;
  while (pos < size) {
    off_t d = lseek(c->fd, pos, SEEK_DATA);
    if (d < 0 && errno == ENXIO) break;           /* a hole to the end */
    if (d < 0) { d = pos; }                       /* cannot tell: data */
    off_t h = lseek(c->fd, d, SEEK_HOLE);
    uint64_t end = h < 0 ? size : MIN((uint64_t) h, size);
    for (uint64_t b = d / block_size; b * block_size < end; b++) {
      if (!(bits[b / 64] >> (b % 64) & 1)) n++;
      bits[b / 64] |= UINT64_C(1) << (b % 64);
    }
    if (end <= (uint64_t) d) break;
    pos = end;
  }
  return n;
}

int cache_zero(struct cache *c, uint64_t off, uint64_t len, bool keep_allocated)
{
  static const char zeros[65536];
  int mode = keep_allocated ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE;
  if (fallocate(c->fd, mode | FALLOC_FL_KEEP_SIZE, off, len) == 0) return 0;
  for (uint64_t p = off; p < off + len; p += sizeof zeros)
    if (pwrite_all(c->fd, zeros, MIN((uint64_t) sizeof zeros, off + len - p), p) < 0)
      return -1;
  return 0;
}

void cache_trim(struct cache *c, uint64_t off, uint64_t len)
{
  if (fallocate(c->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) < 0)
    log_debug("trim of cache %" PRIu64 "+%" PRIu64 " not done: %s", off, len,
              strerror(errno));
}

int cache_sync(struct cache *c) { return file_backend_sync(c->fb); }

struct file_backend *cache_backend(struct cache *c) { return c->fb; }
