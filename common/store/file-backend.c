#include "file-backend.h"
#include "nbd-proto.h"
#include "workq.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_HOLE_EXTENTS 64

struct file_backend {
  int fd;
  uint64_t size;
  bool readonly;
  bool is_bdev;
  atomic_bool may_have_holes;   /* false: skip SEEK_HOLE probing */
  atomic_bool nowait_write_ok;  /* RWF_NOWAIT writes supported here */
  struct workq *wq;
  char *path;
};

struct file_backend *file_backend_open(const char *path, bool readonly,
                                       struct workq *wq, char *err, size_t errlen)
{
  struct file_backend *fb;
  struct stat st;
  int fd = open(path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);

  if (fd < 0) {
    int e = errno;
    if (e == ENOENT)
      snprintf(err, errlen, "cannot open image '%s': no such file (create it "
               "first, e.g. with 'truncate -s 10G %s')", path, path);
    else if ((e == EACCES || e == EROFS) && !readonly)
      snprintf(err, errlen, "cannot open image '%s' for writing: %s (serve "
               "it with --readonly, or fix its permissions)", path, strerror(e));
    else
      snprintf(err, errlen, "cannot open image '%s': %s", path, strerror(e));
    return NULL;
  }
  if (fstat(fd, &st) < 0) {
    snprintf(err, errlen, "cannot stat image '%s': %s", path, strerror(errno));
    close(fd);
    return NULL;
  }
  fb = calloc(1, sizeof *fb);
  if (!fb) { close(fd); snprintf(err, errlen, "out of memory"); return NULL; }
  fb->fd = fd;
  fb->readonly = readonly;
  fb->wq = wq;
  fb->path = strdup(path);
  if (S_ISBLK(st.st_mode)) {
    fb->is_bdev = true;
    if (ioctl(fd, BLKGETSIZE64, &fb->size) < 0) {
      snprintf(err, errlen, "cannot get the size of block device '%s': %s",
               path, strerror(errno));
      file_backend_close(fb);
      return NULL;
    }
  } else if (S_ISREG(st.st_mode)) {
    fb->size = st.st_size;
    atomic_init(&fb->may_have_holes, (uint64_t) st.st_blocks * 512 < fb->size);
  } else {
    snprintf(err, errlen, "'%s' is neither a regular file nor a block device", path);
    file_backend_close(fb);
    return NULL;
  }
  atomic_init(&fb->nowait_write_ok, true);
  return fb;
}

int file_backend_fd(struct file_backend *fb) { return fb->fd; }

int file_backend_sync(struct file_backend *fb)
{
  if (!fb) { errno = EBADF; return -1; }
  while (fdatasync(fb->fd) < 0)
    if (errno != EINTR) return -1;
  return 0;
}

void file_backend_close(struct file_backend *fb)
{
  if (!fb) return;
  if (!fb->readonly && file_backend_sync(fb) < 0)
    log_error("flushing image '%s' on close failed: %s", fb->path, strerror(errno));
  close(fb->fd);
  free(fb->path);
  free(fb);
}

static uint64_t fb_get_size(void *h) { return ((struct file_backend *) h)->size; }

static uint16_t fb_get_flags(void *h)
{
  struct file_backend *fb = h;
  /* One fd and one page cache for every connection, so a flush on one
   * connection covers writes completed on all: multi-conn is true. */
  uint16_t f = NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;
  if (fb->readonly)
    return f | NBD_FLAG_READ_ONLY;
  return f | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
         NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
}

/* ---- work run on the I/O threads ---- */

static struct file_backend *req_fb(struct xreq *r) { return r->be_priv; }

/* Holes are looked for (two lseeks) only in reads this large: a small
 * read of a hole costs less as zeros read from the page cache than as
 * two system calls on an I/O thread, and its reply shrinks by little. */
#define HOLE_READ_MIN (64u << 10)

static bool wants_holes(struct file_backend *fb, struct xreq *r)
{
  return (r->flags & XREQ_F_WANT_HOLES) && r->length >= HOLE_READ_MIN &&
         atomic_load(&fb->may_have_holes);
}

static int read_with_holes(struct file_backend *fb, struct xreq *r)
{
  uint64_t pos = r->offset, end = r->offset + r->length;
  struct xnbd_extent ext[MAX_HOLE_EXTENTS];
  size_t n = 0;

  while (pos < end) {
    off_t data = lseek(fb->fd, pos, SEEK_DATA);
    uint64_t data_end;
    if (data < 0 && errno != ENXIO) return -1;
    if (data < 0 || (uint64_t) data >= end) data = end;   /* hole to the end */
    if ((uint64_t) data > pos) {
      if (n == MAX_HOLE_EXTENTS - 1) break;
      ext[n++] = (struct xnbd_extent) { data - pos, NBD_STATE_HOLE | NBD_STATE_ZERO };
      pos = data;
      if (pos == end) break;
    }
    off_t hole = lseek(fb->fd, pos, SEEK_HOLE);
    if (hole < 0) return -1;
    data_end = MIN((uint64_t) hole, end);
    if (n == MAX_HOLE_EXTENTS - 1) data_end = end;
    if (pread_all(fb->fd, (char *) r->buf + (pos - r->offset), data_end - pos, pos) < 0)
      return -1;
    ext[n++] = (struct xnbd_extent) { data_end - pos, 0 };
    pos = data_end;
  }
  if (pos < end) {   /* ran out of extent slots: the rest is plain data */
    if (pread_all(fb->fd, (char *) r->buf + (pos - r->offset), end - pos, pos) < 0)
      return -1;
    ext[n++] = (struct xnbd_extent) { end - pos, 0 };
  }
  if (n > 1 || (ext[0].flags & NBD_STATE_ZERO)) {
    r->extents = malloc(n * sizeof *ext);
    if (r->extents) {
      memcpy(r->extents, ext, n * sizeof *ext);
      r->n_extents = n;
    } else {       /* no map: the hole bytes must be real zeros */
      uint64_t p = 0;
      for (size_t i = 0; i < n; p += ext[i++].length)
        if (ext[i].flags & NBD_STATE_ZERO)
          memset((char *) r->buf + p, 0, ext[i].length);
    }
  }
  return 0;
}

static int do_punch(struct file_backend *fb, uint64_t off, uint64_t len)
{
  if (fallocate(fb->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) == 0) {
    atomic_store(&fb->may_have_holes, true);
    return 0;
  }
  return -1;
}

static int write_zero_bytes(struct file_backend *fb, uint64_t off, uint64_t len)
{
  static const char zeros[65536];
  while (len) {
    size_t n = MIN(len, sizeof zeros);
    if (pwrite_all(fb->fd, zeros, n, off) < 0) return -1;
    off += n; len -= n;
  }
  return 0;
}

static int do_zero(struct file_backend *fb, struct xreq *r)
{
  bool fast = r->flags & XREQ_F_FAST_ZERO;
  if (!(r->flags & XREQ_F_NO_HOLE) && do_punch(fb, r->offset, r->length) == 0)
    return 0;
  if (fallocate(fb->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                r->offset, r->length) == 0)
    return 0;
  if (fb->is_bdev) {
    uint64_t range[2] = { r->offset, r->length };
    if (ioctl(fb->fd, BLKZEROOUT, range) == 0) return 0;
  }
  if (fast) { errno = ENOTSUP; return -1; }   /* honest: no fast way here */
  return write_zero_bytes(fb, r->offset, r->length);
}

static int sync_if_fua(struct file_backend *fb, struct xreq *r)
{
  return (r->flags & XREQ_F_FUA) ? file_backend_sync(fb) : 0;
}

static void fb_work(struct xwork *w)
{
  struct xreq *r = (struct xreq *) ((char *) w - offsetof(struct xreq, work));
  struct file_backend *fb = req_fb(r);
  uint64_t done = r->be_u64;   /* bytes already transferred on the loop */
  int rc = 0;

  switch (r->type) {
  case XREQ_READ:
    if (wants_holes(fb, r) && !done)
      rc = read_with_holes(fb, r);
    else
      rc = pread_all(fb->fd, (char *) r->buf + done, r->length - done, r->offset + done);
    break;
  case XREQ_WRITE:
    rc = pwrite_all(fb->fd, (char *) r->buf + done, r->length - done, r->offset + done);
    if (rc == 0) rc = sync_if_fua(fb, r);
    break;
  case XREQ_FLUSH:
    rc = file_backend_sync(fb);
    break;
  case XREQ_TRIM:
    /* Trim is advisory: where punching is unsupported, nothing happens. */
    if (do_punch(fb, r->offset, r->length) < 0 &&
        errno != EOPNOTSUPP && errno != ENOSYS)
      rc = -1;
    if (rc == 0) rc = sync_if_fua(fb, r);
    break;
  case XREQ_ZERO:
    rc = do_zero(fb, r);
    if (rc == 0) rc = sync_if_fua(fb, r);
    break;
  case XREQ_BLOCK_STATUS: {
    uint64_t pos = r->offset, end = r->offset + r->length;
    size_t n = 0, max = (r->flags & XREQ_F_REQ_ONE) ? 1 : 8192;
    r->extents = calloc(max, sizeof *r->extents);
    if (!r->extents) { rc = -1; errno = ENOMEM; break; }
    while (pos < end && n < max) {
      off_t d = lseek(fb->fd, pos, SEEK_DATA);
      if (d < 0 && errno != ENXIO) { rc = -1; break; }
      if (d < 0 || (uint64_t) d > pos) {
        uint64_t he = d < 0 ? end : MIN((uint64_t) d, end);
        r->extents[n++] = (struct xnbd_extent) { he - pos, NBD_STATE_HOLE | NBD_STATE_ZERO };
        pos = he;
        continue;
      }
      off_t hl = lseek(fb->fd, pos, SEEK_HOLE);
      if (hl < 0) { rc = -1; break; }
      uint64_t de = MIN((uint64_t) hl, end);
      r->extents[n++] = (struct xnbd_extent) { de - pos, 0 };
      pos = de;
    }
    r->n_extents = n;
    break;
  }
  case XREQ_CACHE:
    break;
  }
  xreq_complete(r, rc < 0 ? (errno ? errno : EIO) : 0);
}

static void to_pool(struct file_backend *fb, struct xreq *r)
{
  r->be_priv = fb;
  r->work.fn = fb_work;
  workq_submit(fb->wq, &r->work);
}

/* ---- operations, called on the loop thread ---- */

static void fb_pread(void *h, struct xreq *r)
{
  struct file_backend *fb = h;
  r->be_u64 = 0;
  if (!wants_holes(fb, r)) {
    struct iovec iov = { r->buf, r->length };
    ssize_t n = preadv2(fb->fd, &iov, 1, r->offset, RWF_NOWAIT);
    if (n == (ssize_t) r->length) { xreq_complete(r, 0); return; }
    if (n > 0) r->be_u64 = n;
  }
  to_pool(fb, r);
}

/* Writes that the page cache absorbs are done here, on the loop thread:
 * with RWF_NOWAIT where the filesystem supports it for buffered writes,
 * else plainly for small ones (a buffered write of a few pages costs less
 * than handing it to another thread and back).  Large and FUA writes, and
 * anything that would block, go to the I/O threads. */
#define INLINE_WRITE_MAX (256 * 1024)

static void fb_pwrite(void *h, struct xreq *r)
{
  struct file_backend *fb = h;
  r->be_u64 = 0;
  if (!(r->flags & XREQ_F_FUA)) {
    struct iovec iov = { r->buf, r->length };
    ssize_t n = -1;
    if (atomic_load(&fb->nowait_write_ok)) {
      n = pwritev2(fb->fd, &iov, 1, r->offset, RWF_NOWAIT);
      if (n < 0 && errno == EOPNOTSUPP)
        atomic_store(&fb->nowait_write_ok, false);
    } else if (r->length <= INLINE_WRITE_MAX)
      n = pwrite(fb->fd, r->buf, r->length, r->offset);
    if (n == (ssize_t) r->length) { xreq_complete(r, 0); return; }
    if (n > 0) r->be_u64 = n;
  }
  to_pool(fb, r);
}

static void fb_block_status(void *h, struct xreq *r)
{
  struct file_backend *fb = h;
  if (!atomic_load(&fb->may_have_holes)) {
    r->extents = malloc(sizeof *r->extents);
    if (r->extents) {
      r->extents[0] = (struct xnbd_extent) { r->length, 0 };
      r->n_extents = 1;
      xreq_complete(r, 0);
      return;
    }
  }
  r->be_u64 = 0;
  to_pool(fb, r);
}

static void fb_cache(void *h, struct xreq *r)
{
  struct file_backend *fb = h;
  posix_fadvise(fb->fd, r->offset, r->length, POSIX_FADV_WILLNEED);
  xreq_complete(r, 0);
}

static void fb_queue(void *h, struct xreq *r)
{
  r->be_u64 = 0;
  to_pool(h, r);
}

const struct xnbd_backend_ops file_backend_ops = {
  .name = "file",
  .get_size = fb_get_size,
  .get_flags = fb_get_flags,
  .pread = fb_pread,
  .pwrite = fb_pwrite,
  .flush = fb_queue,
  .trim = fb_queue,
  .zero = fb_queue,
  .cache = fb_cache,
  .block_status = fb_block_status,
};
