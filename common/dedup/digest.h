/* digest.h: SHA-256 digests of 4 KiB blocks -- the currency of
 * deduplication (DESIGN section 5).  A block's digest is SHA-256 of its
 * 4096 bytes (the last block of an image whose size is not a multiple of
 * 4096: of its bytes padded with zeros to 4096).  Digests of many blocks
 * are laid out as 32 bytes per block, in block order.
 *
 * Hashing uses every core: digest_file() splits the range over threads.
 * Thread-safe; no global state. */
#ifndef XNBD_DIGEST_H
#define XNBD_DIGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DIGEST_BLOCK 4096u
#define DIGEST_LEN 32u

/* The digest export.  For each export NAME, xnbd-server also serves the
 * read-only export NAME DIGEST_EXPORT_SUFFIX, of ceil(size / 4096) x 32
 * bytes: bytes [32 b, 32 b + 32) are the digest of block b of NAME,
 * computed from the image when first read and kept in a sidecar next to
 * the image (digest-sidecar.h; never stale: a digest read after a write
 * through the server covers that write).  Anything that speaks NBD reaches it the same
 * way as the data (plain NBD, xnbd:// with zstd and TLS). */
#define DIGEST_EXPORT_SUFFIX "@xnbd-sha256"

/* The digest of one block of DIGEST_BLOCK bytes. */
void digest_block(const void *buf, uint8_t out[DIGEST_LEN]);
/* The digests of the n blocks at buf (n x DIGEST_BLOCK bytes) into out
 * (n x 32 bytes): two at a time where the CPU has SHA-NI (sha256-x2.h),
 * about twice digest_block's rate.  For re-hashing many blocks (I4). */
void digest_blocks(const void *buf, uint64_t n, uint8_t *out);
/* SHA-256 of len bytes (short messages: tags, keys), with this thread's
 * reused context (SHA256() fetches the algorithm at every call). */
void digest_bytes(const void *buf, size_t len, uint8_t out[DIGEST_LEN]);
/* SHA-256 of DIGEST_BLOCK zero bytes (computed once). */
const uint8_t *digest_zero(void);

/* Digests of blocks [first, first + count) of the file open as fd, whose
 * size is size bytes (blocks past it are an error), into out (count x 32
 * bytes).  Holes (SEEK_DATA/SEEK_HOLE) are not read: their digest is
 * digest_zero().  threads: 0 = one per online CPU.  Returns 0, or -1 with
 * errno (a read error). */
int digest_file(int fd, uint64_t size, uint64_t first, uint64_t count,
                uint8_t *out, unsigned threads);
/* The same, on threads of their own running at nice value nice (> 0:
 * work that may wait for whatever else the machine does, e.g. digests
 * read ahead; the calling thread only waits). */
int digest_file_nice(int fd, uint64_t size, uint64_t first, uint64_t count,
                     uint8_t *out, unsigned threads, int nice);

#endif
