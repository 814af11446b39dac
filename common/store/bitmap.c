/* bitmap.c: the persistent cached-block bitmap (format and contract in
 * bitmap.h).
 *
 * In memory the bit array is a malloc'd array of atomic 64-bit words, bit
 * i in word i / 64, bit i % 64, one chunk (BITMAP_CHUNK_BLOCKS bits =
 * WORDS_PER_CHUNK words) after the other with nothing in between.  On disk
 * each chunk is spread over the 8 sectors of a 4096-byte page, 496 bytes
 * of bits per sector behind a 16-byte sector header (generation, CRC32C),
 * in one of the chunk's two slots.  A second array holds one "dirty" bit
 * per chunk.  We use our own copy rather than mmap so that nothing reaches
 * the file before persist decides it may (I2).
 *
 * Why a set bit is never lost by a concurrent persist: bitmap_set does
 *   (W) fetch_or on the word, then (D) sets the chunk's dirty bit;
 * persist does
 *   (C) clears the dirty bits it takes, then (L) copies those chunks.
 * All four are sequentially consistent.  If D comes before C, then W comes
 * before L and the copy holds the bit.  If D comes after C, the chunk stays
 * dirty and the next persist writes it.  (bitmap_set skips D when it reads
 * the dirty bit already set; that read is seq_cst too, so the same argument
 * holds with the read in place of D.)
 *
 * Why a crash during persist cannot break I1 or I2: see "Crashes during a
 * persist" in bitmap.h.  The slot state kept here for that (persist_lock):
 *   good[c]    which slot of chunk c holds its newest copy KNOWN durable
 *              (written, then fdatasync succeeded).  Persist always writes
 *              the other slot, so a torn write can only hit a slot whose
 *              content nobody relies on.
 *   pending[c] chunk c was written to slot !good[c] since the last
 *              successful fdatasync.  The next successful fdatasync makes
 *              that copy durable and flips good[c]; a failure marks the
 *              pending chunks dirty so they are written (to the same slot)
 *              again.
 */
#include "bitmap.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/sha.h>

#define PAGE               4096u
#define SECTOR             BITMAP_SECTOR_SIZE
#define SECTORS_PER_PAGE   (PAGE / SECTOR)
#define SECTOR_HDR         16u
#define SECTOR_BITS_BYTES  (SECTOR - SECTOR_HDR)              /* 496 */
#define WORDS_PER_SECTOR   (SECTOR_BITS_BYTES / 8)            /* 62 */
#define WORDS_PER_CHUNK    (WORDS_PER_SECTOR * SECTORS_PER_PAGE) /* 496 */
#define CHUNK_PAIR         (2 * PAGE)
#define SUM_OFF            (BITMAP_SLOT_SIZE - SHA256_DIGEST_LENGTH)
#define ID_OFF             68
#define CHUNK_BLOCKS_OFF   1092
/* Chunks snapshotted per round of persist (1 MiB). */
#define PERSIST_BATCH      256
/* Chunk pairs read per round of open (1 MiB). */
#define READ_BATCH         128
/* Damaged chunks named in the error message (the rest are counted). */
#define DAMAGE_NAMED       3

_Static_assert(WORDS_PER_CHUNK * 64 == BITMAP_CHUNK_BLOCKS,
               "chunk geometry");

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
  uint64_t nchunks;             /* chunks of the bit array */
  uint64_t ndirty;              /* words of the per-chunk bit arrays */
  char source_id[BITMAP_SOURCE_ID_MAX + 1];
  uint32_t source_id_len;
  int (*sync)(void *);          /* set before any persist runs */
  void *sync_opaque;

  /* Lock-free. */
  _Atomic uint64_t *words;      /* nchunks * WORDS_PER_CHUNK */
  _Atomic uint64_t *dirty;      /* one bit per chunk */
  _Atomic uint64_t count;
  atomic_bool complete;

  /* persist_lock held below this line. */
  unsigned cur_slot;            /* header slot in force */
  uint64_t seq;                 /* its sequence number */
  uint64_t gen;                 /* highest chunk generation on disk */
  uint64_t *good;               /* one bit per chunk: 1 = slot B */
  uint64_t *pending;            /* one bit per chunk, see above */
  bool any_pending;
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
  uint32_t chunk_blocks;        /* version 2 */
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

static inline bool bit_get(const uint64_t *a, uint64_t i)
{
  return (a[i / 64] >> (i % 64)) & 1;
}

static inline void bit_put(uint64_t *a, uint64_t i, bool v)
{
  if (v)
    a[i / 64] |= UINT64_C(1) << (i % 64);
  else
    a[i / 64] &= ~(UINT64_C(1) << (i % 64));
}

/* ---------------------------------------------------------------- CRC32C */

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and
 * final xor 0xFFFFFFFF), table driven, 8 bytes per step.  crc32c(0, ...)
 * starts a checksum; passing a result back continues it. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
  for (unsigned i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++)
      c = (c >> 1) ^ (0x82F63B78u & -(c & 1));
    crc_table[0][i] = c;
  }
  for (unsigned i = 0; i < 256; i++)
    for (int t = 1; t < 8; t++)
      crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^
                        crc_table[0][crc_table[t - 1][i] & 0xff];
}

uint32_t bitmap_crc32c(uint32_t crc, const void *buf, size_t len)
{
  const uint8_t *p = buf;
  uint32_t c = ~crc;

  pthread_once(&crc_once, crc_init);
  while (len >= 8) {
    uint32_t lo = c ^ ((uint32_t) p[0] | (uint32_t) p[1] << 8 |
                       (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24);
    c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
        crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
        crc_table[3][p[4]] ^ crc_table[2][p[5]] ^
        crc_table[1][p[6]] ^ crc_table[0][p[7]];
    p += 8;
    len -= 8;
  }
  while (len--)
    c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
  return ~c;
}

/* ---------------------------------------------------------------- layout */

/* Geometry from image and block size; -1 if it cannot be represented. */
static int geometry(uint64_t image_size, uint32_t block_size,
                    uint64_t *nblocks, uint64_t *nchunks)
{
  *nblocks = image_size / block_size + (image_size % block_size != 0);
  *nchunks = *nblocks / BITMAP_CHUNK_BLOCKS +
             (*nblocks % BITMAP_CHUNK_BLOCKS != 0);
  /* File size must fit off_t, the word array size_t. */
  if (*nchunks > (uint64_t) (INT64_MAX - PAGE) / CHUNK_PAIR ||
      *nchunks > SIZE_MAX / (WORDS_PER_CHUNK * 8))
    return -1;
  return 0;
}

static inline uint64_t slot_offset(uint64_t chunk, unsigned slot)
{
  return BITMAP_HEADER_SIZE + chunk * CHUNK_PAIR + (uint64_t) slot * PAGE;
}

static uint64_t file_size_v2(uint64_t nchunks)
{
  return BITMAP_HEADER_SIZE + nchunks * CHUNK_PAIR;
}

/* Pages of a version 1 bit array. */
static uint64_t v1_pages(uint64_t nblocks)
{
  uint64_t len = nblocks / 8 + (nblocks % 8 != 0);
  return len / PAGE + (len % PAGE != 0);
}

/* The checksum of a sector written at file offset off: CRC32C of off (8
 * bytes, big-endian), then sector bytes 0..7 and 12..511. */
static uint32_t sector_crc(uint64_t off, const uint8_t *sec)
{
  uint8_t ob[8];
  uint32_t c;
  put_be64(ob, off);
  c = bitmap_crc32c(0, ob, sizeof ob);
  c = bitmap_crc32c(c, sec, 8);
  return bitmap_crc32c(c, sec + 12, SECTOR - 12);
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
  if (h->version >= 2)
    put_be32(s + CHUNK_BLOCKS_OFF, h->chunk_blocks);
  SHA256(s, SUM_OFF, s + SUM_OFF);
}

static enum slot_state hdr_decode(const uint8_t *s, struct hdr *h)
{
  uint8_t sum[SHA256_DIGEST_LENGTH];

  if (memcmp(s, BITMAP_MAGIC, 8) != 0)
    return SLOT_NO_MAGIC;
  h->version = get_be32(s + 8);
  if (h->version != BITMAP_VERSION && h->version != BITMAP_VERSION_1) {
    /* Only believe a foreign version number if nothing else is wrong
     * with the slot as far as we can tell: a torn slot is damage. */
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
  h->chunk_blocks = h->version >= 2 ? get_be32(s + CHUNK_BLOCKS_OFF) : 0;
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
  h->chunk_blocks = BITMAP_CHUNK_BLOCKS;
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

/* Every chunk: both slots empty, so the first write goes to slot A. */
static void reset_slots(struct bitmap *bm)
{
  memset(bm->good, 0xff, bm->ndirty * 8);
  memset(bm->pending, 0, bm->ndirty * 8);
  bm->any_pending = false;
  bm->gen = 0;
}

/* (Re)makes the file on bm->fd: header in both slots with flags, every
 * chunk slot a hole (empty). */
static int create_file(struct bitmap *bm, uint32_t flags, const char *what,
                       char *err, size_t errlen)
{
  uint8_t page[BITMAP_HEADER_SIZE];
  struct hdr h;

  hdr_from_bitmap(bm, 1, flags, &h);
  hdr_encode(&h, page);
  memcpy(page + BITMAP_SLOT_SIZE, page, BITMAP_SLOT_SIZE);
  if (ftruncate(bm->fd, 0) < 0 ||
      ftruncate(bm->fd, (off_t) file_size_v2(bm->nchunks)) < 0 ||
      pwrite_all(bm->fd, page, sizeof page, 0) < 0 ||
      fdatasync(bm->fd) < 0) {
    seterr(err, errlen, "cannot create bitmap %s: %s", what,
           strerror(errno));
    return -1;
  }
  sync_parent_dir(what);
  bm->cur_slot = 0;
  bm->seq = 1;
  reset_slots(bm);
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
             "xnbd reads versions %d and %d. Use the xnbd that made it, "
             OR_CLEAR_HINT, bm->path, slot[i].version, BITMAP_VERSION_1,
             BITMAP_VERSION);
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

  /* The header must describe itself consistently.  Both copies are
   * written by the same xnbd, so they have the same version. */
  if (!util_block_size_ok(h->block_size, &why) ||
      h->nblocks != h->image_size / h->block_size +
                    (h->image_size % h->block_size != 0) ||
      h->array_off != BITMAP_HEADER_SIZE ||
      h->array_len != h->nblocks / 8 + (h->nblocks % 8 != 0) ||
      (h->version >= 2 && h->chunk_blocks != BITMAP_CHUNK_BLOCKS) ||
      (st[!best] == SLOT_OK && slot[!best].version != h->version)) {
    errno = EUCLEAN;
    seterr(err, errlen, "bitmap %s is damaged: its header is inconsistent "
           "(format version %" PRIu32 ", block size %" PRIu64 ", image size %"
           PRIu64 ", %" PRIu64 " blocks, bit array at %" PRIu64 " of %"
           PRIu64 " bytes, %" PRIu32 " blocks per chunk). " CLEAR_HINT,
           bm->path, h->version, h->block_size, h->image_size, h->nblocks,
           h->array_off, h->array_len, h->chunk_blocks);
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

/* Keeps the bits of word w that belong to blocks; adds them to *count. */
static uint64_t keep_bits(const struct bitmap *bm, uint64_t w, uint64_t v,
                          uint64_t *count, bool *stray)
{
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
  *count += (uint64_t) __builtin_popcountll(v);
  return v;
}

/* ------------------------------------------------- reading the bit array */

enum chunk_slot_state {
  CS_EMPTY,        /* never written: every sector reads as zeros */
  CS_VALID,        /* every sector's checksum right, one generation */
  CS_TORN,         /* checksums right, but mixed generations / zeros */
  CS_DAMAGED,      /* some sector's checksum (or content) wrong */
};

struct chunk_slot {
  enum chunk_slot_state st;
  uint64_t gen;             /* VALID: its generation; TORN: the highest */
  unsigned bad_sector;      /* DAMAGED */
  const char *why;          /* DAMAGED */
};

static const uint8_t zero_sector[SECTOR];

static void classify_slot(uint64_t off, const uint8_t *page,
                          struct chunk_slot *r)
{
  bool any_zero = false, any_ok = false;
  uint64_t gmin = UINT64_MAX, gmax = 0;

  memset(r, 0, sizeof *r);
  for (unsigned s = 0; s < SECTORS_PER_PAGE; s++) {
    const uint8_t *sec = page + s * SECTOR;
    uint64_t g;
    if (memcmp(sec, zero_sector, SECTOR) == 0) {
      any_zero = true;
      continue;
    }
    r->bad_sector = s;
    if (get_be32(sec + 8) != sector_crc(off + s * SECTOR, sec)) {
      r->st = CS_DAMAGED;
      r->why = "CRC32C checksum mismatch";
      return;
    }
    g = get_be64(sec);
    if (get_be32(sec + 12) != 0 || g == 0) {
      r->st = CS_DAMAGED;
      r->why = g == 0 ? "generation 0 in a written sector"
                      : "reserved bytes not zero";
      return;
    }
    any_ok = true;
    gmin = MIN(gmin, g);
    gmax = MAX(gmax, g);
  }
  if (!any_ok)
    r->st = CS_EMPTY;
  else if (!any_zero && gmin == gmax)
    r->st = CS_VALID;
  else
    r->st = CS_TORN;
  r->gen = any_ok ? gmax : 0;
}

/* Which slot of a chunk holds its bits.  Sets *use (-1: neither, the
 * chunk is empty; 0: A; 1: B), *good (the slot the next write must not
 * touch) and *torn; or returns -1 with the reason in why. */
static int resolve_chunk(const struct chunk_slot cs[2], int *use,
                         unsigned *good, bool *torn, char *why, size_t wlen)
{
  *torn = false;
  for (unsigned i = 0; i < 2; i++)
    if (cs[i].st == CS_DAMAGED) {
      snprintf(why, wlen, "copy %c, sector %u: %s", "AB"[i],
               cs[i].bad_sector, cs[i].why);
      return -1;
    }
  /* Slot A is always written first (both empty: good = B). */
  if (cs[0].st == CS_EMPTY && cs[1].st != CS_EMPTY) {
    snprintf(why, wlen, "copy A reads as zeros although copy B was "
             "written, and A is always written first");
    return -1;
  }
  if (cs[0].st == CS_TORN && cs[1].st == CS_TORN) {
    snprintf(why, wlen, "both copies are partly written; one persist "
             "writes only one of them");
    return -1;
  }
  for (unsigned i = 0; i < 2; i++)
    if (cs[i].st == CS_TORN) {
      /* An interrupted write of slot i: it started after the other slot's
       * content was durable, with a newer generation. */
      if (cs[i].gen <= cs[!i].gen) {
        snprintf(why, wlen, "copy %c is partly written but not newer than "
                 "copy %c (generation %" PRIu64 " <= %" PRIu64 ")", "AB"[i],
                 "AB"[!i], cs[i].gen, cs[!i].gen);
        return -1;
      }
      *torn = true;
      *use = cs[!i].st == CS_EMPTY ? -1 : (int) !i;
      *good = !i;
      return 0;
    }
  if (cs[0].st == CS_EMPTY) {                   /* and B empty */
    *use = -1;
    *good = 1;
    return 0;
  }
  if (cs[1].st == CS_EMPTY) {
    *use = 0;
    *good = 0;
    return 0;
  }
  if (cs[0].gen == cs[1].gen) {
    snprintf(why, wlen, "both copies carry generation %" PRIu64
             "; each write has its own", cs[0].gen);
    return -1;
  }
  *use = cs[1].gen > cs[0].gen;
  *good = (unsigned) *use;
  return 0;
}

struct read_state {
  uint64_t count, ndamaged, ntorn;
  bool stray;
  char named[DAMAGE_NAMED][256];
};

static void load_chunk(struct bitmap *bm, uint64_t c, const uint8_t *pair,
                       struct read_state *rs)
{
  struct chunk_slot cs[2];
  char why[160];
  unsigned good = 1;
  bool torn;
  int use = -1;

  for (unsigned i = 0; i < 2; i++)
    classify_slot(slot_offset(c, i), pair + i * PAGE, &cs[i]);
  if (resolve_chunk(cs, &use, &good, &torn, why, sizeof why) < 0) {
    if (rs->ndamaged < DAMAGE_NAMED) {
      uint64_t first = c * BITMAP_CHUNK_BLOCKS;
      uint64_t last = MIN(first + BITMAP_CHUNK_BLOCKS, bm->nblocks) - 1;
      snprintf(rs->named[rs->ndamaged], sizeof rs->named[0],
               "blocks %" PRIu64 "-%" PRIu64 " (file bytes %" PRIu64 "-%"
               PRIu64 ", %s)", first, last, slot_offset(c, 0),
               slot_offset(c, 0) + CHUNK_PAIR - 1, why);
    }
    rs->ndamaged++;
    return;
  }
  bm->gen = MAX(bm->gen, MAX(cs[0].gen, cs[1].gen));
  bit_put(bm->good, c, good);
  rs->ntorn += torn;
  if (use < 0)
    return;
  for (unsigned s = 0; s < SECTORS_PER_PAGE; s++) {
    const uint8_t *src = pair + (unsigned) use * PAGE + s * SECTOR + SECTOR_HDR;
    uint64_t w0 = c * WORDS_PER_CHUNK + s * WORDS_PER_SECTOR;
    for (unsigned k = 0; k < WORDS_PER_SECTOR; k++) {
      uint64_t v;
      memcpy(&v, src + k * 8, 8);
      v = keep_bits(bm, w0 + k, le64toh(v), &rs->count, &rs->stray);
      atomic_store_explicit(&bm->words[w0 + k], v, memory_order_relaxed);
    }
  }
}

/* Calls fn for each extent [d, h) of [start, end) that may hold data
 * (all of it without SEEK_DATA); stops at the first that fails. */
static int for_data(int fd, off_t start, off_t end,
                    int (*fn)(void *, off_t, off_t), void *opaque)
{
  off_t off = start;
  while (off < end) {
    off_t d = lseek(fd, off, SEEK_DATA), h;
    if (d < 0 && errno == ENXIO)
      break;
    if (d < 0) {
      d = off;
      h = end;
    }
    else {
      if (d >= end)
        break;
      h = lseek(fd, d, SEEK_HOLE);
      if (h < 0 || h > end)
        h = end;
    }
    if (fn(opaque, d, h) < 0)
      return -1;
    off = h;
  }
  return 0;
}

struct chunk_reader {
  struct bitmap *bm;
  struct read_state *rs;
  uint8_t *buf;
  off_t done;                   /* chunk pairs below this are read */
};

static int read_chunk_extent(void *opaque, off_t d, off_t h)
{
  struct chunk_reader *cr = opaque;
  struct bitmap *bm = cr->bm;
  uint64_t c0 = (uint64_t) (MAX(d, cr->done) - BITMAP_HEADER_SIZE) / CHUNK_PAIR;
  uint64_t c1 = ((uint64_t) (h - BITMAP_HEADER_SIZE) + CHUNK_PAIR - 1) / CHUNK_PAIR;

  c1 = MIN(c1, bm->nchunks);
  for (uint64_t c = c0, n; c < c1; c += n) {
    n = MIN(c1 - c, READ_BATCH);
    if (pread_all(bm->fd, cr->buf, n * CHUNK_PAIR, slot_offset(c, 0)) < 0)
      return -1;
    for (uint64_t k = 0; k < n; k++)
      load_chunk(bm, c + k, cr->buf + k * CHUNK_PAIR, cr->rs);
  }
  cr->done = (off_t) slot_offset(MAX(c0, c1), 0);
  return 0;
}

/* Reads and checks every chunk, skipping holes (a huge sparse bitmap
 * costs no memory for its empty chunks). */
static int read_chunks(struct bitmap *bm, char *err, size_t errlen)
{
  struct read_state rs;
  struct chunk_reader cr = { .bm = bm, .rs = &rs,
                             .done = BITMAP_HEADER_SIZE };

  memset(&rs, 0, sizeof rs);
  cr.buf = malloc((size_t) READ_BATCH * CHUNK_PAIR);
  if (!cr.buf) {
    seterr(err, errlen, "bitmap %s: %s", bm->path, strerror(errno));
    return -1;
  }
  if (for_data(bm->fd, BITMAP_HEADER_SIZE,
               (off_t) file_size_v2(bm->nchunks), read_chunk_extent,
               &cr) < 0) {
    seterr(err, errlen, "cannot read bitmap %s: %s", bm->path,
           errno == ENODATA ? "file is truncated" : strerror(errno));
    free(cr.buf);
    return -1;
  }
  free(cr.buf);

  if (rs.ndamaged) {
    seterr(err, errlen, "bitmap %s is damaged: %" PRIu64 " of its %" PRIu64
           " chunks of %d blocks fail their checks: ", bm->path, rs.ndamaged,
           bm->nchunks, BITMAP_CHUNK_BLOCKS);
    for (uint64_t i = 0; i < MIN(rs.ndamaged, DAMAGE_NAMED); i++)
      adderr(err, errlen, "%s%s", i ? "; " : "", rs.named[i]);
    if (rs.ndamaged > DAMAGE_NAMED)
      adderr(err, errlen, "; and %" PRIu64 " more",
             rs.ndamaged - DAMAGE_NAMED);
    adderr(err, errlen, ". This is not an interrupted save (that is "
           "recognized and recovered from): the file was changed after it "
           "was written (disk error, another program), so which of these "
           "blocks are in the cache image is unknown. Nothing was changed. "
           "Restore the bitmap together with its cache image from a backup, "
           "or start over with --clear-bitmap: the bitmap is recreated "
           "empty and every block is fetched from the source again, which "
           "discards the writes clients made through the proxy.");
    errno = EUCLEAN;
    return -1;
  }
  if (rs.ntorn)
    log_warn("bitmap %s: %" PRIu64 " chunk(s) were being saved when the "
             "proxy stopped (crash or power loss); using their previous "
             "copy (blocks fetched since are fetched again)", bm->path,
             rs.ntorn);
  if (rs.stray)
    log_warn("bitmap %s: ignoring bits set past the last block", bm->path);
  atomic_store(&bm->count, rs.count);
  return 0;
}

/* Version 1: the bit array as plain bytes at offset 4096, no checksums. */
struct v1_reader {
  struct bitmap *bm;
  off_t lim;
};

static int read_v1_extent(void *opaque, off_t d, off_t h)
{
  struct v1_reader *vr = opaque;
  const off_t base = BITMAP_HEADER_SIZE;
  d = base + (d - base) / 8 * 8;
  h = MIN(base + ((h - base) + 7) / 8 * 8, vr->lim);
  if (h <= d)
    return 0;
  return pread_all(vr->bm->fd, (uint8_t *) vr->bm->words + (d - base),
                   (size_t) (h - d), (uint64_t) d);
}

static int read_array_v1(struct bitmap *bm, bool *stray,
                         char *err, size_t errlen)
{
  const off_t base = BITMAP_HEADER_SIZE;
  uint64_t len = v1_pages(bm->nblocks) * PAGE, tail = len - bm->nwords * 8;
  struct v1_reader vr = { .bm = bm, .lim = base + (off_t) bm->nwords * 8 };
  uint64_t count = 0;
  uint8_t *t;

  if (for_data(bm->fd, base, vr.lim, read_v1_extent, &vr) < 0)
    goto io_error;
  for (uint64_t w = 0; w < bm->nwords; w++) {
    uint64_t v = le64toh(atomic_load_explicit(&bm->words[w],
                                              memory_order_relaxed));
    atomic_store_explicit(&bm->words[w], keep_bits(bm, w, v, &count, stray),
                          memory_order_relaxed);
  }
  /* The rest of the last page must be zero too. */
  t = malloc(tail ? tail : 1);
  if (!t)
    goto io_error;
  if (pread_all(bm->fd, t, tail, base + bm->nwords * 8) < 0) {
    free(t);
    goto io_error;
  }
  for (uint64_t i = 0; i < tail; i++)
    if (t[i])
      *stray = true;
  free(t);
  atomic_store(&bm->count, count);
  return 0;

io_error:
  seterr(err, errlen, "cannot read bitmap %s: %s", bm->path,
         errno == ENODATA ? "file is truncated" : strerror(errno));
  return -1;
}

static int persist_locked(struct bitmap *bm);

/* Rewrites the version 1 file as version 2 (bits already in memory): a
 * new file next to it, made durable, then renamed over it.  A crash at
 * any point leaves the version 1 file or the complete version 2 file. */
static int upgrade_v1(struct bitmap *bm, uint32_t flags, const struct stat *st,
                      char *err, size_t errlen)
{
  CLEANUP_FREE char *real = realpath(bm->path, NULL);
  CLEANUP_FREE char *tmp = NULL;
  char why[512];
  int old_fd = bm->fd, fd = -1, saved;

  if (st->st_nlink > 1) {
    seterr(err, errlen, "bitmap %s has format version 1 and must be "
           "rewritten as version 2, but it has %ju hard links: the rewrite "
           "replaces the file, and the other names would keep the old bits. "
           "Remove the other links, then start again.", bm->path,
           (uintmax_t) st->st_nlink);
    errno = EMLINK;
    return -1;
  }
  if (!real || asprintf(&tmp, "%s.v2-upgrade", real) < 0) {
    tmp = NULL;
    snprintf(why, sizeof why, "%s", strerror(errno));
    goto fail;
  }
  fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || fchmod(fd, st->st_mode & 07777) < 0 ||
      flock(fd, LOCK_EX | LOCK_NB) < 0) {
    snprintf(why, sizeof why, "cannot create %s: %s", tmp, strerror(errno));
    goto fail;
  }
  bm->fd = fd;
  if (create_file(bm, flags, tmp, why, sizeof why) < 0)
    goto fail;
  for (uint64_t c = 0; c < bm->nchunks; c++)
    for (uint64_t w = c * WORDS_PER_CHUNK; w < (c + 1) * WORDS_PER_CHUNK; w++)
      if (atomic_load_explicit(&bm->words[w], memory_order_relaxed)) {
        atomic_fetch_or(&bm->dirty[c / 64], UINT64_C(1) << (c % 64));
        break;
      }
  /* No data-sync hook yet: the version 1 bits were on disk, so their data
   * was made durable before (I2). */
  if (persist_locked(bm) < 0) {
    snprintf(why, sizeof why, "cannot write %s: %s", tmp, strerror(errno));
    goto fail;
  }
  if (rename(tmp, real) < 0) {
    snprintf(why, sizeof why, "cannot rename %s to %s: %s", tmp, real,
             strerror(errno));
    goto fail;
  }
  sync_parent_dir(real);
  close(old_fd);
  log_info("bitmap %s: upgraded from format version 1 to %d (checksummed "
           "bit array); %" PRIu64 " of %" PRIu64 " blocks present", bm->path,
           BITMAP_VERSION, atomic_load(&bm->count), bm->nblocks);
  return 0;

fail:
  saved = errno;
  if (fd >= 0) {
    close(fd);
    unlink(tmp);
  }
  bm->fd = old_fd;
  seterr(err, errlen, "cannot upgrade bitmap %s from format version 1 to "
         "%d: %s. The version 1 file is unchanged; fix the cause (the "
         "upgrade writes a new file of %" PRIu64 " bytes in the same "
         "directory) and start again.", bm->path, BITMAP_VERSION, why,
         file_size_v2(bm->nchunks));
  errno = saved;
  return -1;
}

/* The complete flag counts only if every bit says so. */
static void take_complete(struct bitmap *bm, uint32_t flags)
{
  if (!(flags & BITMAP_FLAG_COMPLETE))
    return;
  if (atomic_load(&bm->count) == bm->nblocks)
    atomic_store(&bm->complete, true);
  else
    log_warn("bitmap %s: header says complete but %" PRIu64 " of %" PRIu64
             " blocks are missing; trusting the bits", bm->path,
             bm->nblocks - atomic_load(&bm->count), bm->nblocks);
}

static int open_v1(struct bitmap *bm, const struct hdr *h,
                   const struct stat *st, char *err, size_t errlen)
{
  uint64_t want = BITMAP_HEADER_SIZE + v1_pages(bm->nblocks) * PAGE;
  bool stray = false;

  if ((uint64_t) st->st_size < want) {
    seterr(err, errlen, "bitmap %s is damaged: the file is %jd bytes but a "
           "version 1 bitmap of %" PRIu64 " blocks is %" PRIu64 " bytes. "
           CLEAR_HINT, bm->path, (intmax_t) st->st_size, bm->nblocks, want);
    errno = EUCLEAN;
    return -1;
  }
  if (read_array_v1(bm, &stray, err, errlen) < 0)
    return -1;
  if (stray) {
    /* Version 1 never sets them: the bit array was changed on disk.  The
     * upgrade would put a checksum on it, so refuse instead. */
    seterr(err, errlen, "bitmap %s (format version 1) is damaged: bits are "
           "set past its last block, which this format never writes, so "
           "its other bits cannot be trusted either; it is not upgraded to "
           "version 2. Nothing was changed. Restore the bitmap together "
           "with its cache image from a backup, " OR_CLEAR_HINT, bm->path);
    errno = EUCLEAN;
    return -1;
  }
  take_complete(bm, h->flags);
  return upgrade_v1(bm, atomic_load(&bm->complete) ? BITMAP_FLAG_COMPLETE : 0,
                    st, err, errlen);
}

static void free_bitmap(struct bitmap *bm)
{
  free(bm->path);
  free(bm->words);
  free(bm->dirty);
  free(bm->good);
  free(bm->pending);
  free(bm->iobuf);
  pthread_mutex_destroy(&bm->persist_lock);
  free(bm);
}

/* Opens (creating if need be) and locks the bitmap file: one process per
 * bitmap.  Returns 0 with its stat in *st, or -1 with a message. */
static int open_locked(struct bitmap *bm, const char *path, struct stat *st,
                       char *err, size_t errlen)
{
  bm->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (bm->fd < 0) {
    seterr(err, errlen, "cannot open bitmap %s: %s", path, strerror(errno));
    return -1;
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
    return -1;
  }
  if (fstat(bm->fd, st) < 0) {
    seterr(err, errlen, "cannot stat bitmap %s: %s", path, strerror(errno));
    return -1;
  }
  if (!S_ISREG(st->st_mode)) {
    seterr(err, errlen, "bitmap %s is not a regular file", path);
    errno = EINVAL;
    return -1;
  }
  return 0;
}

struct bitmap *bitmap_open(const char *path, uint64_t image_size,
                           uint32_t block_size, const char *source_id,
                           bool clear, char *err, size_t errlen)
{
  struct bitmap *bm;
  struct stat st;
  struct hdr h;
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
  if (geometry(image_size, block_size, &bm->nblocks, &bm->nchunks) < 0) {
    seterr(err, errlen, "bitmap %s: an image of %" PRIu64 " bytes in blocks "
           "of %" PRIu32 " is too large for a bitmap; use larger blocks",
           path, image_size, block_size);
    errno = EFBIG;
    goto fail;
  }
  bm->nwords = bm->nblocks / 64 + (bm->nblocks % 64 != 0);
  bm->ndirty = bm->nchunks / 64 + (bm->nchunks % 64 != 0);
  /* calloc of a large array maps zero pages lazily: untouched pages of a
   * sparse bitmap cost nothing. */
  bm->words = calloc(bm->nchunks ? bm->nchunks * WORDS_PER_CHUNK : 1, 8);
  bm->dirty = calloc(bm->ndirty ? bm->ndirty : 1, 8);
  bm->good = calloc(bm->ndirty ? bm->ndirty : 1, 8);
  bm->pending = calloc(bm->ndirty ? bm->ndirty : 1, 8);
  bm->iobuf = malloc((size_t) PERSIST_BATCH * PAGE);
  if (!bm->words || !bm->dirty || !bm->good || !bm->pending || !bm->iobuf) {
    seterr(err, errlen, "bitmap %s: cannot allocate %" PRIu64 " bytes for "
           "%" PRIu64 " blocks: %s", path,
           bm->nchunks * WORDS_PER_CHUNK * 8, bm->nblocks, strerror(ENOMEM));
    errno = ENOMEM;
    goto fail;
  }
  reset_slots(bm);

  if (open_locked(bm, path, &st, err, errlen) < 0)
    goto fail;

  if (clear || st.st_size == 0) {
    if (clear && st.st_size > 0)
      log_info("bitmap %s: starting over (every block marked missing)", path);
    if (create_file(bm, 0, bm->path, err, errlen) < 0)
      goto fail;
    return bm;
  }

  if (read_header(bm, &h, err, errlen) < 0 ||
      check_same_source(bm, &h, err, errlen) < 0)
    goto fail;
  if (h.version == BITMAP_VERSION_1) {
    if (open_v1(bm, &h, &st, err, errlen) < 0)
      goto fail;
    return bm;
  }
  if ((uint64_t) st.st_size < file_size_v2(bm->nchunks)) {
    seterr(err, errlen, "bitmap %s is damaged: the file is %jd bytes but a "
           "bitmap of %" PRIu64 " blocks is %" PRIu64 " bytes. " CLEAR_HINT,
           path, (intmax_t) st.st_size, bm->nblocks,
           file_size_v2(bm->nchunks));
    errno = EUCLEAN;
    goto fail;
  }
  if (read_chunks(bm, err, errlen) < 0)
    goto fail;
  take_complete(bm, h.flags);
  return bm;

fail:
  saved = errno;
  if (bm->fd >= 0)
    close(bm->fd);
  free_bitmap(bm);
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
  free_bitmap(bm);
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

static void mark_dirty(struct bitmap *bm, uint64_t chunk)
{
  _Atomic uint64_t *d = &bm->dirty[chunk / 64];
  uint64_t bit = UINT64_C(1) << (chunk % 64);
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
    mark_dirty(bm, w / WORDS_PER_CHUNK);
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

static void remark_dirty(struct bitmap *bm, const uint64_t *chunks, size_t n)
{
  for (size_t k = 0; k < n; k++)
    atomic_fetch_or(&bm->dirty[chunks[k] / 64],
                    UINT64_C(1) << (chunks[k] % 64));
}

/* Takes up to PERSIST_BATCH dirty chunks from *cursor on, clearing their
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

/* Encodes the current bits of chunk into the page for slot. */
static void encode_chunk(struct bitmap *bm, uint64_t chunk, unsigned slot,
                         uint64_t gen, uint8_t *page)
{
  const _Atomic uint64_t *src = &bm->words[chunk * WORDS_PER_CHUNK];
  uint64_t off = slot_offset(chunk, slot);

  for (unsigned s = 0; s < SECTORS_PER_PAGE; s++) {
    uint8_t *sec = page + s * SECTOR;
    put_be64(sec, gen);
    memset(sec + 8, 0, 8);
    for (unsigned k = 0; k < WORDS_PER_SECTOR; k++) {
      uint64_t v = htole64(atomic_load(&src[s * WORDS_PER_SECTOR + k]));
      memcpy(sec + SECTOR_HDR + k * 8, &v, 8);
    }
    put_be32(sec + 8, sector_crc(off + s * SECTOR, sec));
  }
}

/* After a successful fdatasync: the copies written are the good ones. */
static void commit_pending(struct bitmap *bm)
{
  for (uint64_t i = 0; i < bm->ndirty; i++) {
    bm->good[i] ^= bm->pending[i];
    bm->pending[i] = 0;
  }
  bm->any_pending = false;
}

static int persist_locked(struct bitmap *bm)
{
  uint64_t cursor = 0, gen = 0;
  size_t n;
  int saved;

  while ((n = take_dirty(bm, &cursor)) > 0) {
    if (!gen)
      gen = ++bm->gen;
    for (size_t k = 0; k < n; k++)
      encode_chunk(bm, bm->batch[k], !bit_get(bm->good, bm->batch[k]), gen,
                   bm->iobuf + k * PAGE);
    /* I2: the data of every bit in the snapshot is made durable before
     * the snapshot is written. */
    if (bm->sync && bm->sync(bm->sync_opaque) < 0) {
      saved = errno;
      remark_dirty(bm, bm->batch, n);
      errno = saved;
      return -1;
    }
    /* Pending before the write: whatever the write leaves on disk, the
     * chunk is written again or made durable before its slot counts. */
    for (size_t k = 0; k < n; k++)
      bit_put(bm->pending, bm->batch[k], true);
    bm->any_pending = true;
    for (size_t k = 0, j; k < n; k = j) {
      uint64_t off = slot_offset(bm->batch[k],
                                 !bit_get(bm->good, bm->batch[k]));
      /* Slot B of chunk c and slot A of chunk c + 1 are neighbours. */
      for (j = k + 1; j < n &&
             slot_offset(bm->batch[j], !bit_get(bm->good, bm->batch[j])) ==
             off + (j - k) * PAGE; j++)
        ;
      if (pwrite_all(bm->fd, bm->iobuf + k * PAGE, (j - k) * PAGE, off) < 0)
        goto io_error;
    }
  }
  if (bm->any_pending) {
    if (fdatasync(bm->fd) < 0)
      goto io_error;
    commit_pending(bm);
  }
  return 0;

io_error:
  /* After a failed write or sync we cannot tell which of the copies
   * written since the last successful sync reached the disk (a failed
   * fdatasync may drop dirty page-cache pages): write them all again, to
   * the same slots (the good copies stay untouched). */
  saved = errno;
  for (uint64_t i = 0; i < bm->ndirty; i++)
    if (bm->pending[i])
      atomic_fetch_or(&bm->dirty[i], bm->pending[i]);
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
