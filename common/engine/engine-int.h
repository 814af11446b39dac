/* engine-int.h: the engine's internals, shared by its files and by nothing
 * else (front ends see engine.h only).
 *
 * Files, top to bottom (calls go down only):
 *   life.c      open/close, statistics, the operator's controls
 *   client.c    client requests (the backend table)
 *   copy.c      background copy policy: block status ahead of the copy,
 *               window and rate, on the source thread's tick
 *   pipeline.c  jobs: one kind, named states, one producer, one order of
 *               resolution (known zero -> present locally -> source), the
 *               one "data landed" path (on the I/O work queue)
 *   state.c     engine state changes (completion, activate, detach), in
 *               one place
 * below them: store/cache.h (cache image), store/bitmap.h, source/source.h.
 *
 * Locks, in order: a job's store stripes (ascending), then engine.lock,
 * then the bitmap's internal locks.  engine.lock guards metadata only and
 * is never held across disk or network I/O.  The store stripes serialize
 * "check missing, write, set present" of one block between a landing job
 * and a client write to a missing block (I1). */
#ifndef XNBD_ENGINE_INT_H
#define XNBD_ENGINE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include "window.h"

#include "engine.h"
#include "bitmap.h"
#include "cache.h"
#include "source.h"
#include "index.h"
#include "digest-file.h"

#define STRIPES 64                        /* store stripes */
#define STRIPE_SHIFT 8                    /* blocks per stripe region: 256 */

enum job_kind {
  JOB_ONDEMAND,     /* a client waits for these blocks */
  JOB_BACKGROUND,   /* the background copy */
  JOB_PASSTHROUGH,  /* standby: exact bytes for one read, not kept */
  JOB_ZERO,         /* the source said these blocks read as zeros */
  JOB_LOCAL,        /* found in a seed by digest: copied locally after the
                     * seed block re-hashes to the source's digest (I4);
                     * from the source if any does not */
};

enum job_state {
  JOB_NEW,          /* made, in the in-flight table */
  JOB_FETCHING,     /* at the source */
  JOB_LANDING,      /* data (or failure) on its way into the cache */
};

struct pend;
struct waiter { struct pend *p; struct waiter *next; };

struct job {
  struct engine *e;
  enum job_kind kind;
  enum job_state state;
  uint64_t first, count;        /* blocks */
  uint64_t off, len;            /* bytes (exact request for passthrough) */
  uint64_t owned;               /* blocks of the range in the in-flight table
                                 * (the others were present: bridged zeros) */
  void *buf;
  int err;
  struct waiter *waiters;
  struct source_req sr;
  struct xwork work;
  struct hnode *nodes;          /* its in-flight table entries (owned) */
  struct index_loc *locs;       /* JOB_LOCAL: a seed block per block ... */
  uint8_t *digests;             /* ... and the source's digest of it */
  bool fell_back;               /* JOB_LOCAL fetched from the source */
  bool prepage;                 /* JOB_BACKGROUND made next to a miss */
  bool recent;                  /* JOB_BACKGROUND from the source's read map */
  /* JOB_BACKGROUND: made when, with how much landed, the last landing then */
  uint64_t sent_ns, sent_delivered, sent_landed_ns;
};

/* A client request waiting for jobs; resumed when pending reaches 0. */
struct pend {
  struct engine *e;
  struct xreq *r;
  void (*resume)(struct engine *e, struct xreq *r);   /* run it again */
  unsigned pending;
  int err;
  uint64_t deadline_ns;
  bool expired;                 /* answered EIO already; freed when released */
  bool passthrough;             /* completed with the job's bytes */
};

struct hnode { uint64_t block; struct job *job; struct hnode *next; };
struct inflight_tab { struct hnode **b; size_t nbuckets, n; };

#define PREPAGE_HINTS 8
#define PREPAGE_BYTES (1u << 20)       /* copied after each miss first */

/* Background copy policy (copy.c), under engine.lock unless noted. */
struct copy {
  bool running, paused;
  uint64_t rate;                /* cap, bytes/s (0: none) */
  uint64_t cursor;              /* next block to look at */
  uint64_t ahead;               /* fetches made past seeded blocks waiting
                                 * for room among the seed jobs, up to here */
  uint64_t inflight_bytes;
  uint64_t window;
  bool window_auto;
  /* Block status, asked per chunk with several queries in flight. */
  uint64_t status_until;        /* known below this offset */
  uint64_t *status_known;       /* per chunk: known up to (absolute) */
  bool *status_asking;
  uint64_t nchunks;
  unsigned status_outstanding;
  uint64_t *zero_known;         /* blocks found zero (for bridging), or NULL */
  /* Source digests, asked per chunk ahead of the copy (dedup). */
  uint8_t **dig;                /* per chunk: its blocks' digests, or NULL */
  bool *dig_asking, *dig_done;
  uint64_t ndchunks, dig_until;
  uint64_t dig_good_until;      /* the prefix of dig_until whose chunks came */
  unsigned dig_outstanding;
  /* The first chunk's digests, read with the digest export's handshake or
   * asked as soon as it is joined (copy_digest_prefetch), before the copy
   * exists. */
  bool pre_inflight;
  struct digest_query *pre_q;   /* that query, answered before copy_init */
  int pre_err;
  uint64_t local_inflight;      /* bytes in JOB_LOCAL jobs */
  /* Pre-paging: the blocks after the latest client misses, copied before
   * the ascending sweep goes on (newest last). */
  struct { uint64_t next, end; } hint[PREPAGE_HINTS];
  unsigned nhint;
  /* The source's read map (read-map.h): the regions its VM read most
   * recently, copied after the pre-paging hints, before the sweep. */
  enum { MAP_NONE, MAP_ASKED, MAP_IN, MAP_USED } map_state;
  uint8_t *map_buf;             /* MAP_ASKED, MAP_IN: the export's bytes */
  uint64_t map_len;
  unsigned map_pending;         /* reads of it not answered yet */
  int map_err;
  uint64_t *recent;             /* region numbers, most recent first */
  uint64_t nrecent, recent_pos; /* regions; the first not fully copied */
  uint64_t recent_next;         /* in that region: blocks before this are done */
  unsigned recent_shift;        /* log2 of the region size */
  uint64_t recent_dig;          /* digest chunk the next region waits on, or
                                 * UINT64_MAX */
  unsigned recent_chunks;       /* digest chunks asked for the map's regions */
  uint64_t debt;                /* fallback fetches not yet charged to tokens */
  bool dig_off;                 /* digest export unreachable: dedup given up */
  uint64_t dig_down_at;         /* source thread: digest export down since */
  /* Under the lock: landings write these (and win.job_rate, win.job_ns);
   * the source thread sizes the window under it too. */
  uint64_t landed_ns;           /* when a background job landed last */
  struct winctl win;            /* the window (window.c), in link bytes */
  /* Source thread only. */
  int64_t tokens;
  uint64_t tokens_at, rate_at, rate_bytes, last_expire;
  struct winratio ratio;        /* image bytes per link byte (window.h) */
  double delivered_link;        /* delivered, in the controller's link bytes */
  uint64_t delivered_raw;       /* delivered, in image bytes, then */
  /* XNBD_TRACE_COPY (copy.c trace_locked), under the lock. */
  bool trace;
  uint64_t trace_t0, trace_at;
};

struct engine {
  struct engine_config cfg;     /* strings below are owned copies */
  char *target, *target_export, *cache_path, *bitmap_path;
  uint64_t size;
  uint32_t bs;
  uint64_t nblocks;
  struct cache *cache;
  struct bitmap *bm;
  struct source *src;           /* NULL once detached (or complete at start) */
  struct source *dsrc;          /* the source's digest export, or NULL */
  struct companion *dig_opener; /* opening dsrc while the rest opens */
  bool dig_pending;             /* it was still opening when clients were let
                                 * in: joined on the tick; the copy waits */
  struct companion *map_opener; /* opening msrc (joined on the tick) */
  struct source *msrc;          /* the source's read map export, or NULL */
  struct index *ix;             /* the seeds' index, or NULL */
  struct digest_file *dfile;    /* the source's digests from a file, or NULL */
  /* Blocks not present whose cache holds data from before (an older copy
   * of this disk): a seed at the same offset (index_loc.seed CACHE_SEED). */
  uint64_t *old_data;
  /* Blocks whose place in the cache may hold data (written since the
   * cache was opened, or data in it then): a block not in it reads as
   * zero already, so a zero run there needs no write and no punch.  Bits
   * are set (atomically) before any write; never cleared.  NULL: every
   * block may. */
  _Atomic uint64_t *cache_data;
  char live_id[BITMAP_SOURCE_ID_MAX + 1];   /* the source's identity now */
  bool has_status;              /* the source offers base:allocation */
  pthread_mutex_t stripe[STRIPES];

  pthread_mutex_t lock;         /* protects everything below */
  enum engine_state state;
  bool standby;
  bool cache_all_at_activate;   /* --standby --cache-all */
  struct copy copy;
  struct inflight_tab inflight;
  void *zero_tree;              /* JOB_ZERO jobs by range (tsearch; not in
                                 * the table: a hole can be 1 TiB) */
  uint64_t blocks_inflight;
  struct pend **waiting;        /* every pend with a deadline */
  size_t nwaiting, waiting_cap;
  uint64_t forced_missing;
  uint64_t completed_unix_us;   /* see engine_stats */
  char last_error[512];
  char source_id[BITMAP_SOURCE_ID_MAX + 1];
  uint64_t bytes_fetched, bytes_zero_skipped, bytes_local_written, bytes_bridged;
  uint64_t fetches_ondemand, fetches_background, fetch_errors, fetch_rate;
  uint64_t fetches_prepaged;
  uint64_t fetches_recent;      /* background fetches from the read map */
  uint64_t fetches_joined;      /* client reads that waited for a background fetch */
  uint64_t fetches_seed_stale;  /* seed jobs that fell back to the source (I4) */
  uint64_t local_errors;        /* cache writes that failed (disk full...) */
  uint64_t bytes_seeded, bytes_digests;

  unsigned jobs_live;            /* made and not yet landed (close waits) */
  pthread_cond_t jobs_cond;
  atomic_bool stopping;
  pthread_t persister;
  bool persister_started;
  pthread_cond_t persist_cond;
};

/* pipeline.c */
struct job *job_make_locked(struct engine *e, enum job_kind kind,
                            uint64_t first, uint64_t count);
void job_start(struct engine *e, struct job *j);
struct job *inflight_get(struct engine *e, uint64_t block);
/* Deduplication, under lock: the source's digest of block b if known, a
 * seed candidate for it, and a JOB_LOCAL job for the run of candidates
 * from b (b must have one; JOB_BACKGROUND if its lists cannot be made). */
#define CACHE_SEED UINT32_MAX          /* index_loc.seed: the cache itself */
#define LOCAL_JOB_BLOCKS 256           /* 1 MiB copied from seeds per job */
#define DIG_CHUNK_BLOCKS 16384          /* digests asked per query: 512 KiB */
const uint8_t *digest_of(struct engine *e, uint64_t b);
bool seed_hit(struct engine *e, uint64_t b, struct index_loc *loc);
bool digest_says_zero(struct engine *e, uint64_t b);
struct job *digest_zero_job_locked(struct engine *e, uint64_t b, uint64_t lim);
bool local_hit(struct engine *e, uint64_t b);
struct job *local_job_locked(struct engine *e, uint64_t b);
int job_add_waiter_locked(struct job *j, struct pend *p);
void pend_waiting_locked(struct engine *e, struct pend *p);
void engine_expire_waiters(struct engine *e, uint64_t now);
void stripes_lock(struct engine *e, uint64_t first, uint64_t count);
void stripes_unlock(struct engine *e, uint64_t first, uint64_t count);
void inflight_free_all(struct engine *e);
bool cache_may_hold_data(const struct engine *e, uint64_t b);
void cache_data_mark(struct engine *e, uint64_t first, uint64_t count);
uint64_t land_zero_in_holes_locked(struct engine *e, uint64_t first, uint64_t count);

/* state.c */
void engine_set_state_locked(struct engine *e, enum engine_state st);
void engine_set_error(struct engine *e, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
void engine_check_complete(struct engine *e);
void engine_local_failure(struct engine *e, const char *what, uint64_t off, int err);

/* life.c: the source's companion exports, opened on threads of their own */
struct companion;
bool companion_finished(struct companion *o);
/* Nobody will join it: the thread closes what it opens and frees it (the
 * engine may be gone by then).  NULL is allowed. */
void companion_abandon(struct companion *o);
/* Waits for the opener (NULL: none could start); its source, or NULL with
 * why.  An export whose size is not expected is refused. */
struct source *companion_join(struct engine *e, struct companion *o, uint64_t expected,
                              char *why, size_t whylen);
/* On the tick: joins the digest export's opener once it is done (never
 * waits); what it opened becomes the copy's digests (life.c). */
void engine_digests_tick(struct engine *e);

/* copy.c */
int copy_init(struct engine *e);
void copy_free(struct engine *e);
void copy_tick(void *opaque, uint64_t now);
void copy_hint_locked(struct engine *e, uint64_t block);
void copy_digest_prefetch(struct engine *e, struct source *dsrc, uint64_t export_size);

/* Under lock: whether the copy waits for the source's digests (a digest
 * export, one still opening, or --digests file, not turned off after a
 * failure). */
static inline bool copy_digests_on(const struct engine *e)
{
  return (e->dsrc || e->dfile || e->dig_pending) && !e->copy.dig_off;
}

#endif
