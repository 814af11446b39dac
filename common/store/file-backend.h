/* file-backend.h: an image file (or block device) as a backend.
 * Reads and writes that the page cache can satisfy at once run on the
 * calling (event loop) thread with RWF_NOWAIT; everything else runs on a
 * shared pool of I/O threads.  Sparse-aware: holes are reported to block
 * status and to reads that want them. */
#ifndef XNBD_FILE_BACKEND_H
#define XNBD_FILE_BACKEND_H

#include <stdbool.h>
#include "backend.h"

struct workq;
struct file_backend;

extern const struct xnbd_backend_ops file_backend_ops;

/* Opens path.  The work queue is shared and must outlive the backend.
 * Returns NULL with a message (cause and fix) in err. */
struct file_backend *file_backend_open(const char *path, bool readonly,
                                       struct workq *wq,
                                       char *err, size_t errlen);
/* Makes written data durable (fdatasync); returns 0 or -1 with errno. */
int file_backend_sync(struct file_backend *fb);
int file_backend_fd(struct file_backend *fb);
void file_backend_close(struct file_backend *fb);

#endif
