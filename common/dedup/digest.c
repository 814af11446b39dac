/* digest.c: SHA-256 of 4 KiB blocks, over every core (digest.h).
 *
 * OpenSSL 3: one EVP_MD fetched once, one EVP_MD_CTX per thread reused
 * for every block (EVP_DigestInit_ex2 + Update + Final), which is what
 * `openssl speed -evp sha256` measures; SHA256() and EVP_Digest() fetch or
 * allocate per call. */
#include "digest.h"
#include "sha256-x2.h"
#include "util.h"

#include <errno.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#define RUN_BYTES (128u << 10)                   /* one pread: stays in L2 for the hash */
#define RUN_BLOCKS (RUN_BYTES / DIGEST_BLOCK)
#define MIN_BLOCKS_PER_THREAD 256                /* 1 MiB: less is not worth a thread */

static pthread_once_t once = PTHREAD_ONCE_INIT;
static EVP_MD *sha256_md;
static uint8_t zero_digest[DIGEST_LEN];
static pthread_key_t ctx_key;

static void free_ctx(void *p) { EVP_MD_CTX_free(p); }

static bool use_x2;                  /* SHA-NI, two blocks at a time */

static void init_once(void)
{
  const char *impl = getenv("XNBD_SHA256");
  use_x2 = sha256_x2_available() && !(impl && strcmp(impl, "openssl") == 0);
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

/* len bytes with a context the caller keeps. */
static void hash_bytes(EVP_MD_CTX *c, const void *buf, size_t n, uint8_t *out)
{
  unsigned len = 0;
  if (!EVP_DigestInit_ex2(c, sha256_md, NULL) ||
      !EVP_DigestUpdate(c, buf, n) ||
      !EVP_DigestFinal_ex(c, out, &len) || len != DIGEST_LEN)
    abort();                        /* only on memory exhaustion in OpenSSL */
}

static void hash_block(EVP_MD_CTX *c, const void *buf, uint8_t *out)
{
  hash_bytes(c, buf, DIGEST_BLOCK, out);
}

/* Whether a (8-byte aligned) block is all zeros: its digest is known
 * without hashing.  Most blocks fail in the first 64 bytes; images and
 * RAM files hold many blocks of written zeros (journals, zeroed pages). */
static bool block_all_zero(const uint8_t *p)
{
  const uint64_t *q = (const uint64_t *) (const void *) p;
  for (size_t i = 0; i < DIGEST_BLOCK / 8; i += 8)
    if (q[i] | q[i + 1] | q[i + 2] | q[i + 3] | q[i + 4] | q[i + 5] | q[i + 6] | q[i + 7])
      return false;
  return true;
}

static EVP_MD_CTX *new_ctx(void)
{
  EVP_MD_CTX *c = EVP_MD_CTX_new();
  if (!c) abort();
  return c;
}

/* This thread's context, made at its first use. */
static EVP_MD_CTX *thread_ctx(void)
{
  EVP_MD_CTX *c;
  pthread_once(&once, init_once);
  c = pthread_getspecific(ctx_key);
  if (!c) {
    c = new_ctx();
    pthread_setspecific(ctx_key, c);
  }
  return c;
}

void digest_block(const void *buf, uint8_t out[DIGEST_LEN])
{
  hash_block(thread_ctx(), buf, out);
}

void digest_blocks(const void *buf, uint64_t n, uint8_t *out)
{
  const uint8_t *p = buf;
  EVP_MD_CTX *c = thread_ctx();        /* also runs init_once */
  uint64_t i = 0;
  if (use_x2)
    for (; i + 1 < n; i += 2)
      sha256_x2(p + i * DIGEST_BLOCK, p + (i + 1) * DIGEST_BLOCK,
                out + i * DIGEST_LEN, out + (i + 1) * DIGEST_LEN);
  for (; i < n; i++) hash_block(c, p + i * DIGEST_BLOCK, out + i * DIGEST_LEN);
}

void digest_bytes(const void *buf, size_t len, uint8_t out[DIGEST_LEN])
{
  hash_bytes(thread_ctx(), buf, len, out);
}

const uint8_t *digest_zero(void)
{
  pthread_once(&once, init_once);
  return zero_digest;
}

/* ---- digest_file ----
 *
 * Threads take runs of RUN_BLOCKS from a shared counter, so a sparse image
 * (data in one part, holes in another) keeps every core busy: fixed
 * contiguous shares left one thread hashing while the other skipped holes. */

struct hash_job {
  int fd;
  uint64_t size;
  bool holes;                /* the file may have holes: probe them */
  uint64_t first, count;     /* blocks */
  uint8_t *out;              /* count x 32 bytes */
  atomic_uint_fast64_t next; /* next run to take, in blocks from first */
  atomic_int err;            /* errno of the first failure, or 0 */
  int nice;                  /* > 0: the workers run at this nice value */
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

/* One worker: runs from the counter until none is left or one failed.
 * Positions only grow for a worker, so what a probe learned ([data, hole),
 * and no data between the probe and data) stays true for later runs. */
static void hash_runs(struct hash_job *hj)
{
  EVP_MD_CTX *c = new_ctx();
  uint8_t *buf = NULL;
  bool probe = hj->holes;
  uint64_t data = 0, hole = probe ? 0 : UINT64_MAX;   /* 0: probe first */
  uint64_t end_all = hj->first + hj->count;

  if (posix_memalign((void **) &buf, 4096, RUN_BYTES)) {
    int zero = 0;
    atomic_compare_exchange_strong(&hj->err, &zero, ENOMEM);
    EVP_MD_CTX_free(c);
    return;
  }
  while (atomic_load(&hj->err) == 0) {
    uint64_t b = hj->first + atomic_fetch_add(&hj->next, RUN_BLOCKS);
    if (b >= end_all) break;
    uint64_t end = MIN(end_all, b + RUN_BLOCKS);
    while (b < end) {
      uint64_t pos = b * DIGEST_BLOCK, n, got = 0;
      if (probe && pos >= hole && find_data(hj->fd, pos, &data, &hole) < 0) {
        if (errno != EINVAL && errno != ENOTSUP) goto fail;
        probe = false;               /* no SEEK_DATA here: all data */
        data = 0; hole = UINT64_MAX;
      }
      if (probe && data >= pos + DIGEST_BLOCK) {
        /* Whole blocks of hole: no read. */
        uint64_t hb = data == UINT64_MAX ? end : MIN(end, data / DIGEST_BLOCK);
        for (; b < hb; b++)
          memcpy(hj->out + (b - hj->first) * DIGEST_LEN, zero_digest, DIGEST_LEN);
        continue;
      }
      /* Data: up to the run's end, up to the block holding the end of the
       * data (a block partly data is read whole: its hole part reads as
       * zeros anyway). */
      n = end - b;
      if (probe && hole != UINT64_MAX) {
        uint64_t he = (hole + DIGEST_BLOCK - 1) / DIGEST_BLOCK;
        if (he > b && he - b < n) n = he - b;
      }
      uint64_t want = n * DIGEST_BLOCK;
      if (pos + want > hj->size) want = hj->size - pos;
      while (got < want) {
        ssize_t r = pread(hj->fd, buf + got, want - got, (off_t) (pos + got));
        if (r < 0) {
          if (errno == EINTR) continue;
          goto fail;
        }
        if (r == 0) break;           /* past EOF (file shrank): zeros */
        got += (uint64_t) r;
      }
      if (got < n * DIGEST_BLOCK) memset(buf + got, 0, n * DIGEST_BLOCK - got);
      const uint8_t *held = NULL;       /* a block waiting for a partner */
      uint8_t *held_out = NULL;
      for (uint64_t i = 0; i < n; i++) {
        const uint8_t *blk = buf + i * DIGEST_BLOCK;
        uint8_t *o = hj->out + (b + i - hj->first) * DIGEST_LEN;
        if (block_all_zero(blk)) memcpy(o, zero_digest, DIGEST_LEN);
        else if (!use_x2) hash_block(c, blk, o);
        else if (!held) { held = blk; held_out = o; }
        else { sha256_x2(held, blk, held_out, o); held = NULL; }
      }
      if (held) hash_block(c, held, held_out);
      b += n;
    }
  }
  free(buf);
  EVP_MD_CTX_free(c);
  return;
fail:;
  int zero = 0;
  atomic_compare_exchange_strong(&hj->err, &zero, errno ? errno : EIO);
  free(buf);
  EVP_MD_CTX_free(c);
}

static void *hash_thread(void *arg)
{
  struct hash_job *hj = arg;
  /* Only lowered, never raised back: the thread ends with the job.  Best
   * effort: if it fails, the thread hashes at the usual priority. */
  if (hj->nice > 0) (void) setpriority(PRIO_PROCESS, (id_t) syscall(SYS_gettid), hj->nice);
  hash_runs(hj);
  return NULL;
}

int digest_file(int fd, uint64_t size, uint64_t first, uint64_t count,
                uint8_t *out, unsigned threads)
{
  return digest_file_nice(fd, size, first, count, out, threads, 0);
}

int digest_file_nice(int fd, uint64_t size, uint64_t first, uint64_t count,
                     uint8_t *out, unsigned threads, int nice)
{
  uint64_t nblk = size / DIGEST_BLOCK + (size % DIGEST_BLOCK != 0);
  struct stat st;
  pthread_t tid[256];

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
  if (threads > ARRAY_SIZE(tid)) threads = ARRAY_SIZE(tid);

  struct hash_job hj = {
    .fd = fd, .size = size, .first = first, .count = count, .out = out,
    .holes = S_ISREG(st.st_mode) && (uint64_t) st.st_blocks * 512 < (uint64_t) st.st_size,
    .nice = nice,
  };
  atomic_init(&hj.next, 0);
  atomic_init(&hj.err, 0);
  /* This thread is one of the workers (unless they run niced: then it
   * only waits, its own priority untouched); a failed creation means
   * fewer. */
  unsigned started = 0;
  for (unsigned i = nice > 0 ? 0 : 1; i < threads; i++)
    if (pthread_create(&tid[started], NULL, hash_thread, &hj) == 0) started++;
  if (nice <= 0 || !started) hash_runs(&hj);
  for (unsigned i = 0; i < started; i++) pthread_join(tid[i], NULL);
  int err = atomic_load(&hj.err);
  if (err) { errno = err; return -1; }
  return 0;
}
