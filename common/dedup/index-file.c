/* index-file.c: the seed index file (xnbd-proxy --index).
 *
 * It keeps, per seed, its identity and the 8-byte digest key of each of
 * its blocks (zero blocks included, in block order); the table is rebuilt
 * from these in memory at each open.  Per-seed lists rather than the table
 * itself: a changed seed is hashed again without touching the others (with
 * a stored table, removing one seed's entries would lose the duplicates
 * that other seeds' blocks were not inserted for), seeds may be reordered
 * or removed freely, and the table's geometry is free to change.  Cost:
 * 8 bytes of file per seed block; rebuilding the table is a sequential read
 * and one insert per block, far cheaper than hashing.
 *
 * Layout (integers big-endian, every part 8-byte aligned):
 *   header (64 bytes):  "XNBDINDX", u32 version (1), u32 header_bytes,
 *       u32 nseeds, u32 key_bytes (8), u32 block_size (4096), u32 tag_bits,
 *       u64 table capacity, u64 table entries (of the build that wrote it:
 *       the size of the next table), u64 file_bytes, u64 header checksum
 *       (of header_bytes bytes, this field counted as 0)
 *   nseeds seed records: u32 path_len, u32 0, u64 dev, ino, size,
 *       mtime s, mtime ns, ctime s, ctime ns, nblocks, list offset,
 *       list checksum, 0; the realpath, padded to 8 bytes
 *   the lists: nblocks x u64 key per seed
 * The checksums (a 64-bit multiply-xor over 8-byte words) catch damage
 * and truncation; they are no defence against someone who may write the
 * file, and need not be: every block taken from a seed is re-hashed and
 * compared with the source's digest before use (I4), so a forged index
 * file costs deduplication, never data. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "index-int.h"
#include "log.h"
#include "util.h"

#define MAGIC "XNBDINDX"
#define VERSION 1
#define HDR_BYTES 64
#define REC_BYTES 96
#define TAG_BITS_STORED 24
#define IO_KEYS 8192                 /* keys converted per read or write */

static size_t pad8(size_t n) { return (n + 7) & ~(size_t) 7; }

/* A 64-bit checksum of len bytes (a multiple of 8) from state h. */
static uint64_t csum(uint64_t h, const void *p, size_t len)
{
  const uint8_t *b = p;
  for (size_t i = 0; i < len; i += 8) {
    uint64_t w;
    memcpy(&w, b + i, 8);
    h = (h ^ w) * UINT64_C(0x9e3779b97f4a7c15);
    h ^= h >> 29;
  }
  return h;
}
#define CSUM_INIT UINT64_C(0x584e4244494e4458)

static uint64_t rec_off(const uint8_t *hdr, size_t *pos, size_t hdr_bytes, bool *ok)
{
  uint64_t off = *pos;
  uint32_t len;
  if (off + REC_BYTES > hdr_bytes) {
    *ok = false;
    return off;
  }
  len = get_be32(hdr + off);
  if (len == 0 || len > PATH_MAX || off + REC_BYTES + pad8(len) > hdr_bytes)
    *ok = false;
  else
    *pos = off + REC_BYTES + pad8(len);
  return off;
}

/* Why a seed's identity differs from its record, or NULL if it does not. */
static const char *id_change(const struct seed *sd, const uint8_t *r)
{
  if (get_be64(r + 8) != sd->id.dev || get_be64(r + 16) != sd->id.ino)
    return "it is another file now (device or inode)";
  if (get_be64(r + 24) != sd->id.size)
    return "its size changed";
  if ((int64_t) get_be64(r + 32) != sd->id.mtim.tv_sec ||
      get_be64(r + 40) != (uint64_t) sd->id.mtim.tv_nsec)
    return "its modification time changed";
  if ((int64_t) get_be64(r + 48) != sd->id.ctim.tv_sec ||
      get_be64(r + 56) != (uint64_t) sd->id.ctim.tv_nsec)
    return "its status change time changed";
  if (get_be64(r + 64) != sd->nblocks)
    return "its block count differs";
  return NULL;
}

/* Reads a seed's key list; 0, or -1 (a read error or a bad checksum). */
static int list_read(int fd, struct seed *sd, uint64_t off, uint64_t want_csum)
{
  uint8_t buf[IO_KEYS * 8];
  uint64_t h = CSUM_INIT ^ sd->nblocks;
  sd->keys = malloc(MAX(sd->nblocks, 1) * sizeof *sd->keys);
  if (!sd->keys)
    return -1;
  for (uint64_t b = 0; b < sd->nblocks; b += IO_KEYS) {
    uint64_t n = MIN(IO_KEYS, sd->nblocks - b);
    if (pread_all(fd, buf, n * 8, off + b * 8) < 0)
      return -1;
    h = csum(h, buf, n * 8);
    for (uint64_t i = 0; i < n; i++)
      sd->keys[b + i] = get_be64(buf + i * 8);
  }
  return h == want_csum ? 0 : -1;
}

static void unload_all(struct seed *seeds, unsigned nseeds)
{
  for (unsigned s = 0; s < nseeds; s++) {
    free(seeds[s].keys);
    seeds[s].keys = NULL;
    seeds[s].loaded = false;
  }
}

/* Matches our seeds with the records of a checked header and loads the
 * unchanged ones.  Returns the number loaded, or -1 (a list is damaged). */
static int match_seeds(const char *path, int fd, const uint8_t *hdr, size_t hdr_bytes,
                       uint32_t nrec, struct seed *seeds, unsigned nseeds,
                       unsigned *still_named)
{
  int loaded = 0;
  *still_named = 0;
  for (unsigned s = 0; s < nseeds; s++) {
    struct seed *sd = &seeds[s];
    size_t pos = HDR_BYTES;
    bool ok = true, found = false;
    for (uint32_t r = 0; r < nrec && ok && !found; r++) {
      uint64_t off = rec_off(hdr, &pos, hdr_bytes, &ok);
      const uint8_t *rec = hdr + off;
      uint32_t len = get_be32(rec);
      const char *why;
      if (!ok || len != strlen(sd->id.real) || memcmp(rec + REC_BYTES, sd->id.real, len))
        continue;
      found = true;
      (*still_named)++;
      why = id_change(sd, rec);
      if (why) {
        log_info("seed index: seed %s changed since it was indexed (%s): hashing "
                 "it again", sd->path, why);
        continue;
      }
      if (list_read(fd, sd, get_be64(rec + 72), get_be64(rec + 80)) < 0) {
        log_warn("seed index: the index file %s is damaged (the digests of seed "
                 "%s fail their checksum or cannot be read): rebuilding it",
                 path, sd->path);
        unload_all(seeds, nseeds);
        return -1;
      }
      sd->loaded = true;
      loaded++;
    }
    if (!found)
      log_info("seed index: seed %s is not in the index file %s: hashing it",
               sd->path, path);
  }
  return loaded;
}

/* Checks the header: 0 if usable, else logs why the file is rebuilt and
 * returns 1. */
static int header_check(const char *path, const uint8_t *hdr, uint64_t fsize,
                        size_t hdr_bytes, uint32_t nrec)
{
  const char *why = NULL;
  uint64_t file_bytes = get_be64(hdr + 48);
  size_t pos = HDR_BYTES;
  bool ok = true;
  uint8_t *copy;
  if (get_be32(hdr + 20) != 8 || get_be32(hdr + 24) != DIGEST_BLOCK)
    why = "it was written for another block or key size";
  else if (file_bytes > fsize)
    why = "it is truncated";
  else if (file_bytes < fsize)
    why = "it has bytes after its end";
  if (why) {
    log_warn("seed index: the index file %s is unusable (%s): rebuilding it", path, why);
    return 1;
  }
  copy = malloc(hdr_bytes);
  if (!copy)
    return 1;
  memcpy(copy, hdr, hdr_bytes);
  memset(copy + 56, 0, 8);
  if (csum(CSUM_INIT, copy, hdr_bytes) != get_be64(hdr + 56))
    why = "its header fails its checksum";
  free(copy);
  for (uint32_t r = 0; r < nrec && !why; r++) {
    const uint8_t *rec = hdr + rec_off(hdr, &pos, hdr_bytes, &ok);
    uint64_t nb = get_be64(rec + 64), lo = get_be64(rec + 72);
    if (!ok || lo % 8 || lo < hdr_bytes || lo > file_bytes ||
        nb > (file_bytes - lo) / 8)
      why = "a seed record is out of bounds";
  }
  if (!why && pos != hdr_bytes)
    why = "its seed records do not fill its header";
  if (why) {
    log_warn("seed index: the index file %s is damaged (%s): rebuilding it", path, why);
    return 1;
  }
  return 0;
}

int index_file_load(const char *path, struct seed *seeds, unsigned nseeds,
                    uint64_t *hint, bool *rewrite, char *err, size_t errlen)
{
  uint8_t fixed[HDR_BYTES];
  CLEANUP_FREE uint8_t *hdr = NULL;
  struct stat st;
  uint32_t nrec;
  size_t hdr_bytes;
  unsigned still_named;
  int fd, loaded, rc = 0;
  ssize_t got;
  *hint = 0;
  *rewrite = true;
  fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    log_info("seed index: %s does not exist yet: creating it", path);
    return 0;
  }
  if (fd < 0 || fstat(fd, &st) < 0) {
    snprintf(err, errlen, "cannot read the index file %s: %s (fix its permissions, "
             "remove it, or choose another --index path)", path, strerror(errno));
    if (fd >= 0)
      close(fd);
    return -1;
  }
  if (!S_ISREG(st.st_mode)) {
    snprintf(err, errlen, "the index file %s is not a regular file (choose "
             "another --index path)", path);
    close(fd);
    return -1;
  }
  got = pread(fd, fixed, HDR_BYTES, 0);
  if (got < 0) {
    snprintf(err, errlen, "cannot read the index file %s: %s", path, strerror(errno));
    close(fd);
    return -1;
  }
  /* Never overwrite what is not an index file (a mistyped --index naming
   * an image, say); a file cut inside the magic is a truncated index. */
  if (memcmp(fixed, MAGIC, MIN((size_t) got, 8)) != 0) {
    snprintf(err, errlen, "%s is not an xnbd index file (it does not start with "
             "\"" MAGIC "\"): refusing to overwrite it; remove it or choose "
             "another --index path", path);
    close(fd);
    return -1;
  }
  if (got < HDR_BYTES) {
    if (got > 0)
      log_warn("seed index: the index file %s is unusable (it is truncated): "
               "rebuilding it", path);
    goto out;
  }
  if (get_be32(fixed + 8) != VERSION) {
    log_warn("seed index: the index file %s has version %" PRIu32 ", this xnbd "
             "writes version %d: rebuilding it", path, get_be32(fixed + 8), VERSION);
    goto out;
  }
  hdr_bytes = get_be32(fixed + 12);
  nrec = get_be32(fixed + 16);
  if (hdr_bytes < HDR_BYTES || hdr_bytes % 8 || hdr_bytes > (uint64_t) st.st_size ||
      (uint64_t) nrec * (REC_BYTES + 8) > hdr_bytes - HDR_BYTES) {
    log_warn("seed index: the index file %s is damaged (its header size is wrong "
             "or it is truncated): rebuilding it", path);
    goto out;
  }
  hdr = malloc(hdr_bytes);
  if (!hdr || pread_all(fd, hdr, hdr_bytes, 0) < 0) {
    log_warn("seed index: cannot read the header of the index file %s: %s: "
             "rebuilding it", path, strerror(errno));
    goto out;
  }
  if (header_check(path, hdr, st.st_size, hdr_bytes, nrec))
    goto out;
  loaded = match_seeds(path, fd, hdr, hdr_bytes, nrec, seeds, nseeds, &still_named);
  if (loaded < 0)
    goto out;
  if (loaded == 0 && still_named == 0 && nrec > 0)
    log_warn("seed index: the index file %s was built for other seeds (none of "
             "its %" PRIu32 " seeds is named now): rebuilding it for these", path, nrec);
  else if (still_named < nrec)
    log_info("seed index: %" PRIu32 " seed(s) of the index file %s are no longer "
             "named: dropping them", nrec - still_named, path);
  if ((unsigned) loaded == nseeds && nrec == nseeds) {
    *rewrite = false;
    *hint = get_be64(hdr + 40);
  }
out:
  close(fd);
  return rc;
}

static int fsync_dir_of(const char *path)
{
  CLEANUP_FREE char *copy = strdup(path);
  int fd, rc;
  if (!copy)
    return -1;
  fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return -1;
  rc = fsync(fd);
  close(fd);
  return rc;
}

/* Writes one seed's keys at off; returns their checksum in *h. */
static int list_write(int fd, const struct seed *sd, uint64_t off, uint64_t *h)
{
  uint8_t buf[IO_KEYS * 8];
  *h = CSUM_INIT ^ sd->nblocks;
  for (uint64_t b = 0; b < sd->nblocks; b += IO_KEYS) {
    uint64_t n = MIN(IO_KEYS, sd->nblocks - b);
    for (uint64_t i = 0; i < n; i++)
      put_be64(buf + i * 8, sd->keys[b + i]);
    *h = csum(*h, buf, n * 8);
    if (pwrite_all(fd, buf, n * 8, off + b * 8) < 0)
      return -1;
  }
  return 0;
}

/* Fills the header and records, writing the lists after them. */
static int write_body(int fd, const struct seed *seeds, unsigned nseeds,
                      uint64_t capacity, uint64_t entries)
{
  size_t hdr_bytes = HDR_BYTES, pos = HDR_BYTES;
  CLEANUP_FREE uint8_t *hdr = NULL;
  uint64_t off;
  for (unsigned s = 0; s < nseeds; s++)
    hdr_bytes += REC_BYTES + pad8(strlen(seeds[s].id.real));
  if (hdr_bytes > UINT32_MAX || !(hdr = calloc(1, hdr_bytes))) {
    errno = ENOMEM;
    return -1;
  }
  off = hdr_bytes;
  for (unsigned s = 0; s < nseeds; s++) {
    const struct seed *sd = &seeds[s];
    uint8_t *r = hdr + pos;
    size_t len = strlen(sd->id.real);
    uint64_t h;
    if (list_write(fd, sd, off, &h) < 0)
      return -1;
    put_be32(r, len);
    put_be64(r + 8, sd->id.dev);
    put_be64(r + 16, sd->id.ino);
    put_be64(r + 24, sd->id.size);
    put_be64(r + 32, sd->id.mtim.tv_sec);
    put_be64(r + 40, sd->id.mtim.tv_nsec);
    put_be64(r + 48, sd->id.ctim.tv_sec);
    put_be64(r + 56, sd->id.ctim.tv_nsec);
    put_be64(r + 64, sd->nblocks);
    put_be64(r + 72, off);
    put_be64(r + 80, h);
    memcpy(r + REC_BYTES, sd->id.real, len);
    pos += REC_BYTES + pad8(len);
    off += sd->nblocks * 8;
  }
  memcpy(hdr, MAGIC, 8);
  put_be32(hdr + 8, VERSION);
  put_be32(hdr + 12, hdr_bytes);
  put_be32(hdr + 16, nseeds);
  put_be32(hdr + 20, 8);
  put_be32(hdr + 24, DIGEST_BLOCK);
  put_be32(hdr + 28, TAG_BITS_STORED);
  put_be64(hdr + 32, capacity);
  put_be64(hdr + 40, entries);
  put_be64(hdr + 48, off);
  put_be64(hdr + 56, csum(CSUM_INIT, hdr, hdr_bytes));
  return pwrite_all(fd, hdr, hdr_bytes, 0);
}

int index_file_write(const char *path, const struct seed *seeds, unsigned nseeds,
                     uint64_t capacity, uint64_t entries)
{
  char tmp[PATH_MAX];
  int fd, e;
  if (snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path) >= (int) sizeof tmp) {
    errno = ENAMETOOLONG;
    return -1;
  }
  fd = mkostemp(tmp, O_CLOEXEC);      /* mode 0600: digests reveal content */
  if (fd < 0)
    return -1;
  if (write_body(fd, seeds, nseeds, capacity, entries) < 0 || fsync(fd) < 0)
    goto fail;
  if (close(fd) < 0) {
    fd = -1;
    goto fail;
  }
  fd = -1;
  if (rename(tmp, path) < 0)
    goto fail;
  if (fsync_dir_of(path) < 0)
    log_warn("seed index: syncing the directory of %s: %s", path, strerror(errno));
  return 0;
fail:
  e = errno;
  if (fd >= 0)
    close(fd);
  unlink(tmp);
  errno = e;
  return -1;
}
