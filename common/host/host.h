/* host.h: the engine for a synchronous host -- a caller that has a thread
 * per request and wants each call to return when the request is done, as
 * an nbdkit plugin's .pread/.pwrite/.flush... do.  It owns the engine's
 * I/O work queue and the engine; every call may run on any thread, many
 * at once.
 *
 * Lifecycle for a host that forks (nbdkit --fork/--daemon): check the
 * configuration before the fork, call host_open() after it (the engine's
 * threads start there), host_close() at the end. */
#ifndef XNBD_HOST_H
#define XNBD_HOST_H

#include <stdbool.h>
#include <stdint.h>

#include "engine.h"

struct engine_host;

/* io_threads: local I/O threads (0: 4).  Returns NULL with a message. */
struct engine_host *host_open(const struct engine_config *cfg, unsigned io_threads,
                              char *err, size_t errlen);
void host_close(struct engine_host *h);
struct engine *host_engine(struct engine_host *h);

uint64_t host_size(struct engine_host *h);
/* NBD transmission flags (nbd-proto.h NBD_FLAG_*) the engine supports. */
uint16_t host_flags(struct engine_host *h);
/* Block size constraints the engine advertises (minimum, preferred,
 * maximum request size). */
void host_block_size(struct engine_host *h, uint32_t *min, uint32_t *pref, uint32_t *max);

/* Each returns 0, or -1 with errno set (the NBD error to report). */
int host_pread(struct engine_host *h, void *buf, uint64_t count, uint64_t off);
int host_pwrite(struct engine_host *h, const void *buf, uint64_t count, uint64_t off,
                bool fua);
int host_zero(struct engine_host *h, uint64_t count, uint64_t off, bool may_trim,
              bool fua, bool fast);
int host_trim(struct engine_host *h, uint64_t count, uint64_t off, bool fua);
int host_flush(struct engine_host *h);
/* Makes the range present (fetching it) without returning data. */
int host_cache(struct engine_host *h, uint64_t count, uint64_t off);
/* Block status of [off, off+count): calls add for each run (flags are
 * NBD_STATE_HOLE / NBD_STATE_ZERO) until count is covered or add fails. */
int host_extents(struct engine_host *h, uint64_t count, uint64_t off, bool req_one,
                 int (*add)(void *opaque, uint64_t off, uint64_t len, uint32_t flags),
                 void *opaque);

#endif
