/* digest-sidecar.c: computed digests kept next to the image
 * (digest-sidecar.h: format, and why it is never stale). */
#include "digest-sidecar.h"
#include "digest.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

struct digest_sidecar {
  char *path;
  int fd, image_fd;
  uint64_t image_size, blocks;
  char id_hex[33];
  uint64_t gen;

  pthread_mutex_t lock;         /* everything below except the counters */
  uint8_t salt[32];
  uint64_t epoch;               /* +1 at each write begin and end */
  unsigned inflight;            /* writes begun, not ended */
  struct file_stamp seen;       /* the image's times when last looked at */
  uint64_t seen_epoch;          /* epoch then */
  bool broken;                  /* a write failed: no longer used */
  /* One bit per block: its entry passed its tag (or was stored) under
   * the current salt, and nothing invalidated it since.  A look-up then
   * skips the tag's hash (a 16384-block look-up hashed for ~6 ms, and
   * two at once starved the server's event loop on two cores).  Bits are
   * set under the lock only while the epoch is the one the entries were
   * read or stored in; zeroing an entry clears its bit, a new salt clears
   * them all.  NULL (out of memory): every look-up checks every tag. */
  _Atomic uint64_t *checked;

  atomic_uint_fast64_t hits, stored;
};

static void put_be(uint8_t *p, uint64_t v, unsigned n)
{
  for (unsigned i = 0; i < n; i++) p[i] = (uint8_t) (v >> (8 * (n - 1 - i)));
}

static uint64_t get_be(const uint8_t *p, unsigned n)
{
  uint64_t v = 0;
  for (unsigned i = 0; i < n; i++) v = v << 8 | p[i];
  return v;
}

static uint64_t entry_off(uint64_t block)
{
  return DIGEST_SIDECAR_HDR + block * DIGEST_SIDECAR_ENTRY;
}

/* The tag of block b's digest d under salt. */
static void entry_tag(const uint8_t salt[32], uint64_t b, const uint8_t *d, uint8_t tag[8])
{
  uint8_t in[32 + 8 + DIGEST_LEN], md[DIGEST_LEN];
  memcpy(in, salt, 32);
  put_be(in + 32, b, 8);
  memcpy(in + 40, d, DIGEST_LEN);
  digest_bytes(in, sizeof in, md);
  memcpy(tag, md, 8);
}

static void header(const struct digest_sidecar *sc, uint8_t h[DIGEST_SIDECAR_HDR])
{
  memset(h, 0, DIGEST_SIDECAR_HDR);
  memcpy(h, DIGEST_SIDECAR_MAGIC, 8);
  put_be(h + 8, DIGEST_SIDECAR_VERSION, 4);
  put_be(h + 12, DIGEST_BLOCK, 4);
  put_be(h + 16, sc->image_size, 8);
  memcpy(h + 24, sc->id_hex, 32);
  put_be(h + 56, sc->gen, 8);
  memcpy(h + 64, sc->salt, 32);
}

static int new_salt(uint8_t salt[32])
{
  size_t got = 0;
  while (got < 32) {
    ssize_t n = getrandom(salt + got, 32 - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    got += n;
  }
  return 0;
}

/* Checks the open sidecar against the image.  Returns NULL (usable: salt
 * loaded) or why not. */
static bool checked_get(const struct digest_sidecar *sc, uint64_t b)
{
  return sc->checked && (atomic_load_explicit(&sc->checked[b / 64], memory_order_relaxed) >> (b % 64) & 1);
}

/* Under the lock: marks or clears blocks [first, first + count). */
static void checked_set_locked(struct digest_sidecar *sc, uint64_t first, uint64_t count, bool on)
{
  if (!sc->checked) return;
  for (uint64_t b = first; b < first + count; ) {
    unsigned lo = (unsigned) (b % 64);
    uint64_t n = MIN(64 - lo, first + count - b);
    uint64_t mask = (n == 64 ? ~UINT64_C(0) : (UINT64_C(1) << n) - 1) << lo;
    if (on)
      atomic_fetch_or_explicit(&sc->checked[b / 64], mask, memory_order_relaxed);
    else
      atomic_fetch_and_explicit(&sc->checked[b / 64], ~mask, memory_order_relaxed);
    b += n;
  }
}

static const char *check(struct digest_sidecar *sc)
{
  uint8_t h[DIGEST_SIDECAR_HDR], want[DIGEST_SIDECAR_HDR];
  struct stat st;
  if (fstat(sc->fd, &st) < 0) return strerror(errno);
  if (!S_ISREG(st.st_mode)) return "it is not a regular file";
  if ((uint64_t) st.st_size < DIGEST_SIDECAR_HDR) return "it is shorter than its header";
  if (pread_all(sc->fd, h, sizeof h, 0) < 0) return strerror(errno);
  if (memcmp(h, DIGEST_SIDECAR_MAGIC, 8) != 0) return "not a digest sidecar (bad magic)";
  if (get_be(h + 8, 4) != DIGEST_SIDECAR_VERSION) return "unknown version";
  if (get_be(h + 12, 4) != DIGEST_BLOCK) return "another block size";
  if (get_be(h + 16, 8) != sc->image_size) return "made for another image size";
  if (memcmp(h + 24, sc->id_hex, 32) != 0) return "made for another image identity";
  if (get_be(h + 56, 8) != sc->gen)
    return "made for another generation of the image (it changed while no server ran)";
  memcpy(sc->salt, h + 64, 32);
  header(sc, want);
  if (memcmp(h, want, DIGEST_SIDECAR_HDR) != 0) return "damaged header (reserved bytes not zero)";
  if ((uint64_t) st.st_size != entry_off(sc->blocks))
    return (uint64_t) st.st_size < entry_off(sc->blocks) ? "truncated" : "longer than its entries";
  return NULL;
}

/* A new empty sidecar: a temporary file (header, sparse entries) renamed
 * over the old one.  Returns 0, or -1 with errno. */
static int rebuild(struct digest_sidecar *sc)
{
  uint8_t h[DIGEST_SIDECAR_HDR];
  char *tmp = NULL;
  int fd, e;
  if (new_salt(sc->salt) < 0) return -1;
  if (asprintf(&tmp, "%s.tmp.%ld", sc->path, (long) getpid()) < 0) return -1;
  fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) { e = errno; free(tmp); errno = e; return -1; }
  header(sc, h);
  if (pwrite_all(fd, h, sizeof h, 0) < 0 || ftruncate(fd, entry_off(sc->blocks)) < 0 ||
      rename(tmp, sc->path) < 0) {
    e = errno;
    close(fd);
    unlink(tmp);
    free(tmp);
    errno = e;
    return -1;
  }
  free(tmp);
  if (sc->fd >= 0) close(sc->fd);
  sc->fd = fd;
  return 0;
}

struct digest_sidecar *digest_sidecar_open(const char *path, int image_fd,
                                           uint64_t image_size,
                                           const char *id_hex, uint64_t gen)
{
  struct digest_sidecar *sc;
  char *real;
  const char *why;

  if (!id_hex || strlen(id_hex) != 32) return NULL;
  sc = calloc(1, sizeof *sc);
  if (!sc) return NULL;
  sc->fd = -1;
  sc->image_fd = image_fd;
  sc->image_size = image_size;
  sc->blocks = image_size / DIGEST_BLOCK + (image_size % DIGEST_BLOCK != 0);
  memcpy(sc->id_hex, id_hex, 33);
  sc->gen = gen;
  sc->checked = calloc(sc->blocks / 64 + 1, sizeof *sc->checked);
  pthread_mutex_init(&sc->lock, NULL);
  real = realpath(path, NULL);
  if (!real || asprintf(&sc->path, "%s" DIGEST_SIDECAR_SUFFIX, real) < 0) {
    log_warn("digest sidecar: cannot resolve the path of %s (%s): digests are "
             "computed at each read", path, strerror(errno));
    sc->path = NULL;
    free(real);
    goto none;
  }
  free(real);

  sc->fd = open(sc->path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (sc->fd < 0 && errno != ENOENT) {
    /* Not ours to replace blindly (a directory, a symlink...), or not
     * writable: serve without. */
    log_warn("digest sidecar: cannot open %s (%s): digests are computed at "
             "each read, none kept", sc->path, strerror(errno));
    goto none;
  }
  why = sc->fd < 0 ? NULL : check(sc);
  if (sc->fd >= 0 && !why) {
    log_info("digest sidecar: %s matches %s (id %s gen %" PRIu64 "): its "
             "digests are used", sc->path, path, id_hex, gen);
  } else {
    if (why)
      log_warn("digest sidecar: %s is discarded and rebuilt: %s", sc->path, why);
    if (rebuild(sc) < 0) {
      log_warn("digest sidecar: cannot create %s (%s; read-only directory?): "
               "digests are computed at each read, none kept", sc->path, strerror(errno));
      goto none;
    }
    log_info("digest sidecar: %s created for %s (id %s gen %" PRIu64 ")",
             sc->path, path, id_hex, gen);
  }
  file_stamp_get(image_fd, &sc->seen);
  return sc;

none:
  if (sc->fd >= 0) close(sc->fd);
  pthread_mutex_destroy(&sc->lock);
  free(sc->checked);
  free(sc->path);
  free(sc);
  return NULL;
}

/* A write to the sidecar failed (under the lock): stop using it, and make
 * sure no later run trusts it (a failed invalidation may have left an old
 * digest valid). */
static void fail_locked(struct digest_sidecar *sc, const char *what)
{
  if (sc->broken) return;
  sc->broken = true;
  log_warn("digest sidecar: cannot %s %s (%s): it is removed; digests are "
           "computed at each read from now on", what, sc->path, strerror(errno));
  if (ftruncate(sc->fd, 0) < 0 || unlink(sc->path) < 0) { /* best effort */ }
}

uint64_t digest_sidecar_lookup(struct digest_sidecar *sc, uint64_t first,
                               uint64_t count, uint8_t *out, bool *have)
{
  uint8_t salt[32], tag[8], *buf;
  uint64_t found = 0, epoch, tagged = 0;
  bool broken;

  memset(have, 0, count * sizeof *have);
  pthread_mutex_lock(&sc->lock);
  memcpy(salt, sc->salt, 32);
  broken = sc->broken;
  epoch = sc->epoch;
  pthread_mutex_unlock(&sc->lock);
  if (broken || first >= sc->blocks || count > sc->blocks - first) return 0;
  buf = malloc(count * DIGEST_SIDECAR_ENTRY);
  if (!buf) return 0;
  /* The checked bits as they were before the entries were read (a bit
   * set while they were read may be for a newer entry than the one read),
   * trusted only if nothing was invalidated meanwhile. */
  for (uint64_t i = 0; i < count; i++) have[i] = checked_get(sc, first + i);
  /* A file shortened behind our back reads as zeros: invalid entries. */
  int rc = pread_all(sc->fd, buf, count * DIGEST_SIDECAR_ENTRY, entry_off(first));
  pthread_mutex_lock(&sc->lock);
  bool same = sc->epoch == epoch;
  pthread_mutex_unlock(&sc->lock);
  if (rc == 0)
    for (uint64_t i = 0; i < count; i++) {
      static const uint8_t none[8];
      const uint8_t *e = buf + i * DIGEST_SIDECAR_ENTRY;
      bool checked = have[i] && same;
      have[i] = false;
      /* Never written or invalidated (zeroed): no need to hash.  (A real
       * tag of eight zero bytes is then merely computed again.) */
      if (memcmp(e + DIGEST_LEN, none, 8) == 0) continue;
      if (!checked) {
        entry_tag(salt, first + i, e, tag);
        if (memcmp(tag, e + DIGEST_LEN, 8) != 0) continue;
        tagged++;
      }
      memcpy(out + i * DIGEST_LEN, e, DIGEST_LEN);
      have[i] = true;
      found++;
    }
  else
    memset(have, 0, count * sizeof *have);
  free(buf);
  if (tagged) {
    /* The entries that passed their tag, if nothing was invalidated
     * since they were read (the epoch moves at every write and salt). */
    pthread_mutex_lock(&sc->lock);
    if (sc->epoch == epoch && !sc->inflight && !sc->broken)
      for (uint64_t i = 0; i < count; i++)
        if (have[i]) checked_set_locked(sc, first + i, 1, true);
    pthread_mutex_unlock(&sc->lock);
  }
  atomic_fetch_add(&sc->hits, found);
  return found;
}

uint64_t digest_sidecar_epoch(struct digest_sidecar *sc)
{
  struct file_stamp now;
  uint64_t e;
  file_stamp_get(sc->image_fd, &now);
  pthread_mutex_lock(&sc->lock);
  if (memcmp(&now, &sc->seen, sizeof now) != 0) {
    if (sc->epoch == sc->seen_epoch && sc->inflight == 0 && !sc->broken) {
      /* The image changed, and no write came through us since we last
       * looked: someone else wrote it.  A new salt invalidates every entry;
       * the epoch bump keeps digests being computed now from being stored. */
      uint8_t h[DIGEST_SIDECAR_HDR];
      log_warn("digest sidecar: the image of %s changed behind the server's "
               "back (its size or times changed with no write through the "
               "server): every kept digest is dropped", sc->path);
      if (new_salt(sc->salt) < 0) {
        fail_locked(sc, "renew the salt of");
      } else {
        header(sc, h);
        if (pwrite_all(sc->fd, h, sizeof h, 0) < 0) fail_locked(sc, "write the header of");
      }
      sc->epoch++;
      checked_set_locked(sc, 0, sc->blocks, false);
    }
    sc->seen = now;
    sc->seen_epoch = sc->epoch;
  }
  e = sc->inflight || sc->broken ? UINT64_MAX : sc->epoch;
  pthread_mutex_unlock(&sc->lock);
  return e;
}

void digest_sidecar_store(struct digest_sidecar *sc, uint64_t epoch,
                          uint64_t first, uint64_t count, const uint8_t *digests)
{
  uint8_t salt[32], *buf;
  bool ok;

  if (epoch == UINT64_MAX || first >= sc->blocks || count > sc->blocks - first) return;
  pthread_mutex_lock(&sc->lock);
  ok = sc->epoch == epoch;      /* then the salt is the one of that epoch */
  memcpy(salt, sc->salt, 32);
  pthread_mutex_unlock(&sc->lock);
  if (!ok) return;
  buf = malloc(count * DIGEST_SIDECAR_ENTRY);
  if (!buf) return;
  /* Tags outside the lock; digest and tag of an entry go out in the same
   * pwrite, and a torn one fails its tag. */
  for (uint64_t i = 0; i < count; i++) {
    uint8_t *e = buf + i * DIGEST_SIDECAR_ENTRY;
    memcpy(e, digests + i * DIGEST_LEN, DIGEST_LEN);
    entry_tag(salt, first + i, e, e + DIGEST_LEN);
  }
  pthread_mutex_lock(&sc->lock);
  /* Under the lock so that a write beginning now zeroes the entries after
   * this, never before. */
  if (sc->epoch == epoch && !sc->broken) {
    if (pwrite_all(sc->fd, buf, count * DIGEST_SIDECAR_ENTRY, entry_off(first)) < 0)
      fail_locked(sc, "write to");
    else {
      atomic_fetch_add(&sc->stored, count);
      checked_set_locked(sc, first, count, true);
    }
  }
  pthread_mutex_unlock(&sc->lock);
  free(buf);
}

/* Zeroes the entries of blocks [first, first + count) (under the lock). */
static void zero_locked(struct digest_sidecar *sc, uint64_t first, uint64_t count)
{
  static const uint8_t zeros[65536];
  uint64_t off = entry_off(first), len = count * DIGEST_SIDECAR_ENTRY;
  checked_set_locked(sc, first, count, false);
  if (len > sizeof zeros &&
      fallocate(sc->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) == 0)
    return;
  while (len > 0) {
    size_t n = len < sizeof zeros ? len : sizeof zeros;
    if (pwrite_all(sc->fd, zeros, n, off) < 0) {
      fail_locked(sc, "invalidate digests in");
      return;
    }
    off += n;
    len -= n;
  }
}

void digest_sidecar_write_begin(struct digest_sidecar *sc, uint64_t offset,
                                uint64_t length)
{
  pthread_mutex_lock(&sc->lock);
  sc->epoch++;
  sc->inflight++;
  if (!sc->broken && length > 0 && offset < sc->image_size) {
    uint64_t first = offset / DIGEST_BLOCK;
    uint64_t end = offset + length > sc->image_size ? sc->image_size : offset + length;
    uint64_t last = (end - 1) / DIGEST_BLOCK;
    zero_locked(sc, first, last - first + 1);
  }
  pthread_mutex_unlock(&sc->lock);
}

void digest_sidecar_write_end(struct digest_sidecar *sc)
{
  pthread_mutex_lock(&sc->lock);
  sc->epoch++;
  sc->inflight--;
  pthread_mutex_unlock(&sc->lock);
}

void digest_sidecar_close(struct digest_sidecar *sc)
{
  if (!sc) return;
  if (!sc->broken && fsync(sc->fd) < 0) {
    pthread_mutex_lock(&sc->lock);
    fail_locked(sc, "sync");
    pthread_mutex_unlock(&sc->lock);
  }
  log_info("digest sidecar %s: %" PRIu64 " digests read from it, %" PRIu64
           " computed and stored", sc->path, (uint64_t) atomic_load(&sc->hits),
           (uint64_t) atomic_load(&sc->stored));
  close(sc->fd);
  pthread_mutex_destroy(&sc->lock);
  free(sc->checked);
  free(sc->path);
  free(sc);
}
