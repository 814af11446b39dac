/* index-int.h: private to the seed index (index.c: seeds, table, lookups;
 * index-file.c: the index file).  Not for other layers. */
#ifndef XNBD_INDEX_INT_H
#define XNBD_INDEX_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "index.h"

/* What makes a seed "the same file with the same content" between two
 * opens: if any of these changed, the seed is hashed again. */
struct seed_id {
  char *real;                  /* realpath(), malloc'd */
  uint64_t dev, ino, size;
  struct timespec mtim, ctim;
};

struct seed {
  const char *path;            /* as given (the caller's string) */
  struct seed_id id;
  int fd;                      /* O_RDONLY, always */
  uint64_t nblocks;            /* ceil(size / 4096) at open */
  uint64_t base;               /* first global block (table locations) */
  /* During index_open only: the 8-byte digest key of every block (the
   * first 8 bytes of its SHA-256, big-endian), then freed. */
  uint64_t *keys;
  bool loaded;                 /* keys came from the index file */
};

/* The key of a digest: its first 8 bytes as a big-endian number. */
uint64_t index_key(const uint8_t digest[DIGEST_LEN]);

/* Loads the keys of every seed whose identity matches its record in the
 * index file at path (seeds[i].keys, .loaded).  *hint: the table entries
 * of the previous build if the file's seeds are exactly ours (else 0);
 * *rewrite: whether the file must be written again (missing, unusable,
 * other seeds).  Returns 0, or -1 with a message in err: the file exists
 * but is not an index file (never overwritten). */
int index_file_load(const char *path, struct seed *seeds, unsigned nseeds,
                    uint64_t *hint, bool *rewrite, char *err, size_t errlen);

/* Writes every seed's identity and keys to path atomically (temporary
 * file, fsync, rename, fsync of the directory), with the table geometry
 * (capacity, entries).  Returns 0, or -1 with errno. */
int index_file_write(const char *path, const struct seed *seeds, unsigned nseeds,
                     uint64_t capacity, uint64_t entries);

#endif
