/* digest.c: SHA-256 of 4 KiB blocks, over every core (digest.h).
 *
 * OpenSSL 3: one EVP_MD fetched once, one EVP_MD_CTX per thread reused
 * for every block (EVP_DigestInit_ex2 + Update + Final), which is what
 * `openssl speed -evp sha256` measures; SHA256() and EVP_Digest() fetch or
 * allocate per call. */
#include "digest.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#define RUN_BYTES (1u << 20)                     /* one pread */
#define RUN_BLOCKS (RUN_BYTES / DIGEST_BLOCK)
#define MIN_BLOCKS_PER_THREAD 256                /* 1 MiB: less is not worth a thread */

static pthread_once_t once = PTHREAD_ONCE_INIT;
static EVP_MD *sha256_md;
static uint8_t zero_digest[DIGEST_LEN];
static pthread_key_t ctx_key;

static void free_ctx(void *p) { EVP_MD_CTX_free(p); }

static void init_once(void)
{
  static const uint8_t zeros[DIGEST_BLOCK];
  EVP_MD_CTX *c;
  unsigned len = 0;

  sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
  if (!sha256_md) abort();          /* OpenSSL without SHA-256: nothing works */
  pthread_key_create(&ctx_key, free_ctx);
  c = EVP_MD_CTX_new();
  if (!c || !EVP_DigestInit_ex2(c, sha256_md, NULL) ||
      !EVP_DigestUpdate(c, zeros, sizeof zeros) ||
      !EVP_DigestFinal_ex(c, zero_digest, &len) || len != DIGEST_LEN)
    abort();
  EVP_MD_CTX_free(c);
}

/* One block with a context the caller keeps. */
static void hash_block(EVP_MD_CTX *c, const void *buf, uint8_t *out)
{
  unsigned len = 0;
  if (!EVP_DigestInit_ex2(c, sha256_md, NULL) ||
      !EVP_DigestUpdate(c, buf, DIGEST_BLOCK) ||
      !EVP_DigestFinal_ex(c, out, &len) || len != DIGEST_LEN)
    abort();                        /* only on memory exhaustion in OpenSSL */
}

static EVP_MD_CTX *new_ctx(void)
{
  EVP_MD_CTX *c = EVP_MD_CTX_new();
  if (!c) abort();
  return c;
}

void digest_block(const void *buf, uint8_t out[DIGEST_LEN])
{
  EVP_MD_CTX *c;
  pthread_once(&once, init_once);
  c = pthread_getspecific(ctx_key);
  if (!c) {
    c = new_ctx();
    pthread_setspecific(ctx_key, c);
  }
  hash_block(c, buf, out);
}

const uint8_t *digest_zero(void)
{
  pthread_once(&once, init_once);
  return zero_digest;
}

/* ---- digest_file ---- */

struct part {
  int fd;
  uint64_t size;
  bool holes;                /* the file may have holes: probe them */
  uint64_t first, count;     /* blocks */
  uint8_t *out;              /* count x 32 bytes */
  int err;                   /* errno of the first failure, or 0 */
  pthread_t tid;
  bool started;              /* tid is a thread to join */
};

/* Where data begins at or after pos, and where it ends: [*data, *hole).
 * No data at or after pos: *data = *hole = UINT64_MAX. */
static int find_data(int fd, uint64_t pos, uint64_t *data, uint64_t *hole)
{
  off_t d = lseek(fd, (off_t) pos, SEEK_DATA);
  if (d < 0) {
    if (errno == ENXIO) { *data = *hole = UINT64_MAX; return 0; }
    return -1;
  }
  off_t h = lseek(fd, d, SEEK_HOLE);
  if (h < 0) return -1;
  *data = (uint64_t) d;
  *hole = (uint64_t) h;
  return 0;
}

static int hash_part(struct part *p)
{
  EVP_MD_CTX *c = new_ctx();
  uint8_t *buf = NULL;
  uint64_t b = p->first, end = p->first + p->count;
  /* Bytes [data, hole) are known data; before data (from b on), a hole. */
  bool probe = p->holes;
  uint64_t data = 0, hole = probe ? 0 : UINT64_MAX;   /* 0: probe first */
  int rc = -1;

  if (posix_memalign((void **) &buf, 4096, RUN_BYTES)) { errno = ENOMEM; goto out; }
  while (b < end) {
    uint64_t pos = b * DIGEST_BLOCK, n, got = 0;
    if (probe && pos >= hole) {
      if (find_data(p->fd, pos, &data, &hole) < 0) {
        if (errno != EINVAL && errno != ENOTSUP) goto out;
        probe = false;               /* no SEEK_DATA here: all data */
        data = 0; hole = UINT64_MAX;
      }
    }
    if (probe && data >= pos + DIGEST_BLOCK) {
      /* Whole blocks of hole: no read. */
      uint64_t hb = data == UINT64_MAX ? end : data / DIGEST_BLOCK;
      if (hb > end) hb = end;
      for (; b < hb; b++)
        memcpy(p->out + (b - p->first) * DIGEST_LEN, zero_digest, DIGEST_LEN);
      continue;
    }
    /* A run of data: up to RUN_BLOCKS, up to the block holding the end of
     * the data (a block partly data is read whole: its hole part reads as
     * zeros anyway). */
    n = end - b < RUN_BLOCKS ? end - b : RUN_BLOCKS;
    if (probe && hole != UINT64_MAX) {
      uint64_t he = (hole + DIGEST_BLOCK - 1) / DIGEST_BLOCK;
      if (he > b && he - b < n) n = he - b;
    }
    uint64_t want = n * DIGEST_BLOCK;
    if (pos + want > p->size) want = p->size - pos;
    while (got < want) {
      ssize_t r = pread(p->fd, buf + got, want - got, (off_t) (pos + got));
      if (r < 0) {
        if (errno == EINTR) continue;
        goto out;
      }
      if (r == 0) break;             /* past EOF (file shrank): zeros */
      got += (uint64_t) r;
    }
    if (got < n * DIGEST_BLOCK) memset(buf + got, 0, n * DIGEST_BLOCK - got);
    for (uint64_t i = 0; i < n; i++)
      hash_block(c, buf + i * DIGEST_BLOCK, p->out + (b + i - p->first) * DIGEST_LEN);
    b += n;
  }
  rc = 0;
out:
  if (rc < 0) p->err = errno ? errno : EIO;
  free(buf);
  EVP_MD_CTX_free(c);
  return rc;
}

static void *part_thread(void *arg)
{
  hash_part(arg);
  return NULL;
}

int digest_file(int fd, uint64_t size, uint64_t first, uint64_t count,
                uint8_t *out, unsigned threads)
{
  uint64_t nblk = size / DIGEST_BLOCK + (size % DIGEST_BLOCK != 0);
  struct stat st;
  struct part *parts;
  int err = 0;

  pthread_once(&once, init_once);
  if (fd < 0 || fstat(fd, &st) < 0) { errno = EBADF; return -1; }
  if (first > nblk || count > nblk - first || (count && !out)) {
    errno = EINVAL;
    return -1;
  }
  if (count == 0) return 0;
  if (threads == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    threads = n > 0 ? (unsigned) n : 1;
  }
  if (threads > count / MIN_BLOCKS_PER_THREAD)
    threads = count / MIN_BLOCKS_PER_THREAD ? (unsigned) (count / MIN_BLOCKS_PER_THREAD) : 1;
  if (threads > 256) threads = 256;

  parts = calloc(threads, sizeof *parts);
  if (!parts) { errno = ENOMEM; return -1; }
  /* Contiguous shares, whole runs where possible. */
  uint64_t per = count / threads, extra = count % threads, b = first;
  for (unsigned i = 0; i < threads; i++) {
    struct part *p = &parts[i];
    p->fd = fd;
    p->size = size;
    p->holes = S_ISREG(st.st_mode) && (uint64_t) st.st_blocks * 512 < (uint64_t) st.st_size;
    p->first = b;
    p->count = per + (i < extra);
    p->out = out + (b - first) * DIGEST_LEN;
    b += p->count;
  }
  /* Thread 0 is this thread; a failed thread creation hashes inline. */
  for (unsigned i = 1; i < threads; i++)
    parts[i].started = pthread_create(&parts[i].tid, NULL, part_thread, &parts[i]) == 0;
  for (unsigned i = 1; i < threads; i++)
    if (!parts[i].started) hash_part(&parts[i]);
  hash_part(&parts[0]);
  for (unsigned i = 0; i < threads; i++) {
    if (parts[i].started) pthread_join(parts[i].tid, NULL);
    if (!err && parts[i].err) err = parts[i].err;
  }
  free(parts);
  if (err) { errno = err; return -1; }
  return 0;
}
