/* index.c: the seed index (index.h) -- the seeds, the in-memory table,
 * lookups and verified fetches.  The index file is index-file.c.
 *
 * The table: open addressing with linear probing, one 8-byte slot per
 * entry: the low 24 bits of the digest key (the "tag") in the top 24 bits,
 * and 1 + the block's global location in the low 40 bits (0 = empty).
 * Global locations number the seeds' blocks one after the other (seed s
 * starts at seeds[s].base), so 2^40 - 2 blocks (4 PiB of seeds) fit.  The
 * home slot comes from the key's high bits (multiply-shift onto any
 * capacity, so the table is sized exactly: load factor 3/4, about 10.7
 * bytes of RAM per indexed block).  A lookup compares 24 bits of tag on top
 * of the ~log2(capacity) bits of home position; a false candidate (about
 * one lookup in 10^7) costs one read of a seed block, which index_fetch
 * re-hashes anyway (I4).
 *
 * Duplicate digests: the first (seed order, then block order) is kept;
 * a later block with the same tag in the same probe run is not inserted.
 * Zero blocks are not indexed. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "index-int.h"
#include "log.h"
#include "util.h"

#define TAG_BITS 24
#define LOC_BITS 40
#define LOC_MASK ((UINT64_C(1) << LOC_BITS) - 1)
#define TAG_MASK ((UINT64_C(1) << TAG_BITS) - 1)
/* Seeds are hashed this much at a time, then inserted. */
#define CHUNK_BLOCKS (UINT64_C(64) << 20) / DIGEST_BLOCK

struct index {
  unsigned nseeds;
  struct seed *seeds;
  uint64_t *slots;             /* capacity slots, see above */
  uint64_t capacity;
  uint64_t entries;
  uint64_t blocks_hashed;
  double hash_seconds;
};

uint64_t index_key(const uint8_t digest[DIGEST_LEN])
{
  return get_be64(digest);
}

static uint64_t home_of(const struct index *ix, uint64_t key)
{
  return (uint64_t) (((unsigned __int128) key * ix->capacity) >> 64);
}

/* ---- the table ---- */

/* Inserts key at global location gloc unless its tag is already in the
 * probe run (keep the first).  The caller keeps entries < capacity. */
static void table_insert(struct index *ix, uint64_t key, uint64_t gloc)
{
  uint64_t tag = key & TAG_MASK, i = home_of(ix, key);
  for (;;) {
    uint64_t e = ix->slots[i];
    if (e == 0) {
      ix->slots[i] = tag << LOC_BITS | (gloc + 1);
      ix->entries++;
      return;
    }
    if (e >> LOC_BITS == tag)
      return;
    if (++i == ix->capacity)
      i = 0;
  }
}

/* Builds the table for about expect distinct keys.  Returns 0, 1 if the
 * table got fuller than 9/10 (expect was too low: try again with more),
 * -1 with errno (no memory). */
static int table_build(struct index *ix, uint64_t expect, uint64_t zero_key)
{
  uint64_t cap = expect + expect / 3 + 1024;
  if (ix->slots)
    munmap(ix->slots, ix->capacity * sizeof *ix->slots);
  ix->slots = NULL;
  ix->entries = 0;
  ix->capacity = cap;
  /* mmap: zeroed lazily, and given back whole at close. */
  ix->slots = mmap(NULL, cap * sizeof *ix->slots, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ix->slots == MAP_FAILED) {
    ix->slots = NULL;
    ix->capacity = 0;
    return -1;
  }
  for (unsigned s = 0; s < ix->nseeds; s++) {
    const struct seed *sd = &ix->seeds[s];
    for (uint64_t b = 0; b < sd->nblocks; b++) {
      if (sd->keys[b] == zero_key)
        continue;
      if (ix->entries >= cap / 10 * 9)
        return 1;
      table_insert(ix, sd->keys[b], sd->base + b);
    }
  }
  return 0;
}

/* Sizes and fills the table: from the previous build's entry count when
 * the seeds are those of the index file, else from the non-zero blocks
 * and then, if duplicates made it much emptier, once more at its size. */
static int table_make(struct index *ix, uint64_t hint)
{
  uint64_t zero_key = index_key(digest_zero()), nonzero = 0;
  int rc;
  for (unsigned s = 0; s < ix->nseeds; s++)
    for (uint64_t b = 0; b < ix->seeds[s].nblocks; b++)
      nonzero += ix->seeds[s].keys[b] != zero_key;
  if (hint > 0 && hint <= nonzero) {
    rc = table_build(ix, hint, zero_key);
    if (rc <= 0)
      return rc;
  }
  rc = table_build(ix, nonzero, zero_key);
  if (rc != 0 || ix->entries >= nonzero / 10 * 9)
    return rc < 0 ? -1 : 0;       /* rc 1 cannot happen at this size */
  rc = table_build(ix, ix->entries, zero_key);
  if (rc == 1)
    rc = table_build(ix, nonzero, zero_key);
  return rc < 0 ? -1 : 0;
}

/* ---- seeds ---- */

static void seed_id_free(struct seed_id *id)
{
  free(id->real);
  id->real = NULL;
}

/* Opens a seed read-only and records its identity. */
static int seed_open(struct seed *sd, const char *path, char *err, size_t errlen)
{
  struct stat st;
  off_t end;
  sd->path = path;
  sd->fd = open(path, O_RDONLY | O_CLOEXEC);
  if (sd->fd < 0) {
    snprintf(err, errlen, "cannot open seed %s read-only: %s (check the --seed "
             "path and that the proxy's user may read it)", path, strerror(errno));
    return -1;
  }
  if (fstat(sd->fd, &st) < 0 || (end = lseek(sd->fd, 0, SEEK_END)) < 0) {
    snprintf(err, errlen, "cannot stat seed %s: %s", path, strerror(errno));
    return -1;
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    snprintf(err, errlen, "seed %s is not a regular file or a block device "
             "(name disk images, base images or memory files with --seed)", path);
    return -1;
  }
  sd->id.real = realpath(path, NULL);
  if (!sd->id.real) {
    snprintf(err, errlen, "cannot resolve the path of seed %s: %s", path, strerror(errno));
    return -1;
  }
  sd->id.dev = st.st_dev;
  sd->id.ino = st.st_ino;
  sd->id.size = (uint64_t) end;    /* st_size is 0 for a block device */
  sd->id.mtim = st.st_mtim;
  sd->id.ctim = st.st_ctim;
  sd->nblocks = (sd->id.size + DIGEST_BLOCK - 1) / DIGEST_BLOCK;
  return 0;
}

/* Hashes a seed into its keys, CHUNK_BLOCKS at a time, with every core. */
static int seed_hash(struct index *ix, struct seed *sd, unsigned threads,
                     char *err, size_t errlen)
{
  uint64_t chunk = MIN(CHUNK_BLOCKS, MAX(sd->nblocks, 1));
  CLEANUP_FREE uint8_t *dig = malloc(chunk * DIGEST_LEN);
  uint64_t t0 = now_ns();
  if (!dig) {
    snprintf(err, errlen, "no memory to hash seed %s", sd->path);
    return -1;
  }
  for (uint64_t b = 0; b < sd->nblocks; b += chunk) {
    uint64_t n = MIN(chunk, sd->nblocks - b);
    if (digest_file(sd->fd, sd->id.size, b, n, dig, threads) < 0) {
      snprintf(err, errlen, "cannot read seed %s (block %" PRIu64 " to %" PRIu64
               "): %s (is the file being truncated, or the disk failing?)",
               sd->path, b, b + n - 1, strerror(errno));
      return -1;
    }
    for (uint64_t i = 0; i < n; i++)
      sd->keys[b + i] = index_key(dig + i * DIGEST_LEN);
  }
  ix->blocks_hashed += sd->nblocks;
  ix->hash_seconds += (now_ns() - t0) / 1e9;
  return 0;
}

/* Opens every seed; refuses a seed named twice, the index file among the
 * seeds, and more blocks than the table's locations can name. */
static int seeds_open(struct index *ix, const char *const *paths, const char *index_path,
                      char *err, size_t errlen)
{
  struct stat ist;
  bool have_ist = index_path && stat(index_path, &ist) == 0;
  uint64_t base = 0;
  for (unsigned s = 0; s < ix->nseeds; s++) {
    struct seed *sd = &ix->seeds[s];
    if (seed_open(sd, paths[s], err, errlen) < 0)
      return -1;
    for (unsigned t = 0; t < s; t++)
      if (ix->seeds[t].id.dev == sd->id.dev && ix->seeds[t].id.ino == sd->id.ino) {
        snprintf(err, errlen, "seed %s is the same file as seed %s: name each "
                 "seed once", sd->path, ix->seeds[t].path);
        return -1;
      }
    if (have_ist && ist.st_dev == sd->id.dev && ist.st_ino == sd->id.ino) {
      snprintf(err, errlen, "the index file %s is seed %s: the index needs a "
               "file of its own (choose another --index path)", index_path, sd->path);
      return -1;
    }
    sd->base = base;
    base += sd->nblocks;
    if (base > LOC_MASK - 1) {
      snprintf(err, errlen, "the seeds hold more than %" PRIu64 " blocks of 4 KiB "
               "(4 PiB), more than the index can locate: name fewer seeds",
               LOC_MASK - 1);
      return -1;
    }
  }
  return 0;
}

static int keys_alloc(struct seed *sd)
{
  sd->keys = malloc(MAX(sd->nblocks, 1) * sizeof *sd->keys);
  return sd->keys ? 0 : -1;
}

static void keys_free(struct index *ix)
{
  for (unsigned s = 0; s < ix->nseeds; s++) {
    free(ix->seeds[s].keys);
    ix->seeds[s].keys = NULL;
  }
}

/* ---- the interface ---- */

struct index *index_open(const char *const *seeds, unsigned nseeds,
                         const char *index_path, unsigned threads,
                         char *err, size_t errlen)
{
  struct index *ix = calloc(1, sizeof *ix);
  uint64_t hint = 0;
  bool rewrite = index_path != NULL;
  if (!ix || !(ix->seeds = calloc(MAX(nseeds, 1), sizeof *ix->seeds))) {
    snprintf(err, errlen, "no memory for the seed index");
    free(ix);
    return NULL;
  }
  ix->nseeds = nseeds;
  for (unsigned s = 0; s < nseeds; s++)
    ix->seeds[s].fd = -1;
  if (seeds_open(ix, seeds, index_path, err, errlen) < 0)
    goto fail;
  if (index_path && index_file_load(index_path, ix->seeds, nseeds, &hint,
                                    &rewrite, err, errlen) < 0)
    goto fail;
  for (unsigned s = 0; s < nseeds; s++) {
    struct seed *sd = &ix->seeds[s];
    if (sd->loaded)
      continue;
    if (keys_alloc(sd) < 0) {
      snprintf(err, errlen, "no memory to index seed %s", sd->path);
      goto fail;
    }
    if (seed_hash(ix, sd, threads, err, errlen) < 0)
      goto fail;
    rewrite = index_path != NULL;
  }
  if (table_make(ix, hint) < 0) {
    snprintf(err, errlen, "no memory for the seed index table (%" PRIu64 " bytes): "
             "name fewer seeds", ix->capacity * (uint64_t) sizeof *ix->slots);
    goto fail;
  }
  if (rewrite && index_file_write(index_path, ix->seeds, nseeds,
                                  ix->capacity, ix->entries) < 0)
    log_warn("seed index: cannot write the index file %s: %s; the index is "
             "complete in memory but the seeds will be hashed again at the next "
             "start (check the directory and free space)", index_path, strerror(errno));
  keys_free(ix);
  return ix;
fail:
  index_close(ix);
  return NULL;
}

void index_close(struct index *ix)
{
  if (!ix)
    return;
  keys_free(ix);
  for (unsigned s = 0; s < ix->nseeds; s++) {
    if (ix->seeds[s].fd >= 0)
      close(ix->seeds[s].fd);
    seed_id_free(&ix->seeds[s].id);
  }
  if (ix->slots)
    munmap(ix->slots, ix->capacity * sizeof *ix->slots);
  free(ix->seeds);
  free(ix);
}

void index_get_stats(struct index *ix, struct index_stats *st)
{
  memset(st, 0, sizeof *st);
  st->seeds = ix->nseeds;
  st->blocks_indexed = ix->entries;
  st->blocks_hashed = ix->blocks_hashed;
  st->table_bytes = ix->capacity * sizeof *ix->slots;
  st->hash_seconds = ix->hash_seconds;
}

/* The seed and block of a global location (binary search on base). */
static void loc_of(const struct index *ix, uint64_t gloc, struct index_loc *out)
{
  unsigned lo = 0, hi = ix->nseeds;      /* seeds[lo].base <= gloc */
  while (hi - lo > 1) {
    unsigned mid = lo + (hi - lo) / 2;
    if (ix->seeds[mid].base <= gloc)
      lo = mid;
    else
      hi = mid;
  }
  out->seed = lo;
  out->block = gloc - ix->seeds[lo].base;
}

unsigned index_lookup(struct index *ix, const uint8_t digest[DIGEST_LEN],
                      struct index_loc *out, unsigned max)
{
  uint64_t key = index_key(digest), tag = key & TAG_MASK, i;
  unsigned n = 0;
  if (ix->capacity == 0 || max == 0)
    return 0;
  i = home_of(ix, key);
  /* Bounded: the table is never full (load <= 9/10). */
  for (uint64_t probes = 0; probes < ix->capacity && n < max; probes++) {
    uint64_t e = ix->slots[i];
    if (e == 0)
      break;
    if (e >> LOC_BITS == tag)
      loc_of(ix, (e & LOC_MASK) - 1, &out[n++]);
    if (++i == ix->capacity)
      i = 0;
  }
  return n;
}

int index_read(struct index *ix, unsigned seed, uint64_t block, uint64_t n, void *buf)
{
  uint64_t have = 0, want;
  if (seed >= ix->nseeds || n > UINT64_MAX / DIGEST_BLOCK) {
    errno = EINVAL;
    return -1;
  }
  want = n * DIGEST_BLOCK;
  /* The seed may have shrunk or grown since it was indexed: read what is
   * there now; what lies past its end now reads as zeros (no seed block
   * that is indexed hashes as zeros: the caller's check fails). */
  if (want <= INT64_MAX && block <= ((uint64_t) INT64_MAX - want) / DIGEST_BLOCK)
    while (have < want) {
      ssize_t r = pread(ix->seeds[seed].fd, (char *) buf + have, want - have,
                        (off_t) (block * DIGEST_BLOCK + have));
      if (r < 0 && errno == EINTR)
        continue;
      if (r < 0)
        return -1;
      if (r == 0)
        break;
      have += (uint64_t) r;
    }
  memset((char *) buf + have, 0, want - have);
  return 0;
}

int index_fetch(struct index *ix, const struct index_loc *loc,
                const uint8_t digest[DIGEST_LEN], void *buf)
{
  uint8_t got[DIGEST_LEN];
  if (index_read(ix, loc->seed, loc->block, 1, buf) < 0)
    return -1;
  digest_block(buf, got);
  return memcmp(got, digest, DIGEST_LEN) == 0 ? 1 : 0;
}
