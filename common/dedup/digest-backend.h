/* digest-backend.h: the digest export of an image (digest.h,
 * DIGEST_EXPORT_SUFFIX) as an NBD backend (backend.h).
 *
 * Read-only.  Bytes [32 b, 32 b + 32) are the SHA-256 of block b of the
 * image, computed from the image when read, or (with a sidecar) when first
 * read and kept; never stale (digest-sidecar.h says how, and what a change
 * behind the server's back while it runs does).  A read that starts or ends
 * inside a digest computes the whole blocks it touches and returns the
 * bytes asked for.  Reads run on the work queue given (never on the event
 * loop), many at once: a request uses up to one thread per online CPU
 * divided by the number of digest reads running at that moment.  Block
 * status says "all data"; writes are refused by the front end (the export
 * is read-only).
 *
 * With a sidecar (digest_backend_use_sidecar, digest-sidecar.h), digests
 * kept there are served without reading the image, the others computed and
 * kept.  Writes to the image must go through a guard (digest_guard_new),
 * which invalidates the digests of the blocks they cover before the image
 * is written.
 *
 * Read-ahead: a read of at least 1024 blocks that starts the image or
 * goes on from where the last read ended has the next as many (at least
 * 16384, to the image's end) computed on wq's low lane (once nothing else
 * waits), over every CPU at nice 10; into the sidecar, or
 * without one into a stash (a read that begins in it takes what it holds
 * from there, the rest is computed), served only while no write through the guard
 * began since (nor is in flight), the image's size and times are
 * unchanged, and it is under 1 s old.  The proxy's next digest query then
 * costs no hashing time. */
#ifndef XNBD_DIGEST_BACKEND_H
#define XNBD_DIGEST_BACKEND_H

#include <stdint.h>

#include "backend.h"

struct workq;
struct digest_backend;

extern const struct xnbd_backend_ops digest_backend_ops;

/* The size of the digest export of an image of image_size bytes:
 * ceil(image_size / 4096) x 32. */
uint64_t digest_export_size(uint64_t image_size);

/* A digest export over the image open as fd (borrowed: it must stay open
 * until digest_backend_close), image_size bytes.  wq must outlive the
 * backend.  Returns NULL with errno (ENOMEM). */
struct digest_backend *digest_backend_open(int fd, uint64_t image_size,
                                           struct workq *wq);
/* Keeps computed digests in the sidecar of the image at path (whose
 * identity is id_hex and gen, image-id.h), if one can be kept (else
 * logged, and every digest is computed when read). */
void digest_backend_use_sidecar(struct digest_backend *db, const char *path,
                                const char *id_hex, uint64_t gen);
/* Closes the sidecar too (synced): call after the last write to the image
 * completed.  NULL is allowed. */
void digest_backend_close(struct digest_backend *db);

/* The image's backend (inner, ih) with its writes, trims and zeroes
 * invalidating db's kept digests first.  Serve the image through
 * digest_guard_ops(g); free after db is closed. */
struct digest_guard;
struct digest_guard *digest_guard_new(const struct xnbd_backend_ops *inner, void *ih,
                                      struct digest_backend *db);
const struct xnbd_backend_ops *digest_guard_ops(struct digest_guard *g);
void digest_guard_free(struct digest_guard *g);

#endif
