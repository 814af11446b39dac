/* source.h: the source transport -- connections to the source NBD server,
 * below the engine.
 *
 * It reads bytes and asks block status for whoever calls it, and reports
 * back through the callbacks in each request.  It knows nothing of blocks,
 * bitmaps or copy policy.  What it does own: connecting (NBD URIs,
 * HOST:PORT, our xnbd:// WAN transport with zstd and TLS), keeping
 * connections alive (reconnect with backoff shared by all connections, a
 * connection that makes no progress is declared dead and replaced),
 * re-issuing the requests of a dead connection on another, checking every
 * reply (block status through extents.h), and measuring the round trip.
 *
 * Threads.  One thread of its own runs every libnbd call.  source_submit()
 * and the control calls may be called from any thread.  Callbacks (done,
 * extent, tick) run on the source thread, without any source lock held;
 * they may call source_submit().
 *
 * Ownership.  A struct source_req belongs to the caller, who keeps it (and
 * its buffer) alive until its done callback has run.  done runs exactly
 * once per submit, also when the source stops (error ESHUTDOWN). */
#ifndef XNBD_SOURCE_H
#define XNBD_SOURCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "extents.h"
#include "nego.h"                  /* struct wan_early_info */

struct source;
struct source_req;

enum source_kind { SOURCE_READ, SOURCE_STATUS };

struct source_req {
  /* Set by the caller before source_submit(). */
  enum source_kind kind;
  bool urgent;                 /* a client waits on it: reserved connection,
                                * ahead of everything else */
  uint64_t off, len;
  void *buf;                   /* READ: len bytes */
  /* STATUS: each checked run of the reply, in order (clipped to the
   * request; a reply may cover less than asked). */
  void (*extent)(struct source_req *r, const struct extent_run *run);
  /* Exactly once: err 0, or an errno (EIO: gave up after retries; EPROTO:
   * a reply broke the protocol; ESHUTDOWN: the source was stopped). */
  void (*done)(struct source_req *r, int err);
  void *opaque;

  /* Private to the source. */
  struct source *src;
  int err;
  unsigned attempts;
  int conn;
  unsigned gen;
  uint64_t sent_ns, replied_ns; /* when it was last sent, and its reply came */
  uint64_t probe_ns;           /* sent alone on connection 0, small: its
                                * round trip is a probe's (0: not) */
  struct source_req *next, *cnext, *cprev;
};

struct source_config {
  const char *target;          /* nbd://, nbds://, nbd+unix://, xnbd://,
                                * xnbds:// URI, or HOST:PORT */
  const char *export_name;     /* for HOST:PORT ("") */
  unsigned connections;        /* 1..16; connection 0 is kept for urgent
                                * requests when there are several */
  unsigned timeout_s;          /* connect timeout; a connection with
                                * requests out and no reply for a third of
                                * it (at least 2 s) is declared dead */
  int compress_level;          /* xnbd://: zstd level; <0: off; 0: default */
  const char *tls_certificates, *tls_psk, *tls_username;
  bool tls_verify;
  /* A companion export: its name is the target's export name followed by
   * this (e.g. the digest export, dedup/digest.h); NULL: the export itself.
   * Such a source publishes no identity; the caller checks its size
   * (source_info.size). */
  const char *export_suffix;
  /* With export_suffix over xnbd://: bytes at offset 0 of the export read
   * along with the handshake (wan_early, nego.h), a round trip before the
   * first request could be; taken with source_early_take.  0: none. */
  uint32_t early_read;
  /* With cancellable: source_open gives up (ECANCELED) as soon as
   * cancel_fd is readable (an eventfd written by whoever abandons the
   * open), closing what it opened at once. */
  bool cancellable;
  int cancel_fd;
  /* Called on the source thread at every turn of its loop (at least every
   * 100 ms) while the source runs: the engine's copy policy lives there. */
  void (*tick)(void *opaque, uint64_t now_ns);
  void *opaque;
};

/* What the start-up connection found. */
struct source_info {
  uint64_t size;
  uint32_t max_request;        /* largest read the source takes (0: unknown) */
  bool has_status;             /* base:allocation offered */
  bool zeros_cheap;            /* zeros cost next to nothing on the wire */
  char id[1025];               /* identity of the export (identity.h; recorded
                                * in the bitmap) */
};

/* Connects once, synchronously (up to timeout_s), to learn the export's
 * size and identity; that connection is kept as connection 0.  Returns
 * NULL with a message (cause and fix) in err. */
struct source *source_open(const struct source_config *cfg, struct source_info *info,
                           char *err, size_t errlen);
/* Starts the source thread. */
int source_start(struct source *s, char *err, size_t errlen);
/* Stops the thread (every request still held completes with ESHUTDOWN)
 * and closes every connection.  Safe from a callback: the thread then
 * stops after the callback returns.  Idempotent. */
void source_stop(struct source *s);
/* Stops and frees. */
void source_close(struct source *s);
/* The early read (source_config.early_read) once it is in, after
 * source_open: its bytes (malloc'd, now the caller's; *len of them) and
 * when it was sent, its reply began and ended, with the link bytes in
 * between (wan_early_info, nego.h); NULL if it was not asked, not
 * answered, refused, or taken already. */
void *source_early_take(struct source *s, uint64_t *len, struct wan_early_info *info);

void source_submit(struct source *s, struct source_req *r);
/* Use another address of the same source (size checked on connect). */
int source_retarget(struct source *s, const char *target, char *err, size_t errlen);
/* Measure the round trip with tiny requests on the idle urgent connection. */
void source_set_probing(struct source *s, bool on);
void source_wake(struct source *s);
/* A descriptor that wakes the source's thread when 8 bytes (a uint64_t 1)
 * are written to it, for another thread that may outlive s (it stays
 * valid until closed, whatever happens to s); -1 with errno on failure. */
int source_wake_fd_dup(struct source *s);

struct source_stats {
  unsigned connections, connections_up;
  uint64_t rtt_ns;             /* smallest recent round trip (0: unknown) */
  uint64_t reconnects, dead_stalled, protocol_errors;
  bool zeros_cheap;
  /* xnbd:// transport bytes of this source's connections, both ways,
   * before (raw) and after zstd. */
  uint64_t wire_tx_raw, wire_tx, wire_rx, wire_rx_raw;
  char target[512];
  char last_error[512];
};
void source_get_stats(struct source *s, struct source_stats *st);
/* What the copy policy needs at every turn, without locks or copies. */
struct source_brief {
  unsigned up;                  /* connections up */
  uint64_t rtt_ns;              /* smallest recent round trip (0: unknown) */
  uint64_t rtt_last_ns;         /* the latest sample: rtt_ns + the path's queue */
  bool zeros_cheap;
  uint64_t wire_rx, wire_rx_raw;   /* WAN transport bytes received: on the wire, after zstd */
};
void source_brief(struct source *s, struct source_brief *b);

#endif
