/* bitmap.h: the persistent cached-block bitmap of the destination proxy.
 *
 * One bit per cache block; a set bit means "this block is present in the
 * local cache image".  During a migration bits only ever go 0 -> 1 (the
 * only way back to 0 is starting over with clear = true, which makes a
 * new file).
 *
 * ON-DISK FORMAT (version 2; all integers big-endian unless noted)
 *
 *   offset 0       header page, 4096 bytes: two header slots A and B
 *     0              slot A (2048 bytes)
 *     2048           slot B (2048 bytes)
 *   offset 4096    the bit array, cut into chunks of BITMAP_CHUNK_BLOCKS
 *                  (31744) blocks.  Chunk c has two 4096-byte slots:
 *                    slot A at 4096 + c * 8192
 *                    slot B at 4096 + c * 8192 + 4096
 *   file size      4096 + nchunks * 8192, nchunks = ceil(nblocks / 31744)
 *                  (slots never written are holes: the file is sparse)
 *
 *   A chunk slot is 8 sectors of 512 bytes.  Sector s (0..7) of a slot
 *   written at file offset O (O = slot offset + 512 * s):
 *     0     8  generation of the write (> 0; see below)
 *     8     4  CRC32C of: O as 8 bytes big-endian, then bytes 0..7 and
 *              12..511 of this sector (so a sector copied to another
 *              place fails its check)
 *     12    4  reserved, zero
 *     16  496  496 bytes of the chunk's bits: chunk byte j (0..3967) is in
 *              sector j / 496 at 16 + j % 496; bit k (0..31743) of the
 *              chunk = block c * 31744 + k, in chunk byte k / 8, bit k % 8
 *              (LSB first).  Bits of blocks >= nblocks are zero.
 *   A sector of 512 zero bytes is "never written".
 *
 *   CRC32C (Castagnoli; reflected polynomial 0x82F63B78, initial value and
 *   final xor 0xFFFFFFFF; "123456789" -> 0xE3069283), chosen because it
 *   is an error-DETECTING code for accidental damage: every burst of up to
 *   32 flipped bits and every error of up to 5 bits in a 512-byte sector
 *   is caught, and the rest with probability 1 - 2^-32; a cryptographic
 *   hash adds nothing against disks and stray writes (nobody forges a
 *   bitmap that they could simply rewrite).  A checksum per 512-byte
 *   sector, rather than per page, is what tells a torn write from damage
 *   (below).  Cost: 16 bytes of 512 (3 %).
 *
 *   header slot (2048 bytes):
 *     0     8  magic "XNBDBMAP"
 *     8     4  format version (2; 1 is read and upgraded, see below)
 *     12    4  flags: bit 0 = complete (every block present; written when
 *              the migration completes).  Other bits are reserved (0); a
 *              file with unknown flags is refused.
 *     16    8  sequence number of this slot
 *     24    8  block size in bytes (power of two, >= 4096)
 *     32    8  image size in bytes (any; the last block may be partial)
 *     40    8  number of blocks = ceil(image size / block size)
 *     48    8  offset of the bit array (4096)
 *     56    8  bytes of bits = ceil(nblocks / 8) (not the chunk area size)
 *     64    4  length L of the source identity (0..BITMAP_SOURCE_ID_MAX)
 *     68 1024  source identity: L bytes, rest zero.  A string that names
 *              the source export, e.g. "nbd://host:port/export size=N" or
 *              an identity the source publishes.  Compared byte for byte.
 *     1092  4  blocks per chunk (31744)
 *     1096 ..  zero
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
 *   Writing the bits (bitmap_persist).  Each persist that has something to
 *   write takes a new generation, higher than any on disk.  A dirty chunk
 *   is written whole (8 sectors, one generation) to its slot that does NOT
 *   hold its last copy known durable (the "good" slot), then the file is
 *   fdatasync'd once; only then does the written slot become good.  The
 *   first write of a chunk goes to slot A.  A persist that fails (write
 *   or sync error) writes those chunks again, to the same slots, next time.
 *   So the good slot of every chunk is never being written, and at most
 *   the other slot can be caught half-written by a crash.
 *
 *   Reading the bits (bitmap_open).  Each slot of each chunk is
 *     empty    every sector never written (e.g. a hole);
 *     valid    every sector's CRC right, all one generation;
 *     torn     every sector's CRC right (or never written), but not all
 *              of one generation: a write interrupted after some sectors;
 *     damaged  some sector's CRC (or a reserved field) wrong.
 *   The chunk's bits come from its newest valid slot (none if both are
 *   empty).  A torn slot is accepted only if the other slot is valid or
 *   empty and older than the torn one's newest sector: then the other slot
 *   is the copy the interrupted persist did not touch, and is used (a
 *   warning is logged).  Anything else -- a damaged slot (either one, even
 *   the older copy: it is evidence of storage damage), both slots torn, a
 *   written slot B beside an empty slot A, two slots of one generation, a
 *   torn slot older than its partner -- makes bitmap_open fail (EUCLEAN)
 *   naming the file, the chunks' blocks and file bytes, the reason, and
 *   the fixes: restore bitmap and cache image from a backup, or start over
 *   with --clear-bitmap (every block fetched again; writes clients made
 *   through the proxy are lost).  The file is never repaired silently.
 *
 *   What this assumes and what it costs.  A 4096-byte write may be torn
 *   by power loss at any 512-byte sector boundary, but a 512-byte sector
 *   is written whole or not at all (what disks promise; a sector left half
 *   written is reported as damage: safe, but the bitmap must be cleared).
 *   Falling back from a torn slot to its partner drops the bits set since
 *   the partner was written: that is exactly the content of the persist
 *   that was interrupted, which had not returned, so no caller was told
 *   those bits were durable (see the engine's contract below) -- their
 *   blocks are fetched again, which is right for fetched blocks and for
 *   client writes that were never acknowledged as flushed.  A sector that
 *   the disk silently returns as zeros, or an older copy of a sector that
 *   a lying disk reports as written, looks like a torn write and is not
 *   detected.  A flipped byte anywhere in a written slot is detected.
 *
 *   Version 1 (the previous format) had the same header (version 1, no
 *   field at 1092) and the bit array as plain bytes at offset 4096 with
 *   no checksum: bit i in byte i / 8, LSB first, file size 4096 +
 *   ceil(nblocks / 8) rounded up to 4096.  bitmap_open of a version 1 file
 *   (after the same header and source checks) reads its bits and rewrites
 *   the file as version 2: a new file PATH.v2-upgrade (REALPATH of PATH,
 *   same mode) is written and fdatasync'd, then renamed over the old one
 *   and the directory synced, so a crash leaves either the old or the new
 *   file (and perhaps a stale PATH.v2-upgrade, overwritten next time);
 *   the upgrade is logged.  The version 1 bits cannot be verified (they
 *   never had a checksum): damage that happened before the upgrade is not
 *   detected by it.  The upgrade is refused, leaving the file unchanged,
 *   when it would be unsafe: bits set past the last block (version 1 never
 *   writes them: evidence that the array is damaged, which the upgrade
 *   would otherwise seal with checksums); the file has other hard links
 *   (they would keep the old bits, and a stale bitmap loses client
 *   writes); or the new file cannot be written.  bitmap_peek reads both
 *   versions and changes nothing.
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
 *       bitmap_persist() snapshots the dirty chunks of the in-memory array,
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
 *   When a bit counts as saved (the engine's side of I1).  A bit is on
 *   disk for good only once a bitmap_persist() (or bitmap_mark_complete)
 *   that began after the bitmap_set() has returned 0.  Until then a crash
 *   may lose it -- also after its chunk was partly written, since a torn
 *   chunk falls back to the copy before (see "Reading the bits") -- and
 *   the block is then fetched from the source again.  For a block made
 *   present by a client write (whole-block write, or the fetch + modify of
 *   a partial one) that refetch overwrites the client's data, so the
 *   engine must not acknowledge a client FLUSH, or a FUA write, that
 *   covers such a write before such a persist has returned 0 (and a failed
 *   persist fails the flush).  Fetched and zero blocks need nothing: their
 *   refetch brings the same data.
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
#define BITMAP_VERSION         2
#define BITMAP_VERSION_1       1
#define BITMAP_HEADER_SIZE     4096
#define BITMAP_SLOT_SIZE       2048
#define BITMAP_SOURCE_ID_MAX   1024
#define BITMAP_MIN_BLOCK_SIZE  4096
#define BITMAP_SECTOR_SIZE     512
/* Blocks per chunk of the bit array: 8 sectors of 496 bytes of bits. */
#define BITMAP_CHUNK_BLOCKS    31744
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
 * is wrong (old vs new value) and how to fix it.  So is a file whose bit
 * array is damaged (see "Reading the bits").  A version 1 file is upgraded
 * to version 2 (see ON-DISK FORMAT), or refused if that is unsafe.
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
 * nothing is dirty, and once per 256 dirty chunks (1 MiB) otherwise.
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
/* Marks block / blocks [first, first + count) present and their chunks
 * dirty.  A block out of range is a broken invariant (fatal). */
void bitmap_set(struct bitmap *bm, uint64_t block);
void bitmap_set_range(struct bitmap *bm, uint64_t first, uint64_t count);
/* Number of blocks present. */
uint64_t bitmap_count(const struct bitmap *bm);
/* First block >= from that is missing / present; nblocks if none. */
uint64_t bitmap_next_clear(const struct bitmap *bm, uint64_t from);
uint64_t bitmap_next_set(const struct bitmap *bm, uint64_t from);

/* Writes the dirty chunks of the bit array to the file (each to its slot
 * not in force) and fdatasyncs it.  Returns 0, or -1 with errno (nothing
 * is lost: the chunks stay dirty and the next persist writes them again). */
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

/* CRC32C (see ON-DISK FORMAT) of len bytes at buf, continuing crc (0 to
 * start).  Exposed for tests and tools that check bitmap files. */
uint32_t bitmap_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
