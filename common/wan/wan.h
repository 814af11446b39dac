/* wan.h: the WAN transport between xnbd-proxy and xnbd-server.
 *
 * On the WAN port, a connection starts with a transport handshake (not
 * NBD), then optionally TLS, then each direction is a zstd stream; inside
 * runs ordinary, unmodified NBD.  Nothing is added to NBD's option or
 * command number spaces.
 *
 *   client -> server: "XNBDWAN\0" u32 version (1) u32 flags u32 zstd level
 *   server -> client: "XNBDWAN\0" u32 version (1) u32 flags u32 status
 *     flags: WAN_F_ZSTD (compress both directions), WAN_F_TLS (a TLS
 *     handshake follows: client connects, server accepts; compression runs
 *     inside TLS, so data is compressed before it is encrypted).
 *     The server answers with the flags it accepted; status 0 = go on,
 *     else one of WAN_ST_* and the connection is closed.
 *     WAN_F_EARLY (client, without TLS): the client's stream (its NBD
 *     options, nego.h) follows the hello at once, framed as its flags ask,
 *     without waiting for the answer; a server that knows it answers with
 *     WAN_F_EARLY too and reads the client's direction as the client asked
 *     (its own direction is compressed only if it accepted WAN_F_ZSTD).
 *     This saves the round trip of the hello.  On a digest export's
 *     connection the options may end with one NBD read (the first
 *     digests), pipelined after GO and answered before libnbd's first
 *     request (nego.h, wan_early): a round trip less before them.
 *     WAN_F_PACED (client): this connection carries bulk reads (a
 *     background copy, digests), never a client's miss: the server paces
 *     what it writes by the queue on the path (pace.h) and answers with
 *     WAN_F_PACED; a server that does not know it leaves it out.
 *
 * Both ends run a pump thread between the WAN socket and a local
 * socketpair: the NBD server core, or libnbd in the proxy
 * (nbd_aio_connect_socket), sees a plain NBD socket.  All integers are
 * big-endian. */
#ifndef XNBD_WAN_H
#define XNBD_WAN_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>

#include "target.h"
#include "nego.h"

#define WAN_MAGIC "XNBDWAN"          /* 8 bytes with the NUL */
#define WAN_VERSION 1
#define WAN_F_ZSTD (1u << 0)
#define WAN_F_TLS  (1u << 1)
#define WAN_F_EARLY (1u << 2)
#define WAN_F_PACED (1u << 3)
#define WAN_ST_OK 0
#define WAN_ST_TLS_REQUIRED 1        /* server requires TLS, client did not ask */
#define WAN_ST_TLS_UNAVAILABLE 2     /* client asked for TLS, server has none */
#define WAN_DEFAULT_PORT TARGET_XNBD_PORT
/* Measured with zstd -b on the benchmark's mix of random, zero and text
 * blocks (one core): level 1 x1.79 at 595 MB/s, 3 x1.98 at 418 MB/s,
 * 4 x2.00 at 317 MB/s, 6 x2.01 at 132 MB/s.  3 is within 1% of the best
 * ratio and still compresses over 3 Gbit/s per core. */
#define WAN_DEFAULT_LEVEL 3

/* Bytes through WAN pumps.  wan_totals sums every pump of the process; a
 * client (an engine's source) can also have its own set, counted by the
 * pumps of its connections: made by wan_counters_new(), shared with each
 * pump it starts (a pump may outlive its connection's owner), freed when
 * the last holder calls wan_counters_put(). */
struct wan_counters {
  atomic_uint_fast64_t tx_raw, tx_wire;    /* sent: before / after compression */
  atomic_uint_fast64_t rx_wire, rx_raw;    /* received: on the wire / after */
  atomic_int refs;                         /* wan_counters_new() sets, not wan_totals */
};
extern struct wan_counters wan_totals;
struct wan_counters *wan_counters_new(void);
void wan_counters_put(struct wan_counters *c);

/* The smallest round trip a client handshake has seen (hello sent to
 * reply received), in ns; 0 before any.  A clean sample of the path's
 * delay, taken before any bulk data queues on it. */
uint64_t wan_handshake_rtt_ns(void);

struct wan_tls;                   /* OpenSSL context and settings */

/* TLS settings.  Certificates: a directory with ca-cert.pem, and
 * server-cert.pem + server-key.pem (server) or optionally client-cert.pem
 * + client-key.pem (client), as nbdkit and qemu lay them out.  PSK: a file
 * of "username:hexkey" lines (psktool's format). */
struct wan_tls_config {
  const char *cert_dir;
  const char *psk_file;
  const char *psk_username;       /* client: which identity (default: first) */
  bool verify_peer;               /* client: verify the server's certificate */
};
struct wan_tls *wan_tls_new(bool server, const struct wan_tls_config *cfg,
                            char *err, size_t errlen);
void wan_tls_free(struct wan_tls *t);
/* The OpenSSL SSL_CTX (for the NBD server core's STARTTLS). */
void *wan_tls_ssl_ctx(struct wan_tls *t);

/* Server side: wan_fd is an accepted WAN connection.  Returns the local
 * end of a socketpair to serve NBD on (the pump owns wan_fd), or -1.
 * tls: NULL if not configured; require_tls refuses clients without TLS.
 * allow_zstd: whether compression may be accepted. */
int wan_serve(int wan_fd, struct wan_tls *tls, bool require_tls,
              bool allow_zstd, unsigned handshake_timeout_s);

/* Client side: connects to host:port (non-blocking connect done by the
 * pump), handshakes with the given flags and zstd level, and returns the
 * local end of a socketpair carrying NBD, or -1 with a message in err.
 * nego: the NBD options the client on the socketpair will ask, sent ahead
 * right after the hello (nego.h; NULL: none; XNBD_WAN_PIPELINE=0 in the
 * environment turns it off). */
int wan_connect(const char *host, const char *port, unsigned flags,
                int level, struct wan_tls *tls, unsigned timeout_s,
                struct wan_counters *counters, const struct wan_nego_cfg *nego,
                char *err, size_t errlen);

/* Waits until every pump thread has finished (their peers see EOF once
 * the local ends are closed), at most timeout_ms; returns how many are
 * still running.  Called at exit so no TLS session is cut off. */
unsigned wan_wait_idle(unsigned timeout_ms);


#endif
