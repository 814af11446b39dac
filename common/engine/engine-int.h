/* engine-int.h: internals shared by engine.c (block states, client
 * operations, lifecycle) and fetcher.c (the source side: libnbd
 * connections, fetch jobs, background copy).  Not for front ends.
 *
 * Lock order: engine.lock, then bitmap's internal locks.  engine.lock is
 * held while fetched data or a client write to a non-present block is
 * written to the cache, so "check not present, write, set present" is
 * atomic against the other side (I1). */
#ifndef XNBD_ENGINE_INT_H
#define XNBD_ENGINE_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include "engine.h"
#include "bitmap.h"
#include "file-backend.h"

struct fetch_job;

/* A client request waiting for fetches; resumed when pending reaches 0. */
struct pend {
  struct engine *e;
  struct xreq *r;
  unsigned pending;             /* jobs not yet finished */
  int err;                      /* first failure */
  uint64_t deadline_ns;         /* EIO after this if the source is gone */
  bool expired;                 /* already answered EIO; free when released */
  bool passthrough;             /* standby read: complete with the job data */
};

struct waiter {
  struct pend *p;
  struct waiter *next;
};

struct fetch_job {
  uint64_t first, count;        /* blocks */
  uint64_t off, len;            /* bytes (len shorter for the last block) */
  uint64_t owned;               /* blocks of the range this job fetches (the
                                 * rest were present, zero, when it began) */
  bool ondemand;
  bool submitted;
  bool passthrough;             /* standby: not kept, not in the in-flight table */
  void *buf;
  struct waiter *waiters;
  unsigned attempts;
  uint64_t submit_ns;
  int err;                      /* set by the libnbd completion */
  int conn;                     /* connection index while submitted */
  unsigned gen;                 /* that connection's generation then */
  struct engine *e;
  struct fetch_job *next;       /* queue / completed list link */
  struct fetch_job *cnext, *cprev;   /* connection's submitted list links */
};

/* block -> in-flight job (chained hash). */
struct hnode { uint64_t block; struct fetch_job *job; struct hnode *next; };
struct inflight_tab {
  struct hnode **b;
  size_t nbuckets, n;
};

struct engine {
  struct engine_config cfg;     /* strings below are owned copies */
  char *target, *target_export, *cache_path, *bitmap_path;
  uint64_t size;
  uint32_t bs;
  uint64_t nblocks;
  struct file_backend *fb;      /* the cache image */
  int cache_fd;
  struct bitmap *bm;
  atomic_uint_fast64_t sync_count;
  struct wan_tls *wan_tls;      /* client TLS context for xnbds:// */

  pthread_mutex_t lock;         /* protects everything below */
  struct inflight_tab inflight;
  struct fetch_job *od_head, *od_tail;   /* on-demand jobs to submit */
  struct fetch_job *retry_head;          /* failed jobs to resubmit */
  enum engine_state state;
  bool standby;
  bool bg_running, bg_paused;
  uint64_t bg_rate;
  uint64_t bg_cursor;           /* next block the background copy looks at */
  uint64_t bg_inflight_bytes;
  uint64_t bg_window;           /* current window (auto-sized unless set) */
  bool bg_window_auto;
  uint64_t rtt_ns;              /* smallest recent round trip to the source */
  uint64_t bs_known_until;      /* source block status known below (bytes) */
  bool source_has_status;
  uint64_t forced_missing;
  char last_error[512];
  char source_id[BITMAP_SOURCE_ID_MAX + 1];
  uint64_t ondemand_waiting;
  uint64_t blocks_inflight;
  struct pend **waiting;        /* every pend with a deadline (for expiry) */
  size_t nwaiting, waiting_cap;
  char *new_target;             /* reconnect request */

  /* Counters (under lock). */
  uint64_t bytes_fetched, bytes_zero_skipped, bytes_local_written;
  uint64_t bytes_bridged;       /* zero blocks read again inside larger jobs */
  /* Blocks found zero at the source by block status this run (one bit
   * each; NULL unless background jobs may bridge them, see bg_fill). */
  uint64_t *zero_known;
  bool bridge_zeros;            /* the current source compresses zeros away */
  uint64_t fetches_ondemand, fetches_background, fetch_errors;
  uint64_t fetch_rate;

  /* Fetcher thread. */
  pthread_t fetcher;
  bool fetcher_started;
  atomic_bool stopping;
  int wake_fd;                  /* eventfd: wakes the fetcher */
  struct fetcher *f;            /* fetcher-private state */
  void *probe_handle;           /* the start-up connection (struct nbd_handle),
                                 * adopted by the fetcher as connection 0 */

  /* Persister thread. */
  pthread_t persister;
  bool persister_started;
  pthread_cond_t persist_cond;
};

/* engine.c, called by the fetcher (without engine.lock held). */
void engine_job_finished(struct engine *e, struct fetch_job *j);
void engine_job_failed_final(struct engine *e, struct fetch_job *j, int err);
/* Marks [first, first+count) present as zeros where missing and not in
 * flight (source said they read as zero).  Returns blocks marked. */
uint64_t engine_mark_zero(struct engine *e, uint64_t first, uint64_t count);
void engine_check_complete(struct engine *e);
void engine_expire_waiters(struct engine *e, uint64_t now);
void engine_set_error(struct engine *e, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));

/* Under engine.lock: */
struct fetch_job *inflight_get(struct engine *e, uint64_t block);
struct fetch_job *job_new_locked(struct engine *e, uint64_t first,
                                 uint64_t count, bool ondemand);
void job_free(struct fetch_job *j);

int engine_sync_data_hook(void *opaque);   /* bitmap data-sync hook */

/* fetcher.c */
unsigned fetcher_connections_up(struct engine *e);
void fetcher_close_handle(void *h);   /* an nbd_handle never adopted */
int fetcher_start(struct engine *e, char *err, size_t errlen);
void fetcher_stop(struct engine *e);
void fetcher_wake(struct engine *e);
/* Connects once, synchronously, to learn size and identity. */
int source_probe(struct engine *e, const char *target, uint64_t *size,
                 char *id, size_t idlen, uint32_t *max_req,
                 char *err, size_t errlen);

#endif
