/* digest-file.c: the digest file format and its reader (digest-file.h). */
#include "digest-file.h"
#include "digest.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

struct digest_file {
  int fd;
  uint64_t blocks;
};

void digest_file_header(uint8_t hdr[DIGEST_FILE_HDR], uint64_t size,
                        const char *sample_hex, const uint8_t array_sha[32])
{
  memset(hdr, 0, DIGEST_FILE_HDR);
  memcpy(hdr, DIGEST_FILE_MAGIC, 8);
  put_be32(hdr + 8, DIGEST_FILE_VERSION);
  put_be32(hdr + 12, DIGEST_BLOCK);
  put_be64(hdr + 16, size);
  memcpy(hdr + 24, sample_hex, 64);
  memcpy(hdr + 88, array_sha, 32);
}

static bool lower_hex64(const char *s)
{
  for (int i = 0; i < 64; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
  return s[64] == '\0';
}

#define REDO "make it again at the source site with 'xnbd-digest IMAGE -o FILE' " \
             "(the VM stopped), or migrate without it"

/* SHA-256 of bytes [DIGEST_FILE_HDR, DIGEST_FILE_HDR + len) of fd. */
static int array_sha(int fd, uint64_t len, uint8_t md[32])
{
  const size_t chunk = 1u << 20;
  uint8_t *buf = malloc(chunk);
  EVP_MD_CTX *c = EVP_MD_CTX_new();
  unsigned mdlen = 0;
  int rc = -1;

  errno = ENOMEM;
  if (!buf || !c || !EVP_DigestInit_ex(c, EVP_sha256(), NULL)) goto out;
  for (uint64_t pos = 0; pos < len; ) {
    size_t n = len - pos < chunk ? (size_t) (len - pos) : chunk;
    ssize_t r = pread(fd, buf, n, (off_t) (DIGEST_FILE_HDR + pos));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) { if (r == 0) errno = EIO; goto out; }
    errno = ENOMEM;
    if (!EVP_DigestUpdate(c, buf, (size_t) r)) goto out;
    pos += (uint64_t) r;
  }
  errno = ENOMEM;
  if (!EVP_DigestFinal_ex(c, md, &mdlen) || mdlen != 32) goto out;
  rc = 0;
out:
  EVP_MD_CTX_free(c);
  free(buf);
  return rc;
}

static int check_header(const char *path, const uint8_t *h, uint64_t size,
                        const char *sample_hex, char *err, size_t errlen)
{
  uint64_t fsize = get_be64(h + 16);
  if (memcmp(h, DIGEST_FILE_MAGIC, 8) != 0) {
    snprintf(err, errlen, "'%s' is not an xnbd digest file (no %s header): give "
             "the file written by xnbd-digest -o", path, DIGEST_FILE_MAGIC);
    return -1;
  }
  if (get_be32(h + 8) != DIGEST_FILE_VERSION) {
    snprintf(err, errlen, "digest file '%s' has format version %" PRIu32 "; this "
             "xnbd reads version %u: %s", path, get_be32(h + 8), DIGEST_FILE_VERSION, REDO);
    return -1;
  }
  if (get_be32(h + 12) != DIGEST_BLOCK) {
    snprintf(err, errlen, "digest file '%s' has blocks of %" PRIu32 " bytes, not "
             "%u: it is damaged; %s", path, get_be32(h + 12), DIGEST_BLOCK, REDO);
    return -1;
  }
  if (fsize != size) {
    snprintf(err, errlen, "digest file '%s' was made for an image of %" PRIu64
             " bytes, but the source has %" PRIu64 " bytes: it belongs to another "
             "image; give the right file, or %s", path, fsize, size, REDO);
    return -1;
  }
  if (memcmp(h + 24, sample_hex, 64) != 0) {
    snprintf(err, errlen, "digest file '%s' was made for an image whose sampled "
             "blocks differ from the source's (sample=%.64s in the file, sample=%s "
             "at the source): another image of the same size, or this image changed "
             "after the file was made; %s", path, (const char *) h + 24, sample_hex, REDO);
    return -1;
  }
  return 0;
}

int digest_file_open(const char *path, uint64_t size, const char *sample_hex,
                     struct digest_file **out, char *err, size_t errlen)
{
  uint8_t h[DIGEST_FILE_HDR], md[32];
  uint64_t blocks = size / DIGEST_BLOCK + (size % DIGEST_BLOCK != 0);
  struct stat st;
  struct digest_file *df;
  int fd;

  *out = NULL;
  if (!sample_hex || !lower_hex64(sample_hex)) {
    snprintf(err, errlen, "a digest file can only be matched to a source identified "
             "by sampled blocks (sample=HEX, 64 lowercase hex digits)");
    return -1;
  }
  fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    snprintf(err, errlen, "cannot open digest file '%s': %s", path, strerror(errno));
    return -1;
  }
  if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    snprintf(err, errlen, "digest file '%s' is not a regular file", path);
    goto fail;
  }
  if ((uint64_t) st.st_size < DIGEST_FILE_HDR ||
      pread_all(fd, h, sizeof h, 0) < 0) {
    snprintf(err, errlen, "digest file '%s' is too short to be a digest file "
             "(%" PRIu64 " bytes): %s", path, (uint64_t) st.st_size, REDO);
    goto fail;
  }
  if (check_header(path, h, size, sample_hex, err, errlen) < 0) goto fail;
  if ((uint64_t) st.st_size != DIGEST_FILE_HDR + blocks * DIGEST_LEN) {
    snprintf(err, errlen, "digest file '%s' has %" PRIu64 " bytes, but %" PRIu64
             " are expected for an image of %" PRIu64 " bytes: it is truncated or "
             "damaged; %s", path, (uint64_t) st.st_size,
             DIGEST_FILE_HDR + blocks * DIGEST_LEN, size, REDO);
    goto fail;
  }
  if (array_sha(fd, blocks * DIGEST_LEN, md) < 0) {
    snprintf(err, errlen, "reading digest file '%s' failed: %s", path, strerror(errno));
    goto fail;
  }
  if (memcmp(md, h + 88, 32) != 0) {
    snprintf(err, errlen, "digest file '%s' is damaged (its digests do not match "
             "the checksum in its header): %s", path, REDO);
    goto fail;
  }
  df = malloc(sizeof *df);
  if (!df) { snprintf(err, errlen, "out of memory"); goto fail; }
  df->fd = fd;
  df->blocks = blocks;
  *out = df;
  return 0;
fail:
  close(fd);
  return -1;
}

int digest_file_read(struct digest_file *df, uint64_t first, uint64_t count,
                     uint8_t *out)
{
  size_t len, got = 0;
  if (first > df->blocks || count > df->blocks - first) { errno = EINVAL; return -1; }
  len = (size_t) (count * DIGEST_LEN);
  while (got < len) {
    ssize_t r = pread(df->fd, out + got, len - got,
                      (off_t) (DIGEST_FILE_HDR + first * DIGEST_LEN + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) { errno = EIO; return -1; }
    got += (size_t) r;
  }
  return 0;
}

uint64_t digest_file_blocks(const struct digest_file *df) { return df->blocks; }

void digest_file_close(struct digest_file *df)
{
  if (!df) return;
  close(df->fd);
  free(df);
}
