/* cache.h: the proxy's local cache image -- the one way every engine path
 * reaches it.  Client reads and writes of present blocks go through the
 * file backend it wraps (cache_backend()); everything the engine itself
 * writes (fetched data, zeros, a client's write to a missing block) goes
 * through the calls below.  Thread-safe as pwrite/fallocate are; ordering
 * between writers is the engine's business (its store stripes). */
#ifndef XNBD_CACHE_H
#define XNBD_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct workq;
struct cache;
struct file_backend;

/* Opens path for an image of size bytes, creating it sparse if it does not
 * exist (unless must_exist).  A file shorter than size is extended with a
 * hole; *old_size (may be NULL) receives its size before that, so that the
 * caller can refuse a truncated cache whose bitmap claims blocks past its
 * end.  A longer file is refused unless discard_content.  Returns NULL
 * with a message (cause and fix) in err. */
struct cache *cache_open(const char *path, uint64_t size, bool must_exist,
                         bool discard_content, struct workq *wq,
                         uint64_t *old_size, char *err, size_t errlen);
void cache_close(struct cache *c);

int cache_write(struct cache *c, const void *buf, uint64_t len, uint64_t off);
int cache_read(struct cache *c, void *buf, uint64_t len, uint64_t off);
/* Sets bit b of bits (one per block of block_size) for every block that
 * holds data in the file (SEEK_DATA/SEEK_HOLE; all of them where the file
 * system cannot tell).  Returns how many, or -1 with errno. */
int64_t cache_data_blocks(struct cache *c, uint32_t block_size, uint64_t *bits);
/* Makes [off, off+len) read as zeros: a hole where the file system can
 * (keep_allocated: allocated zeros), else written zeros.  0 or -1/errno. */
int cache_zero(struct cache *c, uint64_t off, uint64_t len, bool keep_allocated);
/* Advisory: punches a hole if it can; never fails. */
void cache_trim(struct cache *c, uint64_t off, uint64_t len);
/* Makes everything written so far durable (fdatasync). */
int cache_sync(struct cache *c);

/* For serving present blocks (pread, pwrite, block status...). */
struct file_backend *cache_backend(struct cache *c);

#endif
