/* bitmap.h: the persistent cached-block bitmap of the destination proxy.
 *
 * One bit per cache block; a set bit means "this block is present in the
 * local cache image".  During a migration bits only ever go 0 -> 1 (the
 * only way back to 0 is starting over with clear = true, which makes a
 * new file).
 *
 * ON-DISK FORMAT (version 1; all integers big-endian)
 *
 *   offset 0     header page, 4096 bytes: two header slots A and B
 *     0            slot A (2048 bytes)
 *     2048         slot B (2048 bytes)
 *   offset 4096  the bit array: bit i = block i, in byte i / 8, bit
 *                i % 8 (LSB first).  ceil(nblocks / 8) meaningful bytes;
 *                the bits past nblocks are zero.
 *   file size    4096 + ceil(nblocks / 8) rounded up to a multiple of 4096
 *
 *   header slot (2048 bytes):
 *     0     8  magic "XNBDBMAP"
 *     8     4  format version (1)
 *     12    4  flags: bit 0 = complete (every block present; written when
 *              the migration completes).  Other bits are reserved (0); a
 *              file with unknown flags is refused.
 *     16    8  sequence number of this slot
 *     24    8  block size in bytes (power of two, >= 4096)
 *     32    8  image size in bytes (any; the last block may be partial)
 *     40    8  number of blocks = ceil(image size / block size)
 *     48    8  offset of the bit array (4096)
 *     56    8  length of the bit array in bytes = ceil(nblocks / 8)
 *     64    4  length L of the source identity (0..BITMAP_SOURCE_ID_MAX)
 *     68 1024  source identity: L bytes, rest zero.  A string that names
 *              the source export, e.g. "nbd://host:port/export size=N" or
 *              an identity the source publishes.  Compared byte for byte.
 *     1092 ..  zero
 *     2016 32  SHA-256 of bytes 0..2015 of this slot
 *
 *   Torn header writes.  The header changes after creation only to set the
 *   complete flag.  A new header is always written to the slot that does
 *   NOT hold the current one, with sequence + 1, then fdatasync'd.  On open
 *   each slot is valid if its magic, version and SHA-256 are right; the
 *   valid slot with the highest sequence wins (A on a tie).  So a write
 *   torn by a crash leaves the previous header (same geometry and source,
 *   flag not yet set) in force: the conservative answer, since the bit
 *   array alone still says which blocks are present.  Only when neither
 *   slot is valid is the file refused as damaged.
 *
 * DURABILITY CONTRACT (invariant I2, "bit implies data")
 *
 *   A bit that reaches the bitmap file must never claim a block whose data
 *   is not durable in the cache image.  bitmap_persist() therefore writes a
 *   bit only after the block's data is durable, in one of two ways:
 *
 *   (a) With a data-sync hook (bitmap_set_data_sync(), recommended for the
 *       engine): call bitmap_set() for a block as soon as its data has been
 *       WRITTEN to the cache image (pwrite returned; not yet synced).
 *       bitmap_persist() snapshots the dirty pages of the in-memory array,
 *       calls the hook (which must make every write to the cache image
 *       issued so far durable, e.g. fdatasync the cache image), and only
 *       then writes the snapshot.  A bit set after the snapshot stays dirty
 *       for the next persist.
 *
 *   (b) Without a hook: the caller guarantees that the data of every block
 *       whose bit is set -- including bits set by other threads while
 *       persist runs -- was made durable in the cache image BEFORE the bit
 *       was set (or, if no thread sets bits concurrently, before calling
 *       bitmap_persist()).
 *
 * THREADS
 *
 *   bitmap_test, bitmap_set, bitmap_set_range, bitmap_count,
 *   bitmap_next_clear, bitmap_next_set, bitmap_is_complete and the
 *   geometry getters are lock-free and may be called from any thread at
 *   any time (atomic operations on 64-bit words).  bitmap_persist and
 *   bitmap_mark_complete may be called from any thread, concurrently with
 *   the above and with each other (they serialize internally).  A bit set
 *   while a persist runs is either written by that persist or stays dirty
 *   for the next one -- it is never lost.  bitmap_set_data_sync must be
 *   called before any persist runs.  bitmap_close must not race with
 *   anything.
 *
 * OWNERSHIP
 *
 *   bitmap_open returns a handle owned by the caller, released with
 *   bitmap_close (which persists first).  Strings passed in (path,
 *   source_id) are copied.  The error text goes into the caller's buffer.
 *   The handle holds an exclusive flock on the file, so a second open of
 *   the same file (by this or another process) is refused.
 */
#ifndef XNBD_BITMAP_H
#define XNBD_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BITMAP_MAGIC           "XNBDBMAP"
#define BITMAP_VERSION         1
#define BITMAP_HEADER_SIZE     4096
#define BITMAP_SLOT_SIZE       2048
#define BITMAP_SOURCE_ID_MAX   1024
#define BITMAP_FLAG_COMPLETE   UINT32_C(1)
/* A buffer this large holds any error message of bitmap_open in full. */
#define BITMAP_ERR_MAX         4096

struct bitmap;

/* Opens the bitmap file at path for an image of image_size bytes cut into
 * block_size blocks (XNBD_BLOCK_SIZE_RANGE, util.h), belonging to the source
 * named by source_id (NULL means "", at most BITMAP_SOURCE_ID_MAX bytes).
 *
 * If the file does not exist, is empty, or clear is true, it is (re)made
 * with every bit 0.  Otherwise its header is validated: a file that is not
 * an xnbd bitmap or is damaged, or one that belongs to another image size,
 * block size or source identity, is refused with a message that says what
 * is wrong (old vs new value) and how to fix it.
 *
 * Returns the handle, or NULL with a message in err (errlen bytes,
 * BITMAP_ERR_MAX is always enough) and errno set. */
struct bitmap *bitmap_open(const char *path, uint64_t image_size,
                           uint32_t block_size, const char *source_id,
                           bool clear, char *err, size_t errlen);

/* Registers the hook bitmap_persist calls after snapshotting the bits to
 * write and before writing them: it must make all writes issued so far to
 * the cache image durable and return 0, or return -1 with errno set (the
 * persist then fails and the bits stay dirty).  It is not called when
 * nothing is dirty, and once per 1 MiB of dirty bitmap pages otherwise.
 * It runs with the bitmap's persist lock held: it must not call
 * bitmap_persist or bitmap_mark_complete.  See DURABILITY CONTRACT. */
void bitmap_set_data_sync(struct bitmap *bm, int (*sync)(void *opaque),
                          void *opaque);

/* Geometry. */
uint64_t bitmap_nblocks(const struct bitmap *bm);
uint32_t bitmap_block_size(const struct bitmap *bm);
uint64_t bitmap_image_size(const struct bitmap *bm);
/* The source identity recorded in the file (owned by the bitmap). */
const char *bitmap_source_id(const struct bitmap *bm);

/* Whether block is present.  False for block >= nblocks. */
bool bitmap_test(const struct bitmap *bm, uint64_t block);
/* Marks block / blocks [first, first + count) present and their on-disk
 * pages dirty.  A block out of range is a broken invariant (fatal). */
void bitmap_set(struct bitmap *bm, uint64_t block);
void bitmap_set_range(struct bitmap *bm, uint64_t first, uint64_t count);
/* Number of blocks present. */
uint64_t bitmap_count(const struct bitmap *bm);
/* First block >= from that is missing / present; nblocks if none. */
uint64_t bitmap_next_clear(const struct bitmap *bm, uint64_t from);
uint64_t bitmap_next_set(const struct bitmap *bm, uint64_t from);

/* Writes the dirty pages of the bit array to the file and fdatasyncs it.
 * Returns 0, or -1 with errno (nothing is lost: the pages stay dirty and
 * the next persist writes them again). */
int bitmap_persist(struct bitmap *bm);

/* When every block is present: persists the bits, then sets the complete
 * flag in the header (torn-write safe, see above).  Returns 0 (also if
 * already complete), or -1 with errno: EBUSY if some block is missing,
 * else the I/O error. */
int bitmap_mark_complete(struct bitmap *bm);
bool bitmap_is_complete(const struct bitmap *bm);

/* What a bitmap file says about itself, read without opening it for use
 * (the proxy learns from it whether the source is needed at all). */
struct bitmap_info {
  uint64_t image_size;
  uint32_t block_size;
  bool complete;
  char source_id[BITMAP_SOURCE_ID_MAX + 1];
};
/* Returns 0, or -1 with errno (ENOENT: no such file) and, except for
 * ENOENT, a message in err. */
int bitmap_peek(const char *path, struct bitmap_info *info,
                char *err, size_t errlen);

/* Persists (errors are logged), closes the file and frees bm.  NULL is
 * allowed. */
void bitmap_close(struct bitmap *bm);

#endif
