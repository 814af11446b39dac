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

struct wan_nego_cfg {
  const char *export_name;
  bool structured;              /* NBD_OPT_STRUCTURED_REPLY */
  bool base_alloc;              /* NBD_OPT_SET_META_CONTEXT base:allocation */
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

#endif
