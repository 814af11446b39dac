/* index.h: the destination's index of local content -- "seeds": disk
 * images, base images, RAM files of co-located VMs named explicitly by the
 * operator (xnbd-proxy --seed, repeatable) -- by the SHA-256 of each 4 KiB
 * block (digest.h).  A lookup returns candidates only: the caller re-reads
 * and re-hashes the seed block before using it (I4: seeds change);
 * index_fetch() does exactly that.
 *
 * Memory: at most 16 bytes of RAM per indexed block (a digest prefix and
 * a location; the full digest is checked on use), so 1 TiB of seeds fits
 * in 4 GiB.  Zero blocks are not indexed (block status finds those).
 *
 * Persistence: the index is kept in a file (xnbd-proxy --index) with, per
 * seed, its identity (path, device, inode, size, mtime and ctime in ns); on
 * open, a seed whose identity changed is hashed again, the others are
 * loaded as they are, so a seed is hashed once.  A foreign, truncated or
 * corrupted index file is rebuilt with a message, never trusted.
 *
 * Threads: index_open builds with every core; afterwards index_lookup and
 * index_fetch may be called from any thread at once (read-only). */
#ifndef XNBD_INDEX_H
#define XNBD_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "digest.h"

struct index;

/* A place in a seed. */
struct index_loc {
  unsigned seed;               /* position in the seeds array given to index_open */
  uint64_t block;              /* 4 KiB block of that seed */
};

struct index_stats {
  unsigned seeds;
  uint64_t blocks_indexed;     /* non-zero blocks in the table */
  uint64_t blocks_hashed;      /* hashed by this open (others loaded) */
  uint64_t table_bytes;        /* RAM of the table */
  double hash_seconds;         /* wall time spent hashing */
};

/* Opens the seeds read-only (O_RDONLY: never written), loads the index
 * file at index_path if it matches them (NULL: no file, build in memory),
 * hashes what is new or changed, writes the file back.  threads: 0 = one
 * per online CPU.  Returns NULL with a message (cause and fix) in err. */
struct index *index_open(const char *const *seeds, unsigned nseeds,
                         const char *index_path, unsigned threads,
                         char *err, size_t errlen);
void index_close(struct index *ix);
void index_get_stats(struct index *ix, struct index_stats *st);

/* Candidates for a digest: up to max locations whose stored prefix matches
 * (usually 0 or 1).  Returns how many were written to out. */
unsigned index_lookup(struct index *ix, const uint8_t digest[DIGEST_LEN],
                      struct index_loc *out, unsigned max);

/* Reads blocks [block, block + n) of seed into buf (n x DIGEST_BLOCK
 * bytes) in one go, as they are now: what lies past the seed's end now
 * reads as zeros.  The caller re-hashes them (I4; index_fetch does both
 * for one block).  Returns 0, or -1 with errno (EINVAL: no such seed). */
int index_read(struct index *ix, unsigned seed, uint64_t block, uint64_t n, void *buf);

/* Reads the seed block at loc into buf (DIGEST_BLOCK bytes) and checks it
 * hashes to digest (I4).  Returns 1 if it does, 0 if the seed changed (or
 * the block is past its end now), -1 with errno on a read error. */
int index_fetch(struct index *ix, const struct index_loc *loc,
                const uint8_t digest[DIGEST_LEN], void *buf);

#endif
