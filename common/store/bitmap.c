/* bitmap.c: the persistent cached-block bitmap (format and contract in
 * bitmap.h).
 *
 * In memory the bit array is a malloc'd array of atomic 64-bit words laid
 * out exactly like the file (bit i in word i / 64, bit i % 64; stored
 * little-endian on disk, which is the file's LSB-first byte order), padded
 * to whole 4096-byte pages.  A second array holds one "dirty" bit per page.
 * We use our own copy rather than mmap so that nothing reaches the file
 * before persist decides it may (I2).
 *
 * Why a set bit is never lost by a concurrent persist: bitmap_set does
 *   (W) fetch_or on the word, then (D) sets the page's dirty bit;
 * persist does
 *   (C) clears the dirty bits it takes, then (L) copies those pages.
 * All four are sequentially consistent.  If D comes before C, then W comes
 * before L and the copy holds the bit.  If D comes after C, the page stays
 * dirty and the next persist writes it.  (bitmap_set skips D when it reads
 * the dirty bit already set; that read is seq_cst too, so the same argument
 * holds with the read in place of D.)
 *
 * Why a torn page write cannot break I2: bits only go 0 -> 1 during a
 * migration, so the page we write is a superset of the page on disk, and
 * every bit in it had its data made durable before the write was issued
 * (hook called after the snapshot, or the caller's contract).  A write torn
 * by a crash leaves each sector either old or new; every bit in either
 * version satisfies "bit implies data", so every mix does too.  Bits the
 * crash dropped were never promised: their blocks are fetched again.
 */
#include "bitmap.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/sha.h>

#define PAGE               4096u
#define WORDS_PER_PAGE     (PAGE / 8)
#define SUM_OFF            (BITMAP_SLOT_SIZE - SHA256_DIGEST_LENGTH)
#define ID_OFF             68
/* Pages snapshotted per round of persist (1 MiB). */
#define PERSIST_BATCH      256

struct bitmap {
  /* Lock order: persist_lock is the only lock; nothing is called with it
   * held except the data-sync hook (which must not call back into us). */
  pthread_mutex_t persist_lock;

  /* Fixed after open. */
  char *path;
  int fd;
  uint64_t image_size;
  uint64_t nblocks;
  uint32_t block_size;
  uint64_t nwords;              /* words holding blocks: ceil(nblocks/64) */
  uint64_t npages;              /* pages of the bit array on disk */
  uint64_t ndirty;              /* words of the dirty array */
  char source_id[BITMAP_SOURCE_ID_MAX + 1];
  uint32_t source_id_len;
  int (*sync)(void *);          /* set before any persist runs */
  void *sync_opaque;

  /* Lock-free. */
  _Atomic uint64_t *words;      /* npages * WORDS_PER_PAGE */
  _Atomic uint64_t *dirty;      /* one bit per page */
  _Atomic uint64_t count;
  atomic_bool complete;

  /* persist_lock held below this line. */
  unsigned cur_slot;            /* slot holding the header in force */
  uint64_t seq;                 /* its sequence number */
  uint8_t *iobuf;               /* PERSIST_BATCH pages */
  uint64_t batch[PERSIST_BATCH];
};

struct hdr {
  uint32_t version;
  uint32_t flags;
  uint64_t seq;
  uint64_t block_size;
  uint64_t image_size;
  uint64_t nblocks;
  uint64_t array_off;
  uint64_t array_len;
  uint32_t id_len;
  char id[BITMAP_SOURCE_ID_MAX + 1];
};

enum slot_state {
  SLOT_OK,
  SLOT_NO_MAGIC,
  SLOT_BAD_VERSION,
  SLOT_BAD_SUM,
  SLOT_BAD_FLAGS,
  SLOT_BAD_FIELDS,
};

static void seterr(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  if (!err || errlen == 0)
    return;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* Appends to err (which holds a string). */
static void adderr(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void adderr(char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  size_t n;
  if (!err || errlen == 0)
    return;
  n = strnlen(err, errlen);
  if (n + 1 >= errlen)
    return;
  va_start(ap, fmt);
  vsnprintf(err + n, errlen - n, fmt, ap);
  va_end(ap);
}

/* Copies a possibly binary string for a message (non-printables -> '?'). */
static void printable(const char *s, size_t len, char *out, size_t outlen)
{
  size_t i;
  for (i = 0; i < len && i + 1 < outlen; i++)
    out[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
  out[i] = '\0';
}

/* Geometry from image and block size; -1 if it cannot be represented. */
static int geometry(uint64_t image_size, uint32_t block_size,
                    uint64_t *nblocks, uint64_t *array_len, uint64_t *npages)
{
  *nblocks = image_size / block_size + (image_size % block_size != 0);
  *array_len = *nblocks / 8 + (*nblocks % 8 != 0);
  *npages = *array_len / PAGE + (*array_len % PAGE != 0);
  /* File size must fit off_t, the word array size_t. */
  if (*npages > (uint64_t) (INT64_MAX - PAGE) / PAGE ||
      *npages > SIZE_MAX / PAGE)
    return -1;
  return 0;
}

/* ---------------------------------------------------------------- header */

static void hdr_encode(const struct hdr *h, uint8_t *s)
{
  memset(s, 0, BITMAP_SLOT_SIZE);
  memcpy(s, BITMAP_MAGIC, 8);
  put_be32(s + 8, h->version);
  put_be32(s + 12, h->flags);
  put_be64(s + 16, h->seq);
  put_be64(s + 24, h->block_size);
  put_be64(s + 32, h->image_size);
  put_be64(s + 40, h->nblocks);
  put_be64(s + 48, h->array_off);
  put_be64(s + 56, h->array_len);
  put_be32(s + 64, h->id_len);
  memcpy(s + ID_OFF, h->id, h->id_len);
  SHA256(s, SUM_OFF, s + SUM_OFF);
}

static enum slot_state hdr_decode(const uint8_t *s, struct hdr *h)
{
  uint8_t sum[SHA256_DIGEST_LENGTH];

  if (memcmp(s, BITMAP_MAGIC, 8) != 0)
    return SLOT_NO_MAGIC;
  h->version = get_be32(s + 8);
  if (h->version != BITMAP_VERSION) {
    /* Only believe a foreign version number if nothing else is wrong
     * with the slot as far as we can tell: a torn v1 slot is damage. */
    SHA256(s, SUM_OFF, sum);
    return memcmp(sum, s + SUM_OFF, sizeof sum) == 0
      ? SLOT_BAD_VERSION : SLOT_BAD_SUM;
  }
  SHA256(s, SUM_OFF, sum);
  if (memcmp(sum, s + SUM_OFF, sizeof sum) != 0)
    return SLOT_BAD_SUM;
  h->flags = get_be32(s + 12);
  h->seq = get_be64(s + 16);
  h->block_size = get_be64(s + 24);
  h->image_size = get_be64(s + 32);
  h->nblocks = get_be64(s + 40);
  h->array_off = get_be64(s + 48);
  h->array_len = get_be64(s + 56);
  h->id_len = get_be32(s + 64);
  if (h->flags & ~BITMAP_FLAG_COMPLETE)
    return SLOT_BAD_FLAGS;
  if (h->id_len > BITMAP_SOURCE_ID_MAX)
    return SLOT_BAD_FIELDS;
  memcpy(h->id, s + ID_OFF, h->id_len);
  h->id[h->id_len] = '\0';
  return SLOT_OK;
}

static void hdr_from_bitmap(const struct bitmap *bm, uint64_t seq,
                            uint32_t flags, struct hdr *h)
{
  memset(h, 0, sizeof *h);
  h->version = BITMAP_VERSION;
  h->flags = flags;
  h->seq = seq;
  h->block_size = bm->block_size;
  h->image_size = bm->image_size;
  h->nblocks = bm->nblocks;
  h->array_off = BITMAP_HEADER_SIZE;
  h->array_len = bm->nblocks / 8 + (bm->nblocks % 8 != 0);
  h->id_len = bm->source_id_len;
  memcpy(h->id, bm->source_id, bm->source_id_len);
}

/* ------------------------------------------------------------ open/close */

static void sync_parent_dir(const char *path)
{
  CLEANUP_FREE char *copy = strdup(path);
  int dfd;
  if (!copy)
    return;
  dfd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || fsync(dfd) < 0)
    log_warn("bitmap %s: cannot sync its directory: %m", path);
  if (dfd >= 0)
    close(dfd);
}

/* (Re)makes the file: header in both slots, every bit 0. */
static int create_file(struct bitmap *bm, char *err, size_t errlen)
{
  uint8_t page[BITMAP_HEADER_SIZE];
  struct hdr h;

  hdr_from_bitmap(bm, 1, 0, &h);
  hdr_encode(&h, page);
  memcpy(page + BITMAP_SLOT_SIZE, page, BITMAP_SLOT_SIZE);
  if (ftruncate(bm->fd, 0) < 0 ||
      ftruncate(bm->fd, (off_t) (BITMAP_HEADER_SIZE + bm->npages * PAGE)) < 0 ||
      pwrite_all(bm->fd, page, sizeof page, 0) < 0 ||
      fdatasync(bm->fd) < 0) {
    seterr(err, errlen, "cannot create bitmap %s: %s", bm->path,
           strerror(errno));
    return -1;
  }
  sync_parent_dir(bm->path);
  bm->cur_slot = 0;
  bm->seq = 1;
  return 0;
}

static const char *slot_problem(enum slot_state st)
{
  switch (st) {
  case SLOT_OK: return "valid";
  case SLOT_NO_MAGIC: return "no XNBDBMAP magic";
  case SLOT_BAD_VERSION: return "unsupported format version";
  case SLOT_BAD_SUM: return "SHA-256 checksum mismatch";
  case SLOT_BAD_FLAGS: return "unknown flags";
  case SLOT_BAD_FIELDS: return "invalid field values";
  }
  return "?";
}

/* The fix for a bitmap that cannot be used, as a sentence and as the tail
 * of one. */
#define CLEAR_WHAT \
  " with --clear-bitmap (the bitmap is recreated empty and every block is " \
  "fetched from the source again)."
#define CLEAR_HINT "Start over" CLEAR_WHAT
#define OR_CLEAR_HINT "or start over" CLEAR_WHAT

/* Reads and checks the header; fills h with the slot in force. */
static int read_header(struct bitmap *bm, struct hdr *h,
                       char *err, size_t errlen)
{
  uint8_t page[BITMAP_HEADER_SIZE];
  struct hdr slot[2];
  enum slot_state st[2];
  int best = -1;
  const char *why;

  if (pread_all(bm->fd, page, sizeof page, 0) < 0) {
    if (errno == ENODATA) {
      errno = EUCLEAN;
      seterr(err, errlen, "%s is not an xnbd bitmap file (shorter than its "
             "%d-byte header). Check the path: --clear-bitmap overwrites "
             "the file with a new, empty bitmap.", bm->path,
             BITMAP_HEADER_SIZE);
    }
    else
      seterr(err, errlen, "cannot read bitmap %s: %s", bm->path,
             strerror(errno));
    return -1;
  }
  for (int i = 0; i < 2; i++) {
    st[i] = hdr_decode(page + i * BITMAP_SLOT_SIZE, &slot[i]);
    if (st[i] == SLOT_OK && (best < 0 || slot[i].seq > slot[best].seq))
      best = i;
  }

  if (best < 0) {
    if (st[0] == SLOT_NO_MAGIC && st[1] == SLOT_NO_MAGIC) {
      errno = EUCLEAN;
      seterr(err, errlen, "%s is not an xnbd bitmap file (its header has no "
             "XNBDBMAP magic). Check the path: --clear-bitmap overwrites "
             "the file with a new, empty bitmap.", bm->path);
    }
    else if (st[0] == SLOT_BAD_VERSION || st[1] == SLOT_BAD_VERSION) {
      int i = st[0] == SLOT_BAD_VERSION ? 0 : 1;
      errno = ENOTSUP;
      seterr(err, errlen, "bitmap %s has format version %" PRIu32 "; this "
             "xnbd reads version %d. Use the xnbd that made it, "
             OR_CLEAR_HINT, bm->path, slot[i].version, BITMAP_VERSION);
    }
    else if (st[0] == SLOT_BAD_FLAGS || st[1] == SLOT_BAD_FLAGS) {
      int i = st[0] == SLOT_BAD_FLAGS ? 0 : 1;
      errno = ENOTSUP;
      seterr(err, errlen, "bitmap %s uses features this xnbd does not know "
             "(header flags 0x%" PRIx32 "). Use the xnbd that made it, "
             OR_CLEAR_HINT, bm->path, slot[i].flags);
    }
    else {
      errno = EUCLEAN;
      seterr(err, errlen, "bitmap %s is damaged: neither header copy is "
             "valid (copy A: %s; copy B: %s). " CLEAR_HINT, bm->path,
             slot_problem(st[0]), slot_problem(st[1]));
    }
    return -1;
  }
  if (st[!best] != SLOT_OK)
    log_warn("bitmap %s: header copy %c is not valid (%s); using copy %c "
             "(a header write was probably interrupted)", bm->path,
             "AB"[!best], slot_problem(st[!best]), "AB"[best]);

  *h = slot[best];
  bm->cur_slot = best;
  bm->seq = h->seq;

  /* The header must describe itself consistently. */
  if (!util_block_size_ok(h->block_size, &why) ||
      h->nblocks != h->image_size / h->block_size +
                    (h->image_size % h->block_size != 0) ||
      h->array_off != BITMAP_HEADER_SIZE ||
      h->array_len != h->nblocks / 8 + (h->nblocks % 8 != 0)) {
    errno = EUCLEAN;
    seterr(err, errlen, "bitmap %s is damaged: its header is inconsistent "
           "(block size %" PRIu64 ", image size %" PRIu64 ", %" PRIu64
           " blocks, bit array at %" PRIu64 " of %" PRIu64 " bytes). "
           CLEAR_HINT, bm->path, h->block_size, h->image_size, h->nblocks,
           h->array_off, h->array_len);
    return -1;
  }
  return 0;
}

int bitmap_peek(const char *path, struct bitmap_info *info,
                char *err, size_t errlen)
{
  struct bitmap tmp;
  struct hdr h;
  int rc;

  memset(&tmp, 0, sizeof tmp);
  tmp.fd = open(path, O_RDONLY | O_CLOEXEC);
  if (tmp.fd < 0) {
    if (errno != ENOENT)
      seterr(err, errlen, "cannot open bitmap %s: %s", path, strerror(errno));
    return -1;
  }
  tmp.path = (char *) path;
  rc = read_header(&tmp, &h, err, errlen);
  close(tmp.fd);
  if (rc < 0) return -1;
  info->image_size = h.image_size;
  info->block_size = h.block_size;
  info->complete = h.flags & BITMAP_FLAG_COMPLETE;
  memcpy(info->source_id, h.id, h.id_len);
  info->source_id[h.id_len] = '\0';
  return 0;
}

/* Refuses a bitmap made for another image / block size / source. */
static int check_same_source(struct bitmap *bm, const struct hdr *h,
                             char *err, size_t errlen)
{
  char a[BITMAP_SOURCE_ID_MAX + 1], b[BITMAP_SOURCE_ID_MAX + 1];
  const char *sep = "";

  if (h->block_size == bm->block_size && h->image_size == bm->image_size &&
      h->id_len == bm->source_id_len &&
      memcmp(h->id, bm->source_id, h->id_len) == 0)
    return 0;

  seterr(err, errlen, "bitmap %s was made for another source: ", bm->path);
  if (h->image_size != bm->image_size) {
    adderr(err, errlen, "image size is %" PRIu64 " bytes in the bitmap but "
           "%" PRIu64 " bytes now", h->image_size, bm->image_size);
    sep = "; ";
  }
  if (h->block_size != bm->block_size) {
    adderr(err, errlen, "%sblock size is %" PRIu64 " in the bitmap but %"
           PRIu32 " now", sep, h->block_size, bm->block_size);
    sep = "; ";
  }
  if (h->id_len != bm->source_id_len ||
      memcmp(h->id, bm->source_id, h->id_len) != 0) {
    printable(h->id, h->id_len, a, sizeof a);
    printable(bm->source_id, bm->source_id_len, b, sizeof b);
    adderr(err, errlen, "%ssource identity is \"%s\" in the bitmap but "
           "\"%s\" now", sep, a, b);
  }
  adderr(err, errlen, ". Use the source (--target) and block size this "
         "bitmap was made for, " OR_CLEAR_HINT);
  errno = EINVAL;
  return -1;
}

/* Converts words [first, end) read from the file to host order, drops
 * bits past nblocks and adds the set bits to *count. */
static void load_words(struct bitmap *bm, uint64_t first, uint64_t end,
                       uint64_t *count, bool *stray)
{
  for (uint64_t w = first; w < end; w++) {
    uint64_t v = le64toh(atomic_load_explicit(&bm->words[w],
                                              memory_order_relaxed));
    uint64_t keep;
    if (w >= bm->nwords)
      keep = 0;
    else if (w == bm->nwords - 1 && bm->nblocks % 64)
      keep = (UINT64_C(1) << (bm->nblocks % 64)) - 1;
    else
      keep = UINT64_MAX;
    if (v & ~keep)
      *stray = true;
    v &= keep;
    atomic_store_explicit(&bm->words[w], v, memory_order_relaxed);
    *count += (uint64_t) __builtin_popcountll(v);
  }
}

/* Reads the bit array, skipping holes (a huge sparse bitmap costs no
 * memory for its unset pages). */
static int read_array(struct bitmap *bm, char *err, size_t errlen)
{
  const off_t base = BITMAP_HEADER_SIZE;
  const off_t end = base + (off_t) (bm->npages * PAGE);
  off_t off = base;
  uint64_t count = 0;
  bool stray = false;

  while (off < end) {
    off_t d = lseek(bm->fd, off, SEEK_DATA), h;
    if (d < 0 && errno == ENXIO)
      break;
    if (d < 0) {                        /* no SEEK_DATA: read it all */
      d = off;
      h = end;
    }
    else {
      if (d >= end)
        break;
      h = lseek(bm->fd, d, SEEK_HOLE);
      if (h < 0 || h > end)
        h = end;
    }
    d = base + (d - base) / PAGE * PAGE;
    h = base + ((h - base) + PAGE - 1) / PAGE * PAGE;
    if (h > end)
      h = end;
    if (pread_all(bm->fd, (uint8_t *) bm->words + (d - base),
                  (size_t) (h - d), (uint64_t) d) < 0) {
      seterr(err, errlen, "cannot read bitmap %s: %s", bm->path,
             errno == ENODATA ? "file is truncated" : strerror(errno));
      return -1;
    }
    load_words(bm, (uint64_t) (d - base) / 8, (uint64_t) (h - base) / 8,
               &count, &stray);
    off = h;
  }
  if (stray)
    log_warn("bitmap %s: ignoring bits set past the last block", bm->path);
  atomic_store(&bm->count, count);
  return 0;
}

struct bitmap *bitmap_open(const char *path, uint64_t image_size,
                           uint32_t block_size, const char *source_id,
                           bool clear, char *err, size_t errlen)
{
  struct bitmap *bm;
  struct stat st;
  struct hdr h;
  uint64_t array_len;
  size_t id_len;
  int saved;
  const char *why;

  if (err && errlen)
    err[0] = '\0';
  if (!source_id)
    source_id = "";
  if (!util_block_size_ok(block_size, &why)) {
    seterr(err, errlen, "bitmap %s: block size %" PRIu32 " refused: %s", path,
           block_size, why);
    errno = EINVAL;
    return NULL;
  }
  id_len = strlen(source_id);
  if (id_len > BITMAP_SOURCE_ID_MAX) {
    seterr(err, errlen, "bitmap %s: the source identity is %zu bytes long; "
           "at most %d fit in the bitmap header", path, id_len,
           BITMAP_SOURCE_ID_MAX);
    errno = EINVAL;
    return NULL;
  }

  bm = calloc(1, sizeof *bm);
  if (!bm) {
    seterr(err, errlen, "bitmap %s: %s", path, strerror(errno));
    return NULL;
  }
  pthread_mutex_init(&bm->persist_lock, NULL);
  bm->fd = -1;
  bm->image_size = image_size;
  bm->block_size = block_size;
  memcpy(bm->source_id, source_id, id_len);
  bm->source_id_len = (uint32_t) id_len;
  bm->path = strdup(path);
  if (!bm->path) {
    seterr(err, errlen, "bitmap %s: %s", path, strerror(errno));
    goto fail;
  }
  if (geometry(image_size, block_size, &bm->nblocks, &array_len,
               &bm->npages) < 0) {
    seterr(err, errlen, "bitmap %s: an image of %" PRIu64 " bytes in blocks "
           "of %" PRIu32 " is too large for a bitmap; use larger blocks",
           path, image_size, block_size);
    errno = EFBIG;
    goto fail;
  }
  bm->nwords = bm->nblocks / 64 + (bm->nblocks % 64 != 0);
  bm->ndirty = bm->npages / 64 + (bm->npages % 64 != 0);
  /* calloc of a large array maps zero pages lazily: untouched pages of a
   * sparse bitmap cost nothing. */
  bm->words = calloc(bm->npages ? bm->npages * WORDS_PER_PAGE : 1, 8);
  bm->dirty = calloc(bm->ndirty ? bm->ndirty : 1, 8);
  bm->iobuf = malloc((size_t) PERSIST_BATCH * PAGE);
  if (!bm->words || !bm->dirty || !bm->iobuf) {
    seterr(err, errlen, "bitmap %s: cannot allocate %" PRIu64 " bytes for "
           "%" PRIu64 " blocks: %s", path, bm->npages * PAGE, bm->nblocks,
           strerror(ENOMEM));
    errno = ENOMEM;
    goto fail;
  }

  bm->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (bm->fd < 0) {
    seterr(err, errlen, "cannot open bitmap %s: %s", path, strerror(errno));
    goto fail;
  }
  if (flock(bm->fd, LOCK_EX | LOCK_NB) < 0) {
    if (errno == EWOULDBLOCK) {
      seterr(err, errlen, "bitmap %s is in use by another process (or "
             "another handle); two proxies cannot share one bitmap", path);
      errno = EBUSY;
    }
    else
      seterr(err, errlen, "cannot lock bitmap %s: %s", path,
             strerror(errno));
    goto fail;
  }
  if (fstat(bm->fd, &st) < 0) {
    seterr(err, errlen, "cannot stat bitmap %s: %s", path, strerror(errno));
    goto fail;
  }
  if (!S_ISREG(st.st_mode)) {
    seterr(err, errlen, "bitmap %s is not a regular file", path);
    errno = EINVAL;
    goto fail;
  }

  if (clear || st.st_size == 0) {
    if (clear && st.st_size > 0)
      log_info("bitmap %s: starting over (every block marked missing)", path);
    if (create_file(bm, err, errlen) < 0)
      goto fail;
    return bm;
  }

  if (read_header(bm, &h, err, errlen) < 0 ||
      check_same_source(bm, &h, err, errlen) < 0)
    goto fail;
  if ((uint64_t) st.st_size < BITMAP_HEADER_SIZE + bm->npages * PAGE) {
    seterr(err, errlen, "bitmap %s is damaged: the file is %jd bytes but a "
           "bitmap of %" PRIu64 " blocks is %" PRIu64 " bytes. " CLEAR_HINT,
           path, (intmax_t) st.st_size, bm->nblocks,
           BITMAP_HEADER_SIZE + bm->npages * PAGE);
    errno = EUCLEAN;
    goto fail;
  }
  if (read_array(bm, err, errlen) < 0)
    goto fail;
  if (h.flags & BITMAP_FLAG_COMPLETE) {
    if (atomic_load(&bm->count) == bm->nblocks)
      atomic_store(&bm->complete, true);
    else
      log_warn("bitmap %s: header says complete but %" PRIu64 " of %" PRIu64
               " blocks are missing; trusting the bits", path,
               bm->nblocks - atomic_load(&bm->count), bm->nblocks);
  }
  return bm;

fail:
  saved = errno;
  if (bm->fd >= 0)
    close(bm->fd);
  free(bm->path);
  free(bm->words);
  free(bm->dirty);
  free(bm->iobuf);
  pthread_mutex_destroy(&bm->persist_lock);
  free(bm);
  errno = saved;
  return NULL;
}

void bitmap_set_data_sync(struct bitmap *bm, int (*sync)(void *opaque),
                          void *opaque)
{
  pthread_mutex_lock(&bm->persist_lock);
  bm->sync = sync;
  bm->sync_opaque = opaque;
  pthread_mutex_unlock(&bm->persist_lock);
}

void bitmap_close(struct bitmap *bm)
{
  if (!bm)
    return;
  if (bitmap_persist(bm) < 0)
    log_error("bitmap %s: cannot save the bitmap on close: %m (blocks "
              "fetched since the last save will be fetched again)", bm->path);
  if (close(bm->fd) < 0)
    log_error("bitmap %s: close: %m", bm->path);
  free(bm->path);
  free(bm->words);
  free(bm->dirty);
  free(bm->iobuf);
  pthread_mutex_destroy(&bm->persist_lock);
  free(bm);
}

/* -------------------------------------------------------------- getters */

uint64_t bitmap_nblocks(const struct bitmap *bm) { return bm->nblocks; }
uint32_t bitmap_block_size(const struct bitmap *bm) { return bm->block_size; }
uint64_t bitmap_image_size(const struct bitmap *bm) { return bm->image_size; }
const char *bitmap_source_id(const struct bitmap *bm) { return bm->source_id; }
uint64_t bitmap_count(const struct bitmap *bm) { return atomic_load(&bm->count); }
bool bitmap_is_complete(const struct bitmap *bm) { return atomic_load(&bm->complete); }

/* ----------------------------------------------------------------- bits */

bool bitmap_test(const struct bitmap *bm, uint64_t block)
{
  if (block >= bm->nblocks)
    return false;
  return (atomic_load(&bm->words[block / 64]) >> (block % 64)) & 1;
}

static void mark_dirty(struct bitmap *bm, uint64_t page)
{
  _Atomic uint64_t *d = &bm->dirty[page / 64];
  uint64_t bit = UINT64_C(1) << (page % 64);
  /* seq_cst load: see the argument at the top of the file. */
  if (!(atomic_load(d) & bit))
    atomic_fetch_or(d, bit);
}

static void set_mask(struct bitmap *bm, uint64_t w, uint64_t mask)
{
  uint64_t old, added;
  if ((atomic_load_explicit(&bm->words[w], memory_order_relaxed) & mask)
      == mask)
    return;                     /* already set: its setter marked it dirty */
  old = atomic_fetch_or(&bm->words[w], mask);
  added = mask & ~old;
  if (added) {
    atomic_fetch_add(&bm->count, (uint64_t) __builtin_popcountll(added));
    mark_dirty(bm, w / WORDS_PER_PAGE);
  }
}

void bitmap_set(struct bitmap *bm, uint64_t block)
{
  if (block >= bm->nblocks)
    fatal("bitmap %s: block %" PRIu64 " set but there are only %" PRIu64,
          bm->path, block, bm->nblocks);
  set_mask(bm, block / 64, UINT64_C(1) << (block % 64));
}

void bitmap_set_range(struct bitmap *bm, uint64_t first, uint64_t count)
{
  uint64_t end, w, wend;
  if (count == 0)
    return;
  if (first >= bm->nblocks || count > bm->nblocks - first)
    fatal("bitmap %s: blocks %" PRIu64 "+%" PRIu64 " set but there are "
          "only %" PRIu64, bm->path, first, count, bm->nblocks);
  end = first + count;
  w = first / 64;
  wend = (end - 1) / 64;
  for (; w <= wend; w++) {
    uint64_t lo = w == first / 64 ? first % 64 : 0;
    uint64_t hi = w == wend ? (end - 1) % 64 : 63;   /* inclusive */
    uint64_t mask = (UINT64_MAX >> (63 - hi)) & (UINT64_MAX << lo);
    set_mask(bm, w, mask);
  }
}

static uint64_t next_bit(const struct bitmap *bm, uint64_t from, bool set)
{
  uint64_t flip = set ? 0 : UINT64_MAX;
  uint64_t w, v;

  if (from >= bm->nblocks)
    return bm->nblocks;
  w = from / 64;
  v = (atomic_load_explicit(&bm->words[w], memory_order_relaxed) ^ flip)
      & (UINT64_MAX << (from % 64));
  while (v == 0) {
    if (++w >= bm->nwords)
      return bm->nblocks;
    v = atomic_load_explicit(&bm->words[w], memory_order_relaxed) ^ flip;
  }
  return MIN(w * 64 + (uint64_t) __builtin_ctzll(v), bm->nblocks);
}

uint64_t bitmap_next_clear(const struct bitmap *bm, uint64_t from)
{
  return next_bit(bm, from, false);
}

uint64_t bitmap_next_set(const struct bitmap *bm, uint64_t from)
{
  return next_bit(bm, from, true);
}

/* -------------------------------------------------------------- persist */

static void remark_dirty(struct bitmap *bm, const uint64_t *pages, size_t n)
{
  for (size_t k = 0; k < n; k++)
    atomic_fetch_or(&bm->dirty[pages[k] / 64], UINT64_C(1) << (pages[k] % 64));
}

static void mark_all_dirty(struct bitmap *bm)
{
  for (uint64_t p = 0; p < bm->npages; p++)
    atomic_fetch_or(&bm->dirty[p / 64], UINT64_C(1) << (p % 64));
}

/* Takes up to PERSIST_BATCH dirty pages from *cursor on, clearing their
 * dirty bits; returns how many (their numbers in bm->batch, ascending). */
static size_t take_dirty(struct bitmap *bm, uint64_t *cursor)
{
  size_t n = 0;
  while (*cursor < bm->ndirty && n < PERSIST_BATCH) {
    uint64_t d = atomic_load(&bm->dirty[*cursor]), take = 0;
    while (d && n < PERSIST_BATCH) {
      unsigned b = (unsigned) __builtin_ctzll(d);
      d &= d - 1;
      take |= UINT64_C(1) << b;
      bm->batch[n++] = *cursor * 64 + b;
    }
    if (take)
      atomic_fetch_and(&bm->dirty[*cursor], ~take);
    if (!d)
      (*cursor)++;
  }
  return n;
}

static void snapshot_page(struct bitmap *bm, uint64_t page, uint8_t *out)
{
  const _Atomic uint64_t *src = &bm->words[page * WORDS_PER_PAGE];
  for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
    uint64_t v = htole64(atomic_load(&src[i]));
    memcpy(out + i * 8, &v, 8);
  }
}

static int persist_locked(struct bitmap *bm)
{
  uint64_t cursor = 0;
  bool wrote = false;
  size_t n;
  int saved;

  while ((n = take_dirty(bm, &cursor)) > 0) {
    for (size_t k = 0; k < n; k++)
      snapshot_page(bm, bm->batch[k], bm->iobuf + k * PAGE);
    /* I2: the data of every bit in the snapshot is made durable before
     * the snapshot is written. */
    if (bm->sync && bm->sync(bm->sync_opaque) < 0) {
      saved = errno;
      remark_dirty(bm, bm->batch, n);
      errno = saved;
      return -1;
    }
    for (size_t k = 0, j; k < n; k = j) {
      for (j = k + 1; j < n && bm->batch[j] == bm->batch[j - 1] + 1; j++)
        ;
      if (pwrite_all(bm->fd, bm->iobuf + k * PAGE, (j - k) * PAGE,
                     BITMAP_HEADER_SIZE + bm->batch[k] * PAGE) < 0)
        goto io_error;
    }
    wrote = true;
  }
  if (wrote && fdatasync(bm->fd) < 0)
    goto io_error;
  return 0;

io_error:
  /* After a failed write or sync we cannot tell which pages reached the
   * disk (a failed fdatasync may drop dirty page-cache pages): rewrite
   * everything next time. */
  saved = errno;
  mark_all_dirty(bm);
  errno = saved;
  return -1;
}

int bitmap_persist(struct bitmap *bm)
{
  int r;
  pthread_mutex_lock(&bm->persist_lock);
  r = persist_locked(bm);
  pthread_mutex_unlock(&bm->persist_lock);
  return r;
}

int bitmap_mark_complete(struct bitmap *bm)
{
  uint8_t slot[BITMAP_SLOT_SIZE];
  struct hdr h;
  unsigned next;
  int r = -1;

  pthread_mutex_lock(&bm->persist_lock);
  if (atomic_load(&bm->complete)) {
    r = 0;
    goto out;
  }
  if (atomic_load(&bm->count) != bm->nblocks) {
    errno = EBUSY;
    goto out;
  }
  /* The bits first: "complete" must never be on disk before they are. */
  if (persist_locked(bm) < 0)
    goto out;
  /* Write the slot not in force, so a torn write leaves the old header. */
  next = !bm->cur_slot;
  hdr_from_bitmap(bm, bm->seq + 1, BITMAP_FLAG_COMPLETE, &h);
  hdr_encode(&h, slot);
  if (pwrite_all(bm->fd, slot, sizeof slot,
                 (uint64_t) next * BITMAP_SLOT_SIZE) < 0 ||
      fdatasync(bm->fd) < 0)
    goto out;
  bm->cur_slot = next;
  bm->seq++;
  atomic_store(&bm->complete, true);
  r = 0;
out:
  {
    int saved = errno;
    pthread_mutex_unlock(&bm->persist_lock);
    errno = saved;
  }
  return r;
}
