/* digest-sidecar.h: the digests xnbd-server has computed for an image,
 * kept in a file next to it so that a restart does not rehash the image
 * (the digest export, digest-backend.h, reads them from here first).
 *
 * WHERE: IMAGE.xnbd-sha256 (DIGEST_SIDECAR_SUFFIX) in the directory of the
 * image's real path (symlinks resolved), next to IMAGE.xnbd-id (image-id.h).
 * No sidecar is kept (every digest is computed when read, as before) when
 * the image has no recorded identity (a block device, --image-id=stat or
 * off, or the identity fell back to id-from=stat), or when the file cannot
 * be created or written (read-only directory or filesystem, no space, a
 * FUSE filesystem refusing it...); one log line says so.
 *
 * FORMAT (integers big-endian)
 *   0    8  magic "XNBDSIDE"
 *   8    4  version (1)
 *   12   4  block size (4096)
 *   16   8  image size in bytes
 *   24  32  the image's id: 32 lowercase hex digits (image-id.h)
 *   56   8  the image's generation (image-id.h)
 *   64  32  salt: random, new whenever the entries are all invalidated
 *   96  32  zero
 *   128     one entry per block (ceil(size / 4096) of them, nothing after):
 *           40 bytes at 128 + 40 b: the block's digest (32 bytes, digest.h)
 *           then its tag (8 bytes): the first 8 bytes of
 *           SHA-256(salt || block number (8 bytes) || digest).
 *
 * An entry is valid only if its tag matches: never-written entries (zero),
 * invalidated entries (zeroed), entries of another block or from before a
 * salt change, and entries torn by a crash all fail the tag.
 *
 * NEVER STALE
 *   - The header must match the image's current id, generation and size,
 *     and the file its exact length; otherwise it is rebuilt (empty), with
 *     a log line saying why.  image-id.c bumps the generation when the
 *     image changed while no server ran, or when a server crashed and the
 *     image's times changed; so entries never outlive such a change.
 *   - A write through the server (write, trim, zero) zeroes the entries it
 *     covers before the write is sent to the image, and no digest computed
 *     from data read while a write was in flight is stored (an epoch
 *     counter, see digest_sidecar_epoch), so a digest read after a write
 *     is acknowledged is never the old one.
 *   - During a run, a change behind the server's back is noticed (best
 *     effort) when the image's size, mtime or ctime change while no write
 *     came through the server since they were last seen: every entry is
 *     invalidated (new salt).  Changes through mmap (a running VM's RAM
 *     file) need not update those times: digests of a file that changes
 *     while served are valid only once it stopped changing (a paused VM).
 *
 * CRASH CONSISTENCY, without fsync on the read path: entries are written
 * with pwrite into the page cache; a crash may keep any subset of the
 * bytes of a write, which the per-entry tag catches (a torn entry is
 * invalid, probability 2^-64 otherwise).  An entry invalidated by a write
 * whose zeroing was lost in a crash is an old valid digest; but a crash
 * leaves the identity record "open", and the image's changed times then
 * bump its generation, which discards the whole sidecar.  At a clean stop
 * the sidecar is fsync'ed before the identity records the clean stop.
 *
 * A run checks an entry's tag once: one bit per block in RAM (32 KiB per
 * GiB of image) records the entries that passed (or were stored) since
 * the last invalidation; the file is the server's own while it runs.
 *
 * Thread-safe: lookups and stores from many work-queue threads, write
 * begin/end from the I/O threads. */
#ifndef XNBD_DIGEST_SIDECAR_H
#define XNBD_DIGEST_SIDECAR_H

#include <stdbool.h>
#include <stdint.h>

#define DIGEST_SIDECAR_SUFFIX ".xnbd-sha256"
#define DIGEST_SIDECAR_MAGIC "XNBDSIDE"
#define DIGEST_SIDECAR_VERSION 1u
#define DIGEST_SIDECAR_HDR 128u
#define DIGEST_SIDECAR_ENTRY 40u

struct digest_sidecar;

/* The sidecar of the image at path (open as image_fd, image_size bytes),
 * whose identity is id_hex (32 lowercase hex digits) and gen.  Loads it if
 * it matches, else (re)creates it.  Returns NULL when no sidecar can be
 * kept (logged once). */
struct digest_sidecar *digest_sidecar_open(const char *path, int image_fd,
                                           uint64_t image_size,
                                           const char *id_hex, uint64_t gen);

/* Digests of blocks [first, first + count) found valid in the sidecar go
 * to out + 32 i with have[i] = true; the others get have[i] = false.
 * Returns how many were found. */
uint64_t digest_sidecar_lookup(struct digest_sidecar *sc, uint64_t first,
                               uint64_t count, uint8_t *out, bool *have);

/* Before reading the image for digests to store: the current epoch, or
 * UINT64_MAX when a write is in flight (then nothing may be stored). Also
 * checks the image's times (a change behind the server's back). */
uint64_t digest_sidecar_epoch(struct digest_sidecar *sc);
/* Stores the digests of blocks [first, first + count) computed from data
 * read after digest_sidecar_epoch returned epoch -- unless a write began
 * since (then it does nothing). */
void digest_sidecar_store(struct digest_sidecar *sc, uint64_t epoch,
                          uint64_t first, uint64_t count, const uint8_t *digests);

/* A write through the server to [offset, offset + length) of the image:
 * begin before it is sent to the image (invalidates the blocks it
 * covers), end once it completed (before or after acknowledging). */
void digest_sidecar_write_begin(struct digest_sidecar *sc, uint64_t offset,
                                uint64_t length);
void digest_sidecar_write_end(struct digest_sidecar *sc);

/* fsync, log the counts (blocks served from the sidecar, computed), free.
 * NULL is allowed. */
void digest_sidecar_close(struct digest_sidecar *sc);

#endif
