/* util.h: small helpers shared by every part: byte order, cleanup
 * attributes, parsing of sizes and addresses. */
#ifndef XNBD_UTIL_H
#define XNBD_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>

#define ARRAY_SIZE(a) (sizeof (a) / sizeof ((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Frees the pointer when the variable goes out of scope. */
static inline void cleanup_free_fn(void *p) { free(*(void **) p); }
#define CLEANUP_FREE __attribute__((cleanup(cleanup_free_fn)))

/* Big-endian load/store on unaligned buffers. */
static inline void put_be16(void *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put_be32(void *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put_be64(void *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static inline uint16_t get_be16(const void *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get_be32(const void *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get_be64(const void *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

static inline bool is_power_of_2(uint64_t v) { return v && !(v & (v - 1)); }

/* Parses "123", "4k", "64M", "1G", "2T" (binary units).  Returns 0, or
 * -1 with a reason in *why (static string). */
int parse_size(const char *s, uint64_t *out, const char **why);

/* The cache block size: a power of two from 4 KiB (the bitmap's unit of
 * I/O) to 32 MiB (the largest request the engine advertises).  The one
 * range check, used by every front end, the bitmap and the engine. */
#define XNBD_BLOCK_SIZE_MIN UINT32_C(4096)
#define XNBD_BLOCK_SIZE_MAX (UINT32_C(32) << 20)
#define XNBD_BLOCK_SIZE_RANGE "a power of two from 4096 (4K) to 33554432 (32M)"

/* Whether v is such a block size; if not, *why (static) says so. */
bool util_block_size_ok(uint64_t v, const char **why);

/* Parses a block size ("4096", "64K", "1M") and checks it.  Returns 0, or
 * -1 with a reason in *why (static string). */
int util_parse_block_size(const char *s, uint32_t *out, const char **why);

/* Parses a rate such as "100mbit", "12M" (bytes/s), "0" (unlimited)
 * into bytes per second. */
int parse_rate(const char *s, uint64_t *bytes_per_sec, const char **why);

/* Splits "HOST:PORT", "[V6]:PORT", ":PORT" or "PORT" into host (NULL for
 * any address) and port (0 allowed: a listener's "any free port"; callers
 * that connect must refuse it).  *host and *port are malloc'd. */
int parse_host_port(const char *s, const char *default_port,
                    char **host, char **port, const char **why);

/* Writes all of buf / reads exactly len bytes at offset (retries EINTR and
 * short transfers).  Return 0 or -1 with errno. */
int pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
int pread_all(int fd, void *buf, size_t len, uint64_t off);
int write_all(int fd, const void *buf, size_t len);
int read_all(int fd, void *buf, size_t len); /* -1/ENODATA on early EOF */

/* Whether len bytes at buf are all zero. */
bool is_zero(const void *buf, size_t len);

/* Monotonic time in nanoseconds. */
uint64_t now_ns(void);

/* What shows that a file changed: its size and times (fstat of fd; all 0
 * if that fails).  Compare with memcmp. */
struct file_stamp { uint64_t size; int64_t mtime_ns, ctime_ns; };
void file_stamp_get(int fd, struct file_stamp *s);

/* Human-readable size into buf ("1.5 GiB"). */
const char *human_size(uint64_t bytes, char *buf, size_t len);


#endif
