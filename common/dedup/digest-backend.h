/* digest-backend.h: the digest export of an image (digest.h,
 * DIGEST_EXPORT_SUFFIX) as an NBD backend (backend.h).
 *
 * Read-only.  Bytes [32 b, 32 b + 32) are the SHA-256 of block b of the
 * image, computed from the image when read, so a read always reflects the
 * image as it is at that moment (never stale).  A read that starts or ends
 * inside a digest computes the whole blocks it touches and returns the
 * bytes asked for.  Reads run on the work queue given (never on the event
 * loop), many at once: a request uses up to one thread per online CPU
 * divided by the number of digest reads running at that moment.  Block
 * status says "all data"; writes are refused by the front end (the export
 * is read-only). */
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
void digest_backend_close(struct digest_backend *db);

#endif
