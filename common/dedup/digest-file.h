/* digest-file.h: block digests in a file, for sources that are not
 * xnbd-server (nbdkit, qemu-nbd, nbd-server): `xnbd-digest IMAGE -o FILE`
 * writes them at the source site; the proxy reads them with the calls
 * below after matching the file to its source.
 *
 * FORMAT (integers big-endian)
 *   0    8  magic "XNBDDGST"
 *   8    4  version (1)
 *   12   4  block size (4096)
 *   16   8  image size in bytes
 *   24  64  the image's sampled identity: the HEX of the "sample=HEX" the
 *           proxy records for a source that is not xnbd-server
 *           (identity.h), lowercase hex digits
 *   88  32  SHA-256 of the digest array (bytes 128 to the end)
 *   120  8  zero
 *   128     the digest array: ceil(size / 4096) x 32 bytes, the digest of
 *           block b at 128 + 32 b (digest.h: the last block padded with
 *           zeros), exactly as the digest export of xnbd-server serves it
 *
 * What the identity catches, and what not: a file made for another image
 * of another size or with other sampled blocks is refused, as is a damaged
 * file.  An image edited after xnbd-digest ran, outside the 16 sampled
 * blocks, is NOT detected: the file must be made after the image's last
 * change (the VM stopped) and before the migration. */
#ifndef XNBD_DIGEST_FILE_H
#define XNBD_DIGEST_FILE_H

#include <stddef.h>
#include <stdint.h>

#define DIGEST_FILE_MAGIC "XNBDDGST"
#define DIGEST_FILE_VERSION 1u
#define DIGEST_FILE_HDR 128u

struct digest_file;

/* Encodes the header (the writer: xnbd-digest). */
void digest_file_header(uint8_t hdr[DIGEST_FILE_HDR], uint64_t size,
                        const char *sample_hex, const uint8_t array_sha[32]);

/* Opens path for a source of size bytes whose sampled identity is
 * sample_hex (64 lowercase hex digits), checks the header and the whole
 * array's SHA-256 (reads the file once).  Returns 0 with *out, or -1 with
 * a message in err saying what is wrong and what to do (not a digest
 * file, another version, made for another image, damaged). */
int digest_file_open(const char *path, uint64_t size, const char *sample_hex,
                     struct digest_file **out, char *err, size_t errlen);
/* The digests of blocks [first, first + count) into out (count x 32).
 * Returns 0, or -1 with errno (EINVAL: past the last block; EIO: the file
 * became shorter). */
int digest_file_read(struct digest_file *df, uint64_t first, uint64_t count,
                     uint8_t *out);
uint64_t digest_file_blocks(const struct digest_file *df);
void digest_file_close(struct digest_file *df);

#endif
