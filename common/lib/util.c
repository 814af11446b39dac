#include "util.h"

#include <sys/stat.h>

#include <ctype.h>
#include <strings.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static int apply_suffix(uint64_t v, const char *end, uint64_t *out,
                        const char **why)
{
  uint64_t mul = 1;
  switch (toupper((unsigned char) *end)) {
  case '\0': break;
  case 'B': mul = 1; end++; break;
  case 'K': mul = UINT64_C(1) << 10; end++; break;
  case 'M': mul = UINT64_C(1) << 20; end++; break;
  case 'G': mul = UINT64_C(1) << 30; end++; break;
  case 'T': mul = UINT64_C(1) << 40; end++; break;
  default: *why = "unknown unit suffix (use k, M, G or T)"; return -1;
  }
  if (mul != 1 && (*end == 'i' || *end == 'I'))
    end++;
  if (mul != 1 && (*end == 'b' || *end == 'B'))
    end++;
  if (*end != '\0') { *why = "trailing characters after the number"; return -1; }
  if (v > UINT64_MAX / mul) { *why = "number too large"; return -1; }
  *out = v * mul;
  return 0;
}

int parse_size(const char *s, uint64_t *out, const char **why)
{
  char *end;
  unsigned long long v;
  if (!s || !isdigit((unsigned char) *s)) { *why = "not a number"; return -1; }
  errno = 0;
  v = strtoull(s, &end, 10);
  if (errno) { *why = "number too large"; return -1; }
  return apply_suffix(v, end, out, why);
}

int parse_rate(const char *s, uint64_t *bps, const char **why)
{
  char *end;
  unsigned long long v;
  size_t n;
  if (!s || !isdigit((unsigned char) *s)) { *why = "not a number"; return -1; }
  errno = 0;
  v = strtoull(s, &end, 10);
  if (errno) { *why = "number too large"; return -1; }
  n = strlen(end);
  if (n >= 3 && strcasecmp(end + n - 3, "bit") == 0) {
    /* Network units: decimal, bits. */
    uint64_t mul = 1;
    if (n == 4) {
      switch (tolower((unsigned char) end[0])) {
      case 'k': mul = 1000; break;
      case 'm': mul = 1000000; break;
      case 'g': mul = 1000000000; break;
      default: *why = "unknown rate unit (use kbit, mbit or gbit)"; return -1;
      }
    } else if (n != 3) { *why = "unknown rate unit"; return -1; }
    if (v > UINT64_MAX / mul) { *why = "number too large"; return -1; }
    *bps = v * mul / 8;
    return 0;
  }
  return apply_suffix(v, end, bps, why);
}

int parse_host_port(const char *s, const char *default_port,
                    char **host, char **port, const char **why)
{
  const char *colon;
  *host = *port = NULL;
  if (!s || !*s) { *why = "empty address"; return -1; }
  if (s[0] == '[') {
    const char *close = strchr(s, ']');
    if (!close) { *why = "missing ']' after IPv6 address"; return -1; }
    *host = strndup(s + 1, close - s - 1);
    if (close[1] == ':' && close[2])
      *port = strdup(close + 2);
    else if (close[1] == '\0' && default_port)
      *port = strdup(default_port);
    else { free(*host); *host = NULL; *why = "expected [ADDR]:PORT"; return -1; }
  } else if ((colon = strrchr(s, ':')) != NULL) {
    if (strchr(s, ':') != colon) { *why = "IPv6 addresses must be written [ADDR]:PORT"; return -1; }
    *host = colon == s ? NULL : strndup(s, colon - s);
    if (!colon[1]) { free(*host); *host = NULL; *why = "missing port after ':'"; return -1; }
    *port = strdup(colon + 1);
  } else {
    bool digits = true;
    for (const char *p = s; *p; p++)
      if (!isdigit((unsigned char) *p)) digits = false;
    if (digits) *port = strdup(s);
    else if (default_port) { *host = strdup(s); *port = strdup(default_port); }
    else { *why = "expected HOST:PORT"; return -1; }
  }
  if (*port) {
    char *end;
    unsigned long p = strtoul(*port, &end, 10);
    if (*end || p > 65535) {
      free(*host); free(*port); *host = *port = NULL;
      *why = "port must be a number from 0 to 65535";
      return -1;
    }
  }
  return 0;
}

bool util_block_size_ok(uint64_t v, const char **why)
{
  if (v < XNBD_BLOCK_SIZE_MIN || v > XNBD_BLOCK_SIZE_MAX || !is_power_of_2(v)) {
    *why = "the block size must be " XNBD_BLOCK_SIZE_RANGE;
    return false;
  }
  return true;
}

int util_parse_block_size(const char *s, uint32_t *out, const char **why)
{
  uint64_t v;
  if (parse_size(s, &v, why) < 0)
    return -1;
  if (!util_block_size_ok(v, why))
    return -1;
  *out = (uint32_t) v;
  return 0;
}

int pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
  const char *p = buf;
  while (len > 0) {
    ssize_t r = pwrite(fd, p, len, off);
    if (r < 0) { if (errno == EINTR) continue; return -1; }
    p += r; len -= r; off += r;
  }
  return 0;
}

int pread_all(int fd, void *buf, size_t len, uint64_t off)
{
  char *p = buf;
  while (len > 0) {
    ssize_t r = pread(fd, p, len, off);
    if (r < 0) { if (errno == EINTR) continue; return -1; }
    if (r == 0) { memset(p, 0, len); return 0; } /* past EOF reads zeros */
    p += r; len -= r; off += r;
  }
  return 0;
}

int write_all(int fd, const void *buf, size_t len)
{
  const char *p = buf;
  while (len > 0) {
    ssize_t r = write(fd, p, len);
    if (r < 0) { if (errno == EINTR) continue; return -1; }
    p += r; len -= r;
  }
  return 0;
}

int read_all(int fd, void *buf, size_t len)
{
  char *p = buf;
  while (len > 0) {
    ssize_t r = read(fd, p, len);
    if (r < 0) { if (errno == EINTR) continue; return -1; }
    if (r == 0) { errno = ENODATA; return -1; }
    p += r; len -= r;
  }
  return 0;
}

bool is_zero(const void *buf, size_t len)
{
  const unsigned char *p = buf;
  /* Check the first 16 bytes by hand, then compare the buffer with itself
   * shifted by 16: equal and first 16 zero means all zero. */
  size_t head = len < 16 ? len : 16;
  for (size_t i = 0; i < head; i++)
    if (p[i]) return false;
  return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}

uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static int64_t ts_ns(struct timespec t) { return (int64_t) t.tv_sec * 1000000000 + t.tv_nsec; }

void file_stamp_get(int fd, struct file_stamp *s)
{
  struct stat st;
  memset(s, 0, sizeof *s);
  if (fstat(fd, &st) == 0) {
    s->size = (uint64_t) st.st_size;
    s->mtime_ns = ts_ns(st.st_mtim);
    s->ctime_ns = ts_ns(st.st_ctim);
  }
}

const char *human_size(uint64_t b, char *buf, size_t len)
{
  static const char *u[] = { "B", "KiB", "MiB", "GiB", "TiB" };
  double v = b;
  unsigned i = 0;
  while (v >= 1024 && i < 4) { v /= 1024; i++; }
  if (i == 0) snprintf(buf, len, "%" PRIu64 " B", b);
  else snprintf(buf, len, "%.1f %s", v, u[i]);
  return buf;
}

