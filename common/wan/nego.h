/* nego.h: the NBD handshake of an xnbd:// connection, sent ahead.
 *
 * libnbd negotiates one option at a time: structured replies, the meta
 * context, GO -- three round trips after the greeting, each a full WAN
 * round trip.  The client's WAN pump knows what the proxy will ask (the
 * export, whether it wants structured replies and base:allocation), so it
 * sends the client flags and those options at once, right after the WAN
 * hello, and answers libnbd's options with the server's replies as they
 * arrive: the handshake then costs the one round trip of the hello.  NBD
 * itself is unchanged: the server sees an ordinary client that sent its
 * options without waiting (pipelined).
 *
 * libnbd's options are checked against what was sent (same option, same
 * export name, same contexts; an option sent ahead that libnbd skips is
 * dropped with its answer); anything else -- another option, a different
 * name, malformed bytes -- fails the connection with a message (nego_error).
 * Once libnbd has its answer to GO, the pump passes bytes through.
 *
 * Pure state machine, no I/O: the pump feeds it and drains it. */
#ifndef XNBD_NEGO_H
#define XNBD_NEGO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdatomic.h>

/* An early read: one NBD_CMD_READ sent right after GO, with the options,
 * so that its answer comes a round trip before libnbd could ask it (the
 * first chunk of a digest export, which a seeded copy waits on).  Only on
 * a connection without structured replies.  Its simple reply is taken by
 * the pump, never shown to libnbd; GO's answer reaches libnbd only once
 * that reply is in, so libnbd's requests never cross it (the server may
 * answer out of order).  A GO that fails, or an error reply, leaves it
 * FAILED: the owner then asks as usual.
 *
 * Shared by the owner and the pump (reference counted): the pump fills
 * buf, then sets done_ns and state (release); the owner reads state
 * (acquire) and, if DONE, may take buf (wan_early_take). */
enum { WAN_EARLY_ASKED, WAN_EARLY_DONE, WAN_EARLY_FAILED };
#define WAN_EARLY_MAX (512u << 10)    /* the largest early read (bytes) */

struct wan_early {
  uint64_t off;
  uint32_t len;
  uint8_t *buf;                 /* len bytes */
  uint64_t sent_ns, done_ns;    /* now_ns() when it left, and when it was in */
  uint64_t first_ns;            /* when the first bytes of its reply came */
  uint64_t wire;                /* link bytes that came from then to done (the
                                 * reply crosses as one burst: they over
                                 * done - first tell the link's rate) */
  _Atomic int state;
  _Atomic int refs;
};

/* off, len: the read (len >= 1).  One reference, the caller's.  NULL when
 * out of memory. */
struct wan_early *wan_early_new(uint64_t off, uint32_t len);
void wan_early_put(struct wan_early *x);
/* DONE: the data (malloc'd, now the caller's; len bytes) and the times
 * (first_ns is done_ns when the reply came in one read); else NULL. */
struct wan_early_info { uint64_t sent_ns, first_ns, done_ns, wire; };
uint8_t *wan_early_take(struct wan_early *x, struct wan_early_info *info);

struct wan_nego_cfg {
  const char *export_name;
  bool structured;              /* NBD_OPT_STRUCTURED_REPLY */
  bool base_alloc;              /* NBD_OPT_SET_META_CONTEXT base:allocation */
  struct wan_early *early;      /* NULL: none (ignored with structured) */
};

struct nego;

struct nego *nego_new(const struct wan_nego_cfg *cfg);
void nego_free(struct nego *n);
/* The bytes to send the server first: client flags and the options. */
const uint8_t *nego_preamble(struct nego *n, size_t *len);
/* Bytes libnbd wrote.  *taken: how many of them belong to the handshake
 * (the rest, once libnbd has its answer to GO, is transmission and goes
 * to the server as is).  -1: a mismatch (nego_error). */
int nego_from_local(struct nego *n, const uint8_t *buf, size_t len, size_t *taken);
/* Bytes the server sent, all taken until the handshake is over (bytes
 * after GO's answer are handed on in order).  -1: malformed. */
int nego_from_server(struct nego *n, const uint8_t *buf, size_t len);
/* Bytes for libnbd now (may be none). */
const uint8_t *nego_to_local(struct nego *n, size_t *len);
void nego_delivered(struct nego *n, size_t len);
/* True once GO's answer and everything after it went to libnbd: from then
 * on the pump passes bytes through and may free n. */
bool nego_over(const struct nego *n);
/* True once the server has answered every option sent ahead. */
bool nego_server_done(const struct nego *n);
const char *nego_error(const struct nego *n);
/* The early read once its answer is known (DONE or FAILED, the data in
 * its buffer), returned once: the pump stamps done_ns and publishes the
 * state.  NULL before, after, or with none. */
struct wan_early *nego_early_resolved(struct nego *n, bool *ok);
/* The early read, if any (for the pump to stamp sent_ns). */
struct wan_early *nego_early(const struct nego *n);
/* Whether bytes of the early read's reply have come and it is not in yet
 * (for the pump to stamp first_ns). */
bool nego_early_receiving(const struct nego *n);

#endif
