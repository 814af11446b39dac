/* index-speed: measures the seed index (common/dedup/index.c) -- not a
 * test, a measuring tool for benchmarks.
 *   index-speed INDEX_FILE SEED...
 * Opens the index twice over the seeds: the first open hashes them (after
 * removing INDEX_FILE), the second loads INDEX_FILE; prints for each the
 * wall time, the hashing throughput and the RAM per indexed block. */
#include <inttypes.h>
#include <stdio.h>
#include <unistd.h>

#include "index.h"
#include "log.h"
#include "util.h"

static int one(const char *what, char **seeds, unsigned n, const char *ipath)
{
  char err[512];
  struct index_stats st;
  uint64_t t0 = now_ns();
  struct index *ix = index_open((const char *const *) seeds, n, ipath, 0, err, sizeof err);
  double secs = (now_ns() - t0) / 1e9;
  if (!ix) {
    fprintf(stderr, "index-speed: %s\n", err);
    return 1;
  }
  index_get_stats(ix, &st);
  printf("%s: %.3f s wall, %" PRIu64 " blocks hashed in %.3f s (%.1f MiB/s), "
         "%" PRIu64 " blocks indexed, table %" PRIu64 " bytes = %.2f bytes/block\n",
         what, secs, st.blocks_hashed, st.hash_seconds,
         st.hash_seconds > 0 ? st.blocks_hashed * 4096.0 / st.hash_seconds / 1048576 : 0,
         st.blocks_indexed, st.table_bytes,
         st.blocks_indexed ? (double) st.table_bytes / st.blocks_indexed : 0);
  index_close(ix);
  return 0;
}

int main(int argc, char **argv)
{
  if (argc < 3) {
    fprintf(stderr, "usage: index-speed INDEX_FILE SEED...\n");
    return 2;
  }
  log_init("index-speed", LOG_LVL_WARN);
  unlink(argv[1]);
  if (one("build", argv + 2, argc - 2, argv[1]) || one("reload", argv + 2, argc - 2, argv[1]))
    return 1;
  return 0;
}
