/* engine.h: the migration engine behind xnbd-proxy (and later the nbdkit
 * plugin).  It serves a source's export from a local cache image: blocks
 * present locally are served locally; missing blocks are fetched from the
 * source on demand (and kept); writes stay local; a background copy fetches
 * the rest; then the engine can detach from the source.
 *
 * The engine is a backend (backend.h): pass engine_backend_ops and the
 * engine handle to any front end.  It has no event-loop types in its
 * interface: it runs its own fetcher thread (libnbd) and uses a work queue
 * for local I/O.  Every function here is thread-safe.
 *
 * Block states: missing -> in flight -> present.  The persistent bitmap
 * (bitmap.h) holds "present"; see DESIGN.md §3 for invariants I1-I7. */
#ifndef XNBD_ENGINE_H
#define XNBD_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

struct workq;
struct engine;

struct engine_config {
  const char *target;            /* nbd://, nbds://, nbd+unix:// URI or HOST:PORT */
  const char *target_export;     /* export name for HOST:PORT targets ("") */
  const char *cache_path;        /* local cache image (created sparse) */
  const char *bitmap_path;       /* persistent bitmap */
  const char *source_id;         /* identity recorded in the bitmap (NULL:
                                  * derived from the source's export) */
  uint32_t block_size;           /* power of two >= 4096 (default 4096) */
  bool clear_bitmap;             /* start over */
  bool readonly;                 /* refuse client writes */
  unsigned connections;          /* source connections (default 2: one kept
                                  * for on-demand reads) */
  uint64_t bg_window;            /* background bytes in flight (0: sized
                                  * from measured RTT x throughput) */
  uint64_t bg_rate;              /* background bytes/s cap (0: none) */
  uint32_t max_fetch;            /* largest single fetch (default 4 MiB,
                                  * capped by the source's maximum) */
  unsigned source_timeout_s;     /* how long a client request waits for a
                                  * lost source before EIO (default 60) */
  unsigned persist_interval_ms;  /* bitmap persisted this often (default 1000) */
  bool cache_all;                /* start the background copy at once */
  bool detach_when_complete;     /* detach by itself once every block is present */
  struct workq *wq;              /* local I/O threads (shared; outlives engine) */
  int compress_level;            /* xnbd:// zstd level; 0: default (3); <0: off */
  const char *tls_certificates;  /* TLS: directory with ca-cert.pem (...) */
  const char *tls_psk;           /* TLS: USER:HEXKEY file */
  const char *tls_username;      /* TLS: PSK identity / certificate user */
  bool tls_verify;               /* verify the server certificate (default on) */
  /* Live migration: the VM still runs (and writes) at the source.  Reads
   * of missing blocks pass through without being kept, and no background
   * copy runs, until engine_activate() or the first client write. */
  bool standby;
  /* Deduplication (DESIGN section 5): local files whose blocks are used
   * instead of fetching, when the source publishes block digests
   * (dedup/digest.h).  Opened read-only, never written.  index_path: where
   * the seeds' index is kept (NULL: rebuilt at every start). */
  const char *const *seeds;
  unsigned nseeds;
  const char *index_path;
  /* The source's digests from a file made by xnbd-digest, for a source
   * that does not publish them (checked against its sampled identity). */
  const char *digests_path;
};

enum engine_state {
  ENGINE_CONNECTING,    /* source not reached yet */
  ENGINE_PROXYING,      /* source connected, blocks missing */
  ENGINE_SOURCE_LOST,   /* reconnecting with backoff */
  ENGINE_COMPLETE,      /* every block present, source still attached */
  ENGINE_DETACHED,      /* no source; an ordinary local server */
};

struct engine_stats {
  enum engine_state state;
  uint64_t image_size;
  uint32_t block_size;
  uint64_t blocks_total, blocks_present, blocks_missing, blocks_inflight;
  uint64_t bytes_fetched;        /* payload bytes received from the source */
  uint64_t bytes_zero_skipped;   /* bytes made present as zero w/o transfer */
  uint64_t bytes_bridged;        /* zero bytes re-read inside larger fetches */
  uint64_t bytes_local_written;  /* bytes written by clients */
  uint64_t fetches_ondemand, fetches_background, fetch_errors;
  uint64_t fetches_prepaged;      /* background fetches made next to a miss */
  uint64_t fetches_recent;        /* background fetches of regions the source's
                                   * clients read last (read map) */
  uint64_t bg_recent_regions;     /* regions the read map named */
  uint64_t bg_recent_done;        /* of them, copied (or found present) */
  uint64_t fetches_joined;        /* client reads that joined a background fetch */
  uint64_t fetches_seed_stale;    /* seed jobs fetched instead: a block in the seed
                                   * no longer matched the source's digest (I4) */
  uint64_t fetch_rate;           /* bytes/s over the last few seconds */
  uint64_t ondemand_waiting;     /* client requests waiting on the source */
  bool bg_running, bg_paused;
  uint64_t bg_rate;              /* current cap, bytes/s (0: none) */
  uint64_t bg_window;            /* bytes in flight allowed (auto-sized) */
  uint64_t bg_inflight;          /* background fetch bytes in flight now */
  uint64_t bg_seeding;           /* bytes of seed jobs (copies from seeds) now */
  uint64_t bg_queue_us;          /* queueing delay on the path at the last
                                  * round-trip sample (what a miss waits) */
  uint64_t rtt_us;               /* measured round trip to the source */
  unsigned connections_up, connections;
  char target[512];
  char source_id[1025];
  char last_error[512];
  uint64_t forced_missing;       /* blocks missing at a forced detach */
  uint64_t completed_unix_us;    /* wall clock when every block was present
                                  * in this run (0: not yet, or complete
                                  * already when the proxy started) */
  bool standby;                  /* waiting for the switch-over */
  /* WAN transport (xnbd://) bytes, both directions, before and after zstd. */
  uint64_t wire_tx_raw, wire_tx, wire_rx, wire_rx_raw;
  /* Deduplication: bytes copied from seeds instead of fetched (each
   * verified against the source's digest), and digest bytes read from the
   * source; whether the source publishes digests. */
  uint64_t bytes_seeded, bytes_digests;
  bool digests;
};

extern const struct xnbd_backend_ops engine_backend_ops;

/* Opens (or creates) the cache and bitmap and, unless the bitmap says every
 * block is present, connects to the source (waiting up to
 * source_timeout_s).  Returns NULL with a message (cause and fix) in err. */
struct engine *engine_open(const struct engine_config *cfg, char *err, size_t errlen);

/* Persists the bitmap, stops the fetcher, closes files, frees. */
void engine_close(struct engine *e);

void engine_get_stats(struct engine *e, struct engine_stats *st);
const char *engine_state_name(enum engine_state s);

/* Background copy control.  Return 0, or -1 with a message in err. */
int engine_bg_start(struct engine *e, char *err, size_t errlen);
int engine_bg_pause(struct engine *e, char *err, size_t errlen);
int engine_bg_resume(struct engine *e, char *err, size_t errlen);
int engine_set_bg_rate(struct engine *e, uint64_t bytes_per_sec);

/* Detach from the source: refused while blocks are missing unless force
 * (then logged, and missing blocks read as EIO).  Clients stay connected. */
int engine_detach(struct engine *e, bool force, char *err, size_t errlen);

/* Switch to another address of the same source (identity is checked). */
int engine_reconnect(struct engine *e, const char *target, char *err, size_t errlen);

/* Switch-over done (the VM now runs here): blocks read from now on are
 * kept, and the background copy may run.  Idempotent. */
void engine_activate(struct engine *e, const char *why);

/* Make everything written so far durable (data, then bitmap). */
int engine_flush(struct engine *e);

#endif
